"""One denoising clock per pipeline: which step of which generation every denoiser call is.

Every feature used to guess "new generation = a `set_timesteps` call or a timestep that went up" from
`float(t)`, a host read of a device tensor (a GPU sync) per UNet call. The clock works it out once per call,
without reading device memory, and tells every subscribed feature a `Step`:

1. Generations start at `scheduler.set_timesteps` (wrapped once), at `halodiff.new_generation(pipe, timesteps)`
   (custom denoising loops), or when the scheduler's `timesteps` tensor is another object than last time (a
   swapped scheduler).
2. The position of a call in the generation's timesteps comes from tensor metadata: diffusers loops pass
   `t = timesteps[i]` (or `t.expand(batch)`), a view into the timesteps storage, so `storage_offset` is `i`.
   Timesteps given as Python numbers or CPU tensors are looked up by value. Anything else (a fresh device
   tensor) advances the step by one per call of that denoiser.
3. A per-sample timestep whose values differ (a stream batch: every sample at another step) is a
   `per_sample` step. Streams declare it (`Clock.stream_call`), device tensors are never read for it.
4. A bare denoiser with no scheduler and no declared generation falls back to "the timestep went up": that
   reads the timestep on the host (one sync per call for device timesteps; pass `scheduler=` or declare
   generations to avoid it).

Each denoiser (UNet, every ControlNet) has its own step counter, since a ControlNet runs before the UNet in
the same step; so has each named call of a denoiser within a step (diffusers' `model.cache_context("cond")` /
`("uncond")`: pipelines that run CFG as two calls, Flux and Qwen-Image), which the runtime passes as `context`.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Step:
    """What a feature needs to know about the denoiser call that is starting.

    index: steps since this generation started (0 = first step).
    position: index into the generation's timesteps, or None if unknown.
    count: steps from the generation's first call to its end, or None if unknown.
    first / last: first step of the generation / last one (False when unknown).
    new_generation: this call starts a generation (features drop stale state).
    per_sample: the timestep holds a different value per sample (a stream batch).
    t: the timestep argument as passed (never read by the clock when it is a device tensor).
    context: the name of this call within its step (diffusers' `cache_context`, e.g. "cond" / "uncond"), or None.
    """

    index: int
    position: int | None
    count: int | None
    first: bool
    last: bool
    new_generation: bool
    per_sample: bool = False
    t: Any = None
    context: str | None = None


@dataclass
class _Counter:
    generation: int = -1
    index: int = -1
    origin: int | None = None
    last_value: float | None = None


@dataclass
class _Generation:
    number: int = 0
    timesteps: torch.Tensor | None = None  # as the scheduler/loop holds them (any device)
    declared: bool = False  # by set_timesteps or new_generation (not guessed)
    _values: list[float] | None = field(default=None, repr=False)

    def values(self) -> list[float] | None:
        """Timestep values as floats: one host read per generation, only when a call needs a lookup."""
        if self._values is None and self.timesteps is not None:
            ts = self.timesteps
            self._values = [float(v) for v in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
        return self._values

    def __len__(self) -> int:
        ts = self.timesteps
        return 0 if ts is None else (int(ts.shape[0]) if isinstance(ts, torch.Tensor) else len(ts))


def _on_host(t: torch.Tensor) -> bool:
    """Reading this tensor's values costs no device sync."""
    return t.device.type == "cpu"


def _host_values(t: Any) -> list[float] | None:
    """The timestep's values if reading them costs no device sync (Python numbers, CPU tensors)."""
    if isinstance(t, torch.Tensor):
        return [float(v) for v in t.reshape(-1).tolist()] if _on_host(t) else None
    if isinstance(t, (int, float)):
        return [float(t)]
    return None


class Clock:
    """The denoising clock of one pipeline (or of one bare denoiser)."""

    def __init__(self, scheduler: Callable[[], Any] | None = None):
        """scheduler: returns the pipeline's current scheduler (read on every call: users swap schedulers)."""
        self._scheduler = scheduler or (lambda: None)
        self.generation = _Generation()
        self._seen_timesteps: Any = None  # the scheduler's timesteps object at the last generation start
        self._counters: dict[str, _Counter] = {}
        self._stream = False
        self._scaled = False
        self.listeners: list[Callable[[_Generation], None]] = []  # called at every declared generation start

    # ------------------------------------------------------------------------------ generations
    def new_generation(self, timesteps: Any = None) -> None:
        """A denoising loop starts over `timesteps` (a 1-D tensor or list; None if unknown)."""
        if timesteps is not None and not isinstance(timesteps, torch.Tensor):
            timesteps = list(timesteps)
        self.generation = _Generation(self.generation.number + 1, timesteps, declared=True)
        sched = self._scheduler()
        self._seen_timesteps = getattr(sched, "timesteps", None) if sched is not None else None
        for listener in self.listeners:
            listener(self.generation)

    def wrap_set_timesteps(self, inner: Callable) -> Callable:
        """Factory for `Installation.override(scheduler, "set_timesteps", ...)`."""
        clock = weakref.ref(self)

        def set_timesteps(*args, **kwargs):
            result = inner(*args, **kwargs)
            c = clock()
            if c is not None:
                sched = getattr(inner, "__self__", None) or c._scheduler()
                c.new_generation(getattr(sched, "timesteps", None))
            return result

        return set_timesteps

    def stream_call(self) -> None:
        """The next denoiser call carries one timestep per sample (a stream batch)."""
        self._stream = True

    # -------------------------------------------------------------------------------------- steps
    def _position(self, t: Any, host: list[float] | None) -> int | None:
        ts = self.generation.timesteps
        if isinstance(t, torch.Tensor) and isinstance(ts, torch.Tensor) and ts.dim() == 1 and t.dim() <= 1 \
                and t.dtype == ts.dtype and t.device == ts.device and ts.shape[0] > 0 \
                and t.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr():
            pos, rem = divmod(t.storage_offset() - ts.storage_offset(), ts.stride(0) or 1)
            if rem == 0 and 0 <= pos < ts.shape[0] and (t.dim() == 0 or t.stride(0) == 0 or t.numel() == 1):
                return pos  # a view of timesteps[pos] (or its expand over the batch)
        if host and all(v == host[0] for v in host):
            table = self.generation.values()
            if table is not None and host[0] in table:
                return table.index(host[0])
            if table is not None and self._scaled:  # value / scale * scale: float round-off, match to 1e-4
                near = [i for i, v in enumerate(table) if abs(v - host[0]) <= 1e-4 * max(1.0, abs(v))]
                return near[0] if len(near) == 1 else None
        return None

    def _restarted(self, counter: _Counter, t: Any, host: list[float] | None, position: int | None,
                   per_sample: bool) -> bool:
        """Did a new generation start without a declaration? (position went back / timestep went up)."""
        gen = self.generation
        if position is not None and counter.origin is not None:
            return position < counter.origin + counter.index
        if gen.declared or per_sample:
            return False
        if host:
            value = host[0]
        elif isinstance(t, torch.Tensor) and t.numel():
            value = float(t.reshape(-1)[0])  # host read: only for a bare denoiser with no known timesteps
        else:
            return False
        previous, counter.last_value = counter.last_value, value
        return previous is not None and value > previous

    def tick(self, tag: str, t: Any, context: str | None = None, scale: float = 1.0) -> Step:
        """Called once per denoiser call (before it runs): the Step of that call (`context`: the call's name
        within the step, see the module docstring; `scale`: the scheduler's timesteps are the model's timestep
        times `scale`, e.g. 1000 for Flux and Qwen-Image, whose pipelines pass t / 1000)."""
        stream, self._stream = self._stream, False
        sched = self._scheduler()
        current = getattr(sched, "timesteps", None) if sched is not None else None
        if current is not None and current is not self._seen_timesteps:
            self.new_generation(current)  # set_timesteps ran on a scheduler we did not wrap
        counter = self._counters.setdefault((tag, context), _Counter())
        host = None if stream else _host_values(t)
        self._scaled = scale != 1.0
        if host is not None and self._scaled:
            host = [v * scale for v in host]
        per_sample = stream or (host is not None and any(v != host[0] for v in host))
        position = None if per_sample else self._position(t, host)
        if counter.generation == self.generation.number and self._restarted(counter, t, host, position, per_sample):
            gen = self.generation
            if gen.declared:
                self.new_generation(gen.timesteps)
            else:
                self.generation = _Generation(gen.number + 1)
        gen = self.generation
        if counter.generation != gen.number:
            counter.generation, counter.origin, counter.index = gen.number, position, 0
            new = True
        else:
            new = False
            counter.index = position - counter.origin if position is not None and counter.origin is not None \
                else counter.index + 1
        if host and not gen.declared:
            counter.last_value = host[0]
        n = len(gen)
        count = (n - counter.origin if counter.origin is not None else n if gen.declared and not per_sample else 0) \
            or None
        last = count is not None and counter.index == count - 1
        return Step(counter.index, position, count, counter.index == 0, last, new, per_sample, t, context)


@dataclass
class ClockRef:
    """A clock with the number of features using it (it is removed with the last one)."""

    clock: Clock
    users: int = 0
