"""Fake (meta) kernels for the native schemas so they trace under torch.compile / FakeTensor."""
from __future__ import annotations

import functools

import torch

from .reference import out_format


@functools.cache
def register_fakes() -> None:
    @torch.library.register_fake("halodiff::group_stats")
    def _group_stats(x, num_groups):
        return x.new_empty((x.shape[0], num_groups, 2), dtype=torch.float64)

    @torch.library.register_fake("halodiff::group_norm")
    def _group_norm(x, num_groups, weight, bias, eps, silu, stats, count):
        return torch.empty_like(x, memory_format=out_format(x))

    @torch.library.register_fake("halodiff::group_norm_stale")
    def _group_norm_stale(x, num_groups, weight, bias, eps, silu, stale_global, stale_local, count):
        return torch.empty_like(x, memory_format=out_format(x)), _group_stats(x, num_groups)

    @torch.library.register_fake("halodiff::segmented_attention")
    def _segmented_attention(q, ks, vs, scale):
        B, H, Lq, D = q.shape
        return q.new_empty((B, Lq, H, D)).transpose(1, 2)  # [B, H, Lq, D] view of a [B, Lq, H, D] buffer
