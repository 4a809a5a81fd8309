"""End-to-end patch-parallel benchmark on CPU gloo ranks (also `halodiff bench e2e`).

Same denoiser (a UNet or a DiT, random weights, same seed on every rank), same inputs, batch 2 (CFG): wall time
per step of N ranks × `threads` threads vs 1 rank × `threads` threads, measured in the same run, plus the
steady-state bytes each rank receives per (async) step. Timed steps follow `warmup` untimed steps. DiTs
(`sd3m`: SD3-medium's widths with `layers` blocks) also report the floor: the bytes a rank must receive per step
for its mode, computed from the layer shapes (the attention K/V it attends to from other bands + the output).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from . import launch
from ._optional import require_all


@dataclass
class E2EResult:
    model: str
    latent: str
    ranks: int
    mode: str
    split_cfg: bool
    step_s: float
    speedup: float | None
    mb_received_per_step: float
    bytes_by_kind_per_step: dict
    per_rank_bytes_by_kind: list | None = None
    floor_mb_per_step: float | None = None


DITS = ("sd3m",)


def _build(model: str, batch: int, hw: tuple[int, int], layers: int | None = None, text_len: int | None = None):
    """(denoiser, call kwargs without the timestep, timestep argument name) with the real pipeline's shapes."""
    if model in DITS:
        from diffusers import SD3Transformer2DModel

        from .models.sd_configs import SD3_TEXT_SEQ, dit_config, dit_inputs

        torch.manual_seed(0)
        net = SD3Transformer2DModel(**dit_config(model, layers)).eval()
        return net, dit_inputs(model, batch, hw, text_len or SD3_TEXT_SEQ), "timestep"
    net, sample, text, extra = _build_unet(model, batch, hw)
    return net, dict(sample=sample, encoder_hidden_states=text, **extra), "timestep"


