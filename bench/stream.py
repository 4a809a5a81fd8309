"""StreamDiffusion benchmarks (issue 13): halodiff.StreamDiffusion on the shipped digits model and on an
SD1.5-architecture pipeline at real size (UNet from SD1.5's config and a TAESD-architecture AutoencoderTiny, random
weights, random prompt embeddings; nothing downloaded). CPU, fp32, --threads per process (default 1).

Parts (--parts, comma-separated; default all):
  batch    Stream Batch vs sequential (use_denoising_batch=False), n = 2 and 4, cfg "none", latent level
  rcfg     RCFG "self" and "initialize" vs "full" CFG, n = 2, batch mode, latent level
  package  halodiff vs the streamdiffusion 0.1.1 package (predict_x0 vs predict_x0_batch), n = 2, cfg "self"
  filter   similarity filter on frames with static stretches: share skipped, frames/s (img2img incl. VAE)
  queue    I/O queue (halodiff.stream.run) vs the serial loop, img2img incl. VAE and PIL conversion
  ranks    2 gloo ranks vs 1 rank (n = 2, 1 thread per rank): frames/s, outputs identical; 4 ranks (n = 4)
           projected from the measured 1-row UNet time plus the 2-rank run's measured per-frame overhead
  soak     latency per frame and RSS over --soak-frames frames (img2img, self CFG)
Methods of a part run interleaved (rotated order per repeat), each on a fresh stream with --warmup untimed frames;
frames/s = timed frames / median wall time; CPU time is recorded too (single-threaded parts). Results: a table on
stdout and rows in --json / --csv.

    python bench/stream.py --model digits --json bench_out/stream_digits.json --csv bench_out/stream_digits.csv
    python bench/stream.py --model sd15 --parts batch,rcfg --frames 2 --repeats 3 --json bench_out/stream_sd15.json
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

import halodiff
from halodiff import launch
from halodiff.stream import StreamDiffusion, run, to_pil

PARTS = ("batch", "rcfg", "package", "filter", "queue", "ranks", "soak")
T_INDEX = {1: [32], 2: [32, 45], 4: [10, 20, 32, 45]}  # img2img-style slots (the paper's [32, 45] for n = 2)
DIGITS_T_INDEX = {1: [25], 2: [5, 25], 4: [5, 15, 25, 35]}


@dataclass
class Setup:
    model: str
    resolution: int
    pipe: object
    prompt: dict

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = 1 if self.vae is None else 8
        return (self.pipe.unet.config.in_channels, self.resolution // f, self.resolution // f)

    @property
    def image_channels(self) -> int:
        return 1 if self.vae is None else 3

    @property
    def vae(self):
        return getattr(self.pipe, "vae", None)

    def t_index(self, n: int) -> list[int]:
        return (DIGITS_T_INDEX if self.model == "digits" else T_INDEX)[n]


def build(model: str, resolution: int) -> Setup:
    if model == "digits":
        from halodiff.models.digits import NULL_LABEL, load_digits_pipeline
        from halodiff.stream.demo import label_embeds

        pipe = load_digits_pipeline()
        return Setup(model, 32, pipe, dict(prompt_embeds=label_embeds(pipe, 3),
                                          negative_prompt_embeds=label_embeds(pipe, NULL_LABEL), guidance_scale=2.0))
    from diffusers import AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from halodiff.models.sd_configs import TEXT_SEQ, unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("sd15")).eval()
    vae = AutoencoderTiny().eval()  # TAESD architecture (StreamDiffusion's real-time VAE)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(42)
    cond, uncond = (torch.randn(1, TEXT_SEQ, 768, generator=g) for _ in range(2))
    return Setup(model, resolution, pipe, dict(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=1.4))


def make_stream(s: Setup, n: int, cfg_type: str, batch: bool = True, use_filter: bool = False) -> StreamDiffusion:
    stream = StreamDiffusion(s.pipe, s.t_index(n), width=s.resolution, height=s.resolution, cfg_type=cfg_type,
                             use_denoising_batch=batch)
    stream.prepare(seed=2, **s.prompt)
    if use_filter:
        stream.enable_similar_image_filter(threshold=0.98, max_skip_frame=10, seed=0)
    return stream


def latent_inputs(s: Setup, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, *s.latent_shape, generator=g) for _ in range(count)]


def static_frames(s: Setup, count: int, hold: int = 4) -> list:
    """PIL frames: a new picture every `hold` frames, held with a little noise (sklearn digits for the digits model)."""
    if s.model == "digits":
        from halodiff.stream.demo import digit_frames

        x = digit_frames(count, hold)
    else:
        g = torch.Generator().manual_seed(3)
        base = torch.rand(-(-count // hold), 3, s.resolution, s.resolution, generator=g).repeat_interleave(hold, 0)
        x = (base[:count] + 0.02 * torch.randn(count, 3, s.resolution, s.resolution, generator=g)).clamp(0, 1)
    return to_pil(x)


# ------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], None]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(methods: dict[str, Callable[[], tuple[float, float, dict]]], repeats: int) -> dict[str, dict]:
    """Run every method once per repeat (rotated order); each returns (wall, cpu, extra) for its timed frames."""
    names = list(methods)
    out = {k: {"wall": [], "cpu": [], "extra": {}} for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            wall, cpu, extra = methods[k]()
            out[k]["wall"].append(wall)
            out[k]["cpu"].append(cpu)
            out[k]["extra"] = extra
            gc.collect()
    return out


def rows_of(part: str, s: Setup, res: dict, frames: int, base: str | None, **common) -> list[dict]:
    rows = []
    ref = statistics.median(res[base]["wall"]) if base else None
    ref_cpu = statistics.median(res[base]["cpu"]) if base else None
    for name, r in res.items():
        wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
        rows.append(dict(model=s.model, resolution=s.resolution, part=part, method=name, frames=frames,
                         repeats=len(r["wall"]), fps=frames / wall, ms_per_frame=1e3 * wall / frames,
                         cpu_ms_per_frame=1e3 * cpu / frames, ratio=ref / wall if ref else None,
                         ratio_cpu=ref_cpu / cpu if ref_cpu else None, base=base, **common, **r["extra"]))
    return rows


def latent_method(s: Setup, n: int, cfg: str, batch: bool, a) -> Callable:
    def go():
        stream = make_stream(s, n, cfg, batch)
        xs = latent_inputs(s, a.warmup + a.frames)
        for x in xs[: a.warmup]:
            stream.predict_x0(x)
        wall, cpu = timed(lambda: [stream.predict_x0(x) for x in xs[a.warmup:]])
        return wall, cpu, {"unet_rows_per_frame": stream.stats.unet_rows / stream.stats.frames}

    return go


# ------------------------------------------------------------------------------------------ parts
def part_batch(s: Setup, a) -> list[dict]:
    rows = []
    for n in (2, 4):
        res = interleaved({f"sequential n={n}": latent_method(s, n, "none", False, a),
                           f"stream batch n={n}": latent_method(s, n, "none", True, a)}, a.repeats)
        rows += rows_of("batch", s, res, a.frames, f"sequential n={n}", n=n, cfg="none")
    return rows


def part_rcfg(s: Setup, a) -> list[dict]:
    res = interleaved({f"{cfg} CFG": latent_method(s, 2, cfg, True, a) for cfg in ("full", "self", "initialize")},
                      a.repeats)
    return rows_of("rcfg", s, res, a.frames, "full CFG", n=2)


def part_package(s: Setup, a) -> list[dict]:
    try:
        from streamdiffusion import StreamDiffusion as Package
    except ImportError:
        print("package: streamdiffusion not installed (pip install --no-deps -r requirements-nodeps.txt); skipped")
        return []
    if s.latent_shape[0] != 4:
        print(f"package: skipped for {s.model}: the package hard-codes 4 latent channels (this UNet has "
              f"{s.latent_shape[0]})")
        return []
    p = s.pipe
    embeds = (s.prompt["prompt_embeds"], s.prompt["negative_prompt_embeds"])
    # the package reads these attributes of a pipeline; its text encoding is replaced by our fixed embeddings
    view = SimpleNamespace(device=p.device, vae_scale_factor=p.vae_scale_factor, scheduler=p.scheduler, unet=p.unet,
                           vae=p.vae, text_encoder=None,
                           encode_prompt=lambda **kw: (embeds[0], embeds[1] if kw["do_classifier_free_guidance"]
                                                       else None))

    def package():
        pkg = Package(view, s.t_index(2), torch_dtype=torch.float32, width=s.resolution, height=s.resolution,
                      cfg_type="self")
        pkg.prepare("", guidance_scale=s.prompt["guidance_scale"], seed=2)
        xs = latent_inputs(s, a.warmup + a.frames)
        with torch.no_grad():
            for x in xs[: a.warmup]:
                pkg.predict_x0_batch(x)
            wall, cpu = timed(lambda: [pkg.predict_x0_batch(x) for x in xs[a.warmup:]])
        return wall, cpu, {}

    res = interleaved({"streamdiffusion 0.1.1": package, "halodiff": latent_method(s, 2, "self", True, a)}, a.repeats)
    return rows_of("package", s, res, a.frames, "streamdiffusion 0.1.1", n=2, cfg="self")


def image_method(s: Setup, frames: list, use_filter: bool, queue: bool, a) -> Callable:
    def go():
        stream = make_stream(s, 2, "self", True, use_filter)
        for f in frames[: a.warmup]:
            stream(f)
        stream = make_stream(s, 2, "self", True, use_filter)
        if queue:
            wall, cpu = timed(lambda: list(run(stream, frames, output_type="pil")))
        else:
            wall, cpu = timed(lambda: [to_pil(stream(f)) for f in frames])
        return wall, cpu, {"skipped": stream.stats.skipped / len(frames)}

    return go


def part_filter(s: Setup, a) -> list[dict]:
    frames = static_frames(s, a.image_frames)
    res = interleaved({"no filter": image_method(s, frames, False, False, a),
                       "similarity filter 0.98": image_method(s, frames, True, False, a)}, a.repeats)
    return rows_of("filter", s, res, len(frames), "no filter", n=2, cfg="self", hold=4)


def part_queue(s: Setup, a) -> list[dict]:
    frames = static_frames(s, a.image_frames, hold=1)
    res = interleaved({"serial loop": image_method(s, frames, False, False, a),
                       "I/O queue (run)": image_method(s, frames, False, True, a)}, a.repeats)
    return rows_of("queue", s, res, len(frames), "serial loop", n=2, cfg="self")


def _rank_stream(rank: int, world: int, model: str, resolution: int, n: int, warmup: int, frames: int) -> dict:
    s = build(model, resolution)
    stream = make_stream(s, n, "self")
    xs = latent_inputs(s, warmup + frames)
    for x in xs[:warmup]:
        stream.predict_x0(x)
    t0 = time.perf_counter()
    outs = [stream.predict_x0(x) for x in xs[warmup:]]
    wall = time.perf_counter() - t0
    unet_1row = None
    if world == 1:  # the per-slot (1-row) UNet time, for the projection
        plan = stream._plans[0]
        x = torch.randn(1, *s.latent_shape)
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(frames):
                stream._denoise(x, plan.t[:1], plan.emb[:1], None)
            unet_1row = (time.perf_counter() - t0) / frames
    comm = stream.comm.stats if stream.comm is not None else None
    return {"wall": wall, "outputs": outs, "unet_1row_s": unet_1row,
            "bytes_per_frame": (comm.bytes_sent + comm.bytes_received) / frames if comm else 0}


def part_ranks(s_model: str, resolution: int, a) -> list[dict]:
    runs: dict[str, list] = {"1 rank": [], "2 ranks": []}
    proj: list = []
    for r in range(a.repeats):
        order = [("1 rank", 1), ("2 ranks", 2)][:: 1 if r % 2 == 0 else -1]
        for name, world in order:
            per_rank = launch.run_ranks(_rank_stream, world, s_model, resolution, 2, a.warmup, a.frames,
                                        threads=a.threads)
            runs[name].append((max(p["wall"] for p in per_rank), per_rank))
        proj.append(launch.run_ranks(_rank_stream, 1, s_model, resolution, 4, a.warmup, a.frames,
                                     threads=a.threads)[0])
    one = statistics.median(w for w, _ in runs["1 rank"])
    two = statistics.median(w for w, _ in runs["2 ranks"])
    ref_out = runs["1 rank"][0][1][0]["outputs"]
    max_rel = max(((o - q).norm() / q.norm()).item() for _, pr in runs["2 ranks"] for p in pr
                  for o, q in zip(p["outputs"], ref_out))
    t1 = statistics.median(p["unet_1row_s"] for _, pr in runs["1 rank"] for p in pr)
    overhead = max(0.0, two / a.frames - t1)  # per frame, 2 ranks: comm + sync beyond one 1-row UNet call
    four_one = statistics.median(p["wall"] for p in proj) / a.frames
    base = dict(model=s_model, resolution=resolution, part="ranks", frames=a.frames, repeats=a.repeats, n=2,
                cfg="self", base="1 rank")
    rows = [dict(base, method="1 rank", fps=a.frames / one, ms_per_frame=1e3 * one / a.frames, ratio=1.0),
            dict(base, method="2 ranks", fps=a.frames / two, ms_per_frame=1e3 * two / a.frames, ratio=one / two,
                 max_rel_vs_1_rank=max_rel, bytes_per_frame_rank0=runs["2 ranks"][0][1][0]["bytes_per_frame"],
                 unet_1row_ms=1e3 * t1, overhead_ms_per_frame=1e3 * overhead),
            dict(base, method="4 ranks, n=4 (projected)", n=4, fps=1 / (t1 + overhead),
                 ms_per_frame=1e3 * (t1 + overhead), ratio=four_one / (t1 + overhead),
                 base="1 rank, n=4 (measured)", one_rank_n4_ms_per_frame=1e3 * four_one,
                 projection="T4 = UNet(1 row) + the 2-rank run's per-frame overhead")]
    return rows


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def part_soak(s: Setup, a) -> list[dict]:
    stream = make_stream(s, 2, "self")
    frames = static_frames(s, a.soak_frames, hold=1)
    lat, rss = [], []
    from tqdm.auto import tqdm

    for f in tqdm(frames, desc="soak", unit="frame"):
        t0 = time.perf_counter()
        to_pil(stream(f))
        lat.append(time.perf_counter() - t0)
        rss.append(_rss_mb())
    k = max(1, min(100, len(lat) // 5))
    first, last = statistics.median(lat[k: 2 * k]), statistics.median(lat[-k:])
    return [dict(model=s.model, resolution=s.resolution, part="soak", method=f"{len(frames)} frames", n=2, cfg="self",
                 frames=len(frames), fps=1 / statistics.median(lat), ms_per_frame=1e3 * statistics.median(lat),
                 ms_first_window=1e3 * first, ms_last_window=1e3 * last, latency_drift=last / first,
                 rss_mb_after_window=rss[2 * k - 1], rss_mb_end=rss[-1], rss_growth_mb=rss[-1] - rss[2 * k - 1],
                 peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, window=k)]


# ------------------------------------------------------------------------------------------ main
def table(rows: list[dict]) -> str:
    lines = ["| model | part | method | frames | frames/s | ms/frame | ratio | notes |",
             "|---|---|---|---|---|---|---|---|"]
    skip = {"model", "resolution", "part", "method", "frames", "repeats", "fps", "ms_per_frame", "ratio", "base",
            "cfg", "n"}
    for r in rows:
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in skip and v is not None)
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['model']} {r['resolution']} | {r['part']} | {r['method']} | {r['frames']} | "
                     f"{r['fps']:.3g} | {r['ms_per_frame']:.1f} | {ratio} | {notes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("digits", "sd15"), default="digits")
    p.add_argument("--resolution", type=int, default=512, help="sd15 image size (digits: always 32)")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--frames", type=int, default=None, help="timed frames per latent-level run (digits 40, sd15 2)")
    p.add_argument("--image-frames", type=int, default=None, help="frames of the filter/queue parts (digits 48, "
                                                                   "sd15 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed frames per run (digits 4, sd15 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (digits 3, sd15 1)")
    p.add_argument("--soak-frames", type=int, default=None, help="frames of the soak part (digits 1000, sd15 10)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--json", type=Path)
    p.add_argument("--csv", type=Path)
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"--parts: choose from {','.join(PARTS)}")
    digits = a.model == "digits"
    a.frames = a.frames or (40 if digits else 2)
    a.image_frames = a.image_frames or (48 if digits else 8)
    a.warmup = a.warmup if a.warmup is not None else (4 if digits else 1)
    a.repeats = a.repeats or (3 if digits else 1)
    a.soak_frames = a.soak_frames or (1000 if digits else 10)
    if min(a.frames, a.image_frames, a.repeats, a.soak_frames, a.threads) < 1 or a.warmup < 0:
        p.error("--frames, --image-frames, --repeats, --soak-frames, --threads must be >= 1 and --warmup >= 0")
    torch.set_num_threads(a.threads)
    resolution = 32 if digits else a.resolution
    rows: list[dict] = []
    t0 = time.perf_counter()
    if "ranks" in parts:  # first: spawned ranks build their own models; this process holds none yet
        rows += part_ranks(a.model, resolution, a)
    setup = build(a.model, resolution) if set(parts) - {"ranks"} else None
    for part in parts:
        if part != "ranks":
            print(f"[{time.perf_counter() - t0:.0f}s] {part} ...", flush=True)
            rows += globals()[f"part_{part}"](setup, a)
    print(table(rows))
    meta = dict(model=a.model, resolution=resolution, threads=a.threads, frames=a.frames, warmup=a.warmup,
                repeats=a.repeats, torch=torch.__version__, halodiff=halodiff.__version__, cpu_count=os.cpu_count(),
                machine=platform.processor() or platform.machine(), wall_s=time.perf_counter() - t0)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if a.csv:
        a.csv.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted({k for r in rows for k in r})
        with a.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
