"""Patch parallelism for DiTs (SD3, Flux, PixArt-Sigma, Qwen-Image) on real gloo ranks vs one device.

Bare transformers (float64, so reassociation noise stays far below the tolerance) on token grids whose row count
does not divide by N: `sync` equals one device (rel <= 1e-5), the stale modes give identical ranks, really use
stale data and stay close; bytes per step equal the floor computed here from the layer shapes, independently
of the engine; `unpatch` restores the bit-identical output. Pipelines: the CFG split where the pipeline batches
CFG (SD3, PixArt) and two calls per step under `cache_context` (Flux, Qwen-Image true CFG).
"""
from __future__ import annotations

import math

import pytest
import torch

import halodiff
from dit_utils import FAMILIES, dit_inputs, pipeline_timestep, tiny_transformer
from parallel_utils import psnr, run_ranks

STEPS = 4
TOL = 1e-5
PSNR_STALE = 25.0  # dB vs one device after 2 warm-up steps of 4 (random weights; measured 38-60 dB)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _loop(model, family: str, sample, kwargs, sched, steps: int = STEPS):
    """A flow-matching Euler loop calling the transformer as the family's pipeline does."""
    sched.set_timesteps(steps)
    x = sample.clone()
    for t in sched.timesteps:
        with torch.no_grad():
            out = model(hidden_states=x, timestep=pipeline_timestep(family, t, x.shape[0], x.dtype), return_dict=False,
                        **kwargs)[0]
        x = sched.step(out[:, : x.shape[1]] if family == "pixart" else out, t, x, return_dict=False)[0]
    return x


def _attention_layers(model) -> int:
    cfg = model.config
    if hasattr(cfg, "num_single_layers"):
        return cfg.num_layers + cfg.num_single_layers
    return cfg.num_layers + len(getattr(cfg, "dual_attention_layers", ()) or ())


def _heights(rows: int, n: int) -> list[int]:
    """Token-row band heights (written independently of halodiff.parallel.geometry): sizes differ by at most one,
    the larger bands last."""
    q, extra = divmod(rows, n)
    return [q + (1 if i >= n - extra else 0) for i in range(n)]


def _floor(model, sample, rows: int, cols: int, world: int, mode: str, p: float = 0.3) -> list[dict]:
    """Bytes each rank receives in one step, per kind, from the layer shapes: attention K/V of the image tokens it
    attends to from other bands (sync / distrifusion: whole bands; pcpp: ceil(p·h) rows of each neighbour) and
    the other bands' output tokens."""
    cfg = model.config
    B, esize = sample.shape[0], sample.element_size()
    C = cfg.num_attention_heads * cfg.attention_head_dim
    out_ch = sample.shape[-1] if sample.dim() == 3 else cfg.patch_size ** 2 * cfg.out_channels
    h = _heights(rows, world)
    out = []
    for j in range(world):
        if mode == "pcpp":
            kv_rows = sum(min(h[i], math.ceil(p * h[i] - 1e-9)) for i in (j - 1, j + 1) if 0 <= i < world)
        else:
            kv_rows = rows - h[j]
        out.append({"attention": _attention_layers(model) * kv_rows * cols * B * 2 * C * esize,
                    "output": (rows - h[j]) * cols * B * out_ch * esize})
    return out


# --------------------------------------------------------------------------------------------- workers
def _modes_worker(rank, world, family, rows, cols):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_transformer(family).double()
    sample, kwargs = dit_inputs(family, 2, rows, cols, text_len=5, seed=0)
    sample = sample.double()
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    sched = FlowMatchEulerDiscreteScheduler()
    out = {"ref": _loop(model, family, sample, kwargs, sched) if rank == 0 else None}
    for mode in ("sync", "distrifusion", "pcpp"):
        halodiff.patch(model, mode=mode, warmup_steps=2, split_cfg=False, scheduler=sched)
        out[mode] = _loop(model, family, sample, kwargs, sched)
        out[mode + "_bytes"] = dict(halodiff.comm_stats(model).bytes_by_kind)
        halodiff.unpatch(model)
    out["after_unpatch"] = _loop(model, family, sample, kwargs, sched) if rank == world - 1 else None
    out["floor"] = {m: _floor(model, sample, rows, cols, world, m)[rank] for m in ("sync", "pcpp")}
    return out


