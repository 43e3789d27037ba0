"""The lesson's tooling, apart from the library: `kopru compare` (compare, jobs, measure, report, scale, significance),
`kopru demo` (demo), the tiny backbones tests and exercises build (tiny) and the built-in pretrained ones
(`kopru pretrain-tiny`: pretrain_tiny; the library finds their shipped copy through `kopru.backbones`).

Nothing is imported here, so that one module of the lesson loads without the others."""
