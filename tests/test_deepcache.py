"""DeepCache: schedules, equivalence with the `DeepCache` package, resets, torch.compile, and the
combination with the patch-parallel engine on 2 gloo ranks (tiny UNets with SD1.5 / SDXL structure)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

import halodiff
from halodiff import ParallelConfig, PatchError
from halodiff.cache import (branch_plan, deepcache_context, deepcache_schedule, disable_deepcache, enable_deepcache)
from parallel_utils import (CROSS_DIM, denoise, prompt_embeds, psnr, run_ranks, sdxl_added_cond, tiny_sd15_unet,
                            tiny_sd_pipeline, tiny_sdxl_unet)

STEPS = 7
TOL = 1e-5  # float64 combined (sync) vs one device, relative to max |ref| (as tests/test_parallel.py)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny UNets on a shared 2-core machine: one intra-op thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pipe_run(pipe, steps: int = STEPS, size: int = 256, **kw) -> torch.Tensor:
    dtype = pipe.unet.dtype
    pe, ne = (t.to(dtype) for t in prompt_embeds())
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, height=size, width=size,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images


def _inputs(H: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, H, H, generator=g).to(dtype), torch.randn(2, 8, CROSS_DIM, generator=g).to(dtype)


def _forward_overrides(model: torch.nn.Module) -> dict:
    return {n: m.__dict__.get("forward") for n, m in model.named_modules()}


def _package():
    return pytest.importorskip("DeepCache", reason="the DeepCache package (test-only dependency, requirements-dev."
                               "txt: DeepCache==0.1.1) is not installed").DeepCacheSDHelper


# ------------------------------------------------------------------------------------------ schedules
def test_schedule_vectors():
    assert deepcache_schedule(50, 5, "quadratic", center=15, power=1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert deepcache_schedule(50, 10, "quadratic", center=15, power=1.4) == [0, 9, 17, 26, 37]
    assert deepcache_schedule(50, 5, "quadratic", center=20, power=1.2) == [0, 6, 11, 15, 20, 23, 28, 33, 38, 44]
    assert deepcache_schedule(50, 5) == list(range(0, 50, 5))
    assert deepcache_schedule(20, 3) == [0, 3, 6, 9, 12, 15, 18]
    # quadratic: as many full steps as uniform (ceil(T / interval)); interval 1: every step
    assert len(deepcache_schedule(20, 3, "quadratic")) == 7
    assert deepcache_schedule(6, 1, "quadratic") == deepcache_schedule(6, 1) == list(range(6))
    assert deepcache_schedule(1, 4) == [0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_steps=50, interval=0), r"interval must be an int >= 1"),
    (dict(num_steps=50, interval=2.5), r"interval must be an int >= 1"),
    (dict(num_steps=0, interval=3), r"num_steps must be an int >= 1"),
    (dict(num_steps=50, interval=3, schedule="cosine"), r"schedule must be one of uniform, quadratic"),
    (dict(num_steps=10, interval=3, schedule="quadratic", center=15), r"center must be in \[0, 9\]"),
    (dict(num_steps=50, interval=3, schedule="quadratic", power=1.0), r"power must be a number > 1"),
    (dict(num_steps=10, interval=2, schedule="quadratic", center=5), r"cannot place 5 full steps among 10"),
])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deepcache_schedule(**kwargs)


def test_branch_ranges_and_plan():
    sd15, sdxl = tiny_sd15_unet(), tiny_sdxl_unet()
    before = _forward_overrides(sd15)
    with pytest.raises(ValueError, match=r"branch_id must be in \[0, 11\]"):
        enable_deepcache(sd15, branch_id=12)
    with pytest.raises(ValueError, match=r"branch_id must be in \[0, 8\]"):
        enable_deepcache(sdxl, branch_id=9)
    with pytest.raises(ValueError, match=r"branch_id must be in \[0, 11\]"):
        enable_deepcache(sd15, branch_id=-1)
    with pytest.raises(ValueError, match=r"branch_id must be an int"):
        enable_deepcache(sd15, branch_id=1.0)
    assert _forward_overrides(sd15) == before and not sd15._forward_pre_hooks, "a failed enable must change nothing"
    # branch 0: everything below conv_in's skip is cached; the outermost up block keeps only its last layer
    plan = branch_plan(sd15, 0)
    assert plan.cached == ("down_blocks.0", "down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block",
                           "up_blocks.0", "up_blocks.1", "up_blocks.2", "up_blocks.3.resnets.0",
                           "up_blocks.3.attentions.0", "up_blocks.3.resnets.1", "up_blocks.3.attentions.1")
    plan = branch_plan(sd15, 4)  # block 1, layer 1
    assert plan.cached[:4] == ("down_blocks.1.resnets.1", "down_blocks.1.attentions.1",
                               "down_blocks.1.downsamplers.0", "down_blocks.2")
    assert plan.cached[-2:] == ("up_blocks.2.resnets.0", "up_blocks.2.attentions.0")
    assert branch_plan(sd15, 11).cached == ("mid_block",)


def test_bad_arguments_and_misuse():
    assert (halodiff.enable_deepcache, halodiff.disable_deepcache, halodiff.deepcache_schedule) == (
        enable_deepcache, disable_deepcache, deepcache_schedule)
    unet = tiny_sd15_unet()
    for kw, match in [(dict(interval=0), "interval"), (dict(schedule="cosine"), "schedule must be one of"),
                      (dict(schedule="quadratic", center=-1), "center"), (dict(power=0.5), "power")]:
        with pytest.raises(ValueError, match=match):
            enable_deepcache(unet, **kw)
    with pytest.raises(ValueError, match="quadratic.*needs the step count"):
        enable_deepcache(unet, schedule="quadratic")
    with pytest.raises(PatchError, match="no denoiser halodiff knows"):
        enable_deepcache(object())
    with pytest.raises(PatchError, match="not enabled"):
        disable_deepcache(unet)
    enable_deepcache(unet)
    with pytest.raises(PatchError, match="already enabled"):
        enable_deepcache(unet)
    disable_deepcache(unet)
    with pytest.raises(PatchError, match="not enabled"):
        disable_deepcache(unet)
    pipe = tiny_sd_pipeline()
    enable_deepcache(pipe, interval=3, schedule="quadratic", center=15)
    with pytest.raises(ValueError, match=r"center must be in \[0, 5\]"):  # raised at set_timesteps, before step 0
        _pipe_run(pipe, steps=6)
    disable_deepcache(pipe)


# ------------------------------------------------------------------------- the DeepCache package
def test_matches_deepcache_package_and_disable_restores():
    """SD1.5 structure, interval 3: the package and ours give the same latents (they run the same
    ops, so bit-identical here); disable restores bit-identical output; no class is touched."""
    Helper = _package()
    pipe = tiny_sd_pipeline()
    classes = {n: type(m) for n, m in pipe.unet.named_modules()}
    ref = _pipe_run(pipe)
    for branch in (0, 4):
        before = _forward_overrides(pipe.unet)  # (the package's disable leaves bound methods behind)
        enable_deepcache(pipe, interval=3, branch_id=branch)
        # the deep path runs on full steps only; cached up-block layers get no deep features to copy
        plan = deepcache_context(pipe).plan
        deep_calls, widths = [], []
        hooks = [pipe.unet.mid_block.resnets[0].conv1.register_forward_hook(lambda *a: deep_calls.append(1)),
                 pipe.unet.get_submodule(plan.lean[0]).resnets[0].register_forward_pre_hook(
                     lambda m, a: widths.append(a[0].shape[1]))]
        ours = _pipe_run(pipe)
        for h in hooks:
            h.remove()
        kinds = deepcache_context(pipe).kinds
        assert kinds == ["full", "partial", "partial"] * 2 + ["full"]
        assert len(deep_calls) == kinds.count("full")
        assert [w == 0 for w in widths] == [k == "partial" for k in kinds]
        disable_deepcache(pipe)
        assert _forward_overrides(pipe.unet) == before and not pipe.unet._forward_hooks
        assert torch.equal(_pipe_run(pipe), ref), "disable_deepcache must restore bit-identical output"
        helper = Helper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=branch)
        helper.enable()
        theirs = _pipe_run(pipe)
        helper.disable()
        assert psnr(ours, theirs) >= 60, f"branch {branch}: {psnr(ours, theirs):.1f} dB vs the DeepCache package"
        assert ((ours - ref).abs().max() / ref.abs().max()).item() > 1e-4  # partial steps reused cached features
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == classes
    assert type(pipe).__call__ is type(tiny_sd_pipeline()).__call__


def test_sdxl_structure_matches_package():
    """SDXL structure (DownBlock2D first, 2-layer transformers, added conditioning) on a bare UNet with
    scheduler=; the package runs on the same UNet through a minimal pipe-like object."""
    from diffusers import DDIMScheduler

    Helper = _package()
    unet = tiny_sdxl_unet()
    lat, cond = _inputs(16)
    added = sdxl_added_cond(2)
    sched = DDIMScheduler(num_train_timesteps=1000)
    ref = denoise(unet, lat, cond, STEPS, added=added, scheduler=sched)
    for branch in (0, 5):
        enable_deepcache(unet, interval=3, branch_id=branch, scheduler=sched)
        ours = denoise(unet, lat, cond, STEPS, added=added, scheduler=sched)
        assert deepcache_context(unet).kinds.count("full") == 3
        disable_deepcache(unet)
        helper = Helper(pipe=SimpleNamespace(unet=unet, scheduler=sched))
        helper.set_params(cache_interval=3, cache_branch_id=branch)
        helper.enable()
        theirs = denoise(unet, lat, cond, STEPS, added=added, scheduler=sched)
        helper.disable()
        assert psnr(ours, theirs) >= 60
        assert not torch.equal(ours, ref)
    # the quadratic schedule on SDXL: full steps where the schedule says
    enable_deepcache(unet, interval=2, schedule="quadratic", center=3, scheduler=sched)
    denoise(unet, lat, cond, 8, added=added, scheduler=sched)
    kinds = deepcache_context(unet).kinds
    disable_deepcache(unet)
    assert [i for i, k in enumerate(kinds) if k == "full"] == deepcache_schedule(8, 2, "quadratic", center=3)


# ------------------------------------------------------------------------------------------ resets
def test_new_calls_reset_the_cache():
    """Each pipe(...) call starts from a full step with its own schedule: the results equal a fresh
    enable, also after a call with another step count and resolution."""
    pipe = tiny_sd_pipeline()
    enable_deepcache(pipe, interval=3)
    a = _pipe_run(pipe)
    b = _pipe_run(pipe, steps=5, size=192)
    kinds_b = list(deepcache_context(pipe).kinds)
    a2 = _pipe_run(pipe)
    disable_deepcache(pipe)
    enable_deepcache(pipe, interval=3)
    b_fresh = _pipe_run(pipe, steps=5, size=192)
    disable_deepcache(pipe)
    assert torch.equal(a, a2) and torch.equal(b, b_fresh)
    assert kinds_b == ["full", "partial", "partial", "full", "partial"]
    # a bare UNet without scheduler: calls are counted; a rising timestep starts a new generation
    unet = tiny_sd15_unet()
    lat, cond = _inputs(16)
    enable_deepcache(unet, interval=2)
    x = denoise(unet, lat, cond, 5)
    assert deepcache_context(unet).kinds == ["full", "partial", "full", "partial", "full"]
    assert torch.equal(denoise(unet, lat, cond, 5), x)
    disable_deepcache(unet)


def test_set_timesteps_wrappers_cooperate_with_patch():
    """deepcache and halodiff.patch both wrap scheduler.set_timesteps; any install/remove order leaves
    the scheduler clean and the output right (single rank: patch runs the model unchanged)."""
    pipe = tiny_sd_pipeline()
    ref = _pipe_run(pipe, steps=4, size=128)
    enable_deepcache(pipe, interval=2)
    dc = _pipe_run(pipe, steps=4, size=128)
    disable_deepcache(pipe)
    dc_on, pp_on = (lambda: enable_deepcache(pipe, interval=2)), (lambda: halodiff.patch(pipe, ParallelConfig()))
    dc_off, pp_off = (lambda: disable_deepcache(pipe)), (lambda: halodiff.unpatch(pipe))
    for order in [(dc_on, pp_on, dc_off, pp_off), (dc_on, pp_on, pp_off, dc_off),
                  (pp_on, dc_on, dc_off, pp_off), (pp_on, dc_on, pp_off, dc_off)]:
        order[0]()
        order[1]()
        assert torch.equal(_pipe_run(pipe, steps=4, size=128), dc)
        order[2]()
        expect = dc if order[2] is pp_off else ref
        assert torch.equal(_pipe_run(pipe, steps=4, size=128), expect)  # the one left still works
        order[3]()
        assert "set_timesteps" not in pipe.scheduler.__dict__
        assert torch.equal(_pipe_run(pipe, steps=4, size=128), ref)


# ------------------------------------------------------------------------------------ torch.compile
def _micro_unet():
    """Fewest modules with the SD block structure (dynamo tracing time grows with them)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=CROSS_DIM, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def test_torch_compile_two_static_graphs():
    """torch.compile(unet) with deepcache: matches eager, one graph per step kind, no recompilation in
    a second generation (aot_eager backend: dynamo + AOTAutograd graphs without codegen, CPU-fast)."""
    from diffusers import DDIMScheduler
    from torch._dynamo.utils import counters

    unet = _micro_unet()
    sched = DDIMScheduler(num_train_timesteps=1000)
    lat, cond = _inputs(8)
    enable_deepcache(unet, interval=3, scheduler=sched)
    eager = denoise(unet, lat, cond, STEPS, scheduler=sched)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="aot_eager")
    t0 = time.time()
    out = denoise(compiled, lat, cond, STEPS, scheduler=sched)
    compile_s = time.time() - t0
    graphs = counters["stats"]["unique_graphs"]
    again = denoise(compiled, lat, cond, STEPS, scheduler=sched)
    assert deepcache_context(unet).kinds == ["full", "partial", "partial"] * 2 + ["full"]
    assert graphs == 2, f"expected one graph per step kind, got {graphs}"
    assert counters["stats"]["unique_graphs"] == graphs, "a second generation must not recompile"
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, out)
    disable_deepcache(unet)
    torch._dynamo.reset()
    print(f"\ntorch.compile(aot_eager) with deepcache: {graphs} graphs, first generation {compile_s:.1f}s")


