"""The first-block cache: equal to diffusers' own FirstBlockCacheConfig hook on one device, exact undo, the cache
interface (one cache per pipeline, DeepCache beside it), and the skip decision agreed across gloo ranks (sync mode
then equals one device with the same decisions)."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import halodiff
from dit_utils import dit_inputs, pipeline_timestep, tiny_transformer
from halodiff import FirstBlockCacheConfig, PatchError
from halodiff.cache import first_block_context
from parallel_utils import run_ranks, tiny_sd15_unet

STEPS = 10
# Per family, a threshold inside the range of the tiny model's first-block changes (0.05-0.57 here), so a run
# mixes full and skipped steps.
MID = {"sd3": 0.22, "flux": 0.47, "pixart": 0.065, "qwen": 0.36}


@contextlib.contextmanager
def _named_call(model, name: str = "cond"):
    """diffusers' cache context around a call (its hook needs one); models without CacheMixin (SD3, PixArt) get it
    through diffusers' own helper."""
    if hasattr(model, "cache_context"):
        with model.cache_context(name):
            yield
        return
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(model, None)


def _loop(model, family: str, sample, kwargs, sched, steps: int = STEPS):
    """A flow-matching loop with a slow-moving latent (so the first block's residual changes little)."""
    sched.set_timesteps(steps)
    x = sample.clone()
    for t in sched.timesteps:
        with torch.no_grad(), _named_call(model):
            out = model(hidden_states=x, timestep=pipeline_timestep(family, t, x.shape[0], x.dtype), return_dict=False,
                        **kwargs)[0]
        x = x + 0.05 * out[:, : x.shape[1]]
    return x


def _diffusers_fbc(model, threshold: float):
    from diffusers.hooks import FirstBlockCacheConfig as DiffusersFBC
    from diffusers.hooks import apply_first_block_cache
    from diffusers.hooks.hooks import HookRegistry

    apply_first_block_cache(model, DiffusersFBC(threshold=threshold))
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return model


@pytest.mark.parametrize("family", ["flux", "pixart", "qwen"])
def test_equals_diffusers_hook(family):
    threshold = MID[family]
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_transformer(family)
    sample, kwargs = dit_inputs(family, 2, 6, 4, text_len=5, seed=0)
    sched = FlowMatchEulerDiscreteScheduler()
    ref = _loop(model, family, sample, kwargs, sched)
    want = _loop(_diffusers_fbc(copy.deepcopy(model), threshold), family, sample, kwargs, sched)
    halodiff.enable_cache(model, FirstBlockCacheConfig(threshold=threshold), scheduler=sched)
    got = _loop(model, family, sample, kwargs, sched)
    kinds = list(first_block_context(model).kinds)
    halodiff.disable_cache(model)
    assert torch.equal(got, want), f"{family}: {(got - want).abs().max():.2e} from diffusers' hook"
    assert kinds[0] == "full" and len(kinds) == STEPS
    assert "skip" in kinds and "full" in kinds[1:], kinds  # the comparison covers both branches
    assert torch.equal(_loop(model, family, sample, kwargs, sched), ref), "disable_cache must restore the model"


