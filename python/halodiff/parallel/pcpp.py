"""PCPP (partially conditioned patch parallelism): DistriFusion whose self-attention sees only part of the
neighbour bands.

After the warm-up, the self-attention of band j attends to its own band (fresh) plus the last
ceil(p·h_{j−1}) rows of the band above and the first ceil(p·h_{j+1}) rows of the band below (stale), with
p = `halo_fraction` (ALGORITHMS.md §2). Only those rows travel, point to point in the step's neighbour
messages (posted with the conv halos), instead of whole bands all-gathered. Convs and GroupNorm are
DistriFusion's. Warm-up steps all-gather full K/V (exact) and keep the partial rows the first async step
reads. The segments go to `segmented_attention` as they are: nothing is concatenated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..comm.manager import RowSpec
from .distrifusion import DistriFusion
from .exchange import SyncExchange, split_kv
from .state import LayerInfo, StepInfo


def pcpp_rows(p: float, h: int) -> int:
    """Rows of a neighbour band of height h that a pcpp band attends to."""
    return min(h, math.ceil(p * h - 1e-9))


@dataclass
class _SlotViews:
    sig: tuple
    stale: list  # (K, V) of the rows above (if any), then below (if any)
    below: bool
    send: list  # (K dst, V dst, first token, end token or 0 = the band's end)


class PCPP(DistriFusion):
    def __init__(self, ctx):
        super().__init__(ctx)
        self._slot_views: dict[str, _SlotViews] = {}

    @property
    def p(self) -> float:
        return self.ctx.config.halo_fraction

    def attention_spec(self, key: str, info: LayerInfo, step: StepInfo) -> RowSpec:
        """K/V rows of a self-attention layer in the neighbour messages: [B, rows, cols·2C]."""
        (rows, cols), j, n = info.hw, step.topo.index, step.topo.n
        h = step.bands.heights(rows)
        mine = pcpp_rows(self.p, h[j])
        return RowSpec(key, "attention", (info.in_shape[0],), cols * 2 * info.params[0], mine, mine,
                       pcpp_rows(self.p, h[j - 1]) if j > 0 else 0, pcpp_rows(self.p, h[j + 1]) if j + 1 < n else 0)

    def attention(self, step: StepInfo, key: str, q, k, v, rows: int, cols: int, scale: float | None):
        if step.sync:
            out = SyncExchange.attention(self, step, key, q, k, v, rows, cols, scale)  # warm-up: whole bands
            self._keep_partial_rows(step, key, cols)
            return out
        step.comm.arrive(key)  # the message with the neighbours' rows of the previous step
        views = self._views(step, key, k)
        ks = [s[0] for s in views.stale] + [k]
        vs = [s[1] for s in views.stale] + [v]
        if views.below:  # the stale rows below come after the own band
            ks.append(ks.pop(-2))
            vs.append(vs.pop(-2))
        out = self.ctx.ops.segmented_attention(q, ks, vs, scale)
        if step.comm.sending:  # this band's boundary K/V rows, for the neighbours' next step, straight into the slots
            L = k.shape[2]
            for dk, dv, start, end in views.send:
                dk.copy_(k[:, :, start: end if end else L].transpose(1, 2))
                dv.copy_(v[:, :, start: end if end else L].transpose(1, 2))
            step.comm.queue_rows(key, step.topo)
        return out

    def _views(self, step: StepInfo, key: str, k) -> _SlotViews:
        """The K/V views of a layer's static slots, made once per layout: stale segments to attend to, and the
        [B, r·cols, H, D] halves of the send slots with the token range of the band they take."""
        up, down = step.comm.send_slots(key)
        top, bot = step.comm.recv_slots(key)
        sig = tuple(t.data_ptr() if t is not None else None for t in (up, down, top, bot))
        views = self._slot_views.get(key)
        if views is not None and views.sig == sig:
            return views
        B, H, L, D = k.shape
        stale = [split_kv(t.reshape(B, -1, 2 * H * D), H, D) for t in (top, bot) if t is not None]
        send = []
        for slot, at_top in ((up, True), (down, False)):
            if slot is not None:
                n = slot.shape[-2] * slot.shape[-1] // (2 * H * D)  # tokens in the slot
                d = slot.reshape(B, n, 2, H, D)
                send.append((d[:, :, 0], d[:, :, 1], 0 if at_top else L - n, n if at_top else 0))
        views = self._slot_views[key] = _SlotViews(sig, stale, bot is not None, send)
        return views

    def _keep_partial_rows(self, step: StepInfo, key: str, cols: int) -> None:
        """After a sync gather: copy the neighbour rows the next async step attends to into the layer's slots."""
        buf = self.kv[key]
        top, bot = step.comm.recv_slots(key)
        j = step.topo.index
        heights = [n // cols for n in buf.lens]
        if top is not None:
            r = top.shape[-2]
            top.copy_(buf.recv[j - 1, :, (heights[j - 1] - r) * cols: heights[j - 1] * cols].unflatten(1, (r, cols))
                      .flatten(2))
        if bot is not None:
            r = bot.shape[-2]
            bot.copy_(buf.recv[j + 1, :, : r * cols].unflatten(1, (r, cols)).flatten(2))

