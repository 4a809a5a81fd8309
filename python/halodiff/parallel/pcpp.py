"""PCPP (partially conditioned patch parallelism): DistriFusion whose attention sees only part of the neighbour
bands.

After the warm-up, the attention of band j attends to its own band (fresh) plus the last ceil(p·h_{j−1}) rows of
the band above and the first ceil(p·h_{j+1}) rows of the band below (stale), with p = `halo_fraction`
(docs/algorithms.md); only those rows travel, point to point in the step's neighbour messages, instead of whole
bands all-gathered. Convs and GroupNorm are DistriFusion's. Warm-up steps all-gather full K/V (exact) and keep
the partial rows the first async step reads. The mechanisms live in `parallel/layers/`; this module is the policy.
"""
from __future__ import annotations

from .distrifusion import DistriFusion
from .layers.attention import pcpp_rows

__all__ = ["PCPP", "pcpp_rows"]


class PCPP(DistriFusion):
    partial_attention = True

    @property
    def p(self) -> float:
        return self.config.halo_fraction

    def mechanism(self, kind: str, sync: bool) -> str:
        if kind == "attention" and not sync:
            return "partial"
        return super().mechanism(kind, sync)
