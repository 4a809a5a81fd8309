"""`patch` / `unpatch` / `comm_stats`: install patch parallelism on a diffusers pipeline or a bare model.

What each layer is comes from the denoiser's model spec (`halodiff.specs`: halo conv, GroupNorm, self / joint /
cross attention, the DiT token split and gather); the engine installs the layer mechanism of each role
(`parallel/layers/`), so one code path serves every supported family. Everything goes through the runtime
(`halodiff.runtime`): stack-safe forward overrides and processor swaps, and a subscription to the pipeline's
denoising clock, whose `Step` says which step each denoiser call is. Per call the engine splits the CFG batch
(split_cfg), measures layer shapes once per input signature (meta-device trace), cuts full-size residuals to
the band, and gathers the predicted bands (UNets at their output, DiTs before the unpatchify). The mode's
strategy (sync / DistriFusion / PCPP: which mechanism each layer kind uses at each step) is chosen once, here.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..comm import CommStats
from ..config import ParallelConfig
from ..errors import HalodiffError, PatchError
from ..runtime import (Denoiser, Installation, Step, Subscriber, attach, denoisers, install, lookup, runtime_of,
                       uninstall)
from ..runtime.adapters import latent_scale
from .distrifusion import DistriFusion
from .graphs import StepGraphs
from .layers import INSTALLERS, layout, tokens
from .pcpp import PCPP
from .state import ParallelContext, StepInfo
from .sync import Sync

FEATURE = "patch"
STRATEGIES = {"sync": Sync, "distrifusion": DistriFusion, "pcpp": PCPP}


def _split_batch(obj, full: int, half: int):
    """Take batch half `half` of every tensor whose dim 0 is `full` (recursively in lists/dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.chunk(2, dim=0)[half] if obj.dim() and obj.shape[0] == full else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split_batch(o, full, half) for o in obj)
    if isinstance(obj, dict):
        return {k: _split_batch(v, full, half) for k, v in obj.items()}
    return obj


def _band_slice(obj, step: StepInfo, full_height: int):
    """Cut residuals that are still full size (from an unpatched ControlNet / adapter) to this rank's band.

    A residual is full size iff it has the global height of its level (`full_height` for the first
    entry: level 0 for down-block lists, the deepest level for the mid residual); residuals of a patched
    ControlNet are already band-local and pass unchanged. Global heights differ per level, so each full
    tensor's own height selects its band."""
    tensors = obj if isinstance(obj, (list, tuple)) else [obj]
    if step.topo.n == 1 or not tensors or not isinstance(tensors[0], torch.Tensor) or \
            tensors[0].shape[-2] != full_height:
        return obj
    cut = []
    for t in tensors:
        s, e = step.bands.bounds(t.shape[-2])[step.topo.index]
        cut.append(t[..., s:e, :])
    return type(obj)(cut) if isinstance(obj, (list, tuple)) else cut[0]


