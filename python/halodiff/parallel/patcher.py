"""`patch` / `unpatch` / `comm_stats`: install the patch-parallel layers on a diffusers pipeline.

Modules are found by type (nn.Conv2d with k > 1, nn.GroupNorm, diffusers `Attention` used as
self-attention), so one code path serves SD1.5, SD2.x, SDXL and ControlNet. Every change is recorded
and undone by `unpatch`: instance `forward` overrides are deleted, processors and hooks restored.
A pipeline call is detected through an instance wrapper of `scheduler.set_timesteps` (every diffusers
pipeline calls it first); a bare UNet falls back to "the timestep went up" to start a new generation.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ParallelConfig
from ..comm import CommStats
from ..errors import PatchError
from .attention import PatchAttnProcessor
from .context import ModelState, ParallelContext, StepInfo
from .layers import conv_supported, group_norm_forward, halo_conv_forward

RESIDUAL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals")


@dataclass
class _Patch:
    ctx: ParallelContext
    undo: list[Callable[[], None]] = field(default_factory=list)


_PATCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _attention_class():
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - older/newer layouts
        from diffusers.models.attention import Attention
    return Attention


def _models(pipe) -> list[tuple[str, nn.Module]]:
    if isinstance(pipe, nn.Module):
        return [("unet", pipe)]
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise PatchError(f"halodiff.patch: {type(pipe).__name__} has no .unet; pass a diffusers UNet pipeline "
                         "(StableDiffusion*, StableDiffusionXL*, ControlNet pipelines) or a UNet2DConditionModel")
    found = [("unet", unet)]
    controlnet = getattr(pipe, "controlnet", None)
    if isinstance(controlnet, nn.Module):
        nets = getattr(controlnet, "nets", None)
        if isinstance(nets, nn.ModuleList):
            found += [(f"controlnet.{i}", n) for i, n in enumerate(nets)]
        else:
            found.append(("controlnet", controlnet))
    return found


def _timestep_value(t) -> float:
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else 0.0
    return float(t)


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


class _ModelHooks:
    """Forward pre/post hooks of one patched model: generation detection, CFG batch split, trace,
    step state, and (UNet) the gather of the predicted bands."""

    def __init__(self, ctx: ParallelContext, state: ModelState, gather_output: bool):
        self.ctx, self.state, self.gather_output = ctx, state, gather_output

    def pre(self, module, args, kwargs):
        ctx, st = self.ctx, self.state
        if ctx.tracing:
            return None
        args = list(args)
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if not isinstance(sample, torch.Tensor):
            return None
        t = _timestep_value(timestep) if timestep is not None else 0.0
        B = sample.shape[0]
        # A ControlNet in guess mode sees only the conditional half of the CFG batch (the pipeline pads
        # zeros for the other half): it runs unsplit on the split topology, so its band-local residuals
        # match the bands the UNet's CFG groups compute.
        guess = ctx.split is not None and kwargs.get("guess_mode") is True
        topo = ctx.split if (ctx.split is not None and (B % 2 == 0 or guess)) else ctx.full
        if topo is ctx.split and not guess:
            args = _split_batch(args, B, ctx.cfg_half)
            kwargs = _split_batch(kwargs, B, ctx.cfg_half)
            sample = args[0] if args else kwargs["sample"]
        signature = (tuple(sample.shape), sample.dtype, sample.device, topo.ranks)
        new_generation = st.needs_reset or (st.last_t is not None and t > st.last_t) or signature != st.signature
        if new_generation:
            st.comm.reset()
            st.step = -1
            st.needs_reset = False
            if signature != st.signature and ctx.world > 1:
                # Residuals may already be band-local (from a patched ControlNet); layer shapes do not
                # depend on them, so the trace runs without them.
                ctx.trace(st, tuple(args), {k: (None if k in RESIDUAL_KWARGS else v) for k, v in kwargs.items()}, topo)
                st.signature = signature
        st.step += 1
        st.last_t = t
        cfg = ctx.config
        last = ctx.timesteps is not None and len(ctx.timesteps) > 0 and abs(t - ctx.timesteps[-1]) < 1e-6
        bands = ctx.bands(max(st.deep_height, 1), topo.n)
        step = StepInfo(st, topo, bands, st.step, cfg.mode == "sync" or st.step < cfg.warmup_steps, last)
        for name in RESIDUAL_KWARGS:
            if kwargs.get(name) is not None:
                full = st.deep_height if name.startswith("mid") else sample.shape[-2]
                kwargs[name] = _band_slice(kwargs[name], step, full)
        ctx.active = step
        return tuple(args), kwargs

    def post(self, module, args, kwargs, output):
        ctx, step = self.ctx, self.ctx.active
        if ctx.tracing or step is None:
            return None
        ctx.active = None
        if not step.sync:
            step.comm.flush(step.topo, send=not step.last)
        if not self.gather_output:
            return None
        ctx.stats.steps += 1
        sample = output[0] if isinstance(output, tuple) else output.sample
        if step.topo.n > 1:
            full_h = step.model.signature[0][-2]  # the prediction has the input sample's height
            sample = step.comm.gather_bands(sample.contiguous(), step.bands.heights(full_h), step.topo, "output")
        if step.topo is ctx.split:
            sample = step.comm.all_gather_batch(sample, ctx.pair_group, 2, "output")
        if isinstance(output, tuple):
            return (sample, *output[1:])
        return type(output)(sample=sample)


def patch(pipe, config: ParallelConfig | None = None, group=None) -> None:
    """Make every rank compute only its band of rows (see ParallelConfig for the modes).

    pipe: a diffusers pipeline with `.unet` (and `.controlnet`), or a UNet2DConditionModel.
    group: the torch.distributed process group of the ranks that share the work (None = default group).
    Without an initialised torch.distributed the pipeline runs single-rank, unchanged.
    """
    _install(pipe, _checked(config), lambda cfg: ParallelContext(cfg, group))


def simulate(pipe, config: ParallelConfig | None, ranks: int, index: int) -> None:
    """Patch `pipe` to play band `index` of a `ranks`-rank group on this one process without sending
    anything (received boundary data is whatever the buffers hold). For timing one rank's compute and
    counting its bytes (bench/project_gpus.py); the image is not meaningful. Undo with `unpatch`."""
    _install(pipe, _checked(config), lambda cfg: ParallelContext(cfg, None, simulate=(ranks, index)))


def _checked(config) -> ParallelConfig:
    config = config if config is not None else ParallelConfig()
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"halodiff.patch: config must be a halodiff.ParallelConfig, got {type(config).__name__}")
    return config


def _install(pipe, config: ParallelConfig, make_context) -> None:
    if pipe in _PATCHES:
        raise PatchError("halodiff.patch: this pipeline is already patched; call halodiff.unpatch(pipe) first")
    models = _models(pipe)
    for tag, model in models:
        if model in _PATCHES:
            raise PatchError(f"halodiff.patch: its {tag} is already patched through another pipeline object")
    ctx = make_context(config)
    record = _Patch(ctx)
    Attention = _attention_class()
    try:
        for tag, model in models:
            state = ctx.add_model(tag, model)
            for name, m in model.named_modules():
                key = f"{tag}.{name}"
                if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1:
                    reason = conv_supported(m)
                    if reason:
                        raise PatchError(f"halodiff.patch: {key} has {reason}, which the halo conv does not support")
                    m.forward = halo_conv_forward(ctx, key, m, m.forward)
                    record.undo.append(lambda m=m: m.__dict__.pop("forward", None))
                elif isinstance(m, nn.GroupNorm):
                    m.forward = group_norm_forward(ctx, key, m, m.forward)
                    record.undo.append(lambda m=m: m.__dict__.pop("forward", None))
                elif isinstance(m, Attention) and not m.is_cross_attention:
                    original = m.processor
                    m.set_processor(PatchAttnProcessor(ctx, key, original))
                    record.undo.append(lambda m=m, p=original: m.set_processor(p))
            hooks = _ModelHooks(ctx, state, gather_output=tag == "unet")
            h1 = model.register_forward_pre_hook(hooks.pre, with_kwargs=True)
            h2 = model.register_forward_hook(hooks.post, with_kwargs=True)
            record.undo += [h1.remove, h2.remove]
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "set_timesteps"):
            original_set = scheduler.set_timesteps

            def set_timesteps(*a, **k):
                result = original_set(*a, **k)
                ts = getattr(scheduler, "timesteps", None)
                ctx.new_generation([float(t) for t in ts] if ts is not None else None)
                return result

            scheduler.set_timesteps = set_timesteps
            record.undo.append(lambda: scheduler.__dict__.pop("set_timesteps", None))
    except BaseException:
        for undo in reversed(record.undo):
            undo()
        raise
    _PATCHES[pipe] = record
    for _, model in models:
        if model is not pipe:
            _PATCHES[model] = record


def unpatch(pipe) -> None:
    """Undo `patch` exactly: original forwards, processors and scheduler; hooks removed."""
    record = _PATCHES.get(pipe)
    if record is None:
        raise PatchError("halodiff.unpatch: this pipeline is not patched (nothing to undo)")
    for state in record.ctx.models.values():
        state.comm.drain()
    for undo in reversed(record.undo):
        undo()
    for key in [k for k, v in list(_PATCHES.items()) if v is record]:
        del _PATCHES[key]


def comm_stats(pipe) -> CommStats:
    """This rank's communication counters for a patched pipeline (call `.reset()` to zero them)."""
    record = _PATCHES.get(pipe)
    if record is None:
        raise PatchError("halodiff.comm_stats: this pipeline is not patched")
    return record.ctx.stats


def context(pipe) -> ParallelContext:
    """The ParallelContext of a patched pipeline (step state, topology); for tools and tests."""
    record = _PATCHES.get(pipe)
    if record is None:
        raise PatchError("halodiff: this pipeline is not patched")
    return record.ctx
