"""DiTs: the band split of the token sequence and the gather before the unpatchify.

A DiT's spec names where its image tokens first appear (`TokenSplit`: the patch embedding's output, the RoPE
table) and where the last token-local layer writes them (`TokenGather`: `proj_out`). The split keeps this
rank's band of token rows ([s·cols, e·cols) in row-major order; a leading text part of a joint RoPE table stays
whole), so every block after it runs on the band; the gather all-gathers the bands (unequal sizes allowed) so
the unpatchify sees the whole sequence. Full-size ControlNet residuals are cut to the band the same way.
Both are stack-safe `forward` overrides of the spec's submodules; they do nothing on one rank or in the trace.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import PatchError
from ...specs import TokenGather, TokenSplit
from ..state import ParallelContext, StepInfo


def _mine(ctx: ParallelContext, tag: str) -> StepInfo | None:
    step = ctx.active
    if ctx.tracing or step is None or step.topo.n == 1 or step.model.denoiser != tag or step.model.grid is None:
        return None
    return step


def band_tokens(step: StepInfo, t: torch.Tensor, dim: int, text_first: bool = False, what: str = "") -> torch.Tensor:
    """This band's image tokens of `t` along `dim` (which holds [text?, image tokens of the whole grid])."""
    rows, cols = step.model.grid
    n = rows * cols
    text = t.shape[dim] - n if text_first else 0
    if text < 0 or (not text_first and t.shape[dim] != n):
        raise PatchError(f"halodiff: {what}: expected the {rows}x{cols} grid's {n} tokens along dim {dim}, got "
                         f"shape {tuple(t.shape)}")
    s, e = step.bands.bounds(rows)[step.topo.index]
    band = t.narrow(dim, text + s * cols, (e - s) * cols)
    return torch.cat([t.narrow(dim, 0, text), band], dim=dim) if text else band


def install_split(ctx: ParallelContext, inst, tag: str, model: torch.nn.Module, split: TokenSplit) -> None:
    sub = model.get_submodule(split.module)
    what = f"{tag}.{split.module}"

    def factory(inner: Callable) -> Callable:
        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            step = _mine(ctx, tag)
            if step is None:
                return out
            if isinstance(out, torch.Tensor):
                return band_tokens(step, out, split.dim, split.text_first, what)
            items = range(len(out)) if split.items is None else split.items
            cut = list(out)
            for i in items:
                cut[i] = band_tokens(step, out[i], split.dim, split.text_first, what)
            return type(out)(cut)

        return forward

    inst.override(sub, "forward", factory)


def install_gather(ctx: ParallelContext, inst, tag: str, model: torch.nn.Module, gather: TokenGather) -> None:
    sub = model.get_submodule(gather.module)

    def factory(inner: Callable) -> Callable:
        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            step = _mine(ctx, tag)
            if step is None:
                return out
            rows, cols = step.model.grid
            heights = step.bands.heights(rows)
            x = out.movedim(gather.dim, 1) if gather.dim != 1 else out
            B, L = x.shape[:2]
            if L != heights[step.topo.index] * cols:
                raise PatchError(f"halodiff: {tag}.{gather.module}: expected this band's "
                                 f"{heights[step.topo.index] * cols} tokens along dim {gather.dim}, got {L}")
            rest = x.shape[2:]
            band = x.reshape(B, L // cols, -1)  # [B, band rows, cols * channels]
            full = step.comm.gather_bands(band.contiguous(), heights, step.topo, "output")
            full = full.reshape(B, rows * cols, *rest)
            return full.movedim(1, gather.dim) if gather.dim != 1 else full

        return forward

    inst.override(sub, "forward", factory)


def cut_residuals(step: StepInfo, obj, what: str):
    """Full-size token residuals ([B, L, D] tensors or lists of them) -> this band's tokens; band-size ones
    (from a patched ControlNet) pass unchanged."""
    rows, cols = step.model.grid
    if isinstance(obj, (list, tuple)):
        return type(obj)(cut_residuals(step, o, what) for o in obj)
    if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and obj.shape[1] == rows * cols:
        return band_tokens(step, obj, 1, False, what)
    return obj
