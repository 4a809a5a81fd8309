"""`halodiff stream`: real handwritten digits redrawn, frame by frame, by the shipped digits model.

The input is a stream of sklearn's handwritten digits (real scans, not generated; each held for a few frames with
a little sensor noise, so the similarity filter has static stretches to skip) or the frames of a GIF / a folder
of images. The shipped class-conditional digits model redraws every frame towards the prompted digit(s)
(``--digits 3,8``: the prompt switches with ``update_prompt`` halfway). Methods, each on the same frames through
``halodiff.stream.run(..., align=True)`` (output i belongs to input i):

    sequential (full CFG) -> stream batch (full CFG) -> + RCFG -> + similarity filter -> 2 ranks

Writes stream.gif (input | output), report.md / report.json (frames/s, speedup, classifier accuracy for the
prompted digit, share of frames skipped, PSNR vs the sequential outputs) and fps.png.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import launch
from .._optional import require, require_all
from ..demo import psnr
from ..models.digits import IMAGE_SIZE, NULL_LABEL, load_digits_dataset

T_INDEX_LIST = (5, 25)
GUIDANCE = 2.0


@dataclass(frozen=True)
class StreamMethod:
    name: str
    cfg_type: str
    batch: bool = True
    filter: bool = False
    ranks: int = 1


METHODS = (
    StreamMethod("sequential (full CFG)", "full", batch=False),
    StreamMethod("stream batch (full CFG)", "full"),
    StreamMethod("+ RCFG initialize", "initialize"),
    StreamMethod("+ RCFG self", "self"),
    StreamMethod("+ similarity filter (initialize)", "initialize", filter=True),
    StreamMethod("2 ranks (initialize + filter)", "initialize", filter=True, ranks=2),
)


@dataclass
class StreamResult:
    method: str
    ranks: int
    wall_s: float
    fps: float
    speedup: float = 1.0
    accuracy: float = 0.0
    skipped: float = 0.0
    psnr_db: float | None = None
    outputs: np.ndarray | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------ frames
def digit_frames(count: int, hold: int = 4, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    """``count`` frames ``[count, 1, 32, 32]`` in [0, 1]: random real sklearn digits, each held ``hold`` frames with
    a little Gaussian noise per frame (a camera looking at a still picture)."""
    images, _ = load_digits_dataset()
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(images), (-(-count // hold),), generator=g)
    frames = ((images[picks] + 1) / 2).repeat_interleave(hold, dim=0)[:count]
    return (frames + noise * torch.randn(frames.shape, generator=g)).clamp(0, 1)


def load_frames(path: Path) -> torch.Tensor:
    """Frames of a GIF or of the images in a folder (sorted by name), as 32x32 grayscale ``[N, 1, 32, 32]``."""
    require("PIL", "halodiff stream --input (reading images)")
    from PIL import Image, ImageSequence

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".bmp"))
        if not files:
            raise ValueError(f"no images (.png/.jpg/.gif/.bmp) in {path}")
        images = [Image.open(p) for p in files]
    elif path.is_file():
        with Image.open(path) as im:
            images = [f.copy() for f in ImageSequence.Iterator(im)]
    else:
        raise ValueError(f"--input {path} is neither a folder nor an image file")
    arrays = [np.asarray(im.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays))[:, None]


def prompt_schedule(digits: list[int], count: int) -> list[int]:
    """The prompted digit of each frame: equal segments, one per entry of ``digits``."""
    return [digits[min(i * len(digits) // count, len(digits) - 1)] for i in range(count)]


# ------------------------------------------------------------------------------------------ streaming
def digits_stream(pipe, method: StreamMethod, digit: int, t_index_list=T_INDEX_LIST, seed: int = 0):
    """A prepared stream of the digits pipeline prompted with ``digit`` (label embeddings as prompt_embeds)."""
    from .stream import StreamDiffusion

    stream = StreamDiffusion(pipe, list(t_index_list), width=IMAGE_SIZE, height=IMAGE_SIZE, cfg_type=method.cfg_type,
                             use_denoising_batch=method.batch)
    stream.prepare(prompt_embeds=label_embeds(pipe, digit), negative_prompt_embeds=label_embeds(pipe, NULL_LABEL),
                   guidance_scale=GUIDANCE, seed=seed)
    if method.filter:
        stream.enable_similar_image_filter(threshold=0.98, max_skip_frame=10, seed=seed)
    return stream


def label_embeds(pipe, label: int) -> torch.Tensor:
    with torch.no_grad():
        return pipe.label_embedding(torch.tensor([label]))


def with_prompts(frames: torch.Tensor, prompts: list[int], pipe) -> list:
    """``run``'s items: the frames, with an in-band UpdatePrompt wherever the prompted digit changes."""
    from .runner import UpdatePrompt

    items: list = []
    for i, (frame, digit) in enumerate(zip(frames, prompts)):
        if i and digit != prompts[i - 1]:
            items.append(UpdatePrompt(prompt_embeds=label_embeds(pipe, digit)))
        items.append(frame[None])
    return items


