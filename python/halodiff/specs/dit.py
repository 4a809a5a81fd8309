"""What the DiT families share: a token grid split into bands of token rows right after the patch embedding.

Every transformer layer except attention is token-local, so a band of image tokens runs through the blocks as
it is; attention layers get the other bands' K/V (their role says whether text tokens sit in the same SDPA).
Text tokens are replicated: every rank computes all of them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Layer, ModelSpec, attention_modules, config_value, get_arg, require


class DiTSpec(ModelSpec):
    tag = "transformer"
    sample = "hidden_states"
    timestep = "timestep"
    text: str = "last"  # where this family's joint attention puts the text tokens

    def attention_role(self, name: str, attn: nn.Module) -> Layer:
        """Joint when the module projects text tokens itself (SD3 / Flux double / Qwen), cross when its K/V come
        from the text, else self-attention over the image tokens."""
        if getattr(attn, "add_k_proj", None) is not None or getattr(attn, "to_added_qkv", None) is not None:
            return Layer("joint_attention", text=self.text)
        if getattr(attn, "is_cross_attention", False):
            return Layer("cross_attention")
        return Layer("self_attention")

    def layers(self, module: nn.Module) -> dict[str, Layer]:
        return {name: self.attention_role(name, m) for name, m in attention_modules(module)}


def patched_grid(module: nn.Module, args: tuple, kwargs: dict, sample: str = "hidden_states") -> tuple[int, int]:
    """Token grid of a DiT that patchifies a [B, C, H, W] latent itself (SD3, PixArt): (H/p, W/p)."""
    x = get_arg(module, sample, args, kwargs)
    p = int(config_value(module, "patch_size", 1) or 1)
    require(isinstance(x, torch.Tensor) and x.dim() == 4,
            f"halodiff: {type(module).__name__} expects a [B, C, H, W] latent as {sample}")
    h, w = x.shape[-2:]
    require(h % p == 0 and w % p == 0, f"halodiff: latent {h}x{w} is not a multiple of the patch size {p}")
    return h // p, w // p


class IdsGrid:
    """Token grid from a [L, 3] position-id table (Flux's img_ids: [_, row, col] in row-major order).

    Reading the ids is a host read: it happens once per ids tensor (pipelines make one per generation) and is
    cached by the tensor's identity and version."""

    def __init__(self) -> None:
        self._key: Any = None
        self._grid: tuple[int, int] | None = None

    def __call__(self, ids: torch.Tensor, name: str) -> tuple[int, int]:
        require(isinstance(ids, torch.Tensor) and ids.dim() in (2, 3) and ids.shape[-1] >= 3,
                f"halodiff: {name} must be a [L, 3] position-id tensor")
        if ids.dim() == 3:
            ids = ids[0]
        key = (ids.data_ptr(), ids._version, tuple(ids.shape), ids.device)
        if key == self._key and self._grid is not None:
            return self._grid
        if ids.device.type == "meta":
            raise ValueError("halodiff: position ids on the meta device")
        rows_ids, cols_ids = ids[:, 1].round().long().cpu(), ids[:, 2].round().long().cpu()
        n = ids.shape[0]
        rows = int(torch.unique(rows_ids).numel())
        cols = n // max(rows, 1)
        expect_r = torch.arange(rows).repeat_interleave(cols)
        expect_c = torch.arange(cols).repeat(rows)
        ok = rows * cols == n and torch.equal(rows_ids - rows_ids[0], expect_r) and \
            torch.equal(cols_ids - cols_ids[0], expect_c)
        require(ok, f"halodiff: {name} is not a row-major grid of image tokens (ids[:, 1] = row, ids[:, 2] = col); "
                    "patch parallelism needs the image tokens in row-major order (extra conditioning-image tokens, "
                    "as in Flux Kontext, are not supported)")
        self._key, self._grid = key, (rows, cols)
        return self._grid