def _build_unet(model: str, batch: int, hw: tuple[int, int]):
    """(unet, sample, encoder_hidden_states, extra kwargs) with the real pipeline's input shapes."""
    if model == "digits":
        from .models.digits import NULL_LABEL, load_digits_pipeline

        pipe = load_digits_pipeline()
        g = torch.Generator().manual_seed(0)
        labels = torch.tensor([NULL_LABEL] * (batch // 2) + list(range(batch - batch // 2)))
        with torch.no_grad():
            text = pipe.label_embedding(labels)
        sample = torch.randn(batch, pipe.unet.config.in_channels, *hw, generator=g)
        return pipe.unet.eval(), sample, text, {}
    from diffusers import UNet2DConditionModel

    from .models.sd_configs import unet_config, unet_inputs

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(model)).eval()
    return (unet, *unet_inputs(model, batch, hw))


def _worker(rank: int, world: int, model: str, latent: tuple[int, int], mode: str | None, split_cfg: bool,
            warmup: int, timed: int, halo_fraction: float, layers: int | None = None, text_len: int | None = None):
    import halodiff

    unet, call, t_name = _build(model, 2, latent, layers, text_len)
    patched = mode not in (None, "deepcache")
    if patched:
        halodiff.patch(unet, halodiff.ParallelConfig(mode=mode, warmup_steps=warmup, split_cfg=split_cfg,
                                                     halo_fraction=halo_fraction))
    if mode == "deepcache":
        halodiff.enable_deepcache(unet, interval=3, branch_id=0)
    times, per_step = [], []
    timesteps = torch.linspace(999, 1, warmup + timed).round()
    for i, t in enumerate(timesteps):
        if patched:
            stats = halodiff.comm_stats(unet)
            stats.reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            unet(**call, **{t_name: t.expand(2)})
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            if patched:
                per_step.append(dict(stats.bytes_by_kind))
    kinds = {k: statistics.mean(d[k] for d in per_step) for k in per_step[0]} if per_step else {}
    # DeepCache alternates full and partial steps: its cost is the mean step, not the median.
    return (statistics.mean(times) if mode == "deepcache" else statistics.median(times)), kinds


def dit_floor_bytes(model: str, latent: tuple[int, int], ranks: int, mode: str, halo_fraction: float,
                    layers: int | None = None, batch: int = 2, esize: int = 4) -> int:
    """Bytes the busiest rank must receive per async step of a DiT, from its layer shapes alone: per attention
    layer the image K/V it attends to from other bands (distrifusion / sync: every other band; pcpp: ceil(p·h)
    token rows of each neighbour), plus the other bands' output tokens (the gather before the unpatchify)."""
    import math

    from .models.sd_configs import dit_config

    cfg = dit_config(model, layers)
    p = cfg["patch_size"]
    rows, cols = latent[0] // p, latent[1] // p
    q, extra = divmod(rows, ranks)
    heights = [q + (1 if i >= ranks - extra else 0) for i in range(ranks)]
    kv_row = cols * batch * 2 * cfg["num_attention_heads"] * cfg["attention_head_dim"] * esize  # one token row's K/V
    out_row = cols * batch * p * p * cfg["out_channels"] * esize
    n_attn = cfg["num_layers"] + len(cfg.get("dual_attention_layers", ()))
    worst = 0
    for j, h in enumerate(heights):
        if mode == "pcpp":
            near = [heights[i] for i in (j - 1, j + 1) if 0 <= i < ranks]
            kv_rows = sum(min(hh, math.ceil(halo_fraction * hh - 1e-9)) for hh in near)
        else:
            kv_rows = rows - h
        worst = max(worst, n_attn * kv_rows * kv_row + (rows - h) * out_row)
    return worst


def run(model: str = "sd15", latent: int | tuple[int, int] = 64, ranks: int = 2,
        modes: tuple[str, ...] = ("sync", "distrifusion"), split_cfg: bool = False, warmup: int = 1, timed: int = 3,
        threads: int = 1, halo_fraction: float = 0.3, baseline: bool = True, layers: int | None = None,
        text_len: int | None = None) -> list[E2EResult]:
    require_all(("diffusers",), "halodiff bench e2e")
    hw = (latent, latent) if isinstance(latent, int) else tuple(latent)
    results = []
    base = None
    extra = (layers, text_len)
    if baseline:
        base, _ = launch.run_ranks(_worker, 1, model, hw, None, False, warmup, timed, halo_fraction, *extra,
                                   threads=threads, timeout_s=3600)[0]
        results.append(E2EResult(model, f"{hw[0]}x{hw[1]}", 1, "single", False, base, 1.0, 0.0, {}))
    for mode in modes:
        n = 1 if mode == "deepcache" else ranks
        per_rank = launch.run_ranks(_worker, n, model, hw, mode, split_cfg, warmup, timed, halo_fraction, *extra,
                                    threads=threads, timeout_s=3600)
        step = max(r[0] for r in per_rank)
        kinds = {k: max(r[1].get(k, 0) for r in per_rank) for k in per_rank[0][1]}
        floor = None
        if model in DITS and n > 1 and not split_cfg:
            floor = dit_floor_bytes(model, hw, n, mode, halo_fraction, layers) / 1e6
        results.append(E2EResult(model, f"{hw[0]}x{hw[1]}", n, mode, split_cfg and n > 1, step,
                                 base / step if base else None, sum(kinds.values()) / 1e6, kinds,
                                 [r[1] for r in per_rank], floor))
    return results


def table(results: list[E2EResult]) -> str:
    lines = ["| model | latent | ranks | mode | split_cfg | s/step | speedup | MB recv/step/rank (max rank) | floor MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        sp = f"{r.speedup:.2f}x" if r.speedup else "-"
        floor = f"{r.floor_mb_per_step:.1f}" if r.floor_mb_per_step is not None else "-"
        lines.append(f"| {r.model} | {r.latent} | {r.ranks} | {r.mode} | {r.split_cfg} | {r.step_s:.2f} | {sp} | "
                     f"{r.mb_received_per_step:.1f} | {floor} |")
    return "\n".join(lines)


def as_dicts(results: list[E2EResult]) -> list[dict]:
    return [asdict(r) for r in results]
