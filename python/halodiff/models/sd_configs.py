"""UNet configs of public Stable Diffusion checkpoints (architecture only; weights are random here).

Benchmarks build real-size UNets from these offline: `UNet2DConditionModel(**SD15_UNET)`.
"""
from __future__ import annotations

SD15_UNET: dict = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

SD21_UNET: dict = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                       use_linear_projection=True, sample_size=96)

SDXL_UNET: dict = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), norm_num_groups=32,
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)

TEXT_SEQ = 77


def unet_config(name: str) -> dict:
    configs = {"sd15": SD15_UNET, "sd21": SD21_UNET, "sdxl": SDXL_UNET}
    if name not in configs:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(configs)}")
    return dict(configs[name])


def unet_inputs(name: str, batch: int, latent_hw: tuple[int, int], generator=None, dtype=None, device="cpu"):
    """Random (sample, encoder_hidden_states, extra kwargs) with the shapes the real pipeline feeds the UNet."""
    import torch

    cfg = unet_config(name)
    dtype = dtype or torch.float32
    g = generator or torch.Generator().manual_seed(0)
    sample = torch.randn(batch, cfg["in_channels"], *latent_hw, generator=g).to(device, dtype)
    text = torch.randn(batch, TEXT_SEQ, cfg["cross_attention_dim"], generator=g).to(device, dtype)
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[latent_hw[0] * 8, latent_hw[1] * 8, 0, 0, latent_hw[0] * 8, latent_hw[1] * 8]],
                                     dtype=dtype, device=device).repeat(batch, 1),
        }
    return sample, text, extra


# SD3-medium's transformer (stabilityai/stable-diffusion-3-medium, transformer/config.json): 24 joint blocks of
# 24 heads x 64, 2x2 patches of 16 latent channels. Benchmarks take its widths with fewer blocks (`layers`):
# the speedup of a band split is a per-block property, the block count only scales the time.
SD3_MEDIUM_TRANSFORMER: dict = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SD3_TEXT_SEQ = 333  # 77 CLIP + 256 T5 tokens (StableDiffusion3Pipeline's default max_sequence_length)


def dit_config(name: str, layers: int | None = None) -> dict:
    configs = {"sd3m": SD3_MEDIUM_TRANSFORMER}
    if name not in configs:
        raise ValueError(f"unknown DiT {name!r}; choose one of {', '.join(configs)}")
    cfg = dict(configs[name])
    if layers is not None:
        cfg["num_layers"] = int(layers)
    return cfg


def dit_inputs(name: str, batch: int, latent_hw: tuple[int, int], text_len: int = SD3_TEXT_SEQ, generator=None,
               dtype=None, device="cpu") -> dict:
    """Random call kwargs (without the timestep) with the shapes StableDiffusion3Pipeline feeds the transformer."""
    import torch

    cfg = dit_config(name)
    dtype = dtype or torch.float32
    g = generator or torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    return dict(hidden_states=rnd(batch, cfg["in_channels"], *latent_hw),
                encoder_hidden_states=rnd(batch, text_len, cfg["joint_attention_dim"]),
                pooled_projections=rnd(batch, cfg["pooled_projection_dim"]))
