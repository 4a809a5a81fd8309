"""Qwen-Image (`QwenImageTransformer2DModel`): joint attention with the text tokens first.

The latent arrives packed as tokens; split right after `img_in`, and the image half of the RoPE tables
`pos_embed(img_shapes, ...)` is sliced to the band. The token grid is `img_shapes` (one (frames=1, rows, cols)
image per sample). A padded prompt's mask covers text keys only (the processor adds an all-true image part).
Gathered at `proj_out`. Edit variants (several images per sample, `zero_cond_t`) are not supported.
"""
from __future__ import annotations

from torch import nn

from . import register
from .base import Blocks, Layer, TokenGather, TokenSplit, config_value, get_arg, require
from .dit import DiTSpec


class QwenImageSpec(DiTSpec):
    family = "qwen_image"
    classes = ("QwenImageTransformer2DModel",)
    text = "first"
    timestep_scale = 1000.0  # its pipeline passes the scheduler's timestep / 1000
    residuals = ("controlnet_block_samples",)
    split = (TokenSplit("img_in", dim=1), TokenSplit("pos_embed", dim=0, items=(0,)))
    gather = TokenGather("proj_out", dim=1)

    def attention_role(self, name: str, attn: nn.Module) -> Layer:
        role = super().attention_role(name, attn)
        return Layer(role.role, text=role.text, text_mask=True) if role.role == "joint_attention" else role

    def check(self, module: nn.Module) -> None:
        require(not config_value(module, "zero_cond_t", False),
                "halodiff: QwenImageTransformer2DModel with zero_cond_t (Qwen-Image-Edit conditioning images) "
                "cannot be split into bands; patch the text-to-image model")

    def grid(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        shapes = get_arg(module, "img_shapes", args, kwargs)
        try:
            per_sample = [list(s) if isinstance(s, list) else [s] for s in shapes]
            firsts = {tuple(int(v) for v in s[0]) for s in per_sample}
        except (TypeError, ValueError, IndexError):
            firsts, per_sample = set(), []
        require(len(firsts) == 1 and all(len(s) == 1 for s in per_sample),
                f"halodiff: QwenImageTransformer2DModel needs img_shapes with one (1, rows, cols) image per sample, "
                f"the same for the whole batch; got {shapes!r}")
        frames, rows, cols = firsts.pop()
        require(frames == 1, f"halodiff: Qwen-Image with {frames} frames is not supported (images only)")
        return rows, cols

    def blocks(self, module: nn.Module) -> Blocks:
        return Blocks(("transformer_blocks",), hidden=1, encoder=0)


register(QwenImageSpec())
