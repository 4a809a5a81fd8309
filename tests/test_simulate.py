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
    """After one warm-up step the simulated rank runs the stale path (halos read from the previous step's
    buffers, this step's rows queued and flushed) with no peer at all, and the output keeps its shape."""
    unet = tiny_sd15_unet()
    lat, cond = torch.randn(2, 4, 32, 32), torch.randn(2, 8, CROSS_DIM)
    for mode in ("distrifusion", "pcpp"):
        halodiff.parallel.simulate(unet, ParallelConfig(mode=mode, warmup_steps=1), 4, 2)
        comm = halodiff.parallel.context(unet).models["unet"].comm
        calls = []
        names = ("exchange_rows", "stale_rows", "queue_rows", "end_step")
        for name in names:
            inner = getattr(comm, name)
            setattr(comm, name, lambda *a, inner=inner, name=name, **k: calls.append(name) or inner(*a, **k))
        per_step = []
        with torch.no_grad():
            for t in (900, 800, 700):
                calls.clear()
                out = unet(lat, t, encoder_hidden_states=cond).sample
                per_step.append({n: calls.count(n) for n in names})
                assert out.shape == lat.shape
        halodiff.unpatch(unet)
        n_convs = sum(1 for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1) - 1
        assert per_step[0] == {"exchange_rows": n_convs, "stale_rows": 0, "queue_rows": 0, "end_step": 1}, \
            (mode, per_step[0])
        queued = n_convs + (16 if mode == "pcpp" else 0)  # pcpp sends its K/V boundary rows too
        for step in per_step[1:]:
            assert step == {"exchange_rows": 0, "stale_rows": n_convs, "queue_rows": queued, "end_step": 1}, \
                (mode, step)
