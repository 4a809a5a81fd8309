"""Patch parallelism on real gloo ranks vs a single-device run (tiny UNets with the SD1.5 / SDXL structure).

Exactness checks run in float64 so float reassociation noise (which the CFG sampler amplifies) stays far
below the tolerance: final latents of `sync` mode must be within 1e-5 * max|ref| of one device.
"""
from __future__ import annotations

import time

import pytest
import torch

import halodiff
from halodiff import ParallelConfig, PatchError
from parallel_utils import (CROSS_DIM, denoise, expected_sync_bytes, prompt_embeds, psnr, run_ranks, sdxl_added_cond, tiny_controlnet_pipeline,
                            tiny_sd15_unet, tiny_sdxl_unet)

STEPS = 4
TOL = 1e-5
# dB vs one device for distrifusion/pcpp after 2 warm-up steps of 4: the random-weight tiny UNets give 20.2-23.9 dB
# (the trained digits model ~28 dB, README); tests/test_stale_oracle.py checks the stale steps exactly.
PSNR_STALE = 18.0


def _inputs(H: int, W: int | None = None, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, H, W or H, generator=g).to(dtype)
    cond = torch.randn(2, 8, CROSS_DIM, generator=g).to(dtype)
    return lat, cond


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------------------------- workers
def _modes_worker(rank, world, H, W, split):
    """sync / warm-up-only distrifusion / distrifusion / pcpp / unpatch on one UNet.

    The single-device reference runs on rank 0 only and the after-unpatch run on the last rank only (with 2 CPU
    cores and up to 4 ranks, a full-image run on every rank would cost twice the patched runs)."""
    unet = tiny_sd15_unet().double()
    lat, cond = _inputs(H, W)
    out = {"ref": denoise(unet, lat, cond, STEPS) if rank == 0 else None}
    configs = [
        ("sync", ParallelConfig(mode="sync", split_cfg=split)),
        ("warmup_only", ParallelConfig(mode="distrifusion", warmup_steps=STEPS, split_cfg=split)),
        ("distrifusion", ParallelConfig(mode="distrifusion", warmup_steps=2, split_cfg=split)),
        ("pcpp", ParallelConfig(mode="pcpp", warmup_steps=2, split_cfg=split, halo_fraction=0.3)),
    ]
    if split or world > 3:  # warm-up == sync is checked on 2 and 3 ranks without the CFG split (interior bands)
        configs = [c for c in configs if c[0] != "warmup_only"]
    for name, cfg in configs:
        halodiff.patch(unet, cfg)
        out[name] = denoise(unet, lat, cond, STEPS)
        out[name + "_bytes"] = dict(halodiff.comm_stats(unet).bytes_by_kind)
        halodiff.unpatch(unet)
    out["after_unpatch"] = denoise(unet, lat, cond, STEPS) if rank == world - 1 else None
    return out


def _check_modes(results, what: str, banded: bool = True):
    ref = results[0]["ref"]
    for r, res in enumerate(results):
        assert _rel(res["sync"], ref) <= TOL, f"{what} rank {r}: sync differs from one device by {_rel(res['sync'], ref):.2e}"
        if "warmup_only" in res:
            assert torch.equal(res["warmup_only"], res["sync"]), "warm-up steps must equal sync mode"
        for mode in ("sync", "distrifusion", "pcpp"):
            assert torch.equal(res[mode], results[0][mode]), f"{what}: rank {r} {mode} latents differ from rank 0"
    assert torch.equal(results[-1]["after_unpatch"], ref), \
        f"{what}: unpatch on the last rank must restore its bit-identical single-device output"
    for mode in ("distrifusion", "pcpp"):  # after the warm-up the stale modes really use stale data ...
        if not banded:  # 2 ranks with split_cfg: one CFG half per rank, no bands, nothing stale
            assert _rel(results[0][mode], ref) <= TOL
            continue
        assert _rel(results[0][mode], results[0]["sync"]) > 1e-6, f"{what}: {mode} equals sync after the warm-up"
        # ... and stay close to one device (random-weight UNet, 4 steps, 2 of them stale)
        assert psnr(results[0][mode], ref) >= PSNR_STALE, f"{what}: {mode} {psnr(results[0][mode], ref):.1f} dB"


@pytest.mark.parametrize("world, H, W", [(2, 32, 32), (3, 32, 24), (4, 32, 32)])
def test_modes_without_cfg_split(world, H, W):
    """N = 2, 3, 4 (N=3 on 32 rows: deepest level 4 rows -> uneven bands 1/1/2)."""
    results = run_ranks(_modes_worker, world, H, W, False)
    assert ("warmup_only" in results[0]) == (world <= 3)
    _check_modes(results, f"N={world} {H}x{W}")


@pytest.mark.parametrize("world", [2, 4])
def test_modes_with_cfg_split(world):
    _check_modes(run_ranks(_modes_worker, world, 32, 32, True), f"N={world} split_cfg", banded=world > 2)


