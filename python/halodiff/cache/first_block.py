"""First-block cache (FBCache, the TeaCache family): skip a transformer's remaining blocks when its first block's
output barely changed.

Same semantics as diffusers' `FirstBlockCacheConfig` hook (`hooks/first_block_cache.py`): the first block always
runs; its output residual r = out − in is compared with r_full, the first block's residual at the last full step:
rel = mean|r − r_full| / mean|r_full|. If rel > threshold (or there is no full step yet) every block runs, and
the run keeps r_full = r, the first block's output and the remaining blocks' residual (last block's output − first
block's output, for hidden and encoder states); otherwise the remaining blocks return their inputs and the
first block's output plus the kept residual stands for the last block's output. State is kept per named call
(diffusers' `cache_context`: "cond" / "uncond") and reset when a generation starts.

Under patch parallelism each rank sees its band: the two means' sums are added over every rank sharing the work
(both CFG halves) with one 8-byte all-reduce (`Runtime.reduce_sum`), so all ranks take the same branch and, in
sync mode, the branch one device would take. The decision reads one value on the host per step (a device sync
on GPUs), which is why a step with this cache cannot be one captured CUDA graph.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import PatchError
from ..runtime import Denoiser, Installation, Runtime, Step, Subscriber, attach, install, predictor_of
from ..specs import Blocks
from ..specs.base import get_arg
from .base import FEATURE, CacheConfig, CacheRun, cache_run, register


@dataclass(frozen=True)
class FirstBlockCacheConfig(CacheConfig):
    """Settings of the first-block cache (`halodiff.enable_cache(pipe, FirstBlockCacheConfig(threshold=0.08))`).

    threshold: skip the remaining blocks when mean|r − r_full| / mean|r_full| of the first block's residual is at
        most this (diffusers' default 0.05; higher skips more often)."""

    method: ClassVar[str] = "first_block"
    threshold: float = 0.05

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"first_block: threshold must be a number >= 0; got {t!r}")


@dataclass
class _State:
    """Per named call: what the last full step left."""

    head_residual: torch.Tensor | None = None
    head_output: tuple | None = None  # (hidden, encoder) of the first block at the last full step
    tail_residual: tuple | None = None  # (hidden, encoder) residual of the remaining blocks
    compute: bool = True


@dataclass
class FirstBlockCacheRun(CacheRun):
    config: FirstBlockCacheConfig
    blocks: Blocks
    rt: Runtime | None = None
    states: dict = field(default_factory=dict)
    state: _State | None = None  # of the call in flight
    kinds: list[str] = field(default_factory=list)

    def before(self, d: Denoiser, step: Step, args: tuple, kwargs: dict) -> None:
        if not d.predicts:
            return None
        if step.per_sample:
            raise PatchError("first_block: this call holds samples at different timesteps (a stream batch); there "
                             "is no previous step to compare with: call halodiff.disable_cache(pipe) before streaming")
        if step.new_generation:
            self.states.pop(step.context, None)
        self.state = self.states.setdefault(step.context, _State())
        self.state.compute = True
        return None

    def start_generation(self, generation) -> None:
        self.kinds = []

    def after(self, d: Denoiser, step: Step, output: Any) -> None:
        if d.predicts and self.state is not None:
            self.kinds.append("full" if self.state.compute else "skip")
            self.state = None
        return None

    @torch.compiler.disable
    def decide(self, residual: torch.Tensor) -> bool:
        """Whether the remaining blocks run: every rank gets the same answer (sums over all of them)."""
        prev = self.state.head_residual
        if prev is None or prev.shape != residual.shape or prev.dtype != residual.dtype:
            return True
        sums = torch.stack([(residual - prev).abs().float().sum(), prev.abs().float().sum()])
        diff, base = self.rt.reduce_sum(sums).tolist()
        return not base > 0 or diff / base > self.config.threshold


def _split(block_out: Any, blocks: Blocks) -> tuple[torch.Tensor, torch.Tensor | None]:
    if blocks.hidden is None:
        return block_out, None
    return block_out[blocks.hidden], (block_out[blocks.encoder] if blocks.encoder is not None else None)


