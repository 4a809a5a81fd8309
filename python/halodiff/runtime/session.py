"""The per-pipeline runtime every feature attaches to: one clock, one hook per denoiser, one way to agree.

A feature (patch parallelism, a cache, a stream) attaches a `Subscriber` to a pipeline. The first attach
installs the runtime: a wrapper of `scheduler.set_timesteps` (generation starts), a wrapper of each denoiser's
`cache_context` (diffusers' name for the call within a step, e.g. "cond" / "uncond") and, on every denoiser, one
forward pre-hook that ticks the clock and calls each subscriber's `before`, and one forward hook that calls
their `after` (newest first). The last detach removes it. Shape-only calls on the meta device (a feature
measuring layer shapes) reach no subscriber.

Decisions that every rank sharing the work must take alike (a data-dependent cache skip) go through one call,
`Runtime.reduce_sum`: a sum over every rank of the patch (both CFG halves), or the value itself unpatched.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PatchError
from . import hooks
from .adapters import Denoiser, denoisers, scheduler_source, unwrap
from .clock import Clock, Step

FEATURE = "runtime"


@dataclass
class Subscriber:
    """A feature's per-call callbacks. `before` may return new (args, kwargs); `after` a new output;
    `kind` says which kind of step the call is for this feature (e.g. DeepCache full / partial): features
    that specialise per step kind (CUDA graphs) key on it. `capturable`: False when the feature decides from data
    inside a step (a whole step then cannot be one captured CUDA graph)."""

    name: str
    before: Callable[[Denoiser, Step, tuple, dict], tuple[tuple, dict] | None] | None = None
    after: Callable[[Denoiser, Step, Any], Any] | None = None
    kind: Callable[[], Any] | None = None
    capturable: bool = True


class Runtime:
    """Clock, denoisers and subscribers of one pipeline (or bare denoiser)."""

    def __init__(self, pipe: Any, scheduler: Any = None):
        self.denoisers = denoisers(pipe)
        self.clock = Clock(scheduler_source(pipe, scheduler))
        self.subscribers: list[Subscriber] = []
        self.steps: dict[str, Step] = {}  # the step of each denoiser call in flight
        self.contexts: dict[str, str | None] = {}  # per denoiser: the cache_context name of the current call
        self.group: dist.ProcessGroup | None = None  # every rank sharing the work (set by patch), for reduce_sum
        self.static_buffers = False  # features keep step outputs at fixed addresses (set for CUDA graphs)

    # ----------------------------------------------------------------------------------- features' API
    def on_generation(self, fn: Callable[[Any], None]) -> Callable[[], None]:
        """Call `fn(generation)` at every declared generation start; returns the function that removes it."""
        self.clock.listeners.append(fn)
        return lambda: self.clock.listeners.remove(fn) if fn in self.clock.listeners else None

    def stream_call(self) -> None:
        """The next denoiser call holds one timestep per sample (a stream batch)."""
        self.clock.stream_call()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over every rank sharing this pipeline's work (in place; `t` itself without a patch). The one
        place where features agree on data-dependent decisions: every rank sees the same sum, so all take the
        same branch. Costs one small all-reduce (NCCL: on the device; reading the result is a host sync)."""
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t

    def step_kinds(self) -> tuple:
        """The kind of the current call for every feature that reports one."""
        return tuple((s.name, s.kind()) for s in self.subscribers if s.kind is not None)

    def denoiser(self, tag: str) -> Denoiser:
        for d in self.denoisers:
            if d.tag == tag:
                return d
        raise KeyError(tag)

    def _install(self, inst: hooks.Installation, scheduler: Any) -> None:
        if scheduler is not None and callable(getattr(scheduler, "set_timesteps", None)):
            inst.override(scheduler, "set_timesteps", self.clock.wrap_set_timesteps)
        for d in self.denoisers:
            inst.pre_hook(d.module, self._pre(d), prepend=True)
            inst.post_hook(d.module, self._post(d))
            if callable(getattr(d.module, "cache_context", None)):
                inst.override(d.module, "cache_context", lambda inner, d=d: self._cache_context(d, inner))

    def _cache_context(self, d: Denoiser, inner: Callable) -> Callable:
        """diffusers' `model.cache_context(name)`, also telling the clock which call of the step runs."""

        @contextlib.contextmanager
        def cache_context(name, *args, **kwargs):
            previous = self.contexts.get(d.tag)
            self.contexts[d.tag] = name
            try:
                with inner(name, *args, **kwargs):
                    yield
            finally:
                self.contexts[d.tag] = previous

        return cache_context

    def _pre(self, d: Denoiser):
        @torch.compiler.disable
        def pre(module, args, kwargs):
            sample = d.sample(args, kwargs)
            if sample is None or sample.device.type == "meta" or not self.subscribers:
                return None
            step = self.clock.tick(d.tag, d.timestep(args, kwargs), self.contexts.get(d.tag), d.spec.timestep_scale)
            self.steps[d.tag] = step
            changed = False
            for sub in list(self.subscribers):
                if sub.before is not None:
                    res = sub.before(d, step, args, kwargs)
                    if res is not None:
                        args, kwargs = res
                        changed = True
            return (args, kwargs) if changed else None

        return pre

    def _post(self, d: Denoiser):
        @torch.compiler.disable
        def post(module, args, kwargs, output):
            sample = d.sample(args, kwargs)
            if sample is None or sample.device.type == "meta":  # e.g. a feature's shape trace inside `before`
                return None
            step = self.steps.pop(d.tag, None)
            if step is None:
                return None
            result = output
            for sub in reversed(list(self.subscribers)):
                if sub.after is not None:
                    new = sub.after(d, step, result)
                    if new is not None:
                        result = new
            return None if result is output else result

        return post


