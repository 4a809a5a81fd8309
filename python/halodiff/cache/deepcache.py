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

One of the cache methods behind `halodiff.enable_cache` (cache/base.py); `enable_deepcache(pipe, ...)` is
its shorthand. The UNet's levels come from its model spec (`specs.unet2d`). Installed through the runtime
(`halodiff.runtime`): stack-safe `forward` overrides of the cached modules (and of up block b), and a
subscription to the pipeline's denoising clock, which says which step each UNet call is; `disable_deepcache`
removes exactly these. The schedule is fixed, so every rank of a patch takes the same steps without agreeing.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import HalodiffError, PatchError
from ..specs import UNetLevels
from ..runtime import Denoiser, Installation, Runtime, Step, Subscriber, attach, install, predictor_of
from .base import FEATURE, CacheConfig, CacheRun, cache_run, disable_cache, enable_cache, register
from .schedule import check_schedule_args, deepcache_schedule


@dataclass(frozen=True)
class DeepCacheConfig(CacheConfig):
    """Settings of DeepCache (`enable_cache(pipe, DeepCacheConfig(...))` or `enable_deepcache(pipe, ...)`;
    validated here, branch_id's upper bound by the UNet).

    interval: full step every `interval` steps (uniform) / as many full steps (quadratic); 1 = off.
    branch_id: skip branch (0 = shallowest, fastest); valid range [0, 3 * len(down_blocks) - 1] on SD UNets.
    schedule: "uniform" or "quadratic" (DeepCache's non-uniform schedule around `center`, `power`).
    """

    method: ClassVar[str] = "deepcache"
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


def branch_plan(unet: nn.Module, branch_id: int, levels: UNetLevels | None = None) -> BranchPlan:
    """The modules (qualified names) a partial step takes from the cache for `branch_id` (`levels`: the UNet's
    block names, from its spec)."""
    levels = levels or UNetLevels()
    down, up = getattr(unet, levels.down, None), getattr(unet, levels.up, None)
    if not isinstance(down, nn.ModuleList) or not isinstance(up, nn.ModuleList) or not down or len(down) != len(up):
        raise PatchError(f"deepcache: {type(unet).__name__} is not a UNet with matching down_blocks/up_blocks "
                         "(use a UNet2DConditionModel: SD1.5, SD2.x, SDXL)")
    D, U, M = levels.down, levels.up, levels.mid
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
            cached.append(f"{D}.{j}")
        elif j == b:
            attentions = getattr(blk, "attentions", None) or []
            for i in range(l, len(blk.resnets)):
                cached.append(f"{D}.{j}.resnets.{i}")
                if i < len(attentions):
                    cached.append(f"{D}.{j}.attentions.{i}")
            cached += [f"{D}.{j}.downsamplers.{k}" for k in range(len(blk.downsamplers or []))]
    if getattr(unet, M, None) is not None:
        cached.append(M)
    for p, blk in enumerate(up):
        depth = len(up) - 1 - p  # the down block this up block mirrors
        if depth > b:
            cached.append(f"{U}.{p}")
        elif depth == b:
            attentions = getattr(blk, "attentions", None) or []
            for idx in range(per - 1 - l):  # these layers consume skips of cached down layers
                cached.append(f"{U}.{p}.resnets.{idx}")
                if idx < len(attentions):
                    cached.append(f"{U}.{p}.attentions.{idx}")
            lean = (f"{U}.{p}", per - 1 - l) if per - 1 - l > 0 else None
    return BranchPlan(b, l, n, tuple(cached), lean)


