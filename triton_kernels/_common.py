"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a kernel should see: the Triton interpreter mis-handles bf16, so it gets fp32 there."""
    return torch.float32 if (interpreting() and t.dtype == torch.bfloat16) else t.dtype


def prepare(t: torch.Tensor) -> torch.Tensor:
    """Contiguous tensor in the kernel dtype (the kernels index raw storage)."""
    return t.to(kernel_dtype(t)).contiguous()
