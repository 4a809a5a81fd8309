"""DistriFusion (Li et al., CVPR 2024): patch parallelism with stale, asynchronously exchanged boundary data.

After `warmup_steps` synchronous steps (`SyncExchange`, exact), every band layer uses the other bands' data of
the *previous* step while this step's travels (ALGORITHMS.md §1):
- k x k convs: stale halo rows from the neighbours; this step's boundary rows are queued for the next step;
- GroupNorm: DistriFusion's corrected stale statistics  S ≈ S_stale_global − S_stale_local + S_fresh_local
  (the own band's stale contribution replaced by the fresh one; the band's own variance where that estimate is
  negative); this step's local sums are queued for an all-reduce;
- self-attention: Q and the own band's K/V fresh, the other bands' K/V from the all-gather started by the
  previous step after this layer ran; this step's gather starts right after the attention (skipped on the
  last step).
"""
from __future__ import annotations

import torch

from .. import ops
from .exchange import SyncExchange
from .state import StepInfo


class DistriFusion(SyncExchange):
    stale = True

    def is_sync(self, steps_since_reset: int) -> bool:
        return steps_since_reset < self.ctx.config.warmup_steps

    # ------------------------------------------------------------------------------ conv halos
    def halo_rows(self, step: StepInfo, key: str, x: torch.Tensor, kw: dict):
        if step.sync:
            return super().halo_rows(step, key, x, kw)
        top, bot = step.comm.stale_rows(key)
        step.comm.queue_rows(key, x, **kw)
        return top, bot

    # ------------------------------------------------------------------------------- GroupNorm
    def group_norm(self, step: StepInfo, key: str, gn: torch.nn.GroupNorm, x: torch.Tensor, count: float):
        if step.sync:
            return super().group_norm(step, key, gn, x, count)
        G = gn.num_groups
        local = ops.group_stats(x, G)
        stale_glob, stale_local = step.comm.stale_sums(key)
        step.comm.queue_sums(key, local)
        est = stale_glob - stale_local + local
        mean = est[..., 0] / count
        var = est[..., 1] / count - mean * mean
        n_loc = float(x.shape[1] // G * x.shape[-2] * x.shape[-1])
        loc_mean = local[..., 0] / n_loc
        var = torch.where(var < 0, local[..., 1] / n_loc - loc_mean * loc_mean, var)
        stats = torch.stack([est[..., 0], count * (var + mean * mean)], dim=-1)
        return ops.group_norm(x, G, gn.weight, gn.bias, gn.eps, stats=stats, count=count)

    # ------------------------------------------------------------------------------- attention
    def attention(self, step: StepInfo, key: str, q: torch.Tensor, kv: torch.Tensor, rows: int, cols: int,
                  scale: float | None) -> torch.Tensor:
        if step.sync:
            return super().attention(step, key, q, kv, rows, cols, scale)
        heads, D = q.shape[1], q.shape[-1]
        buf = self.kv_buffers(step, key, kv, rows, cols)
        self.join_kv(buf)
        ks, vs = self.band_segments(step, buf, kv, heads, D)
        out = ops.segmented_attention(q, ks, vs, scale=scale)
        if not step.last:  # the next step reads this one's K/V; it overlaps the rest of this step
            buf.pending = self.gather_kv(step, buf, kv, async_op=True)
        return out
