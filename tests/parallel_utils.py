"""Helpers for distributed tests: tiny UNets/pipelines with the block structure of SD1.5 and SDXL,
and a launcher that runs a function on N spawned gloo ranks and collects each rank's result."""
from __future__ import annotations

import atexit
import os
from collections.abc import Callable

import torch

from halodiff import launch

CROSS_DIM = 32


def tiny_sd15_unet(seed: int = 0, sample_size: int = 32):
    """SD1.5 structure (3 CrossAttnDownBlock2D + DownBlock2D, 2 layers per block, 3 downsamples, head dim 8,
    conv_in/out 3x3, GroupNorm) with tiny widths."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8, cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    _randomize_zero_inits(unet)
    return unet.eval()


def tiny_sdxl_unet(seed: int = 0, sample_size: int = 32):
    """SDXL structure: DownBlock2D + 2 CrossAttnDownBlock2D (transformer depth 2), linear projection,
    head-dim list, added text/time conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=CROSS_DIM,
        attention_head_dim=(4, 8, 8), transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 16,
    )
    _randomize_zero_inits(unet)
    return unet.eval()


def _randomize_zero_inits(model: torch.nn.Module) -> None:
    """diffusers zero-initialises some output projections; give them small random weights so every
    path of the network matters in the comparisons."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def sdxl_added_cond(batch: int) -> dict:
    g = torch.Generator().manual_seed(7)
    return {"text_embeds": torch.randn(batch, 16, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}


def denoise(unet, latents: torch.Tensor, cond: torch.Tensor, steps: int = 6, guidance: float = 3.0,
            added: dict | None = None, scheduler=None) -> torch.Tensor:
    """A minimal CFG DDIM loop calling the UNet the way diffusers pipelines do (one batched call per step)."""
    from diffusers import DDIMScheduler

    sched = scheduler or DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    x = latents.clone()
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if guidance > 1 else x
        kw = {"added_cond_kwargs": added} if added is not None else {}
        with torch.no_grad():
            eps = unet(inp, t, encoder_hidden_states=cond, return_dict=False, **kw)[0]
        if guidance > 1:
            u, c = eps.chunk(2)
            eps = u + guidance * (c - u)
        x = sched.step(eps, t, x).prev_sample
    return x


_POOLS: dict[int, launch.RankPool] = {}


def run_ranks(fn: Callable, world: int, *args, timeout_s: float = 240.0, allow_errors: bool = False) -> list:
    """Run fn(rank, world, *args) on `world` gloo ranks (1 thread each); return their results.

    The ranks of each world size are spawned once per test session and reused (a failed job respawns them)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    pool = _POOLS.get(world)
    if pool is None or not pool.alive:
        pool = _POOLS[world] = launch.RankPool(world, timeout_s=timeout_s)
    return pool.run(fn, *args, timeout_s=timeout_s + 60, allow_errors=allow_errors)


@atexit.register
def close_pools() -> None:
    """Stop every rank pool within a few seconds (then kill): conftest calls this at session finish, which under
    pytest-xdist runs before the worker reports back (the controller kills a worker that lingers 10 s after)."""
    launch.shutdown(list(_POOLS.values()), timeout_s=5.0)
    _POOLS.clear()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    peak = (b.double().max() - b.double().min()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak**2 / mse)).item()


def tiny_vae():
    """A tiny AutoencoderKL with 4 levels (vae_scale_factor 8, as SD)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1).eval()


def tiny_sd_pipeline(unet=None):
    """StableDiffusionPipeline from tiny parts; call it with prompt_embeds (no tokenizer/text encoder)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet or tiny_sd15_unet(),
                                   scheduler=DDIMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet_pipeline():
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    unet = tiny_sd15_unet()
    torch.manual_seed(5)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16)).eval()
    _randomize_zero_inits(controlnet)
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, controlnet=controlnet,
        scheduler=DDIMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(batch: int = 1, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, CROSS_DIM, generator=g), torch.randn(batch, 8, CROSS_DIM, generator=g)


def band_rows(height: int, deep_height: int, n: int, j: int) -> tuple[int, int]:
    """Rows [s, e) of band j at a UNet level of global height `height`: docs/algorithms.md §1, written here
    independently of halodiff.parallel.geometry so that a geometry bug cannot cancel out in the tests.
    The deepest level's rows are split into n bands whose sizes differ by at most one (larger ones last);
    a level k halvings above it (smallest k with height <= 2^k * deep) scales the split by 2^k, clipped."""
    q, extra = divmod(deep_height, n)
    sizes = [q + (1 if i >= n - extra else 0) for i in range(n)]
    starts = [sum(sizes[:i]) for i in range(n + 1)]
    k = 0
    while (deep_height << k) < height:
        k += 1
    return min(starts[j] << k, height), (height if j == n - 1 else min(starts[j + 1] << k, height))


def expected_sync_bytes(unet, lat: torch.Tensor, cond: torch.Tensor, world: int) -> dict[str, list[int]]:
    """Bytes each of `world` ranks must receive in one sync step of `unet` on the CFG batch [lat, lat],
    derived independently of the engine from the layer shapes of an unpatched run."""
    convs, gns, attns = [], [], []
    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1:
            hooks.append(m.register_forward_hook(lambda m, a, o: convs.append((a[0].shape, o.shape, m))))
        elif isinstance(m, torch.nn.GroupNorm):
            hooks.append(m.register_forward_pre_hook(lambda m, a: gns.append((a[0].shape, m.num_groups))))
        elif name.endswith("attn1"):
            hooks.append(m.register_forward_pre_hook(
                lambda m, a, k: attns.append(k["hidden_states"].shape if "hidden_states" in k else a[0].shape),
                with_kwargs=True))
    with torch.no_grad():
        unet(torch.cat([lat, lat]), 500, encoder_hidden_states=cond)
    for h in hooks:
        h.remove()
    esize = lat.element_size()
    grids = {s[-2] * s[-1]: (s[-2], s[-1]) for c in convs for s in (c[0], c[1])}
    deep = min(h for h, _ in grids.values())
    heights = lambda H: [e - s for s, e in (band_rows(H, deep, world, j) for j in range(world))]  # noqa: E731
    exp = {k: [0] * world for k in ("conv_halo", "groupnorm", "attention", "output")}
    for ishape, oshape, conv in convs:
        if ishape[-2] == lat.shape[-2] and ishape[1] == lat.shape[1]:
            continue  # conv_in reads the replicated latent: no exchange
        B, C, H, W = ishape
        for j in range(world):
            (i0, i1), (o0, o1) = band_rows(H, deep, world, j), band_rows(oshape[-2], deep, world, j)
            a = o0 * conv.stride[0] - conv.padding[0]
            b = (o1 - 1) * conv.stride[0] - conv.padding[0] + conv.kernel_size[0]
            rows = (max(0, i0 - a) if j > 0 else 0) + (max(0, b - i1) if j < world - 1 else 0)
            exp["conv_halo"][j] += rows * B * C * W * esize
    for ishape, G in gns:
        for j in range(world):
            exp["groupnorm"][j] += ishape[0] * G * 2 * 8 * (world - 1)  # float64 sums from every other rank
    for B, L, C in attns:
        H, W = grids[L]
        for j in range(world):
            exp["attention"][j] += (H - heights(H)[j]) * W * B * 2 * C * esize
    H = lat.shape[-2]
    for j in range(world):
        exp["output"][j] += (H - heights(H)[j]) * lat.shape[-1] * 2 * lat.shape[1] * esize
    return exp
