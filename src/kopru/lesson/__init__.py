"""The lesson's tooling, apart from the library: `kopru compare` (compare, report, scale, significance),
`kopru demo` (demo), the tiny backbones tests and exercises build (tiny) and the built-in pretrained ones
(`kopru pretrain-tiny`: pretrain_tiny, whose shipped result `default_backbones` the training loop falls back to).

Nothing is imported here, so that one module of the lesson loads without the others."""
