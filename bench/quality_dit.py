"""Quality of patch parallelism and the first-block cache on the trained digits DiT (SD3 architecture, 16x16
tokens): PSNR vs the single-device images and classifier accuracy, for sync, distrifusion, pcpp (p = 0.1, 0.3,
0.5), the first-block cache alone and with sync / distrifusion, at N = 2 and 4 ranks (no CFG split: every rank
holds a band of token rows; at N = 4 a band is 4 token rows).

    python bench/quality_dit.py --ranks 2 4 --json bench_out/quality_dit.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from halodiff import launch


def _worker(rank: int, world: int, methods: list[dict], steps: int, per_class: int, seed: int, warmup: int,
            threshold: float) -> list[dict]:
    import torch

    import halodiff
    from halodiff.cache import first_block_context
    from halodiff.models.digits_dit import load_digits_dit_pipeline

    pipe = load_digits_dit_pipeline()
    labels = [d for _ in range(per_class) for d in range(10)]
    out = []
    for m in methods:
        if m.get("mode"):
            halodiff.patch(pipe, mode=m["mode"], warmup_steps=warmup, split_cfg=False,
                           halo_fraction=m.get("p", 0.3))
        if m.get("fbc"):
            halodiff.enable_cache(pipe, halodiff.FirstBlockCacheConfig(threshold=threshold))
        t0 = time.perf_counter()
        images = pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                      output_type="np").images
        wall = time.perf_counter() - t0
        row = {"method": m["name"], "ranks": world, "wall_s": wall, "images": images if rank == 0 else None}
        if m.get("mode"):
            stats = halodiff.comm_stats(pipe)
            row["mb_received_per_step"] = stats.bytes_received / max(stats.steps, 1) / 1e6
            halodiff.unpatch(pipe)
        if m.get("fbc"):
            kinds = first_block_context(pipe).kinds
            row["skipped_steps"] = kinds.count("skip")
            halodiff.disable_cache(pipe)
        out.append(row)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)  # images in [0, 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-class", type=int, default=5)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.08, help="first-block cache threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from halodiff.models.digits import DigitClassifier

    labels = np.array([d for _ in range(a.per_class) for d in range(10)])
    clf = DigitClassifier()
    single = [{"name": "one device"}, {"name": f"first-block cache ({a.threshold})", "fbc": True}]
    ranked = ([{"name": "sync", "mode": "sync"}, {"name": "distrifusion", "mode": "distrifusion"}]
              + [{"name": f"pcpp p={f}", "mode": "pcpp", "p": f} for f in a.fractions]
              + [{"name": "first-block cache + sync", "mode": "sync", "fbc": True},
                 {"name": "first-block cache + distrifusion", "mode": "distrifusion", "fbc": True}])
    common = (a.steps, a.per_class, a.seed, a.warmup, a.threshold)
    runs = launch.run_ranks(_worker, 1, single, *common, timeout_s=3600)[0]
    base = runs[0]
    for n in a.ranks:
        runs += launch.run_ranks(_worker, n, ranked, *common, timeout_s=3600)[0]
    rows = []
    for r in runs:
        rows.append({k: v for k, v in r.items() if k != "images"} |
                    {"psnr_db": None if r is base else psnr(r["images"], base["images"]),
                     "accuracy": clf.accuracy(r["images"], labels), "speedup": base["wall_s"] / r["wall_s"]})
    print(f"digits DiT, {len(labels)} images, {a.steps} flow-matching steps, guidance 3.0, warm-up {a.warmup}, "
          f"no CFG split; first-block cache threshold {a.threshold}")
    print("| method | ranks | PSNR vs 1 device (dB) | accuracy | steps skipped | MB recv/step/rank | wall s | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ps = "-" if r["psnr_db"] is None else ("exact" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}")
        sk = f"{r['skipped_steps']}/{a.steps}" if "skipped_steps" in r else "-"
        print(f"| {r['method']} | {r['ranks']} | {ps} | {r['accuracy']:.0%} | {sk} | "
              f"{r.get('mb_received_per_step', 0):.2f} | {r['wall_s']:.1f} | {r['speedup']:.2f}x |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(args=vars(a) | {"json": str(a.json)}, rows=rows), indent=2))


if __name__ == "__main__":
    main()
