"""Run a command as it would compute on another CPU: `python scripts/cpu_profile.py PROFILE COMMAND ...`.

Floating-point results differ in their last bits between CPUs, because torch picks its kernels by what the CPU
offers: ATen's own vectorised kernels (`ATEN_CPU_CAPABILITY`), MKL's BLAS (`MKL_ENABLE_INSTRUCTIONS`) and
oneDNN's (`ONEDNN_MAX_CPU_ISA`) each dispatch on their own. Capping all three makes an AVX512 machine compute
what an AVX2-only machine computes (this reproduced, to the last digit, a loss that a user's AMD EPYC with AVX2
reported) or what generic kernels compute. A cap above what the CPU has changes nothing.

Tests of trained figures run under these profiles: `make test` runs them again under `generic`, and
`scripts/trained_spread.py` measures their spread under all three.
"""

from __future__ import annotations

import os
import sys

PROFILES: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def profile_environment(name: str) -> dict[str, str]:
    """os.environ with `name`'s caps set (and any cap from the calling environment replaced)."""
    if name not in PROFILES:
        raise SystemExit(f"unknown CPU profile {name!r}: expected one of {', '.join(PROFILES)}")
    caps = {key for profile in PROFILES.values() for key in profile}
    return {**{k: v for k, v in os.environ.items() if k not in caps}, **PROFILES[name]}


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(f"usage: python scripts/cpu_profile.py {{{','.join(PROFILES)}}} COMMAND [ARG ...]")
    environment = profile_environment(argv[0])
    os.execvpe(argv[1], argv[1:], environment)


if __name__ == "__main__":
    main(sys.argv[1:])
