"""Backend registry and dispatch (xformers style).

Each op has implementations per backend. A backend declares why it cannot run given inputs
(`not_supported_reasons`); dispatch picks the first backend with no reasons, in the order
cuda → triton → cpu → reference. `HALODIFF_BACKEND=<name>` or `use_backend(name)` forces one and
raises `BackendUnavailableError` (a ValueError) listing the reasons when it cannot run the inputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .._native import native
from ..errors import BackendUnavailableError

BACKEND_ORDER = ("cuda", "triton", "cpu", "reference")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("halodiff_backend", default=None)


@functools.cache
def _triton_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401

        from .. import triton_kernels  # noqa: F401  (halodiff.triton_kernels)
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton failed to import: {type(exc).__name__}: {exc}"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_reasons(name: str) -> list[str]:
    """Reasons a backend cannot run at all in this process (independent of inputs)."""
    if name == "reference":
        return []
    if name == "triton":
        reason = _triton_reason()
        if reason:
            return [reason]
        if not torch.cuda.is_available() and not triton_interpreting():
            return ["no CUDA device, and TRITON_INTERPRET=1 is not set (Triton runs CPU tensors only in its interpreter)"]
        return []
    state = native()
    if not state.loaded:
        return [state.error]
    if name == "cuda":
        reasons = []
        if not state.cuda:
            reasons.append(state.cuda_error or "halodiff._C_cuda holds no CUDA kernels")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device available" if torch.version.cuda else "torch is built without CUDA")
        return reasons
    return []


def device_reasons(name: str, device: torch.device, forced: bool = False) -> list[str]:
    """Reasons a backend cannot run tensors on `device` (`forced`: the user asked for this backend)."""
    if name == "cuda" and device.type != "cuda":
        return [f"inputs are on {device.type}, the CUDA kernels need CUDA tensors"]
    if name == "cpu" and device.type != "cpu":
        return [f"inputs are on {device.type}, the native CPU kernels need CPU tensors"]
    if name == "triton":
        if device.type == "cpu" and not triton_interpreting():
            return ["inputs are on cpu; Triton runs CPU tensors only under TRITON_INTERPRET=1"]
        if device.type == "cpu" and not forced:
            return ["inputs are on cpu: the Triton interpreter is used only when forced (use_backend('triton'))"]
        if device.type not in ("cpu", "cuda"):
            return [f"inputs are on {device.type}"]
    return []


@torch.compiler.assume_constant_result
def forced_backend() -> str | None:
    """The backend forced by use_backend() or HALODIFF_BACKEND (a trace-time constant under torch.compile)."""
    name = _forced.get() or os.environ.get("HALODIFF_BACKEND") or None
    if name is not None and name not in BACKEND_ORDER:
        raise BackendUnavailableError(f"unknown halodiff backend {name!r}; choose one of {', '.join(BACKEND_ORDER)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for ops called inside the block (None = automatic choice)."""
    if name is not None and name not in BACKEND_ORDER:
        raise BackendUnavailableError(f"unknown halodiff backend {name!r}; choose one of {', '.join(BACKEND_ORDER)}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


@functools.lru_cache(maxsize=None)
def _cached_static_reasons(backend: str, device_type: str, forced: bool, interpreting: bool) -> tuple[str, ...]:
    return tuple(backend_reasons(backend) or device_reasons(backend, torch.device(device_type), forced))


@torch.compiler.assume_constant_result
def _static_reasons(backend: str, device_type: str, forced: bool) -> tuple[str, ...]:
    """Input-independent reasons (environment + device); a trace-time constant under torch.compile.
    Cached: dispatch runs on every op call of the patched layers."""
    return _cached_static_reasons(backend, device_type, forced, triton_interpreting())


@dataclass
class Op:
    """One op: implementations per backend plus optional per-backend input checks."""

    name: str
    impls: dict[str, Callable] = field(default_factory=dict)
    checks: dict[str, Callable[..., list[str]]] = field(default_factory=dict)

    def reasons(self, backend: str, device: torch.device, *args, forced: bool = False, **kwargs) -> list[str]:
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        reasons = list(_static_reasons(backend, device.type, forced))
        if not reasons and backend in self.checks and (args or kwargs):
            reasons = self.checks[backend](*args, **kwargs)
        return reasons

    def select(self, device: torch.device, *args, **kwargs) -> str:
        forced = forced_backend()
        if forced is not None:
            reasons = self.reasons(forced, device, *args, forced=True, **kwargs)
            if reasons:
                raise BackendUnavailableError(
                    f"halodiff backend {forced!r} cannot run {self.name} here: {'; '.join(reasons)}. "
                    "Unset HALODIFF_BACKEND / use_backend(None) for automatic choice."
                )
            return forced
        for backend in BACKEND_ORDER:
            if not self.reasons(backend, device, *args, **kwargs):
                return backend
        raise BackendUnavailableError(f"no halodiff backend can run {self.name}")  # pragma: no cover

    def __call__(self, device: torch.device, *args, **kwargs):
        return self.impls[self.select(device, *args, **kwargs)](*args, **kwargs)


OPS: dict[str, Op] = {}


def register(name: str, backend: str, check: Callable[..., list[str]] | None = None):
    """Decorator: register `fn` as `backend`'s implementation of op `name`."""

    def deco(fn: Callable) -> Callable:
        op = OPS.setdefault(name, Op(name))
        op.impls[backend] = fn
        if check is not None:
            op.checks[backend] = check
        return fn

    return deco


def report(device: str | torch.device | None = None) -> dict[str, dict[str, list[str]]]:
    """For every op and backend, the reasons it cannot run on `device` (default: cuda if present, else cpu)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return {
        name: {b: op.reasons(b, dev) if b in op.impls else ["not implemented for this op"] for b in BACKEND_ORDER}
        for name, op in OPS.items()
    }


class Binding:
    """Ops bound to a backend once: `binding(name, device, key, *args)` selects the backend (with every input
    check) on the first call per (op, key, forced backend) and afterwards calls that implementation directly,
    without argument validation, backend loops or environment reads. For callers whose arguments are correct
    by construction and the same on every step (the patch-parallel engine's hot path); `key` must capture
    what the checks depend on (device, dtype, ...). HALODIFF_BACKEND is read when the binding is created."""

    def __init__(self) -> None:
        self._impls: dict[tuple, Callable] = {}
        self._env = os.environ.get("HALODIFF_BACKEND") or None

    def __call__(self, name: str, device: torch.device, key: tuple, *args):
        k = (name, key, _forced.get() or self._env)
        impl = self._impls.get(k)
        if impl is None:
            op = OPS[name]
            impl = self._impls[k] = op.impls[op.select(device, *args)]
        return impl(*args)
