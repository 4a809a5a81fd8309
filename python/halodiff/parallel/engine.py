"""`patch` / `unpatch` / `comm_stats`: install patch parallelism on a diffusers pipeline.

Layers are found by type (nn.Conv2d with k > 1, nn.GroupNorm, diffusers `Attention` used as self-attention),
so one code path serves SD1.5, SD2.x, SDXL and ControlNet. Everything goes through the runtime
(`halodiff.runtime`): stack-safe forward overrides and processor swaps, and a subscription to the pipeline's
denoising clock, whose `Step` says which step each denoiser call is. Per call the engine splits the CFG batch
(split_cfg), measures layer shapes once per input signature (meta-device trace), cuts full-size residuals to
the band, and gathers the predicted bands after the UNet. The mode's exchange strategy (sync / DistriFusion /
PCPP) is chosen once, here.
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
from ..runtime import Denoiser, Installation, Step, Subscriber, attach, denoisers, install, lookup, uninstall
from ..runtime.adapters import latent_scale, norm_act_pairs
from .attention import BandAttention
from .distrifusion import DistriFusion
from .exchange import SyncExchange
from .graphs import StepGraphs
from .layers import conv_supported, group_norm_forward, halo_conv_forward, silu_forward
from .pcpp import PCPP
from .state import ParallelContext, StepInfo

FEATURE = "patch"
EXCHANGES = {"sync": SyncExchange, "distrifusion": DistriFusion, "pcpp": PCPP}


def _attention_class():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - older/newer layouts
        from diffusers.models.attention import Attention
    return Attention


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
        st = ctx.models.get(d.tag)
        if st is None or ctx.world == 1:  # one rank: the model runs unchanged (and compiles to one graph)
            return None
        if clock.per_sample and ctx.exchange.stale and ctx.world > 1:
            raise HalodiffError(
                f"halodiff.patch(mode={ctx.config.mode!r}): this UNet call holds samples at different timesteps (a stream "
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
            kwargs = _split_batch(kwargs, B, ctx.cfg_half)
            sample = d.sample(args, kwargs)
        signature = (tuple(sample.shape), sample.dtype, sample.device, topo.ranks)
        relayout = signature != st.signature
        if clock.new_generation or relayout or d.tag not in self.warm_start:
            st.comm.reset()
            self.warm_start[d.tag] = clock.index
            if relayout and ctx.world > 1:
                # Residuals may already be band-local (from a patched ControlNet); layer shapes do not
                # depend on them, so the trace runs without them.
                ctx.trace(st, tuple(args), {k: (None if k in d.residual_kwargs else v) for k, v in kwargs.items()},
                          topo, sample.shape[-2])
            st.signature = signature
        sync = ctx.exchange.is_sync(clock.index - self.warm_start[d.tag])
        step = StepInfo(st, topo, ctx.bands(max(st.deep_height, 1), topo.n), clock, sync)
        if relayout and ctx.world > 1:
            st.comm.set_layout(*ctx.exchange.layout(st, step), like=sample, topo=topo)
        st.comm.start_step(sending=not sync and not clock.last)
        for name in d.residual_kwargs:
            if kwargs.get(name) is not None:
                full = st.deep_height if name.startswith("mid") else sample.shape[-2]
                kwargs = dict(kwargs, **{name: _band_slice(kwargs[name], step, full)})
        ctx.active = step
        return tuple(args), kwargs

    def after(self, d: Denoiser, clock: Step, output: Any):
        ctx = self.ctx
        if ctx.active is not None and ctx.active.model.tag == d.tag:
            ctx.active = None
        return None


def _denoiser_forward(ctx: ParallelContext, d: Denoiser, inner: Callable) -> Callable:
    """The denoiser's forward plus the step's epilogue, inside forward (so a captured CUDA graph holds it
    too): join this step's communication, and (UNet) gather the predicted bands of every rank."""

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        step = ctx.active
        if step is None or ctx.tracing or step.model.tag != d.tag:
            return out
        step.comm.end_step(step.topo)
        if not d.predicts:
            return out
        ctx.stats.steps += 1
        sample = d.prediction(out)
        if step.topo.n > 1:
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


def _kinds_for_graphs(pipe, rt) -> tuple:
    """Per-feature step kinds for the graph key; DeepCache must keep its cache at fixed addresses."""
    entry = lookup(pipe, "deepcache")
    if entry is not None:
        entry[1].static_cache = True
    return rt.step_kinds()


def _install(pipe, config: ParallelConfig, make_context: Callable[[ParallelConfig], ParallelContext],
             scheduler=None, graph_backend=None) -> None:
    dens = denoisers(pipe, "halodiff.patch")
    if lookup(pipe, FEATURE) is not None:
        raise PatchError("halodiff.patch: this pipeline is already patched; call halodiff.unpatch(pipe) first")
    for d in dens:
        if lookup(d.module, FEATURE) is not None:
            raise PatchError(f"halodiff.patch: its {d.tag} is already patched through another pipeline object")
    Attention = _attention_class()

    def build(inst: Installation) -> ParallelContext:
        ctx = make_context(config)
        inst.on_remove(ctx.close)  # runs last: join communication, destroy halodiff's process groups
        ctx.exchange = EXCHANGES[config.mode](ctx)
        for d in dens:
            ctx.add_model(d.tag, d.module)
            pairs = dict(norm_act_pairs(d.module))
            modules = dict(d.module.named_modules())
            for name, m in modules.items():
                key = f"{d.tag}.{name}"
                if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1:
                    reason = conv_supported(m)
                    if reason:
                        raise PatchError(f"halodiff.patch: {key} has {reason}, which the halo conv does not support")
                    inst.override(m, "forward", lambda inner, m=m, key=key: halo_conv_forward(ctx, key, m, inner))
                elif isinstance(m, nn.GroupNorm):
                    fuse = name in pairs
                    inst.override(m, "forward", lambda inner, m=m, key=key, fuse=fuse:
                                  group_norm_forward(ctx, key, m, inner, fuse))
                elif isinstance(m, Attention) and not m.is_cross_attention:
                    inst.processor(m, lambda inner, key=key: BandAttention(ctx, key, inner))
            for act in dict.fromkeys(pairs.values()):
                inst.override(modules[act], "forward", lambda inner: silu_forward(ctx, inner))
            inst.override(d.module, "forward", lambda inner, d=d: _denoiser_forward(ctx, d, inner))
        steps = _Steps(ctx)
        rt, detach = attach(pipe, Subscriber(FEATURE, steps.before, steps.after), scheduler)
        inst.on_remove(detach)
        if _graphs_usable(config, dens):
            for d in dens:
                graphs = ctx.graphs[d.tag] = StepGraphs(ctx, d, lambda: _kinds_for_graphs(pipe, rt), graph_backend)
                inst.override(d.module, "forward", graphs.forward_factory)
                ctx.models[d.tag].comm.join_at_end = True  # a captured step must not leave work in flight
        return ctx

    install(FEATURE, [pipe] + [d.module for d in dens if d.module is not pipe], build)


def patch(pipe, config: ParallelConfig | None = None, group=None, *, scheduler=None, **kwargs) -> None:
    """Make every rank compute only its band of rows (see ParallelConfig for the modes).

    pipe: a diffusers pipeline with `.unet` (and `.controlnet`), or a UNet2DConditionModel.
    config: a ParallelConfig, or its fields as keyword arguments (`patch(pipe, mode="pcpp")`).
    group: the torch.distributed process group of the ranks that share the work (None = default group).
    scheduler: for a bare UNet, the scheduler whose `set_timesteps` starts each generation (pipelines: their own).
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
