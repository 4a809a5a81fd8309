"""Band versions of the layers that need other ranks' rows: k×k convs (halo rows) and GroupNorm (global sums).

Each is a factory for `Installation.override(module, "forward", ...)` (stack-safe instance overrides: the
module tree, parameter names and state_dict stay untouched). Where the boundary data comes from (fresh or
stale) is the mode's exchange strategy (`ctx.exchange`: exchange.py, distrifusion.py, pcpp.py)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import PatchError
from .state import LayerInfo, ParallelContext, StepInfo
from .geometry import conv_rows


def conv_supported(conv: torch.nn.Conv2d) -> str | None:
    """Why a conv cannot be run patch-parallel (None if it can)."""
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (use integer padding)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    return None


def _halo_plan(step: StepInfo, info: LayerInfo, conv: torch.nn.Conv2d, j: int) -> dict[str, int]:
    """For band j: rows it needs from the band above / below, zero rows outside the image, rows to trim."""
    h_in, h_out = info.in_shape[-2], info.out_shape[-2]
    i0, i1 = step.bands.bounds(h_in)[j]
    o0, o1 = step.bands.bounds(h_out)[j]
    a, b = conv_rows(o0, o1, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
    need_top, need_bot = i0 - a, b - i1
    first, last = j == 0, j == step.topo.n - 1
    return {
        "from_up": 0 if first else max(0, need_top),
        "zero_top": max(0, need_top) if first else 0,
        "trim_top": max(0, -need_top),
        "from_down": 0 if last else max(0, need_bot),
        "zero_bot": max(0, need_bot) if last else 0,
        "trim_bot": max(0, -need_bot),
        "out_rows": o1 - o0,
    }


def halo_conv_forward(ctx: ParallelContext, key: str, conv: torch.nn.Conv2d, original: Callable) -> Callable:
    """forward(x) of a k x k conv over a band: its input extended by the neighbours' halo rows."""
    pad_w = conv.padding[1]
    plans: dict[tuple, tuple] = {}  # per band geometry: (plan, exchange kwargs); computed once

    def plan_for(step: StepInfo, info: LayerInfo) -> tuple[dict[str, int], dict]:
        sig = (step.bands, step.topo.index, info.in_shape[-2], info.out_shape[-2])
        if sig not in plans:
            j, n = step.topo.index, step.topo.n
            plan = _halo_plan(step, info, conv, j)
            heights = step.bands.heights(info.in_shape[-2])
            if plan["from_up"] > (heights[j - 1] if j > 0 else 0) or plan["from_down"] > (
                    heights[j + 1] if j + 1 < n else 0):
                raise PatchError(f"halodiff: {key}: the conv needs more halo rows than a neighbour band holds "
                                 f"(band heights {heights}); use fewer ranks or a larger resolution")
            send_up = _halo_plan(step, info, conv, j - 1)["from_down"] if j > 0 else 0
            send_down = _halo_plan(step, info, conv, j + 1)["from_up"] if j + 1 < n else 0
            plans[sig] = (plan, dict(send_up=send_up, send_down=send_down, recv_up=plan["from_up"],
                                     recv_down=plan["from_down"], kind="conv_halo"))
        return plans[sig]

    def conv_rows_only(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, pad_w), conv.dilation, conv.groups)

    def forward(x: torch.Tensor) -> torch.Tensor:
        step = ctx.active
        if ctx.tracing:
            y = original(x)
            ctx.record(key, LayerInfo(tuple(x.shape), tuple(y.shape)))
            return y
        if step is None or step.topo.n == 1:
            return original(x)
        info = step.layer(key)
        j = step.topo.index
        h_in = info.in_shape[-2]
        if x.shape[-2] == h_in:  # replicated full input (conv_in): read the true neighbour rows, exact
            i0, _ = step.bands.bounds(h_in)[j]
            o0, o1 = step.bands.bounds(info.out_shape[-2])[j]
            a, b = conv_rows(o0, o1, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
            rows = x[..., max(a, 0): min(b, h_in), :]
            x_ext = F.pad(rows, (0, 0, max(0, -a), max(0, b - h_in)))
            return conv_rows_only(x_ext)
        plan, kw = plan_for(step, info)
        top, bot = ctx.exchange.halo_rows(step, key, x, kw)
        h = x.shape[-2]
        parts = [x[..., plan["trim_top"]: h - plan["trim_bot"], :]]
        if top is not None and plan["from_up"]:
            parts.insert(0, top)
        if bot is not None and plan["from_down"]:
            parts.append(bot)
        x_ext = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
        if plan["zero_top"] or plan["zero_bot"]:
            x_ext = F.pad(x_ext, (0, 0, plan["zero_top"], plan["zero_bot"]))
        return conv_rows_only(x_ext)

    return forward


def group_norm_forward(ctx: ParallelContext, key: str, gn: torch.nn.GroupNorm, original: Callable) -> Callable:
    """forward(x) of a GroupNorm over a band: statistics of the whole image (from the exchange)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        step = ctx.active
        if ctx.tracing:
            if x.dim() != 4:
                raise PatchError(f"halodiff: {key}: GroupNorm over a {x.dim()}-D input cannot be split into row "
                                 "bands (only [B, C, H, W] inputs are supported)")
            ctx.record(key, LayerInfo(tuple(x.shape)))
            return original(x)
        if step is None or step.topo.n == 1:
            return original(x)
        B, C, H, W = step.layer(key).in_shape
        if x.shape[-2] == H:  # replicated input: local stats are global
            return original(x)
        return ctx.exchange.group_norm(step, key, gn, x, float(C // gn.num_groups * H * W))

    return forward
