"""DistriFusion (Li et al., CVPR 2024): patch parallelism with stale, asynchronously exchanged boundary data.

After `warmup_steps` synchronous steps (`SyncExchange`, exact), every band layer uses the other bands' data of
the *previous* step while this step's travels (ALGORITHMS.md §1):
- k x k convs: stale halo rows from the neighbours; this step's boundary rows are queued for the next step
  once the conv has read the stale ones;
- GroupNorm: DistriFusion's corrected stale statistics  S ≈ S_stale_global − S_stale_local + S_fresh_local
  (the own band's stale contribution replaced by the fresh one; the band's own variance where that estimate is
  negative), in one fused op (`group_norm_stale`); this step's local sums are queued for an all-reduce;
- self-attention: Q and the own band's K/V fresh, the other bands' K/V from the previous step's all-gather;
  this step's all-gather is posted right after the attention (not on the last step).
Queued data is posted in checkpoints during the forward and waited for where the next step reads it
(comm.manager).
"""
from __future__ import annotations

import torch

from .exchange import SyncExchange
from .state import StepInfo


class DistriFusion(SyncExchange):
    stale = True

    def is_sync(self, steps_since_reset: int) -> bool:
        return steps_since_reset < self.ctx.config.warmup_steps

    # ------------------------------------------------------------------------------ conv halos
    def halo_rows(self, step: StepInfo, key: str, x: torch.Tensor):
        if step.sync:
            return super().halo_rows(step, key, x)
        return step.comm.stale_rows(key)

    def after_halo(self, step: StepInfo, key: str, x: torch.Tensor) -> None:
        if not step.sync:
            step.comm.queue_rows(key, step.topo, x)

    # ------------------------------------------------------------------------------- GroupNorm
    def group_norm(self, step: StepInfo, key: str, gn: torch.nn.GroupNorm, x: torch.Tensor, count: float,
                   silu: bool) -> torch.Tensor:
        if step.sync:
            return super().group_norm(step, key, gn, x, count, silu)
        stale_glob, stale_local = step.comm.stale_sums(key)
        y, local = self.ctx.ops.group_norm_stale(x, gn.num_groups, gn.weight, gn.bias, gn.eps, silu, stale_glob,
                                                 stale_local, count)
        step.comm.queue_sums(key, local, step.topo)
        return y

    # ------------------------------------------------------------------------------- attention
    def attention(self, step: StepInfo, key: str, q, k, v, rows: int, cols: int, scale: float | None):
        if step.sync:
            return super().attention(step, key, q, k, v, rows, cols, scale)
        buf = self.kv_buffers(step, key, k, rows, cols)
        step.comm.arrive(key)  # the previous step's all-gather
        ks, vs = self.band_segments(step, buf, k, v)
        out = self.ctx.ops.segmented_attention(q, ks, vs, scale)
        if step.comm.sending:  # the next step reads this one's K/V: it travels until that step reaches this layer
            self.gather_kv(step, buf, k, v, key=key)
        return out
