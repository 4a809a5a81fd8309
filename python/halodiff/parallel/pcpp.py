"""PCPP (partially conditioned patch parallelism): DistriFusion whose self-attention sees only part of the
neighbour bands.

After the warm-up, the self-attention of band j attends to its own band (fresh) plus the last
ceil(p·h_{j−1}) rows of the band above and the first ceil(p·h_{j+1}) rows of the band below (stale), with
p = `halo_fraction` (ALGORITHMS.md §2). Only those rows travel, point to point in the step's neighbour
message (packed with the conv halos), instead of whole bands all-gathered. Convs and GroupNorm are
DistriFusion's. Warm-up steps all-gather full K/V (exact) and keep the partial rows the first async step
reads. The segments go to `ops.segmented_attention` as they are: nothing is concatenated.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from .distrifusion import DistriFusion
from .exchange import KVBuffers, SyncExchange, split_kv
from .state import StepInfo


def pcpp_rows(p: float, h: int) -> int:
    """Rows of a neighbour band of height h that a pcpp band attends to."""
    return min(h, math.ceil(p * h - 1e-9))


class PCPP(DistriFusion):
    @property
    def p(self) -> float:
        return self.ctx.config.halo_fraction

    def attention(self, step: StepInfo, key: str, q: torch.Tensor, kv: torch.Tensor, rows: int, cols: int,
                  scale: float | None) -> torch.Tensor:
        if step.sync:
            out = SyncExchange.attention(self, step, key, q, kv, rows, cols, scale)  # warm-up: whole bands
            self._store_partial_rows(step, key, self.kv[key], cols)
            return out
        heads, D = q.shape[1], q.shape[-1]
        topo, j = step.topo, step.topo.index
        heights = step.bands.heights(rows)
        B, L, C2 = kv.shape
        top, bot = step.comm.stale_rows(key)
        mine = pcpp_rows(self.p, heights[j])
        step.comm.queue_rows(
            key, kv.view(B, heights[j], cols * C2), send_up=mine, send_down=mine,
            recv_up=pcpp_rows(self.p, heights[j - 1]) if j > 0 else 0,
            recv_down=pcpp_rows(self.p, heights[j + 1]) if j + 1 < topo.n else 0, kind="attention")
        segs = [t.reshape(B, -1, C2) for t in (top, kv, bot) if t is not None and t.numel()]
        pairs = [split_kv(s, heads, D) for s in segs or [kv]]
        return ops.segmented_attention(q, [k for k, _ in pairs], [v for _, v in pairs], scale=scale)

    def _store_partial_rows(self, step: StepInfo, key: str, buf: KVBuffers, cols: int) -> None:
        """After a sync gather: keep the neighbour rows the next async step attends to."""
        topo, j = step.topo, step.topo.index
        heights = [n // cols for n in buf.lens]
        top = bot = None
        if j > 0:
            r = pcpp_rows(self.p, heights[j - 1])
            top = buf.recv[j - 1, :, (heights[j - 1] - r) * cols: heights[j - 1] * cols].unflatten(1, (r, cols)).flatten(2)
        if j + 1 < topo.n:
            r = pcpp_rows(self.p, heights[j + 1])
            bot = buf.recv[j + 1, :, : r * cols].unflatten(1, (r, cols)).flatten(2)
        step.comm.store_rows(key, top, bot)

