"""Tests for the class-conditional digits diffusion transformer (SD3 architecture; CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from halodiff.models.digits import LabelEmbedding, sample_accuracy
from halodiff.models.digits_dit import (
    DEFAULT_GUIDANCE_SCALE,
    DIGITS_DIT_MODEL_DIR,
    DigitsDiTPipeline,
    build_digits_dit_pipeline,
    digits_dit_config,
    load_digits_dit_pipeline,
)
from halodiff.models.train_digits_dit import main as train_main

MAX_WEIGHT_BYTES = 5 * 1024 * 1024
# The shipped model scores 20/20 with this protocol (2 images per digit, seed 123, the README's 20 Euler
# steps, default guidance 3) and 0.99-1.00 on 100 images at guidance 2-4 (README). The floor allows 3 of
# the 20 digits to flip (e.g. on other CPUs' float rounding) while still catching a broken model (chance: 0.1).
SHIPPED_ACCURACY_FLOOR = 0.85
SHIPPED_EVAL_STEPS = 20


@pytest.fixture(scope="module")
def shipped() -> DigitsDiTPipeline:
    return load_digits_dit_pipeline()


def _record_calls(transformer: SD3Transformer2DModel) -> tuple[list[dict[str, Any]], Any]:
    calls: list[dict[str, Any]] = []

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        assert not args, "the pipeline passes the transformer's inputs by keyword, as SD3's does"
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    return calls, transformer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("tiny", [False, True])
def test_dit_config_shape(tiny: bool) -> None:
    cfg = digits_dit_config(tiny)
    grid = cfg["sample_size"] // cfg["patch_size"]
    assert cfg["patch_size"] == 2 and grid == 16 and grid % 4 == 0  # 4 token rows per band at 4 ranks
    assert cfg["pos_embed_max_size"] >= grid
    assert cfg["caption_projection_dim"] == cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert cfg["pooled_projection_dim"] == cfg["joint_attention_dim"]
    if not tiny:
        params = sum(p.numel() for p in SD3Transformer2DModel(**cfg).parameters())
        assert params * 4 <= MAX_WEIGHT_BYTES


def test_tiny_pipeline_batches_cfg_like_sd3() -> None:
    torch.manual_seed(0)
    pipe = build_digits_dit_pipeline(tiny=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    calls, handle = _record_calls(pipe.transformer)
    try:
        out = pipe([0, 7], num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                   output_type="np")
        images = out.images
        n_cfg = len(calls)
        pipe([3, 4, 5], num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    finally:
        handle.remove()
    assert images.shape == (2, 32, 32, 1) and 0.0 <= images.min() and images.max() <= 1.0
    assert n_cfg == 2 and len(calls) == 4  # ONE transformer call per step, with or without CFG
    for call in calls[:2]:
        assert call["hidden_states"].shape == (4, 1, 32, 32) and call["timestep"].shape == (4,)
        assert call["return_dict"] is False
        ehs, pooled = call["encoder_hidden_states"], call["pooled_projections"]
        assert ehs.shape == (4, 4, 16) and pooled.shape == (4, 16)
        null = pipe.label_embedding(torch.full((2,), pipe.label_embedding.null_label))
        cond = pipe.label_embedding(torch.tensor([0, 7]))
        assert torch.allclose(ehs, torch.cat([null, cond]))  # [uncond, cond], like SD3's prompt embeds
        assert torch.allclose(pooled, ehs.mean(dim=1))
        hs = call["hidden_states"]
        assert torch.equal(hs[:2], hs[2:])  # torch.cat([latents] * 2)
    assert torch.equal(calls[0]["timestep"], torch.full((4,), float(calls[0]["timestep"][0])))
    assert calls[0]["timestep"][0] > calls[1]["timestep"][0]  # timesteps count down from ~1000
    assert all(c["hidden_states"].shape[0] == 3 for c in calls[2:])


def test_train_script_tiny_roundtrip(tmp_path: Path) -> None:
    stats = train_main(
        ["--tiny", "--steps", "3", "--batch-size", "8", "--out", str(tmp_path)]
        + ["--eval-per-class", "1", "--eval-steps", "2", "--eval-guidance", "1,2"]
    )
    assert np.isfinite(stats["final_loss_last100"])
    assert set(stats["sample_accuracy"]) == {1.0, 2.0}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in stats["sample_accuracy"].values())
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DigitsDiTPipeline"
    assert index["label_embedding"] == ["halodiff.models.digits", "LabelEmbedding"]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert list((tmp_path / "transformer").glob("*.safetensors")) and (tmp_path / "README.md").is_file()
    pipe = load_digits_dit_pipeline(path=tmp_path)
    assert isinstance(pipe.label_embedding, LabelEmbedding)
    images = pipe([0, 7], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 1) and images.min() >= 0.0 and images.max() <= 1.0


def test_shipped_model_files() -> None:
    assert (DIGITS_DIT_MODEL_DIR / "README.md").is_file()
    weights = list(DIGITS_DIT_MODEL_DIR.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"transformer", "label_embedding"}
    assert sum(w.stat().st_size for w in weights) <= MAX_WEIGHT_BYTES


def test_shipped_pipeline_outputs(shipped: DigitsDiTPipeline) -> None:
    assert isinstance(shipped.transformer, SD3Transformer2DModel)
    assert isinstance(shipped.label_embedding, LabelEmbedding)
    def run() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return shipped([5, 6], num_inference_steps=2, generator=gen, output_type="pt").images

    pt = run()
    assert pt.shape == (2, 1, 32, 32) and torch.equal(pt, run())  # seeded
    pil = shipped([1, 2], num_inference_steps=2, output_type="pil").images
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (32, 32)
    with pytest.raises(ValueError):
        shipped([10], num_inference_steps=2)


def test_shipped_samples_are_the_requested_digits(shipped: DigitsDiTPipeline) -> None:
    acc, images = sample_accuracy(
        shipped, per_class=2, num_inference_steps=SHIPPED_EVAL_STEPS, guidance_scale=DEFAULT_GUIDANCE_SCALE, seed=123
    )
    assert images.shape == (20, 32, 32, 1)
    assert acc >= SHIPPED_ACCURACY_FLOOR, f"only {acc:.0%} of generated digits were classified as requested"
