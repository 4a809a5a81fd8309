"""Helpers for the kernel tests: record the aten ops a launcher runs, reach the Triton kernel modules."""
from __future__ import annotations

import importlib

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    """Records the name (without overload) of every aten op run while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def triton_module(name: str):
    """halodiff.triton_kernels.<name> (the package attribute of that name is the launcher function)."""
    return importlib.import_module(f"halodiff.triton_kernels.{name}")