def test_sd3_last_block_without_text_output():
    """SD3's last block returns no text stream (context_pre_only); diffusers' hook fails there (None − tensor),
    halodiff's keeps only the image residual. Threshold 0 never skips (= the model), a huge one skips every step
    after the first, whose output is then the first block's plus the kept residual."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_transformer("sd3")
    sample, kwargs = dit_inputs("sd3", 2, 6, 4, text_len=5, seed=0)
    sched = FlowMatchEulerDiscreteScheduler()
    ref = _loop(model, "sd3", sample, kwargs, sched)
    halodiff.enable_cache(model, FirstBlockCacheConfig(threshold=0.0), scheduler=sched)
    assert torch.equal(_loop(model, "sd3", sample, kwargs, sched), ref)
    assert first_block_context(model).kinds == ["full"] * STEPS
    halodiff.disable_cache(model)
    halodiff.enable_cache(model, FirstBlockCacheConfig(threshold=1e9), scheduler=sched)
    skipped = _loop(model, "sd3", sample, kwargs, sched)
    assert first_block_context(model).kinds == ["full"] + ["skip"] * (STEPS - 1)
    assert not torch.equal(skipped, ref) and torch.isfinite(skipped).all()
    halodiff.disable_cache(model)
    assert torch.equal(_loop(model, "sd3", sample, kwargs, sched), ref)


def test_interface_and_errors():
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_transformer("flux")
    sched = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="threshold"):
        FirstBlockCacheConfig(threshold=-1)
    with pytest.raises(TypeError, match="config must be one of"):
        halodiff.enable_cache(model, {"threshold": 0.1})
    with pytest.raises(PatchError, match="not enabled"):
        halodiff.disable_cache(model)
    halodiff.enable_cache(model, FirstBlockCacheConfig(), scheduler=sched)
    with pytest.raises(PatchError, match="already enabled"):
        halodiff.enable_cache(model, FirstBlockCacheConfig(), scheduler=sched)
    with pytest.raises(PatchError, match="not enabled"):  # the wrong method's shorthand
        halodiff.disable_deepcache(model)
    with pytest.raises(PatchError, match="decides from data"):
        halodiff.patch(model, cuda_graphs=True, scheduler=sched)
    halodiff.disable_cache(model)
    with pytest.raises(PatchError, match="for UNets use DeepCache"):
        halodiff.enable_cache(tiny_sd15_unet(), FirstBlockCacheConfig())
    with pytest.raises(PatchError, match="not a UNet"):
        halodiff.enable_deepcache(model)
    # DeepCache is one method of the same interface
    unet = tiny_sd15_unet()
    halodiff.enable_cache(unet, halodiff.DeepCacheConfig(interval=2))
    assert halodiff.cache.deepcache_context(unet).config.interval == 2
    with pytest.raises(PatchError, match="already enabled"):
        halodiff.enable_cache(unet, halodiff.DeepCacheConfig())
    halodiff.disable_cache(unet)


# -------------------------------------------------------------------------------------------- on ranks
def _ranks_worker(rank, world, family, mode, split):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_transformer(family).double()
    sample, kwargs = dit_inputs(family, 2, 9, 4, text_len=5, seed=0)
    sample = sample.double()
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    sched = FlowMatchEulerDiscreteScheduler()
    halodiff.enable_cache(model, FirstBlockCacheConfig(threshold=MID[family]), scheduler=sched)
    ref = _loop(model, family, sample, kwargs, sched) if rank == 0 else None
    ref_kinds = list(first_block_context(model).kinds)
    halodiff.patch(model, mode=mode, warmup_steps=2, split_cfg=split, scheduler=sched)
    got = _loop(model, family, sample, kwargs, sched)
    kinds = list(first_block_context(model).kinds)
    halodiff.unpatch(model)
    halodiff.disable_cache(model)
    return ref, ref_kinds, got, kinds


@pytest.mark.parametrize("family, world, mode, split", [("pixart", 2, "sync", False), ("flux", 4, "sync", True),
                                                        ("sd3", 3, "distrifusion", False)])
def test_decision_agreed_across_ranks(family, world, mode, split):
    results = run_ranks(_ranks_worker, world, family, mode, split)
    ref, ref_kinds = results[0][0], results[0][1]
    assert "skip" in ref_kinds and "full" in ref_kinds[1:], ref_kinds
    for r, (_, _, got, kinds) in enumerate(results):
        assert kinds == results[0][3], f"rank {r} decided {kinds}, rank 0 {results[0][3]}"
        assert torch.equal(got, results[0][2])
    if mode == "sync":
        assert results[0][3] == ref_kinds, "sync mode must take one device's decisions"
        rel = ((results[0][2] - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-5, rel