# ------------------------------------------------------------------------ with halodiff.patch, 2 ranks
def _combined_worker(rank, world):
    pipe = tiny_sd_pipeline().to(torch.float64)
    run = lambda **kw: _pipe_run(pipe, steps=5, size=128, **kw)  # noqa: E731  latent 16x16: 2 rows deepest
    out = {"plain": run()}
    enable_deepcache(pipe, interval=3)
    out["dc"] = run()  # deepcache only, one device
    for mode in ("sync", "distrifusion", "pcpp"):
        halodiff.patch(pipe, ParallelConfig(mode=mode, warmup_steps=2, split_cfg=False))
        stats = halodiff.comm_stats(pipe)
        per_step = []

        def record(p, i, t, kw, stats=stats, per_step=per_step):
            per_step.append((stats.bytes_received, dict(stats.bytes_by_kind)))
            stats.reset()
            return {}

        stats.reset()
        out[mode] = run(callback_on_step_end=record)
        out[mode + "_steps"] = per_step
        out[mode + "_kinds"] = list(deepcache_context(pipe).kinds)
        halodiff.unpatch(pipe)
    disable_deepcache(pipe)
    out["after"] = run()
    return out


def test_two_ranks_with_patch_parallel():
    """deepcache + patch (2 gloo ranks, float64): sync mode equals deepcache alone on one device
    (max rel diff <= 1e-5, the tolerance of tests/test_parallel.py; measured ~4e-15), and a partial step receives
    < 25% of a full step's bytes (the deep layers do not run, so they exchange nothing and keep their
    stale state); distrifusion and pcpp (warm-up 2, then stale exchanges) stay within 30 dB PSNR."""
    results = run_ranks(_combined_worker, 2)
    r0 = results[0]
    dc = r0["dc"]
    rel = ((r0["sync"] - dc).abs().max() / dc.abs().max()).item()
    assert rel <= TOL, f"sync + deepcache differs from deepcache alone by {rel:.2e}"
    for res in results:
        for mode in ("sync", "distrifusion", "pcpp"):
            assert torch.equal(res[mode], r0[mode]), f"rank latents differ ({mode})"
        assert torch.equal(res["after"], res["plain"]), "unpatch + disable must restore the original output"
        for mode in ("sync", "distrifusion", "pcpp"):
            kinds, steps = res[mode + "_kinds"], res[mode + "_steps"]
            assert kinds == ["full", "partial", "partial", "full", "partial"]
            full = [b for k, (b, _) in zip(kinds, steps) if k == "full"]
            partial = [b for k, (b, _) in zip(kinds, steps) if k == "partial"]
            if mode == "sync":
                assert max(partial) < 0.25 * min(full), (mode, full, partial)
    for mode in ("distrifusion", "pcpp"):  # stale deep state across partial steps: close, not exact
        assert psnr(r0[mode], dc) >= 30, f"{mode} + deepcache: {psnr(r0[mode], dc):.1f} dB vs deepcache alone"
        assert ((r0[mode] - dc).abs().max() / dc.abs().max()).item() > 1e-8, f"{mode}: no stale data was used"
