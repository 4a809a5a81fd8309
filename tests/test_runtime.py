"""The runtime under every feature: stack-safe installs (any order, rollback, foreign wrappers), the denoising
clock (step positions without host reads, per-sample timesteps, declared generations) and denoiser adapters."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import halodiff
from halodiff import ParallelConfig, PatchError
from halodiff.runtime import Clock, Installation, attach, denoisers, features, hooks
from halodiff.runtime.session import Subscriber, runtime_of
from parallel_utils import CROSS_DIM, denoise, prompt_embeds, tiny_controlnet_pipeline, tiny_sd15_unet, tiny_sd_pipeline


class _Thing:
    def f(self, x):
        return x + 1


def _layer(tag):
    return lambda inner: (lambda x: inner(x) * 10 + tag)


# ----------------------------------------------------------------------------------------------- hooks
def test_overrides_stack_and_undo_in_any_order():
    obj = _Thing()
    a, b, c = Installation("a"), Installation("b"), Installation("c")
    a.override(obj, "f", _layer(1))
    b.override(obj, "f", _layer(2))
    c.override(obj, "f", _layer(3))
    assert obj.f(0) == ((1 * 10 + 1) * 10 + 2) * 10 + 3
    b.remove()  # from the middle
    assert obj.f(0) == (1 * 10 + 1) * 10 + 3
    a.remove()
    assert obj.f(0) == 1 * 10 + 3
    c.remove()
    assert "f" not in obj.__dict__ and obj.f(0) == 1  # the class method again, nothing left behind


def test_foreign_wrapper_on_top_keeps_working_after_our_removal():
    """Another library wraps our override (as accelerate's hooks do): removing ours leaves theirs intact and
    their wrapper calls straight through to the original."""
    obj = _Thing()
    ours = Installation("ours")
    ours.override(obj, "f", _layer(1))
    theirs_inner = obj.f
    obj.f = lambda x: theirs_inner(x) + 1000  # their wrapper, installed after ours
    assert obj.f(0) == 1011
    ours.remove()
    assert obj.f(0) == 1001  # theirs still runs; ours passes through
    again = Installation("again")
    again.override(obj, "f", _layer(2))
    assert obj.f(0) == 1001 * 10 + 2
    again.remove()
    assert obj.f(0) == 1001


def test_failed_install_rolls_back():
    unet = tiny_sd15_unet()
    before = {n: dict(m.__dict__.get("_forward_hooks", {})) for n, m in unet.named_modules()}

    def build(inst):
        inst.override(unet.conv_in, "forward", _layer(1))
        inst.pre_hook(unet, lambda m, a, k: None)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        hooks.install("test", [unet], build)
    assert "forward" not in unet.conv_in.__dict__ and not unet._forward_pre_hooks
    assert {n: dict(m.__dict__.get("_forward_hooks", {})) for n, m in unet.named_modules()} == before
    assert features(unet) == []


def test_processor_swaps_stack():
    unet = tiny_sd15_unet()
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    base = attn.processor
    a, b = Installation("a"), Installation("b")
    a.processor(attn, lambda inner: ("A", inner))
    b.processor(attn, lambda inner: ("B", inner))
    assert attn.processor == ("B", ("A", base))
    a.remove()
    assert attn.processor == ("B", base)
    b.remove()
    assert attn.processor is base


# ----------------------------------------------------------------------------------- features together
def _run(pipe):
    pe, ne = prompt_embeds()
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=4, height=128, width=128,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_patch_deepcache_and_a_foreign_hook_in_any_order():
    """patch + enable_deepcache + another library's wrapper on the same UNet forward: every install/remove
    order restores bit-identical outputs and leaves no attribute behind."""
    pipe = tiny_sd_pipeline()
    ref = _run(pipe)
    halodiff.enable_deepcache(pipe, interval=2)
    dc = _run(pipe)
    halodiff.disable_deepcache(pipe)
    assert not torch.equal(dc, ref)
    on = {"patch": lambda: halodiff.patch(pipe, ParallelConfig()), "dc": lambda: halodiff.enable_deepcache(pipe, interval=2)}
    off = {"patch": lambda: halodiff.unpatch(pipe), "dc": lambda: halodiff.disable_deepcache(pipe)}
    for first, second in (("patch", "dc"), ("dc", "patch")):
        for remove_first in (first, second):
            on[first]()
            inner = pipe.unet.forward
            pipe.unet.forward = lambda *a, **k: inner(*a, **k)  # a foreign wrapper on top of ours
            on[second]()
            assert torch.equal(_run(pipe), dc)
            off[remove_first]()
            left = second if remove_first == first else first
            assert torch.equal(_run(pipe), dc if left == "dc" else ref)
            off[left]()
            assert torch.equal(_run(pipe), ref)
            assert features(pipe) == [] and features(pipe.unet) == []
            assert "set_timesteps" not in pipe.scheduler.__dict__
            del pipe.unet.forward  # drop the foreign wrapper: the class forward again
            assert not any("forward" in m.__dict__ for m in pipe.unet.modules())


def test_dropping_a_patched_pipeline_frees_it():
    unet = tiny_sd15_unet()
    halodiff.patch(unet, ParallelConfig())
    halodiff.enable_deepcache(unet, interval=2)
    ref = weakref.ref(unet)
    del unet
    gc.collect()
    assert ref() is None, "the registries must not keep a dropped model alive"


# ------------------------------------------------------------------------------------------------ clock
class _HostReads(TorchDispatchMode):
    """Counts host reads of tensor values (item/float/bool/...: a device sync on GPUs)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _device_like(monkeypatch):
    """Make the clock treat CPU tensors as device tensors (whose values it must not read)."""
    from halodiff.runtime import clock as clock_mod

    monkeypatch.setattr(clock_mod, "_on_host", lambda t: False)


def test_clock_positions_from_views_without_host_reads(monkeypatch):
    from diffusers import DDIMScheduler

    _device_like(monkeypatch)
    sched = DDIMScheduler(num_train_timesteps=1000)
    clock = Clock(lambda: sched)
    sched.set_timesteps(6)
    clock.new_generation(sched.timesteps)
    steps = []
    with _HostReads() as reads:
        for i, t in enumerate(sched.timesteps):
            tag_t = t.expand(2) if i % 2 else t  # diffusers passes t or t.expand(batch): both views
            steps.append(clock.tick("unet", tag_t))
    assert reads.count == 0
    assert [s.index for s in steps] == list(range(6)) and [s.position for s in steps] == list(range(6))
    assert [s.new_generation for s in steps] == [True] + [False] * 5
    assert [s.last for s in steps] == [False] * 5 + [True] and all(s.count == 6 for s in steps)
    # img2img: the loop starts part-way (timesteps[2:] is a view): indices count from the first call
    sched.set_timesteps(6)
    clock.new_generation(sched.timesteps)
    late = [clock.tick("unet", t) for t in sched.timesteps[2:]]
    assert [s.index for s in late] == [0, 1, 2, 3] and [s.position for s in late] == [2, 3, 4, 5]
    assert late[-1].last and late[0].count == 4
    # fresh (non-view) device tensors: counted calls, still no host read
    sched.set_timesteps(3)
    clock.new_generation(sched.timesteps)
    with _HostReads() as reads:
        fresh = [clock.tick("unet", t.clone()) for t in sched.timesteps]
    assert reads.count == 0 and [s.index for s in fresh] == [0, 1, 2] and fresh[-1].last


def test_clock_generations_per_sample_and_fallbacks():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000)
    clock = Clock(lambda: sched)
    sched.set_timesteps(4)  # not wrapped: the clock notices the new timesteps object
    a = [clock.tick("unet", t) for t in sched.timesteps]
    b = [clock.tick("unet", t) for t in sched.timesteps]  # same timesteps again: position went back
    assert [s.new_generation for s in a + b] == [True, False, False, False] * 2
    # values as Python numbers / CPU tensors are looked up
    c = [clock.tick("controlnet", int(t)) for t in sched.timesteps]
    assert [s.index for s in c] == [0, 1, 2, 3] and c[0].new_generation
    # a per-sample timestep with different values is a stream batch
    s = clock.tick("unet", torch.tensor([999, 500, 1]))
    assert s.per_sample and s.position is None
    clock.stream_call()
    assert clock.tick("unet", torch.tensor([7, 7])).per_sample  # declared by a stream
    # no scheduler and nothing declared: a rising timestep starts a generation
    bare = Clock()
    ts = [900, 600, 300, 900, 600]
    got = [bare.tick("unet", torch.tensor(t)) for t in ts]
    assert [g.new_generation for g in got] == [True, False, False, True, False]
    assert [g.index for g in got] == [0, 1, 2, 0, 1] and not any(g.last for g in got)


