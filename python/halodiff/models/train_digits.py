"""Train the class-conditional digits diffusion model on CPU and write a pipeline folder.

Usage: ``python -m halodiff.models.train_digits [--out DIR] [--steps N] [--batch-size B] [--seed S] [--tiny]``.
Standard DDPM epsilon-prediction training with label dropout (for classifier-free guidance), AdamW,
warmup + cosine learning-rate decay and an EMA of the weights, which is what gets saved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr

from halodiff.models.digits import (
    DIGITS_MODEL_DIR,
    NULL_LABEL,
    DigitClassifier,
    DigitsPipeline,
    build_digits_pipeline,
    default_scheduler_config,
    load_digits_dataset,
    sample_accuracy,
)


@dataclass
class TrainConfig:
    """Command-line settings of one training run."""

    out: str = str(DIGITS_MODEL_DIR)
    steps: int = 1100
    batch_size: int = 64
    seed: int = 0
    tiny: bool = False
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    label_dropout: float = 0.15
    snr_gamma: float = 5.0  # min-SNR loss weighting (<= 0 disables)
    ema_max_decay: float = 0.999
    num_tokens: int = 4
    threads: int = 2
    eval_per_class: int = 10
    eval_steps: int = 20
    eval_guidance: str = "1,2,3,4"  # comma-separated guidance scales to evaluate


class FitConfig(Protocol):
    """The fields of a training config that the shared helpers below read (see :class:`TrainConfig`)."""

    out: str
    steps: int
    batch_size: int
    seed: int
    lr: float
    warmup_steps: int
    weight_decay: float
    label_dropout: float
    ema_max_decay: float
    threads: int
    eval_per_class: int
    eval_steps: int
    eval_guidance: str


ConfigT = TypeVar("ConfigT")
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def parse_config(config_cls: type[ConfigT], prog: str, description: str | None, argv: list[str] | None) -> ConfigT:
    """A ``--kebab-case`` flag per field of the dataclass ``config_cls`` (``--tiny`` is a plain switch)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    for field in fields(config_cls):  # type: ignore[arg-type]
        name, value = field.name, field.default
        flag = "--" + name.replace("_", "-")
        if name == "tiny":
            p.add_argument(flag, action="store_true", help="use the tiny test config")
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"default: {value}")
        else:
            p.add_argument(flag, type=type(value), default=value, help=f"default: {value}")
    return config_cls(**vars(p.parse_args(argv)))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(TrainConfig, "python -m halodiff.models.train_digits", __doc__, argv)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fit(cfg: FitConfig, modules: Sequence[nn.Module], loss_fn: LossFn, desc: str) -> dict[str, Any]:
    """Train ``modules`` on shuffled batches of the digits; return loss and timing statistics.

    Each step draws a batch ``(x0, labels)``, replaces ``label_dropout`` of the labels by the null label
    and minimises ``loss_fn(x0, labels, generator)`` with AdamW (warmup + cosine decay, grad-norm clip 1).
    An EMA of the weights is kept and copied into ``modules`` at the end (which are left in eval mode).
    """
    images, labels = load_digits_dataset()
    params = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_max_decay, use_ema_warmup=True, power=3 / 4)

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(images), generator=gen)
    cursor = 0
    losses: list[float] = []
    for module in modules:
        module.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True)
    for _ in bar:
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < cfg.label_dropout] = NULL_LABEL
        loss = loss_fn(x0, y, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_sched.step()
        ema.step(params)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{lr_sched.get_last_lr()[0]:.1e}")
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start

    ema.copy_to(params)
    for module in modules:
        module.eval()
    return {
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "final_loss_last100": float(np.mean(losses[-100:])),
        "final_loss_last_step": losses[-1],
    }


def train(cfg: TrainConfig) -> tuple[DigitsPipeline, dict]:
    """Run the training loop; return the pipeline (EMA weights loaded) and run statistics."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    pipe = build_digits_pipeline(tiny=cfg.tiny, num_tokens=cfg.num_tokens)
    unet, label_embedding = pipe.unet, pipe.label_embedding
    noise_scheduler = DDPMScheduler(**default_scheduler_config())

    def loss_fn(x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=label_embedding(y), return_dict=False)[0]
        loss = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:  # min-SNR-gamma weighting for epsilon prediction (Hang et al., 2023)
            snr = compute_snr(noise_scheduler, t)
            loss = loss * snr.clamp(max=cfg.snr_gamma) / snr
        return loss.mean()

    stats = fit(cfg, [unet, label_embedding], loss_fn, desc="train digits")
    stats["unet_params"] = sum(p.numel() for p in unet.parameters())
    stats["label_embedding_params"] = sum(p.numel() for p in label_embedding.parameters())
    return pipe, stats


def evaluate(pipe: Any, cfg: FitConfig) -> dict:
    """Classifier accuracy of ``eval_per_class`` samples per digit (plus sampling time)."""
    if cfg.eval_per_class <= 0:
        return {}
    pipe.set_progress_bar_config(disable=True)
    clf = DigitClassifier()
    results = {}
    for scale in (float(v) for v in cfg.eval_guidance.split(",")):
        start = time.perf_counter()
        acc, _ = sample_accuracy(pipe, cfg.eval_per_class, cfg.eval_steps, scale, seed=cfg.seed, classifier=clf)
        results[scale] = {"accuracy": acc, "seconds": time.perf_counter() - start}
    return {
        "sample_accuracy": results,
        "sample_count": 10 * cfg.eval_per_class,
        "classifier_held_out_accuracy": clf.held_out_accuracy,
    }


def machine_line(cfg: FitConfig) -> str:
    """The model card's ``- machine:`` line."""
    return (
        f"- machine: {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__},"
        f" torch threads: {cfg.threads}, CPU only"
    )


def quality_lines(cfg: FitConfig, stats: dict, sampler: str) -> list[str]:
    """The model card's quality bullets and accuracy table (``sampler`` names the sampling steps)."""
    if "sample_accuracy" not in stats:
        return ["- not evaluated (`--eval-per-class 0`)"]
    lines = [
        "- classifier (`DigitClassifier`: RBF SVM on the 8x8 pixels, 25% stratified hold-out, seed 0)"
        f" held-out accuracy on real digits: {stats['classifier_held_out_accuracy']:.4f}",
        f"- generated samples classified as the requested digit ({stats['sample_count']} images,"
        f" {cfg.eval_per_class} per digit, {cfg.eval_steps} {sampler} steps, seed {cfg.seed}):",
        "",
        "| guidance scale | accuracy | generation time (s) |",
        "| --- | --- | --- |",
    ]
    return lines + [f"| {g:g} | {r['accuracy']:.3f} | {r['seconds']:.1f} |" for g, r in stats["sample_accuracy"].items()]


def write_model_card(out: Path, cfg: TrainConfig, stats: dict, command: str) -> None:
    """README.md with the command, machine, timings and measured quality of this run."""
    unet_cfg = {k: v for k, v in dict(json.loads((out / "unet" / "config.json").read_text())).items() if not k.startswith("_")}
    blocks = ", ".join(unet_cfg["down_block_types"]) + " | " + unet_cfg["mid_block_type"] + " | " + ", ".join(
        unet_cfg["up_block_types"]
    )
    lines = [
        "# halodiff digits model",
        "",
        "Class-conditional DDPM (epsilon prediction) on scikit-learn's bundled handwritten digits",
        "(`sklearn.datasets.load_digits`, 1797 images, 8x8 nearest-upsampled to 32x32, 1 channel, [-1, 1]).",
        "Trained in-repo by `halodiff.models.train_digits`; load with `halodiff.models.digits.load_digits_pipeline()`.",
        "Label 10 is the null label for classifier-free guidance. Saved weights are the EMA weights.",
        "",
        "## Training run",
        "",
        f"- command: `{command}`",
        machine_line(cfg),
        f"- training wall time: {stats['train_seconds']:.0f} s ({cfg.steps} steps, batch {cfg.batch_size});"
        f" process CPU time {stats['train_cpu_seconds']:.0f} s",
        f"- final loss (min-SNR-weighted epsilon MSE, mean of the last {min(100, cfg.steps)} steps):"
        f" {stats['final_loss_last100']:.4f}",
        f"- parameters: UNet {stats['unet_params']:,}, label embedding {stats['label_embedding_params']:,}",
        f"- UNet blocks: {blocks}; block_out_channels {unet_cfg['block_out_channels']},"
        f" {len(unet_cfg['block_out_channels']) - 1} stride-2 downsamples",
        f"- settings: `{json.dumps({k: v for k, v in asdict(cfg).items() if k != 'out'})}`",
        "",
        "## Quality",
        "",
    ]
    lines += quality_lines(cfg, stats, "DDIM")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def run(
    cfg: FitConfig,
    argv: list[str] | None,
    module: str,
    train_fn: Callable[[Any], tuple[Any, dict]],
    card_fn: Callable[[Path, Any, dict, str], None],
) -> dict:
    """Shared ``main``: set threads, train, save the pipeline to ``cfg.out``, evaluate, write the card."""
    torch.set_num_threads(cfg.threads)
    argv = sys.argv[1:] if argv is None else argv
    command = f"python -m {module} " + shlex.join(argv)
    pipe, stats = train_fn(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    stats.update(evaluate(pipe, cfg))
    card_fn(out, cfg, stats, command.strip())
    print(json.dumps(stats, indent=2))
    return stats


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv), argv, "halodiff.models.train_digits", train, write_model_card)


if __name__ == "__main__":
    main()
