"""The one vocabulary of dtype names, for every command that takes `--dtype`.

Names are PyTorch's (`float32`, `bfloat16`, `float16`) plus the storage formats the memory arithmetic knows
(`float8`, `int8`, `int4`); the short forms people type (`fp32`, `bf16`, `fp16`, `fp8`) mean the same.
Running a model takes only the first three (`torch_dtype`); counting bytes takes all (`dtype_bytes`).
"""

from __future__ import annotations

import torch

BYTES: dict[str, float] = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1, "int4": 0.5}
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8"}
RUN_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")  # what weights can be loaded and run in
NAMES: tuple[str, ...] = (*BYTES, *ALIASES)  # every accepted spelling, for argparse `choices`


def canonical_dtype(name: str) -> str:
    """`bf16` -> `bfloat16`; an unknown name is refused with the accepted ones."""
    canonical = ALIASES.get(name, name)
    if canonical not in BYTES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(NAMES)}")
    return canonical


def dtype_bytes(name: str) -> float:
    """Bytes per element (int4: 0.5)."""
    return BYTES[canonical_dtype(name)]


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype to load weights in; None keeps them as saved."""
    if name is None:
        return None
    canonical = canonical_dtype(name)
    if canonical not in RUN_DTYPES:
        raise ValueError(f"a model runs in {', '.join(RUN_DTYPES)}; {name!r} is a storage format for the memory "
                         "arithmetic only (kopru explain / kopru budget)")
    return getattr(torch, canonical)
