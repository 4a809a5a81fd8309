"""`halodiff.parallel.simulate`: one process plays one rank of N (for multi-GPU projections)."""
from __future__ import annotations

import torch

import halodiff
from halodiff import ParallelConfig
from parallel_utils import CROSS_DIM, expected_sync_bytes, tiny_sd15_unet


def test_simulated_rank_counts_the_bytes_of_a_real_rank():
    unet = tiny_sd15_unet()
    g = torch.Generator().manual_seed(0)
    lat, cond = torch.randn(1, 4, 32, 32, generator=g), torch.randn(2, 8, CROSS_DIM, generator=g)
    expected = expected_sync_bytes(unet, lat, cond, 3)
    for index in range(3):
        halodiff.parallel.simulate(unet, ParallelConfig(mode="sync"), 3, index)
        with torch.no_grad():
            out = unet(torch.cat([lat, lat]), 500, encoder_hidden_states=cond).sample
        assert out.shape == (2, 4, 32, 32)
        got = halodiff.comm_stats(unet).bytes_by_kind
        assert got == {k: v[index] for k, v in expected.items()}
        halodiff.unpatch(unet)


def test_simulated_async_steps_run_without_peers():
    unet = tiny_sd15_unet()
    lat, cond = torch.randn(2, 4, 32, 32), torch.randn(2, 8, CROSS_DIM)
    for mode in ("distrifusion", "pcpp"):
        halodiff.parallel.simulate(unet, ParallelConfig(mode=mode, warmup_steps=1), 4, 2)
        with torch.no_grad():
            for t in (900, 800, 700):
                unet(lat, t, encoder_hidden_states=cond)
        assert halodiff.parallel.context(unet).models["unet"].step == 2
        halodiff.unpatch(unet)
