"""Patch-parallel end-to-end benchmark for DiTs: SD3-medium's transformer widths (24 heads x 64, 16-channel
2x2 patches; random weights, fp32) with `--layers` joint blocks, a 64x64 latent (32x32 = 1024 image tokens),
batch 2 (CFG), `--text` text tokens; N gloo ranks x 1 thread vs 1 rank x 1 thread in the same run. Reports the
bytes each rank receives per step and the floor for its mode computed from the layer shapes.

    python bench/e2e_dit.py --ranks 2 --modes sync,distrifusion,pcpp --layers 4 --text 77 --json bench_out/e2e_dit.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from halodiff import bench_e2e


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd3m", choices=list(bench_e2e.DITS))
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--modes", default="sync,distrifusion,pcpp")
    p.add_argument("--layers", type=int, default=4, help="joint blocks (SD3-medium has 24)")
    p.add_argument("--text", type=int, default=333, help="text tokens (SD3's pipeline: 77 CLIP + 256 T5 = 333)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--halo-fraction", type=float, default=0.3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    modes = tuple(m for m in a.modes.split(",") if m)
    res = bench_e2e.run(a.model, a.latent, a.ranks, modes, False, a.warmup, a.steps, a.threads, a.halo_fraction,
                        layers=a.layers, text_len=a.text)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {a.threads} thread(s) "
          f"per rank; {a.layers} blocks, {a.text} text tokens")
    print(bench_e2e.table(res))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(args=vars(a) | {"json": str(a.json)}, results=bench_e2e.as_dicts(res)),
                                     indent=2))


if __name__ == "__main__":
    main()
