"""Shared benchmark plumbing: every benchmark records a row (name, shape, dtype, backend, ms, GB/s or
TFLOP/s); rows of one run get `ratio` = baseline ms / ms against the baseline measured in the same run,
and are written as CSV + JSON to $HALODIFF_BENCH_OUT (default bench_out/) at the end of the session.

    pytest bench/test_kernels.py                       # CPU numbers of this machine
    pytest bench --benchmark-save=base; ... --benchmark-compare=0001   # pytest-benchmark's own compare
"""
from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path

import pytest
import torch

ROWS: list[dict] = []
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
torch.set_num_threads(max(1, os.cpu_count() or 1))


def machine() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


@pytest.fixture
def bench(benchmark):
    """bench(fn, name=, shape=, dtype=, backend=, bytes=None, flops=None, group=) -> result of fn."""

    def run(fn, *, name: str, shape, dtype, backend: str, bytes: float | None = None, flops: float | None = None,
            group: str | None = None):
        def call():
            out = fn()
            if HAS_CUDA:
                torch.cuda.synchronize()
            return out

        result = benchmark.pedantic(call, rounds=5 if DEVICE == "cpu" else 50, warmup_rounds=1, iterations=1) \
            if not benchmark.disabled else call()
        stats = getattr(benchmark, "stats", None)
        if stats is not None and not benchmark.disabled:
            sec = stats.stats.median
            ROWS.append({
                "name": name, "group": group or name, "shape": "x".join(map(str, shape)),
                "dtype": str(dtype).replace("torch.", ""), "backend": backend, "device": DEVICE,
                "ms": round(sec * 1e3, 4),
                "gbps": round(bytes / sec / 1e9, 2) if bytes else None,
                "tflops": round(flops / sec / 1e12, 3) if flops else None,
                "machine": machine(),
            })
        return result

    return run


@pytest.fixture
def smoke(benchmark) -> bool:
    """True in the smoke run (`--benchmark-disable`, as `make test` runs it: every benchmark once, untimed), where
    a benchmark may shrink what it marks as too big for it (e.g. test_segmented_attention_bench.SMOKE_HEADS)."""
    return benchmark.disabled


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    base = {(r["group"], r["shape"], r["dtype"]): r["ms"] for r in ROWS if r["backend"] == "torch"}
    for r in ROWS:
        b = base.get((r["group"], r["shape"], r["dtype"]))
        r["ratio_vs_torch"] = round(b / r["ms"], 3) if b and r["ms"] else None
    out = Path(os.environ.get("HALODIFF_BENCH_OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    stem = os.environ.get("HALODIFF_BENCH_NAME", "kernels")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ROWS[0].keys()))
        w.writeheader()
        w.writerows(ROWS)
    (out / f"{stem}.json").write_text(json.dumps(ROWS, indent=2))
