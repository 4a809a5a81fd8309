"""Band versions of the layers that need other ranks' rows: k×k convs (halo rows) and GroupNorm (global sums).

Each is a factory for `Installation.override(module, "forward", ...)` (stack-safe instance overrides: the
module tree, parameter names and state_dict stay untouched). Where the boundary data comes from (fresh or
stale) is the mode's exchange strategy (`ctx.exchange`: exchange.py, distrifusion.py, pcpp.py). A GroupNorm
whose output feeds a SiLU directly (diffusers' resnets) applies the SiLU itself (one fused kernel) and the
SiLU module passes that output through.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..comm.manager import RowSpec
from ..comm.topology import Topology
from ..errors import PatchError
from .geometry import Bands, conv_rows
from .state import LayerInfo, ParallelContext


def conv_supported(conv: torch.nn.Conv2d) -> str | None:
    """Why a conv cannot be run patch-parallel (None if it can)."""
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (use integer padding)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    return None


def _halo_plan(bands: Bands, n: int, info: LayerInfo, j: int) -> dict[str, int]:
    """For band j: rows it needs from the band above / below, zero rows outside the image, rows to trim."""
    k, s, p, d = info.params
    h_in, h_out = info.in_shape[-2], info.out_shape[-2]
    i0, i1 = bands.bounds(h_in)[j]
    o0, o1 = bands.bounds(h_out)[j]
    a, b = conv_rows(o0, o1, k, s, p, d)
    need_top, need_bot = i0 - a, b - i1
    first, last = j == 0, j == n - 1
    return {
        "from_up": 0 if first else max(0, need_top),
        "zero_top": max(0, need_top) if first else 0,
        "trim_top": max(0, -need_top),
        "from_down": 0 if last else max(0, need_bot),
        "zero_bot": max(0, need_bot) if last else 0,
        "trim_bot": max(0, -need_bot),
    }


def halo_spec(key: str, info: LayerInfo, bands: Bands, topo: Topology) -> RowSpec:
    """The conv's slot in the neighbour messages: rows it receives from / sends to the bands above and below."""
    j, n = topo.index, topo.n
    plan = _halo_plan(bands, n, info, j)
    heights = bands.heights(info.in_shape[-2])
    if plan["from_up"] > (heights[j - 1] if j > 0 else 0) or plan["from_down"] > (heights[j + 1] if j + 1 < n else 0):
        raise PatchError(f"halodiff: {key}: the conv needs more halo rows than a neighbour band holds "
                         f"(band heights {heights}); use fewer ranks or a larger resolution")
    B, C, _, W = info.in_shape
    return RowSpec(key, "conv_halo", (B, C), W,
                   _halo_plan(bands, n, info, j - 1)["from_down"] if j > 0 else 0,
                   _halo_plan(bands, n, info, j + 1)["from_up"] if j + 1 < n else 0,
                   plan["from_up"], plan["from_down"])


def halo_conv_forward(ctx: ParallelContext, key: str, conv: torch.nn.Conv2d, original: Callable) -> Callable:
    """forward(x) of a k x k conv over a band: its input extended by the neighbours' halo rows."""
    pad_w = conv.padding[1]
    params = (conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
    plans: dict[tuple, dict[str, int]] = {}  # per band geometry, computed once
    zeros: dict[tuple, torch.Tensor] = {}  # zero rows at the image border, one block per shape

    def zero_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
        key = (*x.shape[:-2], rows, x.shape[-1], x.dtype, x.device)
        block = zeros.get(key)
        if block is None:
            block = zeros[key] = x.new_zeros(*x.shape[:-2], rows, x.shape[-1])
        return block

    def conv_rows_only(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, pad_w), conv.dilation, conv.groups)

    def forward(x: torch.Tensor) -> torch.Tensor:
        step = ctx.active
        if ctx.tracing:
            y = original(x)
            ctx.record(key, LayerInfo(tuple(x.shape), tuple(y.shape), kind="conv", params=params))
            return y
        if step is None or step.topo.n == 1:
            return original(x)
        info = step.layer(key)
        j = step.topo.index
        h_in = info.in_shape[-2]
        if x.shape[-2] == h_in:  # replicated full input (conv_in): read the true neighbour rows, exact
            o0, o1 = step.bands.bounds(info.out_shape[-2])[j]
            a, b = conv_rows(o0, o1, *params)
            rows = x[..., max(a, 0): min(b, h_in), :]
            return conv_rows_only(F.pad(rows, (0, 0, max(0, -a), max(0, b - h_in))))
        sig = (step.bands, j, step.topo.n, h_in)
        plan = plans.get(sig)
        if plan is None:
            plan = plans[sig] = _halo_plan(step.bands, step.topo.n, info, j)
        top, bot = ctx.exchange.halo_rows(step, key, x)
        h = x.shape[-2]
        parts = [x[..., plan["trim_top"]: h - plan["trim_bot"], :] if plan["trim_top"] or plan["trim_bot"] else x]
        if plan["from_up"] and top is not None:
            parts.insert(0, top)
        elif plan["zero_top"]:
            parts.insert(0, zero_rows(x, plan["zero_top"]))
        if plan["from_down"] and bot is not None:
            parts.append(bot)
        elif plan["zero_bot"]:
            parts.append(zero_rows(x, plan["zero_bot"]))
        x_ext = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
        ctx.exchange.after_halo(step, key, x)  # the stale rows are consumed: this step's may be queued now
        return conv_rows_only(x_ext)

    return forward


def group_norm_forward(ctx: ParallelContext, key: str, gn: torch.nn.GroupNorm, original: Callable,
                       fuse_silu: bool = False) -> Callable:
    """forward(x) of a GroupNorm over a band: statistics of the whole image (from the exchange).
    fuse_silu: the module's output goes straight into a SiLU (see `silu_forward`): apply it here."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        step = ctx.active
        if ctx.tracing:
            if x.dim() != 4:
                raise PatchError(f"halodiff: {key}: GroupNorm over a {x.dim()}-D input cannot be split into row "
                                 "bands (only [B, C, H, W] inputs are supported)")
            ctx.record(key, LayerInfo(tuple(x.shape), kind="groupnorm", params=(gn.num_groups,)))
            return original(x)
        if step is None or step.topo.n == 1:
            return original(x)
        B, C, H, W = step.layer(key).in_shape
        if x.shape[-2] == H:  # replicated input: local stats are global
            return original(x)
        y = ctx.exchange.group_norm(step, key, gn, x, float(C // gn.num_groups * H * W), fuse_silu)
        if fuse_silu:
            ctx.fused_silu = y
        return y

    return forward


def silu_forward(ctx: ParallelContext, original: Callable) -> Callable:
    """forward(x) of a SiLU that follows a fused GroupNorm: its output already holds the SiLU."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x is ctx.fused_silu:
            ctx.fused_silu = None
            return x
        return original(x)

    return forward
