"""`halodiff info`: versions, native build state, optional packages and per-op backend availability."""
from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from . import _optional
from ._native import native
from .cache import methods
from .ops import BACKEND_ORDER, report
from .specs import supported


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict[str, Any]:
    state = native()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "halodiff": _version("halodiff"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers") if _optional.available("diffusers") else None,
        "optional": _optional.report(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native": {
            "loaded": state.loaded,
            "cuda_kernels": state.cuda,
            "cuda_archs": state.cuda_archs,
            "cuda_path": state.cuda_path,
            "cuda_error": state.cuda_error,
            "path": state.path,
            "error": state.error,
        },
        "device": device,
        "model_families": supported(),
        "cache_methods": methods(),
        "backend_order": list(BACKEND_ORDER),
        "ops": report(device),
    }


def _optional_lines(optional: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, p in optional.items():
        state = (p["version"] or "found") if p["available"] else f"not installed (pip install {p['pip']})"
        lines.append(f"  {name:<12} {state}; for {'; '.join(p['needed_by'])}")
    return lines


def format_text(info: dict[str, Any]) -> str:
    n = info["native"]
    lines = [
        f"halodiff {info['halodiff']}  python {info['python']}",
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})  triton {info['triton'] or 'not installed'}  "
        f"diffusers {info['diffusers'] or 'not installed'}",
        f"GPU: {info['gpu'] or 'none'}",
        "native CPU ops halodiff._C: " + (f"loaded {n['path']}" if n["loaded"] else f"not loaded: {n['error']}"),
        "native CUDA ops halodiff._C_cuda: "
        + (f"loaded, archs {n['cuda_archs']} {n['cuda_path']}" if n["cuda_kernels"] else
           f"not loaded: {n['cuda_error'] or n['error']}"),
        "optional packages (import halodiff, the ops, patch and caches need only torch, numpy, tqdm):",
        *_optional_lines(info.get("optional", {})),
        "model families (patch / caches): " + "; ".join(f"{fam}: {', '.join(names)}"
                                                         for fam, names in info["model_families"].items()),
        "cache methods: " + ", ".join(info["cache_methods"]),
        f"backends per op for {info['device']} tensors (tried in order {' -> '.join(info['backend_order'])}):",
    ]
    for op, backends in info["ops"].items():
        lines.append(f"  {op}")
        for name, reasons in backends.items():
            lines.append(f"    {name:<10} {'ok' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    return "\n".join(lines)
