"""One interface for every cache method: `enable_cache(pipe, config)` / `disable_cache(pipe)`.

A method is a config dataclass (subclass of `CacheConfig`) and one module that registers an installer for it
(`register`). The installer puts its overrides on the pipeline's predicting denoiser through the runtime
(`halodiff.runtime`), subscribes to the denoising clock, and returns its run state (a `CacheRun`). One cache per
pipeline; it combines with patch parallelism in either order. Decisions that depend on data (skip or compute)
are agreed across ranks through `Runtime.reduce_sum`, never by looking another feature up by name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import PatchError
from ..runtime import lookup, uninstall, unwrap

FEATURE = "cache"


class CacheConfig:
    """Base of the cache methods' config dataclasses (`DeepCacheConfig`, `FirstBlockCacheConfig`)."""

    method: str = ""


class CacheRun:
    """Base of a method's run state: `config`, and `kinds` ("full" / "partial" / "skip" ... per predicting call
    of the current generation, for tests and benchmarks)."""

    config: CacheConfig
    kinds: list[str]


@dataclass(frozen=True)
class CacheMethod:
    name: str
    config: type
    install: Callable[[Any, Any, Any], None]  # (pipe, config, scheduler) -> installs under FEATURE


_METHODS: dict[type, CacheMethod] = {}


def register(name: str, config: type, install: Callable[[Any, Any, Any], None]) -> None:
    _METHODS[config] = CacheMethod(name, config, install)


def methods() -> list[str]:
    return [m.name for m in _METHODS.values()]


def _owner(pipe: Any) -> Any | None:
    """`pipe`, or the module a torch.compile wrapper holds, whichever the cache is registered under."""
    for owner in (pipe, unwrap(pipe)) if isinstance(pipe, nn.Module) else (pipe,):
        if lookup(owner, FEATURE) is not None:
            return owner
    return None


def enable_cache(pipe: Any, config: CacheConfig, *, scheduler: Any = None) -> None:
    """Enable the cache method `config` selects (`DeepCacheConfig`, `FirstBlockCacheConfig`) on a pipeline or a
    bare model (then pass `scheduler=` so generations and step counts are known). Undo with `disable_cache`."""
    method = _METHODS.get(type(config))
    if method is None:
        raise TypeError(f"halodiff.enable_cache: config must be one of {', '.join(c.__name__ for c in _METHODS)}, "
                        f"got {type(config).__name__}")
    owner = _owner(pipe)
    if owner is not None:
        raise PatchError(f"{method.name}: a cache ({lookup(owner, FEATURE)[1].config.method}) is already enabled on "
                         "this pipeline; call halodiff.disable_cache first")
    method.install(pipe, config, scheduler)


def cache_run(pipe: Any, method: str | None = None, detail: str = "") -> CacheRun:
    """The run state of the cache enabled on `pipe` (of `method`, if given)."""
    owner = _owner(pipe)
    run = lookup(owner, FEATURE)[1] if owner is not None else None
    if run is None or (method is not None and run.config.method != method):
        raise PatchError(f"{method or 'halodiff'}: not enabled on this pipeline{detail}")
    return run


def disable_cache(pipe: Any, method: str | None = None) -> None:
    """Undo `enable_cache` exactly: original forwards, hooks removed, scheduler restored."""
    cache_run(pipe, method, " (nothing to disable)")
    uninstall(_owner(pipe), FEATURE)
