"""PixArt-alpha / PixArt-Sigma (`PixArtTransformer2DModel`): self-attention over the image tokens (`attn1`),
cross-attention to the text (`attn2`, band-local).

Split right after `pos_embed` (it adds the whole grid's position embedding), gathered at `proj_out`.
"""
from __future__ import annotations

from torch import nn

from . import register
from .base import Blocks, TokenGather, TokenSplit
from .dit import DiTSpec, patched_grid


class PixArtSpec(DiTSpec):
    family = "pixart"
    classes = ("PixArtTransformer2DModel",)
    split = (TokenSplit("pos_embed", dim=1),)
    gather = TokenGather("proj_out", dim=1)

    def grid(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        return patched_grid(module, args, kwargs)

    def blocks(self, module: nn.Module) -> Blocks:
        return Blocks(("transformer_blocks",))


register(PixArtSpec())
