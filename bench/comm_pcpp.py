"""PCPP communication benchmark: steady-state bytes received per rank per step, pcpp(p) / distrifusion,
same UNet and inputs in the same run (SD1.5 architecture, random weights, 64x64 latent, CFG batch 2,
no CFG split). Bytes are counted by halodiff's comm layer (`halodiff.comm_stats`) during async steps.

    python bench/comm_pcpp.py --ranks 2 4 --json bench_out/comm_pcpp.json

Floors computed from the UNet's exact layer shapes (docs/algorithms.md §2): attention K/V 0.323 (N=2),
0.179 (N=4); all bytes 0.383 / 0.252. Goals: attention <= 0.33 / 0.19, total <= 0.40 / 0.27.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from halodiff import bench_e2e

GOALS = {2: (0.33, 0.40), 4: (0.19, 0.27)}


def ratios(df: bench_e2e.E2EResult, pc: bench_e2e.E2EResult) -> dict:
    """Mean over ranks of bytes received per step, pcpp / distrifusion, per kind and in total."""
    def per_rank(res, kind=None):
        return mean(sum(k.values()) if kind is None else k[kind] for k in res.per_rank_bytes_by_kind)

    out = {kind: per_rank(pc, kind) / per_rank(df, kind) for kind in ("attention", "conv_halo", "groupnorm", "output")
           if per_rank(df, kind)}
    out["total"] = per_rank(pc) / per_rank(df)
    out["distrifusion_MB_per_step"] = per_rank(df) / 1e6
    out["pcpp_MB_per_step"] = per_rank(pc) / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--halo-fraction", type=float, default=0.3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    rows = []
    for n in a.ranks:
        res = bench_e2e.run("sd15", a.latent, n, ("distrifusion", "pcpp"), False, warmup=1, timed=1,
                            halo_fraction=a.halo_fraction, baseline=False)
        r = ratios(res[0], res[1])
        goal = GOALS.get(n)
        r.update(ranks=n, latent=a.latent, halo_fraction=a.halo_fraction,
                 meets_goal=None if goal is None else (r["attention"] <= goal[0] and r["total"] <= goal[1]))
        rows.append(r)
        print(f"N={n} latent {a.latent}: attention ratio {r['attention']:.3f}, total ratio {r['total']:.3f} "
              f"(distrifusion {r['distrifusion_MB_per_step']:.1f} MB/step/rank, pcpp {r['pcpp_MB_per_step']:.1f}); "
              f"goal {goal}: {'met' if r['meets_goal'] else 'NOT met' if goal else '-'}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
