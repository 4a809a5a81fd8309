"""GroupNorm statistics precision per backend: relative error of var = Σx²/n − mean² from `group_stats` sums
added over 3 row bands (as the patch-parallel all-reduce adds them) vs the exact two-pass float64 variance,
at mean/std = 1 ... 1000, for float32/float16/bfloat16 inputs; plus plain float32 (Σx, Σx²) for comparison.

    python bench/group_norm_precision.py [--json bench_out/group_norm_precision.json]

Triton runs in its CPU interpreter when no GPU is present. Deterministic (fixed seeds); no timing.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from halodiff import ops  # noqa: E402
from halodiff.ops import registry  # noqa: E402

SHAPE, G, BANDS = (2, 16, 20, 12), 4, ((0, 7), (7, 13), (13, 20))


def rel_var_error(sums: torch.Tensor, x: torch.Tensor, n: int) -> float:
    exact = x.double().reshape(x.shape[0], G, -1).var(-1, unbiased=False)
    mean = sums[..., 0].double() / n
    return ((sums[..., 1].double() / n - mean * mean - exact.to(sums.device)).abs() / exact.to(sums.device)).max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench_out/group_norm_precision.json"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = [b for b in ("cuda", "triton", "cpu", "reference")
                if not registry.backend_reasons(b) and not registry.device_reasons(b, dev, forced=True)]
    n = SHAPE[1] // G * SHAPE[2] * SHAPE[3]
    rows = []
    for ratio in (1, 100, 300, 1000):
        g = torch.Generator().manual_seed(ratio)
        x32 = torch.randn(SHAPE, generator=g) * 0.7 + ratio * 0.7
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = x32.to(dtype).to(dev)
            row = {"mean_over_std": ratio, "dtype": str(dtype).replace("torch.", "")}
            for b in backends:
                with ops.use_backend(b):
                    sums = sum(ops.group_stats(x[:, :, a:e].contiguous(), G) for a, e in BANDS)
                row[b] = rel_var_error(sums, x, n)
            xf = x.float().reshape(SHAPE[0], G, -1)
            row["float32 sums"] = rel_var_error(torch.stack([xf.sum(-1), (xf * xf).sum(-1)], -1), x, n)
            rows.append(row)
            print("  ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"shape": SHAPE, "groups": G, "bands": BANDS, "rows": rows}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
