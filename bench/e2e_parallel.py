"""Patch-parallel end-to-end benchmark: SD1.5-architecture UNet (random weights, fp32, 64x64 latent,
batch 2 for CFG), N gloo ranks x 1 thread vs 1 rank x 1 thread on this machine.

    python bench/e2e_parallel.py --ranks 2 --modes sync,distrifusion,pcpp --json bench_out/e2e_parallel.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from halodiff import bench_e2e


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="sd15", choices=["sd15", "sd21", "sdxl"])
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--modes", default="sync,distrifusion")
    p.add_argument("--split-cfg", action="store_true", help="also run with the CFG split")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--halo-fraction", type=float, default=0.3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    modes = tuple(m for m in a.modes.split(",") if m)
    res = bench_e2e.run(a.model, a.latent, a.ranks, modes, False, a.warmup, a.steps, a.threads, a.halo_fraction)
    if a.split_cfg:
        res += bench_e2e.run(a.model, a.latent, a.ranks, modes, True, a.warmup, a.steps, a.threads,
                             a.halo_fraction, baseline=False)
        for r in res:
            if r.speedup is None:
                r.speedup = res[0].step_s / r.step_s
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{a.threads} thread(s) per rank")
    print(bench_e2e.table(res))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(bench_e2e.as_dicts(res), indent=2))


if __name__ == "__main__":
    main()