def test_odd_resolution_and_stride_parity():
    """36x20 latent: 36 -> 18 -> 9 -> 5 rows, so stride-2 convs see odd heights and clipped last bands."""
    _check_modes(run_ranks(_modes_worker, 3, 36, 20, False), "N=3 36x20")


def _sdxl_worker(rank, world):
    unet = tiny_sdxl_unet().double()
    lat, cond = _inputs(32)
    added = {k: v.double() for k, v in sdxl_added_cond(2).items()}
    ref = denoise(unet, lat, cond, STEPS, added=added)
    halodiff.patch(unet, ParallelConfig(mode="sync", split_cfg=False))
    sync = denoise(unet, lat, cond, STEPS, added=added)
    halodiff.unpatch(unet)
    halodiff.patch(unet, ParallelConfig(mode="distrifusion", warmup_steps=2, split_cfg=False))
    dfu = denoise(unet, lat, cond, STEPS, added=added)
    return ref, sync, dfu


def test_sdxl_structure():
    results = run_ranks(_sdxl_worker, 2)
    ref, sync, dfu = results[0]
    assert _rel(sync, ref) <= TOL
    assert torch.equal(results[1][1], sync) and torch.equal(results[1][2], dfu)


def _controlnet_worker(rank, world):
    pipe = tiny_controlnet_pipeline().to(torch.float64)
    pe, ne = (t.double() for t in prompt_embeds())
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)).double()

    def run(steps=STEPS, size=256):
        img = torch.nn.functional.interpolate(image, size=(size, size)) if size != 256 else image
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=img, num_inference_steps=steps, height=size,
                    width=size, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    ref, ref_b = run(), run(steps=4, size=192)
    halodiff.patch(pipe, ParallelConfig(mode="sync", split_cfg=False))
    sync = run()
    again = run()  # a second call is a new generation on its own
    other = run(steps=4, size=192)  # different step count and resolution
    halodiff.unpatch(pipe)
    halodiff.patch(pipe, ParallelConfig(mode="distrifusion", warmup_steps=2, split_cfg=False))
    dfu = run()
    halodiff.unpatch(pipe)
    return ref, sync, again, ref_b, other, dfu


def test_controlnet_pipeline_and_new_generations():
    results = run_ranks(_controlnet_worker, 2)
    ref, sync, again, ref_b, other, dfu = results[0]
    assert _rel(sync, ref) <= TOL
    assert torch.equal(again, sync)
    assert _rel(other, ref_b) <= TOL
    assert torch.equal(results[1][5], dfu)


def _controlnet_split_worker(rank, world):
    pipe = tiny_controlnet_pipeline().to(torch.float64)
    pe, ne = (t.double() for t in prompt_embeds())
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2)).double()

    def run(guess):
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=image, num_inference_steps=4, height=256,
                    width=256, guess_mode=guess, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    refs = [run(False), run(True)]
    halodiff.patch(pipe, ParallelConfig(mode="sync", split_cfg=True))
    outs = [run(False), run(True)]
    halodiff.unpatch(pipe)
    return refs, outs


def test_controlnet_split_cfg_and_guess_mode():
    """CFG split with a ControlNet, also in guess mode (ControlNet on the conditional half only):
    4 ranks = 2 CFG groups x 2 bands, equal to one device."""
    for refs, outs in run_ranks(_controlnet_split_worker, 4):
        assert _rel(refs[1], refs[0]) > 1e-3  # guess mode really changes the result
        for ref, out in zip(refs, outs):
            assert _rel(out, ref) <= TOL


# ------------------------------------------------------------------------------------ comm accounting
def _stats_worker(rank, world):
    unet = tiny_sd15_unet()
    lat, cond = _inputs(32, dtype=torch.float32)
    expected = expected_sync_bytes(unet, lat, cond, world)
    halodiff.patch(unet, ParallelConfig(mode="sync", split_cfg=False))
    stats = halodiff.comm_stats(unet)
    with torch.no_grad():
        unet(torch.cat([lat, lat]), 500, encoder_hidden_states=cond)
    got = dict(stats.bytes_by_kind)
    total, steps = stats.bytes_received, stats.steps
    stats.reset()
    return got, {k: v[rank] for k, v in expected.items()}, total, steps, stats.bytes_received


def test_comm_stats_count_exact_payload():
    for got, exp, total, steps, after_reset in run_ranks(_stats_worker, 3):
        assert got == exp
        assert total == sum(exp.values()) and steps == 1 and after_reset == 0


