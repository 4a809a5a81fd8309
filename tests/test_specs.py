"""Model specs: which spec serves which class, the role each family gives its layers, the split / gather points,
pipeline discovery, and a clear PatchError for a family without a spec (never a silent unsplit run)."""
from __future__ import annotations

import pytest
import torch

import halodiff
from dit_utils import tiny_transformer
from halodiff import PatchError
from halodiff.runtime import denoisers
from halodiff.specs import find_denoisers, spec_for, supported
from parallel_utils import tiny_controlnet_pipeline, tiny_sd15_unet


def _roles(model) -> dict[str, tuple]:
    return {name: (layer.role, layer.text) for name, layer in spec_for(model).layers(model).items()}


def test_every_family_is_registered():
    fams = supported()
    assert {"unet2d", "sd3", "flux", "pixart", "qwen_image"} <= set(fams)
    assert "SD3Transformer2DModel" in fams["sd3"] and "UNet2DConditionModel" in fams["unet2d"]


def test_unet_roles():
    unet = tiny_sd15_unet()
    roles = _roles(unet)
    assert roles["conv_in"] == ("halo_conv", None)
    assert roles["down_blocks.0.resnets.0.norm1"] == ("group_norm", None)
    assert roles["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == ("self_attention", None)
    assert roles["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == ("cross_attention", None)
    assert "conv_in" in roles and not any(n.endswith("proj_in") for n in roles)  # 1x1 convs are band-local
    layers = spec_for(unet).layers(unet)
    assert layers["down_blocks.0.resnets.0.norm1"].fuse_silu == "down_blocks.0.resnets.0.nonlinearity"


def test_dit_roles_split_and_gather():
    sd3 = tiny_transformer("sd3", dual=True)
    r = _roles(sd3)
    assert r["transformer_blocks.0.attn"] == ("joint_attention", "last")
    assert any(v == ("self_attention", None) for k, v in r.items() if k.endswith("attn2")), "SD3.5 dual attention"
    assert not any(k.startswith("pos_embed") for k in r), "the patch embedding's conv must not be a halo conv"
    assert [s.module for s in spec_for(sd3).split] == ["pos_embed"] and spec_for(sd3).gather.module == "proj_out"

    flux = tiny_transformer("flux")
    r = _roles(flux)
    assert r["transformer_blocks.0.attn"] == ("joint_attention", "first")
    assert r["single_transformer_blocks.0.attn"] == ("joint_attention", "first")
    assert [s.module for s in spec_for(flux).split] == ["x_embedder", "pos_embed"]

    pixart = tiny_transformer("pixart")
    r = _roles(pixart)
    assert r["transformer_blocks.0.attn1"] == ("self_attention", None)
    assert r["transformer_blocks.0.attn2"] == ("cross_attention", None)

    qwen = tiny_transformer("qwen")
    layer = spec_for(qwen).layers(qwen)["transformer_blocks.0.attn"]
    assert (layer.role, layer.text, layer.text_mask) == ("joint_attention", "first", True)
    for model in (sd3, flux, pixart, qwen):
        assert spec_for(model).blocks(model) is not None and spec_for(model).unet_levels(model) is None


def test_pipeline_discovery():
    pipe = tiny_controlnet_pipeline()
    assert [d.tag for d in denoisers(pipe)] == ["unet", "controlnet"]
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    pipe.controlnet = MultiControlNetModel([pipe.controlnet, pipe.controlnet])
    pipe.register_modules(controlnet=pipe.controlnet)
    found = denoisers(pipe)
    assert [d.tag for d in found] == ["unet", "controlnet.0", "controlnet.1"]
    assert [d.predicts for d in found] == [True, False, False]
    compiled = torch.compile(tiny_sd15_unet())
    assert find_denoisers(compiled)[0][1] is compiled._orig_mod


def _sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=8, sample_size=8)


def test_family_without_spec_is_a_clear_error():
    sana = _sana()
    for call in (lambda: halodiff.patch(sana), lambda: halodiff.enable_cache(sana, halodiff.FirstBlockCacheConfig())):
        with pytest.raises(PatchError, match=r"SanaTransformer2DModel has no halodiff model spec.*flux.*sd3"):
            call()

    class Pipe:  # a pipeline whose denoiser component has no spec
        components = {"transformer": sana, "vae": torch.nn.Linear(1, 1)}

    with pytest.raises(PatchError, match=r"\.transformer .*SanaTransformer2DModel has no halodiff model spec"):
        halodiff.patch(Pipe())
    with pytest.raises(PatchError, match="no denoiser halodiff knows"):
        halodiff.patch(object())
