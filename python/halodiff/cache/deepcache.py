"""DeepCache (Ma et al., CVPR 2024): reuse the deep UNet features of the last full step.

Same semantics as the `DeepCache` package 0.1.1 (`DeepCacheSDHelper`), without touching any class:
- branch_id k -> down block b = k // m, layer l = k % m (m = skip outputs per down block: 3 on SD1.5,
  SD2.x and SDXL). Cached on partial steps: down blocks deeper than b (all of b when l == 0), the
  layers >= l of down block b and its downsampler, the mid block, the up blocks deeper than b and
  the up-block-b layers mirroring the cached down layers (`branch_plan`).
- step index = position of the current timestep in `pipe.scheduler.timesteps`, counted from the
  first UNet call of the pipeline call; full steps come from the precomputed schedule (`schedule.py`).

A partial step runs the UNet's own forward, but every cached module returns its stored output
instead of computing, so only the shallow sub-network executes (up block b even hands its cached
layers zero-channel views, so the deep features are not copied by its torch.cat either). Which
modules those are depends only on the step kind (a Python bool read by the wrappers), so under
torch.compile each kind is one static graph. With `halodiff.patch`, layers that do not run exchange
nothing, and the engine keeps their last exchanged (stale) data for the next full step.

Installed as instance `forward` overrides of the cached modules (and of up block b), forward hooks
on the UNet and an instance wrapper of `scheduler.set_timesteps`; `disable_deepcache` removes
exactly these.
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PatchError
from .schedule import check_schedule_args, deepcache_schedule

_MISSING = object()


@dataclass(frozen=True)
class DeepCacheConfig:
    """Settings of `enable_deepcache` (validated here; branch_id's upper bound by the UNet)."""

    interval: int = 3
    branch_id: int = 0
    schedule: str = "uniform"
    center: int = 15
    power: float = 1.4

    def __post_init__(self) -> None:
        check_schedule_args(self.interval, self.schedule, self.center, self.power)
        if isinstance(self.branch_id, bool) or not isinstance(self.branch_id, int):
            raise ValueError(f"deepcache: branch_id must be an int (0 = shallowest branch); got {self.branch_id!r}")

    def full_steps(self, num_steps: int) -> list[int]:
        return deepcache_schedule(num_steps, self.interval, self.schedule, self.center, self.power)


@dataclass(frozen=True)
class BranchPlan:
    """Where a branch cuts the UNet: block, layer, and the modules whose outputs partial steps reuse."""

    block: int
    layer: int
    num_branches: int
    cached: tuple[str, ...]
    lean: tuple[str, int] | None = None  # (up block b, its leading cached layers): see `_lean_up_forward`


def branch_plan(unet: nn.Module, branch_id: int) -> BranchPlan:
    """The modules (qualified names) a partial step takes from the cache for `branch_id`."""
    down, up = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
    if not isinstance(down, nn.ModuleList) or not isinstance(up, nn.ModuleList) or not down or len(down) != len(up):
        raise PatchError(f"deepcache: {type(unet).__name__} is not a UNet with matching down_blocks/up_blocks "
                         "(use a UNet2DConditionModel: SD1.5, SD2.x, SDXL)")
    per = len(up[-1].resnets)  # skip outputs per down block = resnets per up block
    if any(len(b.resnets) != per for b in up) or any(len(b.resnets) != per - 1 for b in down):
        raise PatchError("deepcache: branch ids need the same layers_per_block in every block of the UNet")
    n = per * len(down)
    if isinstance(branch_id, bool) or not isinstance(branch_id, int) or not 0 <= branch_id < n:
        raise ValueError(f"deepcache: branch_id must be in [0, {n - 1}] for this UNet ({len(down)} down blocks x "
                         f"{per} skip branches); got {branch_id!r}")
    b, l = divmod(branch_id, per)
    cached: list[str] = []
    lean = None
    for j, blk in enumerate(down):
        if j > b or (j == b and l == 0):
            cached.append(f"down_blocks.{j}")
        elif j == b:
            attentions = getattr(blk, "attentions", None) or []
            for i in range(l, len(blk.resnets)):
                cached.append(f"down_blocks.{j}.resnets.{i}")
                if i < len(attentions):
                    cached.append(f"down_blocks.{j}.attentions.{i}")
            cached += [f"down_blocks.{j}.downsamplers.{k}" for k in range(len(blk.downsamplers or []))]
    if getattr(unet, "mid_block", None) is not None:
        cached.append("mid_block")
    for p, blk in enumerate(up):
        depth = len(up) - 1 - p  # the down block this up block mirrors
        if depth > b:
            cached.append(f"up_blocks.{p}")
        elif depth == b:
            attentions = getattr(blk, "attentions", None) or []
            for idx in range(per - 1 - l):  # these layers consume skips of cached down layers
                cached.append(f"up_blocks.{p}.resnets.{idx}")
                if idx < len(attentions):
                    cached.append(f"up_blocks.{p}.attentions.{idx}")
            lean = (f"up_blocks.{p}", per - 1 - l) if per - 1 - l > 0 else None
    return BranchPlan(b, l, n, tuple(cached), lean)


def _on_meta(args: tuple, kwargs: dict) -> bool:
    """A shape-only trace (e.g. halodiff.patch measuring layer shapes) runs everything, caches nothing."""
    for v in itertools.chain(args, kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device.type == "meta"
    return False


def _timestep_value(t) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else 0.0
    return float(t)


class DeepCacheRun:
    """Explicit step state of one enabled pipeline (no globals).

    `partial` / `recording` are the only fields the wrapped modules read: True during a partial /
    full step of the current UNet call, False otherwise. `kinds` lists "full"/"partial" for each UNet
    call of the current pipeline call (for tests and benchmarks).
    """

    def __init__(self, config: DeepCacheConfig, plan: BranchPlan, owner, scheduler):
        self.config, self.plan = config, plan
        self._owner = weakref.ref(owner) if owner is not None else None  # pipeline: its scheduler is read per call
        self._scheduler = scheduler
        self.partial = False
        self.recording = False
        self.cache: dict[str, Any] = {}
        self.kinds: list[str] = []
        self.active = True
        self._new_call = True
        self._ts: Any = None
        self._index: dict[float, int] = {}
        self._num: int | None = None
        self._origin = 0
        self._last_index: int | None = None
        self._last_t: float | None = None
        self._full: frozenset[int] | None = None
        self._valid: tuple | None = None  # input signature the cache was filled with
        self._sig: tuple | None = None

    def scheduler(self):
        if self._scheduler is not None:
            return self._scheduler
        owner = self._owner() if self._owner is not None else None
        return getattr(owner, "scheduler", None)

    def new_call(self, timesteps=None) -> None:
        """A pipeline call starts (scheduler.set_timesteps): the next UNet call starts a generation."""
        self._new_call = True
        if timesteps is not None and self.config.schedule == "quadratic":
            self.config.full_steps(len(timesteps))  # raise a schedule error before the first step

    def begin(self, sample: torch.Tensor, timestep) -> None:
        """Before a UNet call: derive the step index, start a new generation if needed, pick the kind."""
        t = _timestep_value(timestep)
        sched = self.scheduler()
        ts = getattr(sched, "timesteps", None) if sched is not None else None
        new = self._new_call
        idx = None
        if ts is not None:
            if ts is not self._ts:  # set_timesteps made a new list (also catches an unwrapped scheduler)
                self._ts, new = ts, True
                values = ts.tolist() if isinstance(ts, torch.Tensor) else list(ts)
                self._index = {}
                for i, v in enumerate(values):
                    self._index.setdefault(float(v), i)
                self._num = len(values)
            idx = self._index.get(t)
        else:
            self._num = None
            if self._last_t is not None and t > self._last_t:  # timesteps only go down within a generation
                new = True
        if idx is None:  # no scheduler, or a timestep it does not list: count calls
            idx = 0 if new or self._last_index is None else self._last_index + 1
        elif self._last_index is not None and idx < self._last_index:
            new = True
        if new:
            self._start_generation(idx)
        self._last_index, self._last_t = idx, t
        step = idx - self._origin
        full = step % self.config.interval == 0 if self._full is None else step in self._full
        sig = (tuple(sample.shape), sample.dtype, sample.device)
        if not full and self._valid != sig:  # nothing usable cached (e.g. the batch changed): run it all
            full = True
        self.partial, self.recording = not full, full
        if full:
            self._valid, self._sig = None, sig
        self.kinds.append("full" if full else "partial")

    def _start_generation(self, idx: int) -> None:
        self._new_call = False
        self._origin = idx
        self._valid = None
        self.kinds = []
        if self.config.schedule == "quadratic" and self.config.interval > 1:
            if self._num is None:
                raise ValueError("deepcache: schedule='quadratic' needs the step count: enable it on a pipeline "
                                 "or pass scheduler=")
            self._full = frozenset(self.config.full_steps(max(1, self._num - idx)))
        else:
            self._full = None

    def end(self) -> None:
        """After a UNet call: a completed full step makes the cache usable."""
        if self.recording:
            self._valid = self._sig
        self.partial = self.recording = False

    def deactivate(self) -> None:
        self.active = self.partial = self.recording = False
        self.cache.clear()


def _cached_forward(run: DeepCacheRun, key: str, inner: Callable) -> Callable:
    """Instance forward of a cached module: stored output on partial steps, store it on full steps."""

    def forward(*args, **kwargs):
        if run.partial and not _on_meta(args, kwargs):
            return run.cache[key]
        out = inner(*args, **kwargs)
        if run.recording and not _on_meta(args, kwargs):
            run.cache[key] = out
        return out

    return forward


_FREEU = ("s1", "s2", "b1", "b2")


def _lean_up_forward(run: DeepCacheRun, block: nn.Module, n_cached: int, inner: Callable) -> Callable:
    """Up block b on partial steps: its first `n_cached` layers return cached outputs, so they get
    zero-channel views of the deep features and skips instead (their torch.cat copies the real ones
    for nothing). The layers that run see exactly the tensors they would otherwise. Off with FreeU."""

    def forward(*args, **kwargs):
        h, res = kwargs.get("hidden_states"), kwargs.get("res_hidden_states_tuple")
        if (run.partial and not args and isinstance(h, torch.Tensor) and h.device.type != "meta"
                and isinstance(res, tuple) and len(res) >= n_cached
                and not all(getattr(block, a, None) for a in _FREEU)):
            keep = len(res) - n_cached
            kwargs = dict(kwargs, hidden_states=h[:, :0],
                          res_hidden_states_tuple=res[:keep] + tuple(r[:, :0] for r in res[keep:]))
        return inner(*args, **kwargs)

    return forward


@dataclass
class _Record:
    run: DeepCacheRun
    undo: list[Callable[[], None]] = field(default_factory=list)


_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unet_of(pipe) -> nn.Module:
    unet = pipe if isinstance(pipe, nn.Module) else getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise PatchError(f"deepcache: {type(pipe).__name__} has no .unet; pass a diffusers UNet pipeline or a "
                         "UNet2DConditionModel")
    return getattr(unet, "_orig_mod", unet)  # torch.compile'd UNet: patch the module it wraps


def _override(obj, name: str, new, undo: list) -> None:
    """Set an instance attribute; its undo restores the previous state only while `new` is still the
    outermost one (otherwise whoever wrapped it keeps calling it, and it passes through)."""
    previous = obj.__dict__.get(name, _MISSING)
    setattr(obj, name, new)

    def restore() -> None:
        if obj.__dict__.get(name) is new:
            if previous is _MISSING:
                del obj.__dict__[name]
            else:
                setattr(obj, name, previous)

    undo.append(restore)


def _wrap_set_timesteps(run: DeepCacheRun, scheduler, undo: list) -> None:
    inner = scheduler.set_timesteps

    def set_timesteps(*args, **kwargs):
        out = inner(*args, **kwargs)
        if run.active:
            run.new_call(getattr(scheduler, "timesteps", None))
        return out

    _override(scheduler, "set_timesteps", set_timesteps, undo)


def enable_deepcache(pipe, interval: int = 3, branch_id: int = 0, schedule: str = "uniform", center: int = 15,
                     power: float = 1.4, *, scheduler=None) -> None:
    """Run only the shallow UNet path on the steps between full steps, reusing cached deep features.

    pipe: a diffusers pipeline with `.unet`, or a UNet2DConditionModel (then pass `scheduler=` to get
        the step index from its timesteps; without one, UNet calls are counted and a rising timestep
        starts a new generation; the quadratic schedule needs a scheduler).
    interval: full step every `interval` steps (uniform) / as many full steps (quadratic); 1 = off.
    branch_id: skip branch (0 = shallowest, fastest); valid range [0, 3 * len(down_blocks) - 1] on SD UNets.
    schedule: "uniform" or "quadratic" (DeepCache's non-uniform schedule around `center`, `power`).
    """
    config = DeepCacheConfig(interval, branch_id, schedule, center, power)
    unet = _unet_of(pipe)
    for obj, what in ((pipe, "this pipeline"), (unet, "its UNet")):
        if obj in _RUNS:
            raise PatchError(f"deepcache: already enabled on {what}; call halodiff.disable_deepcache first")
    plan = branch_plan(unet, branch_id)
    owner = None if isinstance(pipe, nn.Module) else pipe
    run = DeepCacheRun(config, plan, owner, scheduler)
    sched = run.scheduler()
    if schedule == "quadratic" and interval > 1 and sched is None:
        raise ValueError("deepcache: schedule='quadratic' needs the step count: enable it on a pipeline or pass "
                         "scheduler=")
    record = _Record(run)
    modules = dict(unet.named_modules())
    try:
        for key in plan.cached:
            module = modules[key]
            _override(module, "forward", _cached_forward(run, key, module.forward), record.undo)
        if plan.lean is not None:
            block = modules[plan.lean[0]]
            _override(block, "forward", _lean_up_forward(run, block, plan.lean[1], block.forward), record.undo)

        @torch.compiler.disable
        def pre(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample")
            if run.active and isinstance(sample, torch.Tensor) and sample.device.type != "meta":
                run.begin(sample, args[1] if len(args) > 1 else kwargs.get("timestep"))

        @torch.compiler.disable
        def post(module, args, kwargs, output):
            sample = args[0] if args else kwargs.get("sample")
            if isinstance(sample, torch.Tensor) and sample.device.type != "meta":
                run.end()

        record.undo.append(unet.register_forward_pre_hook(pre, with_kwargs=True).remove)
        record.undo.append(unet.register_forward_hook(post, with_kwargs=True).remove)
        if sched is not None and callable(getattr(sched, "set_timesteps", None)):
            _wrap_set_timesteps(run, sched, record.undo)
    except BaseException:
        for undo in reversed(record.undo):
            undo()
        raise
    _RUNS[unet] = record
    if pipe is not unet:
        _RUNS[pipe] = record


def _record(pipe, detail: str = ""):
    """The enable record of `pipe` (or of the module a torch.compile wrapper holds)."""
    record = _RUNS.get(pipe)
    if record is None and isinstance(pipe, nn.Module):
        record = _RUNS.get(getattr(pipe, "_orig_mod", pipe))
    if record is None:
        raise PatchError(f"deepcache: not enabled on this pipeline{detail}")
    return record


def disable_deepcache(pipe) -> None:
    """Undo `enable_deepcache` exactly: original forwards, hooks removed, scheduler restored."""
    record = _record(pipe, " (nothing to disable)")
    record.run.deactivate()
    for undo in reversed(record.undo):
        undo()
    for key in [k for k, v in list(_RUNS.items()) if v is record]:
        del _RUNS[key]


def deepcache_context(pipe) -> DeepCacheRun:
    """The step state of a pipeline with DeepCache enabled (step kinds, plan); for tools and tests."""
    return _record(pipe).run