def _on_meta(args: tuple, kwargs: dict) -> bool:
    """A shape-only trace (e.g. halodiff.patch measuring layer shapes) runs everything, caches nothing."""
    for v in itertools.chain(args, kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device.type == "meta"
    return False


class DeepCacheRun(CacheRun):
    """Explicit step state of one enabled pipeline (no globals).

    `partial` / `recording` are the only fields the wrapped modules read: True during a partial /
    full step of the current UNet call, False otherwise. `kinds` lists "full"/"partial" for each UNet
    call of the current generation (for tests and benchmarks). Steps come from the runtime's clock.
    """

    def __init__(self, config: DeepCacheConfig, plan: BranchPlan):
        self.config, self.plan = config, plan
        self.partial = False
        self.recording = False
        self.cache: dict[str, Any] = {}
        self.rt: Runtime | None = None
        self.kinds: list[str] = []
        self._full: frozenset[int] | None = None
        self._valid: tuple | None = None  # input signature the cache was filled with
        self._sig: tuple | None = None

    @property
    def static_cache(self) -> bool:
        """Write full steps' outputs into the cached tensors (fixed addresses), as CUDA graphs need."""
        return self.rt is not None and self.rt.static_buffers

    def check_schedule(self, generation) -> None:
        """At set_timesteps: raise a schedule error before the first step."""
        if len(generation) and self.config.schedule == "quadratic":
            self.config.full_steps(len(generation))

    def before(self, d: Denoiser, step: Step, args: tuple, kwargs: dict) -> None:
        """Before a UNet call: start a new generation if needed, pick the step kind."""
        if not d.predicts:
            return None
        if step.per_sample:
            raise HalodiffError(
                "deepcache: this UNet call holds samples at different timesteps (a stream batch, e.g. "
                "halodiff.StreamDiffusion), so there is no step schedule to cache along; call "
                "halodiff.disable_deepcache(pipe) before streaming")
        if step.new_generation:
            self._start_generation(step)
        sample = d.sample(args, kwargs)
        full = step.index % self.config.interval == 0 if self._full is None else step.index in self._full
        sig = (tuple(sample.shape), sample.dtype, sample.device)
        if not full and self._valid != sig:  # nothing usable cached (e.g. the batch changed): run it all
            full = True
        self.partial, self.recording = not full, full
        if full:
            self._valid, self._sig = None, sig
        self.kinds.append("full" if full else "partial")
        return None

    def _start_generation(self, step: Step) -> None:
        self._valid = None
        self.kinds = []
        if self.config.schedule == "quadratic" and self.config.interval > 1:
            if step.count is None:
                raise ValueError("deepcache: schedule='quadratic' needs the step count: enable it on a pipeline, "
                                 "pass scheduler=, or declare the loop with halodiff.new_generation(pipe, timesteps)")
            self._full = frozenset(self.config.full_steps(max(1, step.count)))
        else:
            self._full = None

    def after(self, d: Denoiser, step: Step, output: Any) -> None:
        """After a UNet call: a completed full step makes the cache usable."""
        if d.predicts:
            if self.recording:
                self._valid = self._sig
            self.partial = self.recording = False
        return None

    def deactivate(self) -> None:
        self.partial = self.recording = False
        self.cache.clear()


def _same_layout(a: Any, b: Any) -> bool:
    """Same pytree structure and tensors of the same shape, dtype and device."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    return sa == sb and all(
        (x.shape, x.dtype, x.device) == (y.shape, y.dtype, y.device) if isinstance(x, torch.Tensor)
        else not isinstance(y, torch.Tensor) for x, y in zip(la, lb))


def _cached_forward(run: DeepCacheRun, key: str, inner: Callable) -> Callable:
    """Instance forward of a cached module: stored output on partial steps, store it on full steps."""

    def forward(*args, **kwargs):
        if run.partial and not _on_meta(args, kwargs):
            return run.cache[key]
        out = inner(*args, **kwargs)
        if run.recording and not _on_meta(args, kwargs):
            old = run.cache.get(key)
            if run.static_cache and old is not None and _same_layout(old, out):
                tree_map(lambda dst, src: dst.copy_(src) if isinstance(dst, torch.Tensor) else dst, old, out)
            else:
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


def enable_deepcache(pipe, config: DeepCacheConfig | None = None, *, scheduler=None, **kwargs) -> None:
    """Run only the shallow UNet path on the steps between full steps, reusing cached deep features.
    Shorthand of `halodiff.enable_cache(pipe, DeepCacheConfig(...))`.

    pipe: a diffusers UNet pipeline, or a UNet2DConditionModel (then pass `scheduler=` to get the step index from
        its timesteps; without one, UNet calls are counted and a rising timestep starts a new generation; the
        quadratic schedule needs a scheduler).
    config: a `DeepCacheConfig`, or its fields as keyword arguments (interval, branch_id, schedule, center, power).
    """
    enable_cache(pipe, _config(config, kwargs), scheduler=scheduler)


def _install(pipe, config: DeepCacheConfig, scheduler) -> None:
    den = predictor_of(pipe, "deepcache")
    unet = den.module
    levels = den.spec.unet_levels(unet)
    if levels is None:
        raise PatchError(f"deepcache: {type(unet).__name__} is not a UNet (DeepCache caches UNet levels); for "
                         "transformers use halodiff.enable_cache(pipe, halodiff.FirstBlockCacheConfig())")
    plan = branch_plan(unet, config.branch_id, levels)
    if config.schedule == "quadratic" and config.interval > 1 and scheduler is None and isinstance(pipe, nn.Module):
        raise ValueError("deepcache: schedule='quadratic' needs the step count: enable it on a pipeline or pass "
                         "scheduler=")

    def build(inst: Installation) -> DeepCacheRun:
        run = DeepCacheRun(config, plan)
        modules = dict(unet.named_modules())
        for key in plan.cached:
            inst.override(modules[key], "forward", lambda inner, key=key: _cached_forward(run, key, inner))
        if plan.lean is not None:
            block = modules[plan.lean[0]]
            inst.override(block, "forward", lambda inner: _lean_up_forward(run, block, plan.lean[1], inner))
        rt, detach = attach(pipe, Subscriber(FEATURE, run.before, run.after, kind=lambda: run.partial), scheduler)
        run.rt = rt
        inst.on_remove(detach)
        inst.on_remove(rt.on_generation(run.check_schedule))
        inst.on_remove(run.deactivate)
        return run

    install(FEATURE, [pipe] if pipe is unet else [pipe, unet], build)


register(DeepCacheConfig.method, DeepCacheConfig, _install)


def _config(config: DeepCacheConfig | None, kwargs: dict) -> DeepCacheConfig:
    if config is not None and kwargs:
        raise TypeError("enable_deepcache: pass a DeepCacheConfig or keyword arguments, not both")
    if config is None:
        fields = {f.name for f in dataclasses.fields(DeepCacheConfig)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"enable_deepcache: unknown argument(s) {', '.join(unknown)}; "
                            f"DeepCacheConfig fields are {', '.join(sorted(fields))}")
        return DeepCacheConfig(**kwargs)
    if not isinstance(config, DeepCacheConfig):
        raise TypeError(f"enable_deepcache: config must be a halodiff.DeepCacheConfig, got {type(config).__name__}")
    return config


def disable_deepcache(pipe) -> None:
    """Undo `enable_deepcache` exactly: original forwards, hooks removed, scheduler restored."""
    disable_cache(pipe, DeepCacheConfig.method)


def deepcache_context(pipe) -> DeepCacheRun:
    """The step state of a pipeline with DeepCache enabled (step kinds, plan); for tools and tests."""
    return cache_run(pipe, DeepCacheConfig.method)