def test_new_generation_for_custom_loops():
    """A custom loop declares its timesteps: DeepCache's quadratic schedule then works on a bare UNet."""
    unet = tiny_sd15_unet()
    with pytest.raises(PatchError, match="no halodiff feature"):
        halodiff.new_generation(unet, [3, 2, 1])
    halodiff.enable_deepcache(unet, interval=2)
    with pytest.raises(ValueError, match="1-D"):
        halodiff.new_generation(unet, torch.zeros(2, 2))
    lat, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 8, CROSS_DIM)
    kinds = halodiff.cache.deepcache_context(unet)
    for _ in range(2):
        halodiff.new_generation(unet, [900, 800, 700, 600, 500])
        with torch.no_grad():
            for t in [900, 800, 700, 600, 500]:
                unet(lat, t, encoder_hidden_states=cond)
        assert kinds.kinds == ["full", "partial", "full", "partial", "full"]
    halodiff.disable_deepcache(unet)


# --------------------------------------------------------------------------------------------- adapters
def test_denoisers_of_pipelines():
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    pipe = tiny_controlnet_pipeline()
    assert [(d.tag, d.predicts) for d in denoisers(pipe)] == [("unet", True), ("controlnet", False)]
    pipe.controlnet = MultiControlNetModel([pipe.controlnet, pipe.controlnet])
    assert [d.tag for d in denoisers(pipe)] == ["unet", "controlnet.0", "controlnet.1"]
    unet = tiny_sd15_unet()
    compiled = torch.compile(unet)
    assert denoisers(compiled)[0].module is unet  # torch.compile'd: hooks go on the module it compiles
    d = denoisers(unet)[0]
    lat = torch.zeros(1, 4, 8, 8)
    assert d.sample((lat, 5), {}) is lat and d.timestep((lat, 5), {}) == 5
    assert d.sample((), {"sample": lat}) is lat and d.timestep((), {"sample": lat, "timestep": 3}) == 3


def test_runtime_is_shared_and_removed_with_the_last_feature():
    pipe = tiny_sd_pipeline()
    seen = []
    rt1, detach1 = attach(pipe, Subscriber("a", before=lambda d, s, a, k: seen.append(("a", s.index))))
    rt2, detach2 = attach(pipe, Subscriber("b", before=lambda d, s, a, k: seen.append(("b", s.index))))
    assert rt1 is rt2 and runtime_of(pipe.unet) is rt1
    _run(pipe)
    assert seen == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    detach1()
    assert runtime_of(pipe) is rt1
    detach2()
    assert runtime_of(pipe) is None and not pipe.unet._forward_pre_hooks and "set_timesteps" not in \
        pipe.scheduler.__dict__
    with torch.no_grad():
        denoise(tiny_sd15_unet(), torch.randn(1, 4, 16, 16), torch.randn(2, 8, CROSS_DIM), 2)
