"""Band GroupNorm: statistics of the whole image from every band's sums.

Mechanisms: `fresh` all-reduces this step's [B, G, 2] float64 sums and waits (exact); `stale` is DistriFusion's
corrected stale estimate S ≈ S_stale_global − S_stale_local + S_fresh_local (the band's own stale contribution
replaced by its fresh one; its own variance where that estimate is negative), in one fused op
(`group_norm_stale`), and queues this step's sums for the next step's all-reduce. A GroupNorm whose output
feeds a SiLU directly (diffusers' resnets) applies the SiLU itself (one fused kernel) and the SiLU module
passes that output through.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import PatchError
from ..state import LayerInfo, ParallelContext, StepInfo

KIND = "groupnorm"


def fresh(step: StepInfo, ctx: ParallelContext, key: str, gn, x, count: float, silu: bool) -> torch.Tensor:
    ops = ctx.ops
    local = ops.group_stats(x, gn.num_groups)
    glob = step.comm.all_reduce_sums(key, local, step.topo)
    return ops.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps, silu, glob, count)


def stale(step: StepInfo, ctx: ParallelContext, key: str, gn, x, count: float, silu: bool) -> torch.Tensor:
    stale_glob, stale_local = step.comm.stale_sums(key)
    y, local = ctx.ops.group_norm_stale(x, gn.num_groups, gn.weight, gn.bias, gn.eps, silu, stale_glob, stale_local,
                                        count)
    step.comm.queue_sums(key, local, step.topo)
    return y


MECHANISMS = {"fresh": fresh, "stale": stale}


def install(ctx: ParallelContext, inst, key: str, gn: torch.nn.Module, layer, modules: dict) -> None:
    act = modules.get(layer.fuse_silu) if layer.fuse_silu is not None else None
    fuse = isinstance(act, torch.nn.SiLU)
    inst.override(gn, "forward", lambda inner: forward(ctx, key, gn, inner, fuse))
    if fuse and id(act) not in ctx.silu_passthrough:  # one SiLU may follow several norms (a resnet's norm1, norm2)
        ctx.silu_passthrough.add(id(act))
        inst.override(act, "forward", lambda inner: silu_forward(ctx, inner))


def forward(ctx: ParallelContext, key: str, gn: torch.nn.GroupNorm, original: Callable,
            fuse_silu: bool = False) -> Callable:
    """forward(x) of a GroupNorm over a band: statistics of the whole image (from the strategy's mechanism).
    fuse_silu: the module's output goes straight into a SiLU (see `silu_forward`): apply it here."""

    def run(x: torch.Tensor) -> torch.Tensor:
        step = ctx.active
        if ctx.tracing:
            if x.dim() != 4:
                raise PatchError(f"halodiff: {key}: GroupNorm over a {x.dim()}-D input cannot be split into row "
                                 "bands (only [B, C, H, W] inputs are supported)")
            ctx.record(key, LayerInfo(tuple(x.shape), kind=KIND, params=(gn.num_groups,)))
            return original(x)
        if step is None or step.topo.n == 1:
            return original(x)
        B, C, H, W = step.layer(key).in_shape
        if x.shape[-2] == H:  # replicated input: local stats are global
            return original(x)
        mech = MECHANISMS[ctx.strategy.mechanism(KIND, step.sync)]
        y = mech(step, ctx, key, gn, x, float(C // gn.num_groups * H * W), fuse_silu)
        if fuse_silu:
            ctx.fused_silu = y
        return y

    return run


def silu_forward(ctx: ParallelContext, original: Callable) -> Callable:
    """forward(x) of a SiLU that follows a fused GroupNorm: its output already holds the SiLU."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if x is ctx.fused_silu:
            ctx.fused_silu = None
            return x
        return original(x)

    return run
