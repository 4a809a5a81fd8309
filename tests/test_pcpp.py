"""PCPP partial-halo attention on real gloo ranks: p = 1 equals distrifusion at N = 2, p = 0 is band-local,
and the bytes of an async step match the formula (only ceil(p*h) neighbour rows travel)."""
from __future__ import annotations

import math

import torch

import halodiff
from halodiff import ParallelConfig
from parallel_utils import CROSS_DIM, band_rows, denoise, expected_sync_bytes, run_ranks, tiny_sd15_unet


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 32, 32, generator=g).double(), torch.randn(2, 8, CROSS_DIM, generator=g).double()


def _equivalence_worker(rank, world):
    unet = tiny_sd15_unet().double()
    lat, cond = _inputs()
    out = {}
    for name, cfg in [("distrifusion", ParallelConfig(mode="distrifusion", warmup_steps=2, split_cfg=False)),
                      ("pcpp1", ParallelConfig(mode="pcpp", warmup_steps=2, split_cfg=False, halo_fraction=1.0)),
                      ("pcpp0", ParallelConfig(mode="pcpp", warmup_steps=2, split_cfg=False, halo_fraction=0.0))]:
        halodiff.patch(unet, cfg)
        out[name] = denoise(unet, lat, cond, 5)
        halodiff.unpatch(unet)
    return out


def test_full_fraction_equals_distrifusion_at_two_ranks():
    for res in run_ranks(_equivalence_worker, 2):
        torch.testing.assert_close(res["pcpp1"], res["distrifusion"], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(res["pcpp0"], res["distrifusion"], rtol=1e-6, atol=1e-6)


def _attention_shapes(unet, lat, cond):
    shapes = []
    hooks = [m.register_forward_pre_hook(lambda m, a, k: shapes.append((a[0] if a else k["hidden_states"]).shape),
                                         with_kwargs=True)
             for n, m in unet.named_modules() if n.endswith("attn1")]
    with torch.no_grad():
        unet(torch.cat([lat, lat]), 500, encoder_hidden_states=cond)
    for h in hooks:
        h.remove()
    return shapes


def _bytes_worker(rank, world, p):
    unet = tiny_sd15_unet()
    lat, cond = (t.float() for t in _inputs())
    sync = expected_sync_bytes(unet, lat, cond, world)
    attn = _attention_shapes(unet, lat, cond)
    halodiff.patch(unet, ParallelConfig(mode="pcpp", warmup_steps=1, split_cfg=False, halo_fraction=p))
    stats = halodiff.comm_stats(unet)
    x = torch.cat([lat, lat])
    with torch.no_grad():
        unet(x, 900, encoder_hidden_states=cond)  # sync warm-up step
        stats.reset()
        unet(x, 800, encoder_hidden_states=cond)  # async step: sends this step's rows for the next one
    return dict(stats.bytes_by_kind), {k: v[rank] for k, v in sync.items()}, attn


def test_async_step_bytes_match_the_formula():
    world, p = 3, 0.3
    for rank, (got, sync, attn) in enumerate(run_ranks(_bytes_worker, world, p)):
        # Conv halos, GroupNorm sums and the output gather are the same as in a sync step.
        assert {k: got[k] for k in ("conv_halo", "groupnorm", "output")} == \
            {k: sync[k] for k in ("conv_halo", "groupnorm", "output")}
        # Attention: ceil(p * h) rows of each neighbour band, K and V, every self-attention layer.
        expected = 0
        for B, L, C in attn:
            H = {1024: 32, 256: 16, 64: 8, 16: 4}[L]
            W = L // H
            heights = [e - s for s, e in (band_rows(H, 4, world, j) for j in range(world))]
            rows = sum(math.ceil(p * heights[j]) for j in (rank - 1, rank + 1) if 0 <= j < world)
            expected += rows * W * B * 2 * C * 4
        assert got["attention"] == expected
        assert got["attention"] < sync["attention"]  # far less than distrifusion's whole bands
