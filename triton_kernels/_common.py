"""Helpers shared by the Triton launchers: interpreter handling, device guard, the one launch point."""
from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import torch
from torch.library import wrap_triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a kernel should see: the Triton interpreter mis-handles bf16, so it gets fp32 there."""
    return torch.float32 if (interpreting() and t.dtype == torch.bfloat16) else t.dtype


def prepare(t: torch.Tensor) -> torch.Tensor:
    """Contiguous tensor in the kernel dtype (the kernels index raw storage); no copy when it already is."""
    return t.to(kernel_dtype(t)).contiguous()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU (a rank with tensors on cuda:N and no set_device would otherwise launch on cuda:0)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for the CPU interpreter): sizes split grids."""
    return _sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 1


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """Every Triton launch of halodiff goes through here (wrap_triton, so torch.compile sees each kernel)."""
    wrap_triton(kernel)[grid](*args, **kwargs)


def split_f64(v: float) -> tuple[float, float]:
    """(hi, lo) float32 parts of a float64 (Triton passes Python floats as fp32): hi + lo in float64 in-kernel
    recovers v to ~2^-48 relative (counts up to 2^48 exactly)."""
    hi = float(np.float32(v))
    return hi, float(v) - hi


def pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
