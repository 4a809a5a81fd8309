"""Train the class-conditional digits diffusion transformer (SD3 architecture) on CPU.

Usage: ``python -m halodiff.models.train_digits_dit [--out DIR] [--steps N] [--batch-size B] [--seed S] [--tiny]``.
Rectified-flow training as in SD3: ``x_t = (1 - s) x0 + s noise`` with ``s`` drawn logit-normal, the
transformer predicts the velocity ``noise - x0`` at timestep ``1000 s``. Label dropout (for classifier-free
guidance), AdamW with warmup + cosine decay and an EMA of the weights (what gets saved) come from the
shared loop of :mod:`halodiff.models.train_digits`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusers import SD3Transformer2DModel

from halodiff.models.digits_dit import (
    DIGITS_DIT_MODEL_DIR,
    DigitsDiTPipeline,
    build_digits_dit_pipeline,
    label_conditioning,
)
from halodiff.models.train_digits import fit, machine_line, parse_config, quality_lines, run


@dataclass
class DiTTrainConfig:
    """Command-line settings of one training run."""

    out: str = str(DIGITS_DIT_MODEL_DIR)
    steps: int = 500
    batch_size: int = 32
    seed: int = 0
    tiny: bool = False
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    label_dropout: float = 0.15
    logit_mean: float = 0.0  # logit-normal timestep density (SD3); logit_std <= 0 samples s uniformly
    logit_std: float = 1.0
    zero_init: bool = True  # DiT-style zero init of the AdaLN modulations and the output projection
    learn_pos_embed: bool = True  # train the (sincos-initialised) position table; see set_pos_embed_trainable
    ema_max_decay: float = 0.999
    num_tokens: int = 4
    threads: int = 1
    eval_per_class: int = 10
    eval_steps: int = 20
    eval_guidance: str = "1,1.5,2,3,4"  # comma-separated guidance scales to evaluate


def parse_args(argv: list[str] | None = None) -> DiTTrainConfig:
    return parse_config(DiTTrainConfig, "python -m halodiff.models.train_digits_dit", __doc__, argv)


def zero_init_(transformer: SD3Transformer2DModel) -> None:
    """Zero the AdaLN(-Zero) modulation layers and the output projection, as DiT initialises them."""
    for module in transformer.modules():
        linear = getattr(module, "linear", None)
        if type(module).__name__.startswith("AdaLayerNorm") and isinstance(linear, nn.Linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    nn.init.zeros_(transformer.proj_out.weight)
    nn.init.zeros_(transformer.proj_out.bias)


def set_pos_embed_trainable(transformer: SD3Transformer2DModel, trainable: bool) -> None:
    """Turn ``pos_embed.pos_embed`` (a persistent buffer, saved and loaded with the weights) into a parameter or back.

    The fixed 2D sincos table has no feature for a token's row/column parity, which the digits need: each
    8x8 source pixel is a 4x4 block = 2x2 tokens starting at even token indices, and with the fixed table
    the model leaves visible disagreement between the tokens of one block. Training the table (from its
    sincos values) fixes that; the architecture, config and checkpoint layout stay SD3's.
    """
    embed = transformer.pos_embed
    table = embed.pos_embed.detach().clone()
    del embed.pos_embed  # drops the buffer or the parameter
    if trainable:
        embed.pos_embed = nn.Parameter(table)
    else:
        embed.register_buffer("pos_embed", table, persistent=True)


def train(cfg: DiTTrainConfig) -> tuple[DigitsDiTPipeline, dict]:
    """Run the training loop; return the pipeline (EMA weights loaded) and run statistics."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    pipe = build_digits_dit_pipeline(tiny=cfg.tiny, num_tokens=cfg.num_tokens)
    transformer, label_embedding = pipe.transformer, pipe.label_embedding
    if cfg.zero_init:
        zero_init_(transformer)
    if cfg.learn_pos_embed:
        set_pos_embed_trainable(transformer, True)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps

    def loss_fn(x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen)
        if cfg.logit_std > 0:
            s = torch.sigmoid(torch.randn(len(x0), generator=gen) * cfg.logit_std + cfg.logit_mean)
        else:
            s = torch.rand(len(x0), generator=gen)
        sigma = s.view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        tokens, pooled = label_conditioning(label_embedding, y)
        pred = transformer(
            hidden_states=noisy,
            timestep=s * num_train_timesteps,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return F.mse_loss(pred, noise - x0)

    stats = fit(cfg, [transformer, label_embedding], loss_fn, desc="train digits DiT")
    if cfg.learn_pos_embed:
        set_pos_embed_trainable(transformer, False)
    stats["transformer_params"] = sum(p.numel() for p in transformer.parameters())
    stats["label_embedding_params"] = sum(p.numel() for p in label_embedding.parameters())
    return pipe, stats


def write_model_card(out: Path, cfg: DiTTrainConfig, stats: dict, command: str) -> None:
    """README.md with the command, machine, timings and measured quality of this run."""
    config = json.loads((out / "transformer" / "config.json").read_text())
    tcfg = {k: v for k, v in config.items() if not k.startswith("_")}
    grid = tcfg["sample_size"] // tcfg["patch_size"]
    weights = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    lines = [
        "# halodiff digits DiT model",
        "",
        "Class-conditional rectified flow (velocity prediction, SD3's `FlowMatchEulerDiscreteScheduler`) on",
        "scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`, 1797 images, 8x8",
        "nearest-upsampled to 32x32, 1 channel, [-1, 1]). The denoiser is a diffusers `SD3Transformer2DModel`",
        "(MMDiT: joint attention over image and label tokens). Trained in-repo by `halodiff.models.train_digits_dit`;",
        "load with `halodiff.models.digits_dit.load_digits_dit_pipeline()`. Label 10 is the null label for",
        "classifier-free guidance. Saved weights are the EMA weights.",
        "",
        "Conditioning: `LabelEmbedding` (shared with the UNet digits model) gives"
        f" {cfg.num_tokens} learned tokens of width {tcfg['joint_attention_dim']} per label, used as"
        " `encoder_hidden_states`; their mean over the tokens is `pooled_projections`.",
        "",
        "## Training run",
        "",
        f"- command: `{command}`",
        machine_line(cfg),
        f"- training wall time: {stats['train_seconds']:.0f} s ({cfg.steps} steps, batch {cfg.batch_size});"
        f" process CPU time {stats['train_cpu_seconds']:.0f} s",
        f"- final loss (velocity MSE, logit-normal timesteps, mean of the last {min(100, cfg.steps)} steps):"
        f" {stats['final_loss_last100']:.4f}",
        f"- parameters: transformer {stats['transformer_params']:,}, label embedding {stats['label_embedding_params']:,};"
        f" safetensors {weights / 1e6:.2f} MB",
        f"- transformer: {tcfg['num_layers']} joint transformer blocks, {tcfg['num_attention_heads']} heads x"
        f" {tcfg['attention_head_dim']}, patch {tcfg['patch_size']} -> {grid}x{grid} image tokens"
        f" + {cfg.num_tokens} label tokens, pos_embed_max_size {tcfg['pos_embed_max_size']}",
        f"- settings: `{json.dumps({k: v for k, v in asdict(cfg).items() if k != 'out'})}`",
        "",
        "## Quality",
        "",
    ]
    lines += quality_lines(cfg, stats, "flow-matching Euler")
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv), argv, "halodiff.models.train_digits_dit", train, write_model_card)


if __name__ == "__main__":
    main()