# ---------------------------------------------------------------------------------------------- errors
def test_single_rank_without_distributed_is_unchanged():
    unet = tiny_sd15_unet()
    lat, cond = _inputs(32, dtype=torch.float32)
    ref = denoise(unet, lat, cond, 3)
    halodiff.patch(unet, ParallelConfig())
    assert torch.equal(denoise(unet, lat, cond, 3), ref)
    with pytest.raises(PatchError, match="already patched"):
        halodiff.patch(unet, ParallelConfig())
    halodiff.unpatch(unet)
    with pytest.raises(PatchError, match="not patched"):
        halodiff.unpatch(unet)
    with pytest.raises(PatchError, match="not patched"):
        halodiff.comm_stats(unet)
    assert torch.equal(denoise(unet, lat, cond, 3), ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        ParallelConfig(mode="fast")
    with pytest.raises(ValueError, match="halo_fraction"):
        ParallelConfig(mode="pcpp", halo_fraction=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        ParallelConfig(warmup_steps=-1)
    with pytest.raises(TypeError, match="ParallelConfig"):
        halodiff.patch(tiny_sd15_unet(), {"mode": "sync"})
    with pytest.raises(PatchError, match="no denoiser halodiff knows"):
        halodiff.patch(object(), ParallelConfig())


def _too_small_worker(rank, world):
    unet = tiny_sd15_unet()
    halodiff.patch(unet, ParallelConfig(mode="sync", split_cfg=False))
    lat, cond = _inputs(16, dtype=torch.float32)
    try:
        with torch.no_grad():
            unet(torch.cat([lat, lat]), 500, encoder_hidden_states=cond)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_resolution_too_small_names_the_minimum():
    for msg in run_ranks(_too_small_worker, 4):
        # 16 rows -> 2 rows at the deepest level (x8), 4 ranks need 4: smallest valid height 25
        assert "at least 25" in msg, msg


def _dying_peer_worker(rank, world, behaviour):
    import os

    unet = tiny_sd15_unet()
    halodiff.patch(unet, ParallelConfig(mode="sync", split_cfg=False, timeout_s=1))
    lat, cond = _inputs(32, dtype=torch.float32)
    if rank == 1:
        if behaviour == "dies":
            os._exit(0)
        time.sleep(3)  # alive but silent (longer than timeout_s)
        return "slept"
    t0 = time.time()
    try:
        with torch.no_grad():
            unet(torch.cat([lat, lat]), 500, encoder_hidden_states=cond)
    except halodiff.CommTimeoutError as exc:
        return ("timeout", time.time() - t0, str(exc))
    return ("no error", time.time() - t0, "")


@pytest.mark.parametrize("behaviour", ["dies", "silent"])
def test_dead_or_silent_peer_raises_within_timeout(behaviour):
    """gloo: the waiting rank raises CommTimeoutError once halodiff's process group times out (timeout_s) or the
    peer's connection closes. (NCCL instead aborts the process from its watchdog: see README.)"""
    res = run_ranks(_dying_peer_worker, 2, behaviour, allow_errors=True, timeout_s=60) if behaviour == "silent" else \
        _run_with_dead_rank()
    kind, waited, msg = res[0]
    assert kind == "timeout" and waited < 10, (kind, waited, msg)
    assert "timeout_s=1" in msg


def _run_with_dead_rank():
    """rank 1 exits without a result: collect rank 0's result only."""
    import os
    import pickle
    import tempfile

    import torch.multiprocessing as mp

    from halodiff.launch import _worker, free_port

    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, 2, port, _dying_peer_worker, ("dies",), out_dir, 60.0, 1))
                 for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
                raise TimeoutError("rank hung")
        with open(os.path.join(out_dir, "rank0.pkl"), "rb") as f:
            return [pickle.load(f)]


# --------------------------------------------------------------------------------- process groups
def _independent_groups_worker(rank, world):
    """Ranks {0, 1} and {2, 3} each patch their own pipeline on their own (user) group, at the same time,
    with the CFG split (halodiff creates its groups on the members only); every group is gone after unpatch."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    pair = [0, 1] if rank < 2 else [2, 3]
    group = dist.new_group(pair, use_local_synchronization=True)
    before = len(c10d._world.pg_map)
    unet = tiny_sd15_unet().double()
    seed = 0 if rank < 2 else 1  # the two pairs run different images
    g = torch.Generator().manual_seed(seed)
    lat, cond = torch.randn(1, 4, 32, 32, generator=g).double(), torch.randn(2, 8, CROSS_DIM, generator=g).double()
    ref = denoise(unet, lat, cond, 3)
    out = {}
    for split in (False, True):
        halodiff.patch(unet, ParallelConfig(mode="sync", split_cfg=split), group=group)
        out[split] = denoise(unet, lat, cond, 3)
        during = len(c10d._world.pg_map)
        halodiff.unpatch(unet)
        out[f"groups {split}"] = (during - before, len(c10d._world.pg_map) - before)
    return ref, out


def test_independent_patch_groups_and_group_cleanup():
    for ref, out in run_ranks(_independent_groups_worker, 4):
        for split in (False, True):
            assert _rel(out[split], ref) <= TOL
            created, left = out[f"groups {split}"]
            assert created > 0 and left == 0, (split, created, left)
