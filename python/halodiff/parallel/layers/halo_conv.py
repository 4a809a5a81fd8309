"""Band k x k convs: a band's input extended by the neighbours' halo rows.

Mechanisms (the strategy picks one per step): `fresh` exchanges this step's boundary rows with the neighbour
bands and waits (exact); `stale` reads the rows the neighbours sent last step and queues this step's for the
next one, once the conv has consumed the stale ones (posted at the next checkpoint, waited where read).
A conv whose input is the whole replicated latent (the UNet's first conv) reads the true neighbour rows from
it: that is where a UNet's band split happens. Installed as a stack-safe instance override of `forward` (the
module tree, parameter names and state_dict stay untouched).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ...comm.manager import RowSpec
from ...comm.topology import Topology
from ...errors import PatchError
from ..geometry import Bands, conv_rows
from ..state import LayerInfo, ParallelContext, StepInfo

KIND = "conv"


def supported(conv: torch.nn.Conv2d) -> str | None:
    """Why a conv cannot be run patch-parallel (None if it can)."""
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (use integer padding)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    return None


def _plan(bands: Bands, n: int, info: LayerInfo, j: int) -> dict[str, int]:
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


def slots(key: str, info: LayerInfo, bands: Bands, topo: Topology) -> RowSpec:
    """The conv's slot in the neighbour messages: rows it receives from / sends to the bands above and below."""
    j, n = topo.index, topo.n
    plan = _plan(bands, n, info, j)
    heights = bands.heights(info.in_shape[-2])
    if plan["from_up"] > (heights[j - 1] if j > 0 else 0) or plan["from_down"] > (heights[j + 1] if j + 1 < n else 0):
        raise PatchError(f"halodiff: {key}: the conv needs more halo rows than a neighbour band holds "
                         f"(band heights {heights}); use fewer ranks or a larger resolution")
    B, C, _, W = info.in_shape
    return RowSpec(key, "conv_halo", (B, C), W,
                   _plan(bands, n, info, j - 1)["from_down"] if j > 0 else 0,
                   _plan(bands, n, info, j + 1)["from_up"] if j + 1 < n else 0,
                   plan["from_up"], plan["from_down"])


# ------------------------------------------------------------------------------------------ mechanisms
def fresh(step: StepInfo, key: str, x: torch.Tensor):
    """(rows from the band above, rows from the band below), exchanged now and waited for."""
    return step.comm.exchange_rows(key, x, step.topo)


def stale(step: StepInfo, key: str, x: torch.Tensor):
    """The neighbours' rows of the last step that exchanged them (waits for their message if still in flight)."""
    return step.comm.stale_rows(key)


def _after_stale(step: StepInfo, key: str, x: torch.Tensor) -> None:
    step.comm.queue_rows(key, step.topo, x)  # the stale rows are consumed: this step's are queued now


MECHANISMS = {"fresh": (fresh, None), "stale": (stale, _after_stale)}


def install(ctx: ParallelContext, inst, key: str, conv: torch.nn.Module, layer, modules: dict) -> None:
    reason = supported(conv)
    if reason:
        raise PatchError(f"halodiff.patch: {key} has {reason}, which the halo conv does not support")
    inst.override(conv, "forward", lambda inner: forward(ctx, key, conv, inner))


def forward(ctx: ParallelContext, key: str, conv: torch.nn.Conv2d, original: Callable) -> Callable:
    """forward(x) of a k x k conv over a band: its input extended by the neighbours' halo rows."""
    pad_w = conv.padding[1]
    params = (conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0])
    plans: dict[tuple, dict[str, int]] = {}  # per band geometry, computed once
    zeros: dict[tuple, torch.Tensor] = {}  # zero rows at the image border, one block per shape

    def zero_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
        k = (*x.shape[:-2], rows, x.shape[-1], x.dtype, x.device)
        block = zeros.get(k)
        if block is None:
            block = zeros[k] = x.new_zeros(*x.shape[:-2], rows, x.shape[-1])
        return block

    def conv_rows_only(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, pad_w), conv.dilation, conv.groups)

    def run(x: torch.Tensor) -> torch.Tensor:
        step = ctx.active
        if ctx.tracing:
            y = original(x)
            ctx.record(key, LayerInfo(tuple(x.shape), tuple(y.shape), kind=KIND, params=params))
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
            plan = plans[sig] = _plan(step.bands, step.topo.n, info, j)
        get, after = MECHANISMS[ctx.strategy.mechanism(KIND, step.sync)]
        top, bot = get(step, key, x)
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
        if after is not None:
            after(step, key, x)
        return conv_rows_only(x_ext)

    return run
