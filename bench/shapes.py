"""Layer shapes of real SD UNets, measured by running the model on the meta device (no weights, no compute)."""
from __future__ import annotations

import torch

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


def conv_halo_inputs(latent: int = 64, batch: int = 2, ranks: int = 2) -> list[tuple[int, ...]]:
    """Input shapes of every k×k (k>1) conv of SD1.5 at `latent`², cut to rank 0's band of `ranks` bands
    (the tensors whose boundary rows one patch-parallel step exchanges)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    shapes: list[tuple[int, ...]] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
        for m in unet.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1 and m.in_channels != 4
    ]
    unet(torch.empty(batch, 4, latent, latent, device="meta"), 1,
         encoder_hidden_states=torch.empty(batch, 77, 768, device="meta"))
    for h in hooks:
        h.remove()
    return [(b, c, max(1, h // ranks), w) for b, c, h, w in shapes]
