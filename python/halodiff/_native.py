"""Lazy, failure-tolerant loading of the native extensions.

`halodiff._C` holds the op schemas and the CPU kernels; `halodiff._C_cuda` the CUDA kernels (built only where
CUDA can be built: `SKIP_CUDA_BUILD=1` and `make demo` on a machine without a GPU skip it). Importing halodiff
never fails because either is missing: ops fall back to other backends and `halodiff info` reports the
reasons recorded here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class NativeState:
    loaded: bool
    cuda: bool = False
    cuda_archs: str = ""
    error: str = ""
    path: str = ""  # halodiff._C
    cuda_path: str = ""  # halodiff._C_cuda
    cuda_error: str = ""


def _reason(exc: Exception, module: str, fix: str) -> str:
    if isinstance(exc, ImportError) and module in str(exc):
        return f"halodiff.{module} is not built ({fix})"
    return f"{type(exc).__name__}: {exc}"  # e.g. an OSError / undefined symbol from an ABI mismatch


@functools.cache
def native() -> NativeState:
    """Import `halodiff._C` (the `torch.ops.halodiff.*` schemas and CPU kernels) and `halodiff._C_cuda` once."""
    try:
        import torch  # noqa: F401  (the extensions link libtorch)

        from . import _C  # type: ignore[attr-defined]
    except Exception as exc:
        return NativeState(loaded=False, error=_reason(exc, "_C", "pip install --no-build-isolation . builds it"))
    from .ops import _fake

    _fake.register_fakes()
    try:
        from . import _C_cuda  # type: ignore[attr-defined]
    except Exception as exc:
        return NativeState(loaded=True, path=getattr(_C, "__file__", ""), cuda_error=_reason(
            exc, "_C_cuda", "a CPU-only build: SKIP_CUDA_BUILD=1, `make demo` without a GPU, a CPU-only torch or no "
            "CUDA toolkit; `make build-cuda` builds it"))
    info = _C_cuda.build_info()
    return NativeState(loaded=True, cuda=bool(info.get("cuda")), cuda_archs=str(info.get("cuda_archs", "")),
                       path=getattr(_C, "__file__", ""), cuda_path=getattr(_C_cuda, "__file__", ""))
