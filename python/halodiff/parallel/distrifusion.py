"""DistriFusion (Li et al., CVPR 2024): patch parallelism with stale, asynchronously exchanged boundary data.

After `warmup_steps` synchronous steps, every band layer uses the other bands' data of the *previous* step
while this step's travels (docs/algorithms.md): stale conv halos, DistriFusion's corrected stale GroupNorm
statistics, and self/joint attention over the own band's fresh K/V plus the other bands' K/V from the previous
step's all-gather. The mechanisms live in `parallel/layers/`; this module is the policy.
"""
from __future__ import annotations

from .sync import Sync


class DistriFusion(Sync):
    stale = True

    def is_sync(self, steps_since_reset: int) -> bool:
        return steps_since_reset < self.config.warmup_steps

    def mechanism(self, kind: str, sync: bool) -> str:
        return "fresh" if sync else "stale"
