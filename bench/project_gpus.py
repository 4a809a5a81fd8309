"""Projected N-GPU speedup of patch parallelism from ONE GPU (run it when a session is lent one).

For N = 2/4/8, `halodiff.parallel.simulate` makes this process play one rank (the middle band, which has
two neighbours) of an N-rank group: every layer runs its band with the stale-buffer (async) path, packs and
counts its messages, but nothing is sent. We time that rank's UNet step (T_rank) and read the bytes it
receives per step (B). With a link of bandwidth BW:

    full-overlap model (DistriFusion's premise):        T_N = max(T_rank, B / BW)
    serial model (no overlap, a pessimistic bound):      T_N = T_rank + B / BW
    measured (halodiff's schedule):                      T_N = the rank's step time with its messages on a
        `SimulatedLink` of that bandwidth (each message takes latency + bytes / BW on a serial link and is waited
        for where the engine waits for it), so the exposed part of the communication is measured, not assumed
    speedup = T_1 / T_N, with T_1 the unpatched single-GPU step measured in the same run.

Compared with DistriFusion's published 8xA100 (NVLink) SDXL figures: 1024²: 1.5/2.2/2.8x on 2/4/8 GPUs,
2048²: 1.8/3.1/4.9x.

    python bench/project_gpus.py --model sdxl --resolutions 1024 2048 --ranks 2 4 8 --json bench_out/project.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import halodiff
from halodiff.comm.simulated import SimulatedLink
from halodiff.models.sd_configs import unet_config, unet_inputs

PUBLISHED = {("sdxl", 1024): {2: 1.5, 4: 2.2, 8: 2.8}, ("sdxl", 2048): {2: 1.8, 4: 3.1, 8: 4.9}}
LINKS_GBPS = {"nvlink": 300.0, "pcie": 25.0}
LATENCY_S = 10e-6  # per message


def _timer(device: str):
    def run(fn, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return run


def project(model: str, resolution: int, ranks: list[int], modes: list[str], device: str, dtype: torch.dtype,
            repeats: int) -> list[dict]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(model)).to(device, dtype).eval()
    latent = resolution // 8
    sample, text, extra = unet_inputs(model, 2, (latent, latent), dtype=dtype, device=device)
    timer = _timer(device)

    def step(t=500):
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=text, **extra)

    step()
    t1 = timer(step, repeats)
    rows = []
    for n in ranks:
        for mode in modes:
            halodiff.parallel.simulate(unet, halodiff.ParallelConfig(mode=mode, warmup_steps=1), n, n // 2)
            stats = halodiff.comm_stats(unet)
            step(900)  # sync warm-up step (new generation: fills the stale buffers)
            step(800)
            stats.reset()
            step(700)
            nbytes = stats.bytes_received
            tr = timer(lambda: step(600), repeats)
            halodiff.unpatch(unet)
            row = dict(model=model, resolution=resolution, ranks=n, mode=mode, device=str(device),
                       dtype=str(dtype).replace("torch.", ""), t1_ms=t1 * 1e3, rank_ms=tr * 1e3,
                       mb_per_step=nbytes / 1e6, published=PUBLISHED.get((model, resolution), {}).get(n))
            for link, bw in LINKS_GBPS.items():
                comm = nbytes / (bw * 1e9)
                row[f"speedup_overlap_{link}"] = t1 / max(tr, comm)
                row[f"speedup_serial_{link}"] = t1 / (tr + comm)
                transport = lambda s, k, bw=bw: SimulatedLink(s, k, n, bw * 1e9, LATENCY_S)  # noqa: E731
                halodiff.parallel.simulate(unet, halodiff.ParallelConfig(mode=mode, warmup_steps=1), n, n // 2,
                                           transport=transport)
                step(900)
                step(800)
                tm = timer(lambda: step(600), repeats)
                halodiff.unpatch(unet)
                row[f"speedup_measured_{link}"] = t1 / tm
                row[f"exposed_fraction_{link}"] = max(0.0, tm - tr) / comm if comm else 0.0
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdxl", choices=["sd15", "sd21", "sdxl"])
    p.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--modes", nargs="+", default=["distrifusion", "pcpp"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    rows = []
    for res in a.resolutions:
        rows += project(a.model, res, a.ranks, a.modes, a.device, dtype, a.repeats)
    print("T_N = max(T_rank, bytes/BW) (full overlap), T_rank + bytes/BW (serial), measured on a simulated link; "
          "BW nvlink 300 GB/s, pcie 25 GB/s; T_rank = one simulated rank (middle band) timed on this device")
    print("| model | res | N | mode | T1 ms | rank ms | MB/step | x measured NVLink (exposed) | x full overlap NVLink | "
          "x serial NVLink | x measured PCIe (exposed) | DistriFusion 8xA100 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['resolution']} | {r['ranks']} | {r['mode']} | {r['t1_ms']:.1f} | {r['rank_ms']:.1f} "
              f"| {r['mb_per_step']:.1f} | {r['speedup_measured_nvlink']:.2f} ({r['exposed_fraction_nvlink']:.2f}) | "
              f"{r['speedup_overlap_nvlink']:.2f} | {r['speedup_serial_nvlink']:.2f} | "
              f"{r['speedup_measured_pcie']:.2f} ({r['exposed_fraction_pcie']:.2f}) | {r['published'] or '-'} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
