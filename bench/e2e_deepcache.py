"""DeepCache end-to-end benchmark: baseline vs the `DeepCache` package vs halodiff, same pipeline, same run.

SD1.5-architecture StableDiffusionPipeline (UNet2DConditionModel with SD1.5's config, random weights, no
downloads; random prompt embeddings instead of a text encoder; output_type="latent", so the tiny VAE is
never run), DDIM, CFG 7.5, CPU. For every resolution x step count: the baseline, then for every interval
the package (`DeepCacheSDHelper`), halodiff uniform and halodiff quadratic (same number of full steps).
Methods run interleaved, in a rotated (and on odd repeats reversed) order; speedup = median baseline time /
median method time (also the median of the per-repeat ratios); PSNR of the final latents vs the baseline's. Both wall
time and this process's CPU time are measured: on a shared machine with --threads 1, CPU time is the
number that other jobs disturb least (it excludes the time the process waits for a core).

    python bench/e2e_deepcache.py --quick --json bench_out/e2e_deepcache.json
    python bench/e2e_deepcache.py --resolutions 256 512 --steps 20 50 --intervals 3 5 --repeats 3
    python bench/e2e_deepcache.py --quick --parallel   # + deepcache with distrifusion on 2 gloo ranks
                                                       # (needs ~3 x 4 GB RAM: 1-rank and 2-rank runs)

Goal: halodiff's speedup >= the package's at equal settings, PSNR >= the package's - 0.1 dB.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280))  # default block types = SD1.5


@dataclass
class Method:
    name: str
    interval: int | None
    schedule: str | None
    enable: Callable[[object], None]
    disable: Callable[[object], None]


@dataclass
class Row:
    resolution: int
    steps: int
    method: str
    interval: int | None
    schedule: str | None
    branch_id: int
    full_steps: int
    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    median_s: float = 0.0
    median_cpu_s: float = 0.0
    speedup: float = 1.0  # wall time, ratio of medians
    speedup_cpu: float = 1.0  # CPU time, ratio of medians
    speedup_cpu_paired: float = 1.0  # CPU time, median of the per-repeat ratios
    psnr_db: float = math.inf


def build_pipe(dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1).eval()  # only for vae_scale_factor = 8
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    peak = (b.double().max() - b.double().min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def methods(intervals: list[int], branch: int, center: int, power: float, package: bool,
            quadratic: bool) -> list[Method]:
    from halodiff.cache import disable_deepcache, enable_deepcache

    out = [Method("baseline", None, None, lambda p: None, lambda p: None)]
    for i in intervals:
        if package:
            from DeepCache import DeepCacheSDHelper

            holder: dict = {}

            def pkg_on(p, i=i, holder=holder):
                holder["h"] = DeepCacheSDHelper(pipe=p)
                holder["h"].set_params(cache_interval=i, cache_branch_id=branch)
                holder["h"].enable()

            out.append(Method(f"DeepCache pkg i{i}", i, "uniform", pkg_on,
                              lambda p, holder=holder: holder["h"].disable()))
        out.append(Method(f"halodiff i{i}", i, "uniform",
                          lambda p, i=i: enable_deepcache(p, interval=i, branch_id=branch), disable_deepcache))
        if quadratic:
            out.append(Method(f"halodiff quad i{i}", i, "quadratic",
                              lambda p, i=i: enable_deepcache(p, interval=i, branch_id=branch, schedule="quadratic",
                                                              center=center, power=power),
                              disable_deepcache))
    return out


def full_step_count(m: Method, steps: int, center: int, power: float) -> int:
    from halodiff.cache import deepcache_schedule

    if m.interval is None:
        return steps
    return len(deepcache_schedule(steps, m.interval, m.schedule, center, power))


def bench_one(pipe, res: int, steps: int, ms: list[Method], repeats: int, branch: int, center: int, power: float,
              guidance: float) -> list[Row]:
    g = torch.Generator().manual_seed(42)
    dtype = pipe.unet.dtype
    pe = torch.randn(1, 77, 768, generator=g).to(dtype)
    ne = torch.randn(1, 77, 768, generator=g).to(dtype)

    def call(n: int) -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=n, height=res, width=res,
                        guidance_scale=guidance, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    call(2)  # warm-up: allocator, oneDNN primitives for this resolution
    rows = {m.name: Row(res, steps, m.name, m.interval, m.schedule, branch, full_step_count(m, steps, center, power))
            for m in ms}
    latents: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        order = ms[r % len(ms):] + ms[:r % len(ms)]
        if r % 2:  # also flip it, so no method always runs right after the same other one
            order.reverse()
        for m in order:
            m.enable(pipe)
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                out = call(steps)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            finally:
                m.disable(pipe)
            rows[m.name].times_s.append(dt)
            rows[m.name].cpu_s.append(dc)
            latents.setdefault(m.name, out)
            print(f"  {res}px {steps} steps repeat {r}: {m.name:<22} wall {dt:7.2f}s cpu {dc:7.2f}s", flush=True)
    base = rows["baseline"]
    for row in rows.values():
        row.median_s, row.median_cpu_s = statistics.median(row.times_s), statistics.median(row.cpu_s)
        row.speedup = statistics.median(base.times_s) / row.median_s
        row.speedup_cpu = statistics.median(base.cpu_s) / row.median_cpu_s
        row.speedup_cpu_paired = statistics.median(b / t for b, t in zip(base.cpu_s, row.cpu_s))
        row.psnr_db = psnr(latents[row.method], latents["baseline"])
    return list(rows.values())


def table(rows: list[Row]) -> str:
    lines = [f"{'res':>4} {'steps':>5}  {'method':<22} {'full':>4} {'wall s':>8} {'speedup':>8} {'cpu s':>8} "
             f"{'speedup':>8} {'paired':>7} {'PSNR dB':>8}"]
    for r in rows:
        lines.append(f"{r.resolution:>4} {r.steps:>5}  {r.method:<22} {r.full_steps:>4} {r.median_s:>8.2f} "
                     f"{r.speedup:>7.2f}x {r.median_cpu_s:>8.2f} {r.speedup_cpu:>7.2f}x {r.speedup_cpu_paired:>6.2f}x "
                     f"{r.psnr_db:>8.2f}")
    return "\n".join(lines)


def _spread(xs: list[float]) -> float:
    return max(xs) / min(xs) - 1 if len(xs) > 1 else 0.0


def verdicts(rows: list[Row]) -> list[str]:
    """halodiff vs the package at equal settings: speedup (CPU time) >= and PSNR >= package - 0.1 dB."""
    out = []
    by = {(r.resolution, r.steps, r.method): r for r in rows}
    for r in rows:
        if not r.method.startswith("DeepCache pkg"):
            continue
        ours = by.get((r.resolution, r.steps, f"halodiff i{r.interval}"))
        if ours is None:
            continue
        quality = ours.psnr_db >= r.psnr_db - 0.1
        # Relative speed difference vs the spread of either method's own repeats (max/min - 1): a
        # shortfall smaller than that spread is not a measurable difference.
        diff = ours.speedup_cpu / r.speedup_cpu - 1
        spread = max(_spread(ours.cpu_s), _spread(r.cpu_s))
        verdict = ("met" if diff >= 0 else "equal within noise" if -diff <= spread else "NOT met") if quality \
            else "NOT met (quality)"
        out.append(f"{r.resolution}px {r.steps} steps interval {r.interval}: halodiff {ours.speedup_cpu:.2f}x cpu "
                   f"(wall {ours.speedup:.2f}x) / {ours.psnr_db:.2f} dB vs package {r.speedup_cpu:.2f}x cpu "
                   f"(wall {r.speedup:.2f}x) / {r.psnr_db:.2f} dB; speed {diff:+.1%}, repeat spread {spread:.1%} "
                   f"-> {verdict}")
    return out


# ----------------------------------------------------------------------------- deepcache + distrifusion
def _parallel_worker(rank: int, world: int, res: int, steps: int, interval: int, branch: int, repeats: int):
    import halodiff
    from halodiff.cache import disable_deepcache, enable_deepcache

    pipe = build_pipe()
    g = torch.Generator().manual_seed(42)
    pe, ne = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)

    def call(n: int) -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=n, height=res, width=res,
                        output_type="latent", generator=torch.Generator().manual_seed(0)).images

    if world > 1:
        halodiff.patch(pipe, halodiff.ParallelConfig(mode="distrifusion", split_cfg=False))
    call(2)
    out = {}
    for r in range(repeats):
        for name in (("plain", "deepcache") if r % 2 == 0 else ("deepcache", "plain")):
            if name == "deepcache":
                enable_deepcache(pipe, interval=interval, branch_id=branch)
            t0 = time.perf_counter()
            lat = call(steps)
            out.setdefault(name, {"times": [], "latents": lat})["times"].append(time.perf_counter() - t0)
            if name == "deepcache":
                disable_deepcache(pipe)
    return out


def bench_parallel(res: int, steps: int, interval: int, branch: int, repeats: int) -> list[dict]:
    """1 rank vs 2 gloo ranks (distrifusion), each with and without deepcache, 1 thread per rank."""
    from halodiff import launch

    one = launch.run_ranks(_parallel_worker, 1, res, steps, interval, branch, repeats, threads=1, timeout_s=7200)[0]
    two = launch.run_ranks(_parallel_worker, 2, res, steps, interval, branch, repeats, threads=1, timeout_s=7200)[0]
    base_t = statistics.median(one["plain"]["times"])
    base_lat = one["plain"]["latents"]
    rows = []
    for ranks, res_ in ((1, one), (2, two)):
        for name in ("plain", "deepcache"):
            t = statistics.median(res_[name]["times"])
            label = {(1, "plain"): "baseline (1 rank)", (1, "deepcache"): f"deepcache i{interval}",
                     (2, "plain"): "distrifusion 2 ranks", (2, "deepcache"): f"distrifusion + deepcache i{interval}"}
            rows.append(dict(resolution=res, steps=steps, method=label[(ranks, name)], median_s=t,
                             speedup=base_t / t, psnr_db=psnr(res_[name]["latents"], base_lat)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--center", type=int, default=15, help="quadratic schedule center (DeepCache default 15)")
    p.add_argument("--power", type=float, default=1.4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--quick", action="store_true", help="256px, 20 steps (overrides --resolutions/--steps)")
    p.add_argument("--no-package", action="store_true", help="skip the DeepCache package")
    p.add_argument("--no-quadratic", action="store_true")
    p.add_argument("--parallel", action="store_true", help="also deepcache + distrifusion on 2 gloo ranks")
    p.add_argument("--json", type=Path)
    p.add_argument("--csv", type=Path)
    a = p.parse_args()
    if a.quick:
        a.resolutions, a.steps = [256], [20]
    if a.threads:
        torch.set_num_threads(a.threads)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
               f"torch threads, load avg {os.getloadavg()[0]:.1f}")
    print(f"machine: {machine}; torch {torch.__version__}")
    pipe = build_pipe()
    ms = methods(a.intervals, a.branch, a.center, a.power, not a.no_package, not a.no_quadratic)
    rows: list[Row] = []
    t0 = time.time()
    for res in a.resolutions:
        for steps in a.steps:
            rows += bench_one(pipe, res, steps, ms, a.repeats, a.branch, a.center, a.power, a.guidance)
    print(f"\n{table(rows)}\n")
    for line in verdicts(rows):
        print(line)
    par = []
    if a.parallel:
        del pipe  # the rank processes build their own (SD1.5 fp32: 3.4 GB each)
        gc.collect()
        for res in a.resolutions:
            for steps in a.steps:
                par += bench_parallel(res, steps, a.intervals[0], a.branch, a.repeats)
        print("\ndeepcache + distrifusion (1 thread per rank):")
        for r in par:
            print(f"{r['resolution']:>4} {r['steps']:>5}  {r['method']:<34} {r['median_s']:8.2f}s "
                  f"{r['speedup']:6.2f}x {r['psnr_db']:8.2f} dB")
    print(f"total {time.time() - t0:.0f}s; final load avg {os.getloadavg()[0]:.1f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(a).items()},
                                      "rows": [asdict(r) for r in rows], "parallel": par}, indent=2))
    if a.csv:
        a.csv.parent.mkdir(parents=True, exist_ok=True)
        with a.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[k for k in asdict(rows[0]) if k not in ("times_s", "cpu_s")])
            w.writeheader()
            for r in rows:
                w.writerow({k: v for k, v in asdict(r).items() if k not in ("times_s", "cpu_s")})


if __name__ == "__main__":
    main()