def stream_methods(rank: int, world: int, methods: list[StreamMethod], frames: torch.Tensor, prompts: list[int],
                   warmup: int) -> list[dict]:
    """On every rank, each method in turn: warm up, then stream ``frames`` (timed): outputs, wall time, skips."""
    from ..models.digits import load_digits_pipeline
    from .runner import run

    pipe = load_digits_pipeline()
    results = []
    for method in methods:
        stream = digits_stream(pipe, method, prompts[0])
        list(run(stream, list(frames[:warmup, None]), align=True))  # untimed: first-call setup
        stream = digits_stream(pipe, method, prompts[0])
        items = with_prompts(frames, prompts, pipe)
        t0 = time.perf_counter()
        outs = list(run(stream, items, align=True))
        wall = time.perf_counter() - t0
        results.append({"outputs": torch.cat(outs)[:, 0].numpy(), "wall_s": wall, "skipped": stream.stats.skipped})
    return results


def transition_mask(prompts: list[int], lag: int) -> np.ndarray:
    """True for frames whose whole denoising ran under their own prompt (not the ``lag`` frames before a switch)."""
    ok = np.ones(len(prompts), dtype=bool)
    for i in range(1, len(prompts)):
        if prompts[i] != prompts[i - 1]:
            ok[max(0, i - lag):i] = False
    return ok


def run_methods(frames: torch.Tensor, prompts: list[int], methods=METHODS, warmup: int = 4) -> list[StreamResult]:
    from tqdm.auto import tqdm

    from ..models.digits import DigitClassifier

    classifier = DigitClassifier()
    keep = transition_mask(prompts, len(T_INDEX_LIST) - 1)
    labels = np.asarray(prompts)[keep]
    raw: list[dict] = []
    groups = [[m for m in methods if m.ranks == 1]] + [[m] for m in methods if m.ranks > 1]
    with tqdm(total=len(methods), desc="halodiff stream", unit="method") as bar:
        for group in (g for g in groups if g):
            bar.set_postfix_str(f"{group[0].ranks} rank(s): {', '.join(m.name for m in group)}")
            per_rank = launch.run_ranks(stream_methods, group[0].ranks, group, frames, prompts, warmup)
            for i, r in enumerate(per_rank[0]):
                raw.append(dict(r, wall_s=max(p[i]["wall_s"] for p in per_rank)))
            bar.update(len(group))
    results: list[StreamResult] = []
    for m, r in zip((m for g in groups for m in g), raw):
        outs = r["outputs"]
        res = StreamResult(m.name, m.ranks, r["wall_s"], len(frames) / r["wall_s"], skipped=r["skipped"] / len(frames),
                           accuracy=classifier.accuracy(outs[keep], labels), outputs=outs)
        if results:
            res.speedup = res.fps / results[0].fps
            p = psnr(outs, results[0].outputs)
            res.psnr_db = None if math.isinf(p) else p
        results.append(res)
    return results


