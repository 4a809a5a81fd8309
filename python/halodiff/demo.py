"""`halodiff demo`: what halodiff does to a real (small, trained) diffusion pipeline, in one command.

Generates digits 0-9 with the shipped digits model: unpatched, DeepCache, and on N gloo ranks (launched
here) sync / distrifusion / pcpp patch parallelism and DeepCache + distrifusion. Every rank uses one
thread, so N ranks use N cores against the unpatched run's one. Writes to the output folder:
grid.png (a labelled row per method), report.md + report.json (wall time, speedup and PSNR vs
unpatched, classifier accuracy, bytes received per step) and speed_quality.png.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import launch
from ._optional import require, require_all


@dataclass(frozen=True)
class Method:
    key: str  # the name `halodiff demo --methods` takes
    name: str
    ranks: int  # 1: single process; else the demo's --ranks
    mode: str | None = None  # ParallelConfig.mode
    deepcache: bool = False
    halo_fraction: float = 0.3


METHODS = (
    Method("unpatched", "unpatched", 1),
    Method("deepcache", "deepcache (interval 3)", 1, deepcache=True),
    Method("sync", "sync", 0, "sync"),
    Method("distrifusion", "distrifusion", 0, "distrifusion"),
    Method("pcpp", "pcpp (p=0.3)", 0, "pcpp"),
    Method("deepcache+distrifusion", "deepcache + distrifusion", 0, "distrifusion", deepcache=True),
)
METHOD_KEYS = tuple(m.key for m in METHODS)


def select(keys: list[str]) -> tuple[Method, ...]:
    """The methods named by `keys` (the unpatched baseline always runs first)."""
    unknown = [k for k in keys if k not in METHOD_KEYS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_KEYS)}")
    return tuple(m for m in METHODS if m.key == "unpatched" or m.key in keys)


@dataclass
class MethodResult:
    method: str
    ranks: int
    wall_s: float
    speedup: float = 1.0
    psnr_db: float | None = None
    accuracy: float = 0.0
    mb_received_per_step: float = 0.0
    images: np.ndarray | None = field(default=None, repr=False)


def _run_methods(rank: int, world: int, methods: list[Method], steps: int, per_class: int, seed: int,
                 warmup_steps: int) -> list[dict]:
    """On every rank: generate with each method in turn; rank-0 results are used (all ranks agree)."""
    import torch

    import halodiff
    from halodiff.cache import disable_deepcache, enable_deepcache
    from halodiff.models.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    labels = [d for _ in range(per_class) for d in range(10)]
    out = []
    for m in methods:
        if m.mode is not None:
            cfg = halodiff.ParallelConfig(mode=m.mode, warmup_steps=warmup_steps, split_cfg=False,
                                          halo_fraction=m.halo_fraction)
            halodiff.patch(pipe, cfg)
        if m.deepcache:
            enable_deepcache(pipe, interval=3, branch_id=0)
        pipe(labels[:2], num_inference_steps=2, output_type="np")  # untimed: first-call setup
        if m.mode is not None:
            halodiff.comm_stats(pipe).reset()
        t0 = time.perf_counter()
        images = pipe(labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                      output_type="np").images[..., 0]
        wall = time.perf_counter() - t0
        mb = 0.0
        if m.mode is not None:
            stats = halodiff.comm_stats(pipe)
            mb = stats.bytes_received / max(stats.steps, 1) / 1e6
        if m.deepcache:
            disable_deepcache(pipe)
        if m.mode is not None:
            halodiff.unpatch(pipe)
        out.append({"method": m.name, "ranks": world, "wall_s": wall, "mb": mb, "images": images})
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def run_methods(ranks: int, steps: int, per_class: int = 3, seed: int = 0, warmup_steps: int = 4,
                methods: tuple[Method, ...] = METHODS) -> list[MethodResult]:
    from tqdm.auto import tqdm

    from .models.digits import DigitClassifier

    single = [m for m in methods if m.ranks == 1 or ranks == 1]
    multi = [m for m in methods if m.ranks != 1 and ranks > 1]
    raw: list[dict] = []
    with tqdm(total=len(single) + len(multi), desc="halodiff demo", unit="method") as bar:
        if single:  # in this process (1 thread, like every rank)
            import torch

            bar.set_postfix_str(f"1 rank: {', '.join(m.name for m in single)}")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                raw += _run_methods(0, 1, single, steps, per_class, seed, warmup_steps)
            finally:
                torch.set_num_threads(threads)
            bar.update(len(single))
        if multi:
            bar.set_postfix_str(f"{ranks} ranks: {', '.join(m.name for m in multi)}")
            per_rank = launch.run_ranks(_run_methods, ranks, multi, steps, per_class, seed, warmup_steps)
            for i, r in enumerate(per_rank[0]):
                r["wall_s"] = max(p[i]["wall_s"] for p in per_rank)
                r["mb"] = max(p[i]["mb"] for p in per_rank)
            raw += per_rank[0]
            bar.update(len(multi))
    classifier = DigitClassifier()
    labels = np.array([d for _ in range(per_class) for d in range(10)])
    base = next(r for r in raw if r["method"] == "unpatched")
    results = []
    for r in raw:
        p = psnr(r["images"], base["images"])
        results.append(MethodResult(
            method=r["method"], ranks=r["ranks"], wall_s=r["wall_s"], speedup=base["wall_s"] / r["wall_s"],
            psnr_db=None if math.isinf(p) else p, accuracy=classifier.accuracy(r["images"], labels),
            mb_received_per_step=r["mb"], images=r["images"]))
    return results


def report_table(results: list[MethodResult]) -> str:
    lines = ["| method | ranks | wall time (s) | speedup | PSNR vs unpatched (dB) | classifier accuracy | "
             "MB received / step / rank |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ps = "-" if r.psnr_db is None else f"{r.psnr_db:.1f}"
        lines.append(f"| {r.method} | {r.ranks} | {r.wall_s:.2f} | {r.speedup:.2f}x | {ps} | {r.accuracy:.0%} | "
                     f"{r.mb_received_per_step:.2f} |")
    return "\n".join(lines)


def write_outputs(results: list[MethodResult], out: Path, meta: dict) -> None:
    matplotlib = require("matplotlib", "the demo's grid and plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    # grid.png: one row per method, digits 0-9 (first sample of each)
    fig, axes = plt.subplots(len(results), 10, figsize=(10 * 0.9 + 2.8, len(results) * 0.95 + 0.4), squeeze=False)
    for i, r in enumerate(results):
        for d in range(10):
            ax = axes[i][d]
            ax.imshow(r.images[d], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(str(d), fontsize=9)
        ps = "ref" if r.psnr_db is None else f"{r.psnr_db:.0f} dB"
        axes[i][0].set_ylabel(f"{r.method}\n{r.ranks} rank(s), {r.speedup:.2f}x, {ps}", rotation=0, ha="right",
                              va="center", fontsize=8)
    fig.suptitle(f"halodiff demo: digits model, {meta['steps']} DDIM steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=100)
    plt.close(fig)
    # speed_quality.png
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max([r.psnr_db for r in results if r.psnr_db is not None] or [40.0]) + 5
    for r in results:
        y = top if r.psnr_db is None else r.psnr_db
        ax.scatter(r.speedup, y, s=40)
        ax.annotate(r.method, (r.speedup, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("speedup vs unpatched (wall time)")
    ax.set_ylabel("PSNR vs unpatched (dB; unpatched drawn on top)")
    ax.set_title("speed vs quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speed_quality.png", dpi=100)
    plt.close(fig)
    rows = [{k: v for k, v in asdict(r).items() if k != "images"} for r in results]
    (out / "report.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (out / "report.md").write_text(
        f"# halodiff demo\n\n{meta['description']}\n\n{report_table(results)}\n\n![grid](grid.png)\n\n"
        f"![speed vs quality](speed_quality.png)\n")


def run_demo(out: Path, ranks: int = 2, steps: int = 20, per_class: int = 3,
             methods: tuple[Method, ...] = METHODS) -> int:
    import os
    import platform

    require_all(("diffusers", "sklearn", "matplotlib"), "halodiff demo")
    t0 = time.perf_counter()
    results = run_methods(ranks, steps, per_class, methods=methods)
    meta = {
        "steps": steps, "ranks": ranks, "images_per_method": 10 * per_class, "guidance_scale": 2.0,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per rank",
        "description": (f"Shipped digits model, {10 * per_class} images (digits 0-9), {steps} DDIM steps, CFG 2.0, "
                        f"seed 0. Multi-rank methods use {ranks} gloo ranks without CFG split; every rank runs "
                        "1 thread. Wall time of the pipeline call (slowest rank); PSNR of the images vs the "
                        "unpatched ones; accuracy = share classified as the requested digit."),
    }
    write_outputs(results, out, meta)
    print(report_table(results))
    print(f"\nwrote {out}/grid.png, report.md, report.json, speed_quality.png in {time.perf_counter() - t0:.0f}s")
    return 0
