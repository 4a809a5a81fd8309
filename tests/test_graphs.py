"""CUDA-graph plumbing of `ParallelConfig(cuda_graphs=True)`, checked on CPU with a stand-in graph backend.

No GPU runs here, so `torch.cuda.CUDAGraph` is replaced by a backend that "captures" by running the step and
"replays" by running it again into the captured output tensors. What is checked is everything around the
capture: one graph per step kind (sync / async / last x DeepCache full / partial x input signature), the
first call of a kind eager and the second captured, inputs copied into static buffers, fresh outputs,
comm counters per replay, the warning fallback, and outputs equal to the eager engine. The capture itself
(NCCL inside a graph, memory pools) is exercised by bench/gpu_suite.sh on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_map

import halodiff
from halodiff import ParallelConfig
from halodiff.parallel import engine, graphs
from parallel_utils import CROSS_DIM, tiny_sd15_unet


class _StandInGraph:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        tree_map(lambda dst, src: dst.copy_(src) if isinstance(dst, torch.Tensor) else dst, self.out, self.fn())


class _StandInBackend:
    fail = False

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = fn()
        return _StandInGraph(fn, out), out


def _run(unet, sched, x, cond, steps=7):
    outs = []
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            outs.append(unet(x, t, encoder_hidden_states=cond).sample)
    return outs


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(engine, "_graphs_usable", lambda config, dens: config.cuda_graphs)
    monkeypatch.setattr(graphs, "CudaGraphBackend", _StandInBackend)
    return _StandInBackend


def test_one_graph_per_step_kind_replays_equal_eager(stand_in):
    from diffusers import DDIMScheduler

    unet = tiny_sd15_unet()
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 8, CROSS_DIM, generator=g)
    sched = DDIMScheduler(num_train_timesteps=1000)
    results = {}
    for use_graphs in (False, True):
        cfg = ParallelConfig(mode="distrifusion", warmup_steps=2, split_cfg=False, cuda_graphs=use_graphs)
        halodiff.parallel.simulate(unet, cfg, 2, 0, scheduler=sched)
        halodiff.enable_deepcache(unet, interval=3, scheduler=sched)
        stats = halodiff.comm_stats(unet)
        outs = _run(unet, sched, x, cond) + _run(unet, sched, x, cond)  # two generations
        results[use_graphs] = (outs, dict(stats.bytes_by_kind), stats.messages)
        if use_graphs:
            sg = halodiff.parallel.context(unet).graphs["unet"]
            kinds = sorted((k[0], k[1], dict(k[3]).get("cache")) for k, v in sg.graphs.items())
            captures, replays = sg.captures, sg.replays
        halodiff.disable_deepcache(unet)
        halodiff.unpatch(unet)
    eager, with_graphs = results[False], results[True]
    for a, b in zip(eager[0], with_graphs[0]):
        assert torch.equal(a, b)
    assert eager[1] == with_graphs[1] and eager[2] == with_graphs[2], "comm counters must count replays too"
    # 7 steps, warm-up 2, DeepCache every 3rd step full: sync full/partial, async full/partial, last (full)
    assert kinds == [(False, False, False), (False, False, True), (False, True, False), (True, False, False),
                     (True, False, True)]
    assert captures == 5 and replays == 9  # a kind runs eagerly once, is captured the second time, then replays


def test_capture_failure_falls_back_to_eager_with_a_warning(stand_in, monkeypatch):
    monkeypatch.setattr(_StandInBackend, "fail", True)
    from diffusers import DDIMScheduler

    unet = tiny_sd15_unet()
    x, cond = torch.randn(2, 4, 32, 32), torch.randn(2, 8, CROSS_DIM)
    sched = DDIMScheduler(num_train_timesteps=1000)
    halodiff.parallel.simulate(unet, ParallelConfig(mode="sync", split_cfg=False, cuda_graphs=True), 2, 0,
                               scheduler=sched)
    with pytest.warns(RuntimeWarning, match="capture of a unet step failed.*runs eagerly"):
        outs = _run(unet, sched, x, cond, steps=4)
    assert all(o.shape == x.shape for o in outs)
    assert halodiff.parallel.context(unet).graphs["unet"].replays == 0
    halodiff.unpatch(unet)


def test_cuda_graphs_on_cpu_warn_and_run_eagerly():
    unet = tiny_sd15_unet()
    with pytest.warns(RuntimeWarning, match=r"cuda_graphs=True\) needs a model on a CUDA device"):
        halodiff.parallel.simulate(unet, ParallelConfig(cuda_graphs=True), 2, 0)
    assert halodiff.parallel.context(unet).graphs == {}
    halodiff.unpatch(unet)