# every family at N = 2, 3, 4, with token-row counts that do not divide by N (uneven bands)
CASES = [("sd3", 2, 7, 6), ("sd3", 3, 7, 4), ("sd3", 4, 9, 4), ("flux", 2, 5, 6), ("flux", 3, 10, 6),
         ("flux", 4, 6, 3), ("pixart", 2, 5, 4), ("pixart", 3, 7, 4), ("pixart", 4, 10, 3), ("qwen", 2, 7, 4),
         ("qwen", 3, 8, 5), ("qwen", 4, 7, 3)]


@pytest.mark.parametrize("family, world, rows, cols", CASES)
def test_modes(family, world, rows, cols):
    results = run_ranks(_modes_worker, world, family, rows, cols)
    ref = results[0]["ref"]
    what = f"{family} N={world} {rows}x{cols} tokens"
    for r, res in enumerate(results):
        assert _rel(res["sync"], ref) <= TOL, f"{what} rank {r}: sync differs from one device by {_rel(res['sync'], ref):.2e}"
        for mode in ("sync", "distrifusion", "pcpp"):
            assert torch.equal(res[mode], results[0][mode]), f"{what}: rank {r} {mode} differs from rank 0"
        # sync: every step exchanges the whole per-step floor; the gathered output every step in every mode
        floor = res["floor"]
        assert res["sync_bytes"]["attention"] == STEPS * floor["sync"]["attention"], (what, r, res["sync_bytes"])
        for mode in ("sync", "distrifusion", "pcpp"):
            assert res[mode + "_bytes"]["output"] == STEPS * floor["sync"]["output"], (what, r, mode)
        # distrifusion: 2 warm-up steps gather fresh, step 2 posts its K/V for step 3, the last step posts nothing
        assert res["distrifusion_bytes"]["attention"] == (STEPS - 1) * floor["sync"]["attention"]
        # pcpp: 2 warm-up steps gather whole bands, step 2 sends only the partial rows, the last step nothing
        assert res["pcpp_bytes"]["attention"] == 2 * floor["sync"]["attention"] + floor["pcpp"]["attention"]
        assert res["sync_bytes"]["conv_halo"] == res["sync_bytes"]["groupnorm"] == 0
    assert torch.equal(results[-1]["after_unpatch"], ref), f"{what}: unpatch must restore the bit-identical output"
    for mode in ("distrifusion", "pcpp"):
        assert _rel(results[0][mode], results[0]["sync"]) > 1e-9, f"{what}: {mode} equals sync after the warm-up"
        assert psnr(results[0][mode], ref) >= PSNR_STALE, f"{what}: {mode} {psnr(results[0][mode], ref):.1f} dB"


@pytest.mark.parametrize("family", FAMILIES)
def test_one_rank_is_unchanged_and_errors(family):
    """Without torch.distributed a patched transformer runs unchanged; double patch and bad grids are clear errors."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_transformer(family)
    sample, kwargs = dit_inputs(family, 1, 4, 4, text_len=3, seed=0)
    sched = FlowMatchEulerDiscreteScheduler()
    ref = _loop(model, family, sample, kwargs, sched, 2)
    halodiff.patch(model, mode="pcpp", scheduler=sched)
    assert torch.equal(_loop(model, family, sample, kwargs, sched, 2), ref)
    with pytest.raises(halodiff.PatchError, match="already patched"):
        halodiff.patch(model)
    halodiff.unpatch(model)
    assert torch.equal(_loop(model, family, sample, kwargs, sched, 2), ref)


def _residuals_worker(rank, world, family):
    """Full-size ControlNet residuals (from an unpatched ControlNet) are cut to the band."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_transformer(family).double()
    sample, kwargs = dit_inputs(family, 2, 5, 4, text_len=5, seed=0)
    sample = sample.double()
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(3)
    res = [torch.randn(2, 20, inner, generator=g).double() for _ in range(2)]
    kwargs["block_controlnet_hidden_states" if family == "sd3" else "controlnet_block_samples"] = res
    sched = FlowMatchEulerDiscreteScheduler()
    ref = _loop(model, family, sample, kwargs, sched)
    halodiff.patch(model, mode="sync", split_cfg=False, scheduler=sched)
    got = _loop(model, family, sample, kwargs, sched)
    halodiff.unpatch(model)
    return ref, got


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_size_controlnet_residuals(family):
    for ref, got in run_ranks(_residuals_worker, 2, family):
        assert _rel(got, ref) <= TOL
