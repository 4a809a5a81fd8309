"""DiT pipelines end to end on gloo ranks (tiny offline SD3 / PixArt-Sigma / Flux / Qwen-Image pipelines with their
text encoders): `sync` equals one device with the CFG split where the pipeline batches CFG (SD3, PixArt) and
with two calls per step where it does not (Flux, Qwen-Image true CFG under `cache_context`); stale modes give the
same image on every rank and keep separate stale data per named call. Plus torch.compile of a patched
transformer (one rank playing band 0 of 2, so every band code path is traced) without graph breaks."""
from __future__ import annotations

import pytest
import torch

import halodiff
from dit_utils import dit_inputs, pipe_kwargs, pipeline_timestep, tiny_pipeline, tiny_transformer
from parallel_utils import run_ranks

STEPS = 4
TOL = 1e-5
# CFG in each family's pipeline: SD3 / PixArt batch [uncond, cond]; Flux / Qwen-Image call twice (true CFG).
CFG = {"sd3": dict(guidance_scale=3.0, negative_prompt="blurry"), "pixart": dict(guidance_scale=3.0,
                                                                                    negative_prompt="blurry"),
       "flux": dict(true_cfg_scale=2.0, negative_prompt="blurry"), "qwen": dict(true_cfg_scale=2.0,
                                                                                negative_prompt="blurry")}


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _generate(pipe, family: str):
    kw = pipe_kwargs(family, num_inference_steps=STEPS, height=96, width=48, **CFG[family])  # 6 x 3 tokens
    return pipe(**kw).images


def _pipeline_worker(rank, world, family, split):
    pipe = tiny_pipeline(family, fresh=True).to(torch.float64)
    out = {"ref": _generate(pipe, family) if rank == 0 else None}
    for mode in ("sync", "distrifusion"):
        halodiff.patch(pipe, mode=mode, warmup_steps=2, split_cfg=split)
        out[mode] = _generate(pipe, family)
        ctx = halodiff.parallel.context(pipe)
        out[mode + "_states"] = sorted(ctx.models)
        out[mode + "_split"] = ctx.split is not None
        halodiff.unpatch(pipe)
    return out


@pytest.mark.parametrize("family, world, split", [("sd3", 2, True), ("sd3", 4, True), ("pixart", 4, True),
                                                  ("flux", 3, True), ("qwen", 2, True)])
def test_pipelines_on_ranks(family, world, split):
    results = run_ranks(_pipeline_worker, world, family, split)
    ref = results[0]["ref"]
    for r, res in enumerate(results):
        assert _rel(res["sync"], ref) <= TOL, f"{family} N={world} rank {r}: sync {_rel(res['sync'], ref):.2e}"
        assert torch.equal(res["sync"], results[0]["sync"]) and torch.equal(res["distrifusion"],
                                                                            results[0]["distrifusion"])
    res = results[0]
    if family in ("flux", "qwen"):  # true CFG: two named calls per step, each with its own state
        assert res["distrifusion_states"] == ["transformer", "transformer[cond]", "transformer[uncond]"]
    if family in ("sd3", "pixart") and world % 2 == 0:
        assert res["sync_split"], "the CFG batch is split over the two rank halves"
    if world > 2 or family in ("flux", "qwen"):  # bands (not just CFG halves): distrifusion is stale
        assert _rel(res["distrifusion"], res["sync"]) > 1e-9


def _compile_worker(family: str, mode: str):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from torch._dynamo.utils import counters

    model = tiny_transformer(family)
    sample, kwargs = dit_inputs(family, 2, 6, 4, text_len=5, seed=0)
    sched = FlowMatchEulerDiscreteScheduler()
    halodiff.parallel.simulate(model, halodiff.ParallelConfig(mode=mode, warmup_steps=1, split_cfg=False), 2, 0,
                               scheduler=sched)

    bands = []  # the band's tokens before the gather (a simulated peer sends nothing, so the output is zeros)
    model.norm_out.register_forward_hook(lambda mod, args, out: bands.append(out.clone()) if out.device.type != "meta"
                                         else None)

    def run(m):
        sched.set_timesteps(3)
        bands.clear()
        for t in sched.timesteps:
            with torch.no_grad():
                m(hidden_states=sample, timestep=pipeline_timestep(family, t, 2), return_dict=False, **kwargs)
        return list(bands)

    eager = run(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch.compile(model, backend="aot_eager"))
    breaks = dict(counters["graph_break"])
    halodiff.unpatch(model)
    torch._dynamo.reset()
    return eager, compiled, breaks


@pytest.mark.slow
@pytest.mark.parametrize("family, mode", [("sd3", "pcpp"), ("flux", "distrifusion")])
def test_torch_compile_of_a_patched_transformer(family, mode):
    """The band code paths (token split, segmented joint attention, the gather) compile without graph breaks; a
    new graph per step kind (first / steady / last) is expected. Under gloo the collectives split the graph."""
    eager, compiled, breaks = _compile_worker(family, mode)
    assert not breaks, breaks
    for a, b in zip(eager, compiled):
        assert _rel(b, a) <= 1e-5