# ------------------------------------------------------------------------------------------ outputs
def report_table(results: list[StreamResult]) -> str:
    lines = ["| method | ranks | frames/s | speedup | classifier accuracy | frames skipped | PSNR vs sequential (dB) |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        ps = "ref" if i == 0 else ("inf (identical)" if r.psnr_db is None else f"{r.psnr_db:.1f}")
        lines.append(f"| {r.method} | {r.ranks} | {r.fps:.1f} | {r.speedup:.2f}x | {r.accuracy:.0%} | "
                     f"{r.skipped:.0%} | {ps} |")
    return "\n".join(lines)


def write_gif(frames: torch.Tensor, outputs: np.ndarray, prompts: list[int], path: Path, scale: int = 4,
              ms: int = 120) -> None:
    """Animated GIF: input | output side by side (upscaled), the prompted digit in the corner."""
    from PIL import Image, ImageDraw

    tiles = []
    for frame, out, digit in zip(frames[:, 0].numpy(), outputs, prompts):
        pair = np.concatenate([frame, np.ones((IMAGE_SIZE, 2), np.float32), out], axis=1)
        im = Image.fromarray((pair * 255).round().astype(np.uint8), mode="L")
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        ImageDraw.Draw(im).text((im.width - 14, 2), str(digit), fill=128)
        tiles.append(im)
    tiles[0].save(path, save_all=True, append_images=tiles[1:], duration=ms, loop=0)


def write_outputs(results: list[StreamResult], frames: torch.Tensor, prompts: list[int], out: Path,
                  meta: dict) -> None:
    matplotlib = require("matplotlib", "the stream demo's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    write_gif(frames, results[-1].outputs, prompts, out / "stream.gif")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r.method for r in results]
    bars = ax.barh(names[::-1], [r.fps for r in results][::-1], color="tab:blue")
    for bar, r in zip(bars, results[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r.fps:.1f} ({r.accuracy:.0%})",
                va="center", fontsize=8)
    ax.set_xlabel("frames/s (classifier accuracy)")
    ax.set_title(f"halodiff stream: digits model, {meta['frames']} frames", fontsize=10)
    ax.set_xlim(0, max(r.fps for r in results) * 1.3)
    fig.tight_layout()
    fig.savefig(out / "fps.png", dpi=100)
    plt.close(fig)
    rows = [{k: v for k, v in asdict(r).items() if k != "outputs"} for r in results]
    (out / "report.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    (out / "report.md").write_text(f"# halodiff stream\n\n{meta['description']}\n\n{report_table(results)}\n\n"
                                   "![stream](stream.gif)\n\n![frames/s](fps.png)\n")


def run_stream_demo(out: Path, frames: int = 48, digits: tuple[int, ...] = (3, 8), input_path: Path | None = None,
                    hold: int = 4, ranks: int = 2) -> int:
    require_all(("diffusers", "sklearn", "matplotlib", "PIL"), "halodiff stream")
    t0 = time.perf_counter()
    x = load_frames(input_path) if input_path is not None else digit_frames(frames, hold)
    prompts = prompt_schedule(list(digits), len(x))
    methods = tuple(m if m.ranks == 1 else StreamMethod(f"{ranks} ranks (initialize + filter)", m.cfg_type,
                                                         m.batch, m.filter, ranks)
                    for m in METHODS if m.ranks == 1 or ranks > 1)
    results = run_methods(x, prompts, methods)
    source = f"frames of {input_path}" if input_path is not None else (
        f"real sklearn handwritten digits, each held {hold} frames with Gaussian noise (sigma 0.02)")
    meta = {
        "frames": len(x), "digits": list(digits), "t_index_list": list(T_INDEX_LIST), "guidance_scale": GUIDANCE,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per rank",
        "description": (
            f"Shipped digits model, {len(x)} frames ({source}) redrawn towards the prompted digit(s) "
            f"{', '.join(map(str, digits))} (update_prompt at each switch); t_index_list={list(T_INDEX_LIST)} of 50 "
            f"LCM steps, CFG {GUIDANCE}; halodiff.stream.run(align=True), 1 torch thread per process. Frames/s = "
            "input frames / wall time (incl. the n-1 flush frames); accuracy = share of outputs the classifier "
            "reads as the prompted digit (frames whose denoising straddles a prompt switch excluded); PSNR of the "
            "outputs vs the sequential ones."),
    }
    write_outputs(results, x, prompts, out, meta)
    print(report_table(results))
    print(f"\nwrote {out}/stream.gif, report.md, report.json, fps.png in {time.perf_counter() - t0:.0f}s")
    return 0