def _find(pipe: Any) -> Runtime | None:
    entry = hooks.lookup(pipe, FEATURE)
    if entry is None and isinstance(pipe, torch.nn.Module):
        entry = hooks.lookup(unwrap(pipe), FEATURE)
    return entry[1] if entry is not None else None


def runtime_of(pipe: Any) -> Runtime | None:
    """The runtime attached to a pipeline / denoiser, if any feature is installed."""
    return _find(pipe)


def attach(pipe: Any, sub: Subscriber, scheduler: Any = None) -> tuple[Runtime, Callable[[], None]]:
    """Attach `sub` to the pipeline's runtime (installing it first if needed); returns (runtime, detach)."""
    rt = _find(pipe)
    if rt is None:
        sched = scheduler if scheduler is not None else (None if isinstance(pipe, torch.nn.Module)
                                                         else getattr(pipe, "scheduler", None))

        def build(inst: hooks.Installation) -> Runtime:
            r = Runtime(pipe, scheduler)
            r._install(inst, sched)
            return r

        targets = [pipe] + [d.module for d in denoisers(pipe) if d.module is not pipe]
        rt = hooks.install(FEATURE, targets, build)
    elif scheduler is not None and rt.clock._scheduler() is None:
        raise PatchError("halodiff: scheduler= given, but features already installed on this model run without "
                         "one; remove them first or pass the same scheduler to every feature")
    rt.subscribers.append(sub)
    pipe_ref = weakref.ref(pipe)  # the detach callback lives in the registry: it must not keep `pipe` alive

    def detach() -> None:
        if sub in rt.subscribers:
            rt.subscribers.remove(sub)
        owner = pipe_ref()
        if not rt.subscribers and owner is not None and _find(owner) is rt:
            hooks.uninstall(owner, FEATURE)

    return rt, detach


def new_generation(pipe: Any, timesteps: Any = None) -> None:
    """Declare that a custom denoising loop starts a generation over `timesteps` (1-D tensor or list).

    Pipelines need not call this: `scheduler.set_timesteps` does it for them. Custom loops that call the UNet
    directly (with timesteps that are not views of `scheduler.timesteps`) call it before their first step,
    so every feature knows the step index and the last step without reading device tensors."""
    rt = _find(pipe)
    if rt is None:
        raise PatchError("halodiff.new_generation: no halodiff feature is installed on this pipeline/model")
    if timesteps is not None and not isinstance(timesteps, torch.Tensor):
        try:
            timesteps = [float(t) for t in timesteps]
        except TypeError as exc:
            raise TypeError("halodiff.new_generation: timesteps must be a 1-D tensor or a list of numbers") from exc
    elif isinstance(timesteps, torch.Tensor) and timesteps.dim() != 1:
        raise ValueError(f"halodiff.new_generation: timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    rt.clock.new_generation(timesteps)