class _Steps:
    """The engine's per-call work, as callbacks of the runtime (one `before`/`after` per denoiser call)."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.warm_start: dict[str, int] = {}  # per denoiser: clock index where the current warm-up began

    def before(self, d: Denoiser, clock: Step, args: tuple, kwargs: dict):
        ctx = self.ctx
        if ctx.world == 1:  # one rank: the model runs unchanged (and compiles to one graph)
            return None
        st = ctx.model_state(d.tag, clock.context)
        if st is None:
            return None
        if clock.per_sample and ctx.strategy.stale and ctx.world > 1:
            raise HalodiffError(
                f"halodiff.patch(mode={ctx.config.mode!r}): this {d.tag} call holds samples at different timesteps (a stream "
                "batch, e.g. halodiff.StreamDiffusion), so there is no previous step whose boundary data could be "
                "reused; patch with ParallelConfig(mode='sync') for streams")
        sample = d.sample(args, kwargs)
        B = sample.shape[0]
        # A ControlNet in guess mode sees only the conditional half of the CFG batch (the pipeline pads
        # zeros for the other half): it runs unsplit on the split topology, so its band-local residuals
        # match the bands the UNet's CFG groups compute.
        guess = ctx.split is not None and d.guess_mode(kwargs)
        topo = ctx.split if (ctx.split is not None and (B % 2 == 0 or guess)) else ctx.full
        if topo is ctx.split and not guess:
            args = _split_batch(args, B, ctx.cfg_half)
            kwargs = {k: (v if k in d.spec.unbatched else _split_batch(v, B, ctx.cfg_half)) for k, v in kwargs.items()}
            sample = d.sample(args, kwargs)
        grid = d.spec.grid(d.module, args, kwargs) if d.spec.tokens else None
        signature = (tuple(sample.shape), sample.dtype, sample.device, topo.ranks, grid)
        relayout = signature != st.signature
        if clock.new_generation or relayout or st.tag not in self.warm_start:
            st.comm.reset()
            self.warm_start[st.tag] = clock.index
            if relayout:
                # Residuals may already be band-local (from a patched ControlNet); layer shapes do not
                # depend on them, so the trace runs without them.
                ctx.trace(st, tuple(args), {k: (None if k in d.residual_kwargs else v) for k, v in kwargs.items()},
                          topo, sample.shape[-2], grid)
                st.grid = grid
            st.signature = signature
        sync = ctx.strategy.is_sync(clock.index - self.warm_start[st.tag])
        step = StepInfo(st, topo, ctx.bands(max(st.deep_height, 1), topo.n), clock, sync)
        if relayout:
            st.comm.set_layout(*layout(st, step, ctx.strategy), like=sample, topo=topo)
        st.comm.start_step(sending=not sync and not clock.last)
        for name in d.residual_kwargs:
            if kwargs.get(name) is not None:
                if grid is not None:
                    cut = tokens.cut_residuals(step, kwargs[name], f"{d.tag}: {name}")
                else:
                    cut = _band_slice(kwargs[name], step, st.deep_height if name.startswith("mid") else sample.shape[-2])
                kwargs = dict(kwargs, **{name: cut})
        ctx.active = step
        return tuple(args), kwargs

    def after(self, d: Denoiser, clock: Step, output: Any):
        ctx = self.ctx
        if ctx.active is not None and ctx.active.model.denoiser == d.tag:
            ctx.active = None
        return None


def _denoiser_forward(ctx: ParallelContext, d: Denoiser, inner: Callable) -> Callable:
    """The denoiser's forward plus the step's epilogue, inside forward (so a captured CUDA graph holds it
    too): join this step's communication, and (UNets; DiTs gather their tokens before the unpatchify) gather
    the predicted bands of every rank."""

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        step = ctx.active
        if step is None or ctx.tracing or step.model.denoiser != d.tag:
            return out
        step.comm.end_step(step.topo)
        if not d.predicts:
            return out
        ctx.stats.steps += 1
        sample = d.prediction(out)
        if step.topo.n > 1 and not d.spec.tokens:
            full_h = step.model.signature[0][-2]  # the prediction has the input sample's height
            sample = step.comm.gather_bands(sample.contiguous(), step.bands.heights(full_h), step.topo, "output")
        if step.topo is ctx.split:
            sample = step.comm.all_gather_batch(sample, ctx.pair_group, 2, "output")
        return d.with_prediction(out, sample)

    return forward


def _checked(config, kwargs: dict) -> ParallelConfig:
    if config is not None and kwargs:
        raise TypeError("halodiff.patch: pass a ParallelConfig or keyword arguments, not both")
    if config is None:
        return ParallelConfig(**kwargs)
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"halodiff.patch: config must be a halodiff.ParallelConfig, got {type(config).__name__}")
    return config


def _graphs_usable(config: ParallelConfig, dens: list[Denoiser]) -> bool:
    if not config.cuda_graphs:
        return False
    p = next(iter(dens[0].module.parameters()), None)
    if p is None or p.device.type != "cuda":
        warnings.warn("halodiff.patch: ParallelConfig(cuda_graphs=True) needs a model on a CUDA device; steps run "
                      "eagerly", RuntimeWarning, stacklevel=4)
        return False
    return True


def _check_capturable(rt) -> None:
    for sub in rt.subscribers if rt is not None else ():
        if not sub.capturable:
            raise PatchError(f"halodiff.patch(cuda_graphs=True): the {sub.name} feature decides from data inside a "
                             "step, so a step cannot be one captured CUDA graph; use cuda_graphs=False with it")


def _kinds_for_graphs(rt) -> tuple:
    """Per-feature step kinds for the graph key (features keep their step outputs at fixed addresses)."""
    rt.static_buffers = True
    _check_capturable(rt)
    return rt.step_kinds()


def _install(pipe, config: ParallelConfig, make_context: Callable[[ParallelConfig], ParallelContext],
             scheduler=None, graph_backend=None) -> None:
    dens = denoisers(pipe, "halodiff.patch")
    if lookup(pipe, FEATURE) is not None:
        raise PatchError("halodiff.patch: this pipeline is already patched; call halodiff.unpatch(pipe) first")
    for d in dens:
        if lookup(d.module, FEATURE) is not None:
            raise PatchError(f"halodiff.patch: its {d.tag} is already patched through another pipeline object")
        d.spec.check(d.module)
    if config.cuda_graphs:
        _check_capturable(runtime_of(pipe))

    def build(inst: Installation) -> ParallelContext:
        ctx = make_context(config)
        inst.on_remove(ctx.close)  # runs last: join communication, destroy halodiff's process groups
        ctx.strategy = STRATEGIES[config.mode](config)
        for d in dens:
            ctx.add_model(d.tag, d.module, d.spec)
            modules = dict(d.module.named_modules())
            for name, layer in d.spec.layers(d.module).items():
                INSTALLERS[layer.role](ctx, inst, f"{d.tag}.{name}", modules[name], layer, modules)
            for split in d.spec.split:
                tokens.install_split(ctx, inst, d.tag, d.module, split)
            if d.spec.gather is not None:
                tokens.install_gather(ctx, inst, d.tag, d.module, d.spec.gather)
            inst.override(d.module, "forward", lambda inner, d=d: _denoiser_forward(ctx, d, inner))
        steps = _Steps(ctx)
        rt, detach = attach(pipe, Subscriber(FEATURE, steps.before, steps.after), scheduler)
        inst.on_remove(detach)
        if ctx.world > 1 and not ctx.simulated:  # data-dependent decisions of other features agree over all ranks
            rt.group = ctx.full.group
            inst.on_remove(lambda: setattr(rt, "group", None))
        if _graphs_usable(config, dens):
            inst.on_remove(lambda: setattr(rt, "static_buffers", False))
            for d in dens:
                graphs = ctx.graphs[d.tag] = StepGraphs(ctx, d, lambda: _kinds_for_graphs(rt), graph_backend)
                inst.override(d.module, "forward", graphs.forward_factory)
                ctx.models[d.tag].comm.join_at_end = True  # a captured step must not leave work in flight
        return ctx

    install(FEATURE, [pipe] + [d.module for d in dens if d.module is not pipe], build)


def patch(pipe, config: ParallelConfig | None = None, group=None, *, scheduler=None, **kwargs) -> None:
    """Make every rank compute only its band of rows (see ParallelConfig for the modes).

    pipe: a diffusers pipeline (a `.unet` and its ControlNets, or a `.transformer` of a supported DiT family: SD3,
        Flux, PixArt, Qwen-Image; see `halodiff.specs`), or the bare UNet / transformer.
    config: a ParallelConfig, or its fields as keyword arguments (`patch(pipe, mode="pcpp")`).
    group: the torch.distributed process group of the ranks that share the work (None = default group).
    scheduler: for a bare model, the scheduler whose `set_timesteps` starts each generation (pipelines: their own).
    Without an initialised torch.distributed the pipeline runs single-rank, unchanged.
    """
    config = _checked(config, kwargs)
    device = _device(pipe)
    _install(pipe, config, lambda cfg: ParallelContext(cfg, group, latent_scale=latent_scale(pipe), device=device),
             scheduler)


def simulate(pipe, config: ParallelConfig | None, ranks: int, index: int, *, scheduler=None, transport=None) -> None:
    """Patch `pipe` to play band `index` of a `ranks`-rank group on this one process without sending
    anything (received boundary data is whatever the buffers hold). For timing one rank's compute and
    counting its bytes (bench/project_gpus.py); the image is not meaningful. Undo with `unpatch`.
    transport(stats, checkpoint) -> CommManager: e.g. a `halodiff.comm.SimulatedLink` (bench/overlap.py)."""
    _install(pipe, _checked(config, {}),
             lambda cfg: ParallelContext(cfg, None, simulate=(ranks, index), transport=transport), scheduler)


def _device(pipe) -> torch.device | None:
    module = denoisers(pipe, "halodiff.patch")[0].module
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else None


def _owner(pipe, what: str):
    if lookup(pipe, FEATURE) is None:
        raise PatchError(f"halodiff.{what}: this pipeline is not patched" +
                         (" (nothing to undo)" if what == "unpatch" else ""))
    return pipe


def unpatch(pipe) -> None:
    """Undo `patch` exactly: original forwards, processors and scheduler; hooks removed."""
    uninstall(_owner(pipe, "unpatch"), FEATURE)


def comm_stats(pipe) -> CommStats:
    """This rank's communication counters for a patched pipeline (call `.reset()` to zero them)."""
    return lookup(_owner(pipe, "comm_stats"), FEATURE)[1].stats


def context(pipe) -> ParallelContext:
    """The ParallelContext of a patched pipeline (step state, topology); for tools and tests."""
    return lookup(_owner(pipe, "context"), FEATURE)[1]
