"""SD3 / SD3.5 (`SD3Transformer2DModel`): MMDiT joint attention, image tokens first and text tokens last.

Split right after `pos_embed` (the patch embedding adds the position embedding of the whole grid, so the band's
slice carries its own positions); gathered at `proj_out`, before the unpatchify. SD3.5's dual-attention layers
(`attn2`) are self-attention over the image tokens. `block_controlnet_hidden_states` (SD3 ControlNet) are cut to
the band when they arrive full size.
"""
from __future__ import annotations

from torch import nn

from . import register
from .base import Blocks, TokenGather, TokenSplit
from .dit import DiTSpec, patched_grid


class SD3Spec(DiTSpec):
    family = "sd3"
    classes = ("SD3Transformer2DModel",)
    text = "last"
    residuals = ("block_controlnet_hidden_states",)
    split = (TokenSplit("pos_embed", dim=1),)
    gather = TokenGather("proj_out", dim=1)

    def grid(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        return patched_grid(module, args, kwargs)

    def blocks(self, module: nn.Module) -> Blocks:
        return Blocks(("transformer_blocks",), hidden=1, encoder=0)


register(SD3Spec())
