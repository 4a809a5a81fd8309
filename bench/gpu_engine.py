"""Engine checks for a GPU machine (bench/gpu_suite.sh step 6): CUDA-graph capture and the e2e UNet step.

    python bench/gpu_engine.py graphs --json OUT/graph_capture.json   # patched step: eager vs CUDA graphs
    python bench/gpu_engine.py step --json OUT/e2e_step.json          # SD1.5-architecture step, fp16: unpatched vs DeepCache

graphs: one GPU plays band 0 of a 2-rank group (`halodiff.parallel.simulate`, nothing is sent) with DeepCache
on, so every step kind occurs (sync / async / last x DeepCache full / partial). The same steps run eagerly and
with `ParallelConfig(cuda_graphs=True)`; outputs must match, steady steps run under
`torch.cuda.set_sync_debug_mode("error")` (a host sync raises), and the time per step of both is reported.
step: one UNet call of the SD1.5 architecture (random weights, 512², batch 2, fp16), unpatched vs DeepCache
(interval 3: full and partial steps), CUDA events, medians.
Needs diffusers (wheels/ on an offline machine); `--device cpu --tiny` runs the same code on CPU as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import halodiff


def _unet(tiny: bool, device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    from halodiff.models.sd_configs import unet_config

    cfg = unet_config("sd15")
    if tiny:
        cfg.update(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, norm_num_groups=16)
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).to(device, dtype).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def graphs(device: str, tiny: bool, steps: int) -> dict:
    from diffusers import DDIMScheduler

    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = _unet(tiny, device, dtype)
    latent = 16 if tiny else 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    sched = DDIMScheduler(num_train_timesteps=1000)
    out: dict = {}
    for use in (False, True):
        cfg = halodiff.ParallelConfig(mode="distrifusion", warmup_steps=2, split_cfg=False, cuda_graphs=use)
        halodiff.parallel.simulate(unet, cfg, 2, 0, scheduler=sched)
        halodiff.enable_deepcache(unet, interval=3, scheduler=sched)
        results, times = [], []
        for generation in range(2):
            sched.set_timesteps(steps, device=device)
            for i, t in enumerate(sched.timesteps):
                _sync(device)
                t0 = time.perf_counter()
                steady = device == "cuda" and generation == 1 and 0 < i < steps - 1
                if steady:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    with torch.no_grad():
                        results.append(unet(x, t, encoder_hidden_states=text).sample)
                finally:
                    if steady:
                        torch.cuda.set_sync_debug_mode("default")
                _sync(device)
                if generation == 1:
                    times.append(time.perf_counter() - t0)
        ctx = halodiff.parallel.context(unet)
        sg = ctx.graphs.get("unet")
        out["graphs" if use else "eager"] = dict(
            ms_per_step=statistics.median(times) * 1e3, captures=sg.captures if sg else 0,
            replays=sg.replays if sg else 0)
        out.setdefault("outputs", []).append(results)
        halodiff.disable_deepcache(unet)
        halodiff.unpatch(unet)
    eager, with_graphs = out.pop("outputs")
    out["max_abs_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(eager, with_graphs))
    out["speedup"] = out["eager"]["ms_per_step"] / out["graphs"]["ms_per_step"]
    return out


def step(device: str, tiny: bool, repeats: int) -> dict:
    from halodiff.models.sd_configs import unet_inputs

    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = _unet(tiny, device, dtype)
    latent = 16 if tiny else 64
    sample, text, extra = unet_inputs("sd15", 2, (latent, latent), dtype=dtype, device=device)
    if tiny:
        text = text[..., :64].contiguous()

    def timed(calls: int) -> list[float]:
        times = []
        for i in range(calls):
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                unet(sample, 999 - i, encoder_hidden_states=text, **extra)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return times

    timed(2)
    base = statistics.median(timed(repeats))
    halodiff.enable_deepcache(unet, interval=3)
    t = timed(3 * repeats)  # calls counted from the first: full, partial, partial, ...
    halodiff.disable_deepcache(unet)
    full, partial = statistics.median(t[0::3]), statistics.median(t[1::3] + t[2::3])
    return dict(unpatched_ms=base * 1e3, deepcache_full_ms=full * 1e3, deepcache_partial_ms=partial * 1e3,
                deepcache_i3_speedup=base / ((full + 2 * partial) / 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=["graphs", "step"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="narrow UNet, 16x16 latent (smoke test)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    res = graphs(a.device, a.tiny, a.steps) if a.check == "graphs" else step(a.device, a.tiny, a.repeats)
    res = dict(check=a.check, device=name, tiny=a.tiny, **res)
    print(json.dumps(res, indent=2))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