def _join(hidden: torch.Tensor, encoder: torch.Tensor | None, blocks: Blocks, like: Any) -> Any:
    if blocks.hidden is None:
        return hidden
    out = [None] * len(like)
    out[blocks.hidden] = hidden
    if blocks.encoder is not None:
        out[blocks.encoder] = encoder
    return tuple(out)


def _passthrough(block: nn.Module, blocks: Blocks, args: tuple, kwargs: dict) -> Any:
    """A skipped block's output: its inputs, in the block's output layout."""
    hidden = get_arg(block, "hidden_states", args, kwargs)
    if blocks.hidden is None:
        return hidden
    encoder = get_arg(block, "encoder_hidden_states", args, kwargs) if blocks.encoder is not None else None
    return _join(hidden, encoder, blocks, (None,) * (max(blocks.hidden, blocks.encoder or 0) + 1))


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a + b


def _sub(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a - b


def _active(run: FirstBlockCacheRun, args: tuple, kwargs: dict) -> bool:
    if run.state is None:
        return False
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v.device.type != "meta"  # a feature's shape trace runs every block
    return True


def _head_forward(run: FirstBlockCacheRun, block: nn.Module, inner: Callable) -> Callable:
    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        if not _active(run, args, kwargs):
            return out
        hidden_in = get_arg(block, "hidden_states", args, kwargs)
        hidden, encoder = _split(out, run.blocks)
        residual = hidden - hidden_in
        st = run.state
        st.compute = run.decide(residual)
        if st.compute:
            st.head_residual, st.head_output = residual, (hidden, encoder)
            return out
        tail_h, tail_e = st.tail_residual
        return _join(hidden + tail_h, _add(tail_e, encoder), run.blocks, out)

    return forward


def _rest_forward(run: FirstBlockCacheRun, block: nn.Module, tail: bool, inner: Callable) -> Callable:
    def forward(*args, **kwargs):
        if not _active(run, args, kwargs):
            return inner(*args, **kwargs)
        st = run.state
        if st.compute:
            out = inner(*args, **kwargs)
            if tail:
                hidden, encoder = _split(out, run.blocks)
                st.tail_residual = (hidden - st.head_output[0], _sub(encoder, st.head_output[1]))
            return out
        return _passthrough(block, run.blocks, args, kwargs)

    return forward


def _install(pipe, config: FirstBlockCacheConfig, scheduler) -> None:
    den = predictor_of(pipe, "first_block")
    model = den.module
    blocks = den.spec.blocks(model)
    if blocks is None:
        raise PatchError(f"first_block: {type(model).__name__} has no transformer block list to skip; for UNets use "
                         "DeepCache (halodiff.enable_deepcache(pipe) or DeepCacheConfig)")
    chain = [blk for name in blocks.lists for blk in model.get_submodule(name)]
    if len(chain) < 2:
        raise PatchError(f"first_block: {type(model).__name__} has {len(chain)} block(s); the cache needs at least 2")

    def build(inst: Installation) -> FirstBlockCacheRun:
        run = FirstBlockCacheRun(config, blocks)
        inst.override(chain[0], "forward", lambda inner: _head_forward(run, chain[0], inner))
        for i, blk in enumerate(chain[1:], 1):
            inst.override(blk, "forward", lambda inner, blk=blk, i=i: _rest_forward(run, blk, i == len(chain) - 1, inner))
        rt, detach = attach(pipe, Subscriber(FEATURE, run.before, run.after, kind=None, capturable=False), scheduler)
        run.rt = rt
        inst.on_remove(detach)
        inst.on_remove(rt.on_generation(run.start_generation))
        inst.on_remove(run.states.clear)
        return run

    install(FEATURE, [pipe] if pipe is model else [pipe, model], build)


register(FirstBlockCacheConfig.method, FirstBlockCacheConfig, _install)


def first_block_context(pipe) -> FirstBlockCacheRun:
    """The run state of a pipeline with the first-block cache enabled (kinds per call); for tools and tests."""
    return cache_run(pipe, FirstBlockCacheConfig.method)
