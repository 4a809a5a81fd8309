"""Quality of the stale/partial methods on the trained digits model: PSNR vs the single-device images and
classifier accuracy, for distrifusion and pcpp (p = 0.1, 0.3, 0.5) at N = 2 and 4 ranks (no CFG split).

    python bench/quality_pcpp.py --ranks 2 4 --json bench_out/quality_pcpp.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from halodiff import launch
from halodiff.demo import Method, _run_methods, psnr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-class", type=int, default=5)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from halodiff.models.digits import DigitClassifier

    labels = np.array([d for _ in range(a.per_class) for d in range(10)])
    clf = DigitClassifier()
    base = launch.run_ranks(_run_methods, 1, [Method("unpatched", 1)], a.steps, a.per_class, 0, a.warmup)[0][0]
    rows = [{"method": "unpatched", "ranks": 1, "psnr_db": None, "accuracy": clf.accuracy(base["images"], labels)}]
    methods = [Method("distrifusion", 0, "distrifusion")] + [Method(f"pcpp p={f}", 0, "pcpp", halo_fraction=f)
                                                             for f in a.fractions]
    for n in a.ranks:
        for r in launch.run_ranks(_run_methods, n, methods, a.steps, a.per_class, 0, a.warmup)[0]:
            rows.append({"method": r["method"], "ranks": n, "psnr_db": psnr(r["images"], base["images"]),
                         "accuracy": clf.accuracy(r["images"], labels), "mb_received_per_step": r["mb"]})
    print(f"digits model, {10 * a.per_class} images, {a.steps} DDIM steps, warm-up {a.warmup}, CFG 2.0, no CFG split")
    print("| method | ranks | PSNR vs 1 device (dB) | accuracy | MB recv/step/rank |\n|---|---|---|---|---|")
    for r in rows:
        ps = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        print(f"| {r['method']} | {r['ranks']} | {ps} | {r['accuracy']:.0%} | {r.get('mb_received_per_step', 0):.2f} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
