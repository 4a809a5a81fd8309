"""UNets (SD1.5, SD2.x, SDXL and their ControlNets): the band split is over latent rows at every level.

The first conv reads the whole (replicated) latent and writes its band's rows; every k x k conv after it needs
halo rows, every GroupNorm the image's sums, every self-attention the other bands' K/V; cross-attention is
band-local. The prediction's rows are gathered at the output. A ControlNet's residuals are cut to the band
when they arrive full size (from an unpatched ControlNet or a T2I-Adapter).
"""
from __future__ import annotations

from torch import nn

from . import register
from .base import Layer, ModelSpec, UNetLevels, attention_modules

UNET_RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual",
                  "down_intrablock_additional_residuals")


def norm_act_pairs(module: nn.Module) -> dict[str, str]:
    """GroupNorm -> SiLU submodule names where the norm's output goes straight into the activation, so the
    activation can be fused into the norm: diffusers' ResnetBlock2D (norm1 -> nonlinearity; norm2 ->
    nonlinearity unless a scale-shift time embedding sits between them) and the UNet's conv_norm_out -> conv_act."""
    pairs = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        act = getattr(m, "nonlinearity", None)
        if isinstance(act, nn.SiLU) and hasattr(m, "time_embedding_norm"):
            if isinstance(getattr(m, "norm1", None), nn.GroupNorm):
                pairs[prefix + "norm1"] = prefix + "nonlinearity"
            if isinstance(getattr(m, "norm2", None), nn.GroupNorm) and m.time_embedding_norm == "default":
                pairs[prefix + "norm2"] = prefix + "nonlinearity"
        if isinstance(getattr(m, "conv_norm_out", None), nn.GroupNorm) and isinstance(getattr(m, "conv_act", None),
                                                                                        nn.SiLU):
            pairs[prefix + "conv_norm_out"] = prefix + "conv_act"
    return pairs


def conv_layers(module: nn.Module) -> dict[str, Layer]:
    """The roles of a conv network's layers: halo convs, GroupNorms (SiLU fused where it follows directly) and
    self-attention (cross-attention stays band-local)."""
    pairs = norm_act_pairs(module)
    roles: dict[str, Layer] = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1:
            roles[name] = Layer("halo_conv")
        elif isinstance(m, nn.GroupNorm):
            roles[name] = Layer("group_norm", fuse_silu=pairs.get(name))
    for name, m in attention_modules(module):
        roles[name] = Layer("cross_attention" if getattr(m, "is_cross_attention", False) else "self_attention")
    return roles


class UNetSpec(ModelSpec):
    family = "unet2d"
    classes = ("UNet2DConditionModel",)
    tag = "unet"
    residuals = UNET_RESIDUALS

    def layers(self, module: nn.Module) -> dict[str, Layer]:
        return conv_layers(module)

    def unet_levels(self, module: nn.Module) -> UNetLevels | None:
        levels = UNetLevels()
        down, up = getattr(module, levels.down, None), getattr(module, levels.up, None)
        return levels if isinstance(down, nn.ModuleList) and isinstance(up, nn.ModuleList) else None


class ControlNetSpec(ModelSpec):
    """A ControlNet: conditioning for the UNet (its residuals are band-local when it is patched too). In guess
    mode it sees only the conditional half of a CFG batch."""

    family = "unet2d"
    classes = ("ControlNetModel",)
    tag = "controlnet"
    predicts = False

    def layers(self, module: nn.Module) -> dict[str, Layer]:
        return conv_layers(module)


class MultiControlNetSpec(ModelSpec):
    family = "unet2d"
    classes = ("MultiControlNetModel",)
    tag = "controlnet"
    predicts = False

    def children(self, module: nn.Module) -> list[tuple[str, nn.Module]] | None:
        nets = getattr(module, "nets", None)
        return [(str(i), n) for i, n in enumerate(nets)] if isinstance(nets, nn.ModuleList) else []


register(UNetSpec())
register(ControlNetSpec())
register(MultiControlNetSpec())
