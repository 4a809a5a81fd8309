"""Lazy, failure-tolerant loading of the native extension `halodiff._C`.

Importing halodiff never fails because the extension is missing: ops fall back to other backends
and `halodiff info` reports the reason recorded here.
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
    path: str = ""


@functools.cache
def native() -> NativeState:
    """Import `halodiff._C` once (which registers the `torch.ops.halodiff.*` schemas and kernels)."""
    try:
        import torch  # noqa: F401  (the extension links libtorch)

        from . import _C  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, or an OSError/undefined symbol from an ABI mismatch
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ImportError) and "_C" in str(exc):
            reason = "halodiff._C is not built (pip install --no-build-isolation . builds it)"
        return NativeState(loaded=False, error=reason)
    info = _C.build_info()
    from .ops import _fake

    _fake.register_fakes()

    return NativeState(
        loaded=True,
        cuda=bool(info.get("cuda")),
        cuda_archs=str(info.get("cuda_archs", "")),
        path=getattr(_C, "__file__", ""),
    )
