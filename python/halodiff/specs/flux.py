"""Flux.1 dev / schnell (`FluxTransformer2DModel`): double-stream blocks (joint attention, text first) and
single-stream blocks (one sequence [text, image], also text first).

The latent arrives packed as tokens; split right after `x_embedder`, and the RoPE table `pos_embed(ids)` (rows
[text, image]) keeps the text rows and the band's image rows. The token grid comes from `img_ids`
(row-major [_, row, col]). Gathered at `proj_out` (the pipeline unpacks the tokens). ControlNet samples are cut to
the band when they arrive full size.
"""
from __future__ import annotations

from torch import nn

from . import register
from .base import Blocks, Layer, TokenGather, TokenSplit, get_arg, require
from .dit import DiTSpec, IdsGrid


class FluxSpec(DiTSpec):
    family = "flux"
    classes = ("FluxTransformer2DModel",)
    text = "first"
    timestep_scale = 1000.0  # its pipeline passes the scheduler's timestep / 1000
    residuals = ("controlnet_block_samples", "controlnet_single_block_samples")
    unbatched = ("img_ids", "txt_ids")
    split = (TokenSplit("x_embedder", dim=1), TokenSplit("pos_embed", dim=0, text_first=True))
    gather = TokenGather("proj_out", dim=1)

    def __init__(self) -> None:
        self._ids = IdsGrid()

    def attention_role(self, name: str, attn: nn.Module) -> Layer:
        if name.startswith("single_transformer_blocks."):  # text tokens are the head of its one sequence
            return Layer("joint_attention", text="first")
        return super().attention_role(name, attn)

    def grid(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        ids = get_arg(module, "img_ids", args, kwargs)
        require(ids is not None, "halodiff: FluxTransformer2DModel needs img_ids to know its token grid")
        return self._ids(ids, "img_ids")

    def blocks(self, module: nn.Module) -> Blocks:
        return Blocks(("transformer_blocks", "single_transformer_blocks"), hidden=1, encoder=0)


register(FluxSpec())
