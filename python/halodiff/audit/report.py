"""The audit's output (audit.json, audit.csv, a summary table) and its command line (`halodiff bench audit`,
`python -m halodiff.audit`, `python bench/kernel_audit.py`)."""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict
from pathlib import Path

from .cuda import cuda_rows
from .rows import Row
from .sass import ARCH, MODEL
from .tools import find_tool
from .triton_aot import triton_rows

ARCHS = (80, 90)


def write(rows: list[Row], notes: list[str], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    flat = [r.flat() for r in rows]
    tools = {t: find_tool(t) for t in ("cuobjdump", "nvdisasm", "ptxas", "nvcc")}
    doc = {"model": MODEL, "archs": {f"sm_{k}": asdict(v) for k, v in ARCH.items()}, "tools": tools, "notes": notes,
           "rows": flat}
    jpath, cpath = out / "audit.json", out / "audit.csv"
    jpath.write_text(json.dumps(doc, indent=1))
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    with cpath.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    return jpath, cpath


def summary(rows: list[Row]) -> str:
    """One line per SD-config row: what bounds its hot loop and the implied fraction of peak."""
    lines = [f"{'backend':7} {'kernel':28} {'arch':5} {'dtype':5} {'D':>4} {'variant':24} {'regs':>4} {'spill':>5} "
             f"{'smem':>6} {'occ':>5} {'HMMA':>4} {'LDSM':>4} {'LDS':>4} {'LDGSTS':>6} {'ld/mma':>6} bound"]
    for r in rows:
        if r.kernel.startswith("seg_attn") and r.head_dim and not r.sd_config or r.dtype not in ("fp16", "bf16", ""):
            continue  # the table shows the model head dims and the 16-bit kernels; the files have every row
        frac = r.model.get("dense_peak_fraction")
        spill = r.spill_bytes if r.spill_bytes is not None else r.local_bytes
        lines.append(
            f"{r.backend:7} {r.kernel[:28]:28} {r.arch:5} {r.dtype:5} {r.head_dim[:4]:>4} {r.variant[:24]:24} "
            f"{r.regs:>4} {spill:>5} {r.smem_bytes or 0:>6} {r.occupancy.get('occupancy', ''):>5} "
            f"{r.loop.get('hmma', 0) + r.loop.get('wgmma', 0):>4} {r.loop.get('ldsm', 0):>4} {r.loop.get('lds', 0):>4} "
            f"{r.loop.get('ldgsts', 0):>6} {r.shared_loads_per_mma if r.shared_loads_per_mma is not None else '':>6} "
            f"{r.model.get('bound', '')[:10]}{f' {frac:.0%} of dense peak' if frac is not None else ''}"
            f"{f' {bpa} B/thread/access' if (bpa := r.model.get('global_bytes_per_thread_access')) else ''}")
    return "\n".join(lines)


def run(out: Path, archs: tuple[int, ...] = ARCHS, only: str | None = None, pattern: str | None = None) -> list[Row]:
    notes: list[str] = []
    rows: list[Row] = []
    if only in (None, "cuda"):
        rows += cuda_rows(archs, pattern, notes)
    if only in (None, "triton"):
        rows += triton_rows(archs, pattern, notes)
    jpath, cpath = write(rows, notes, out)
    print(summary(rows))
    print("\n".join(notes))
    print(f"\n{len(rows)} rows: {jpath} and {cpath}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Static SASS audit of halodiff's CUDA and Triton kernels for "
                                 "sm_80/sm_90 (no GPU needed)")
    ap.add_argument("--out", type=Path, default=Path("bench_out") / "audit")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated SM versions (80, 90)")
    ap.add_argument("--only", choices=("cuda", "triton"))
    ap.add_argument("--kernels", help="regex on kernel names")
    args = ap.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        ap.error(f"--arch must be comma-separated integers like 80,90, got {args.arch!r}")
    bad = [a for a in archs if a not in ARCH]
    if bad:
        ap.error(f"--arch {bad}: the audit models sm_80 and sm_90 only")
    run(args.out, archs, args.only, args.kernels)
    return 0
