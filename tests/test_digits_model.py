"""Tests for the shipped class-conditional digits diffusion model (CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from halodiff.models.digits import (
    DIGITS_MODEL_DIR,
    DigitClassifier,
    DigitsPipeline,
    LabelEmbedding,
    digits_unet_config,
    downsample_images,
    load_digits_dataset,
    load_digits_pipeline,
    sample_accuracy,
)
from halodiff.models.train_digits import main as train_main


@pytest.fixture(scope="module")
def shipped() -> DigitsPipeline:
    return load_digits_pipeline()


@pytest.mark.parametrize("tiny", [False, True])
def test_unet_config_shape(tiny: bool) -> None:
    from diffusers import UNet2DConditionModel

    cfg = digits_unet_config(tiny)
    n_down = len(cfg["block_out_channels"]) - 1
    assert n_down in (2, 3)
    assert cfg["sample_size"] // 2**n_down >= 4  # row bands over up to 4 ranks at the deepest level
    assert cfg["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert "CrossAttnDownBlock2D" in cfg["down_block_types"] and "CrossAttnUpBlock2D" in cfg["up_block_types"]
    if not tiny:
        params = sum(p.numel() for p in UNet2DConditionModel(**cfg).parameters())
        assert 1_000_000 <= params <= 4_000_000


def test_classifier_scores_real_digits() -> None:
    clf = DigitClassifier()
    assert clf.held_out_accuracy >= 0.95
    x, y = load_digits_dataset()
    images01 = (x[:, 0] + 1) / 2  # [N, 32, 32] in [0, 1], exactly what the pipeline produces
    assert np.allclose(downsample_images(images01).reshape(-1, 8, 8), x[:, 0, ::4, ::4].add(1).mul(8).numpy())
    assert clf.accuracy(images01.numpy()[..., None], y.numpy()) >= 0.9
    assert clf.predict(images01[:5]).shape == (5,)


def test_train_script_tiny_roundtrip(tmp_path: Path) -> None:
    stats = train_main(
        ["--tiny", "--steps", "3", "--batch-size", "8", "--out", str(tmp_path)]
        + ["--eval-per-class", "1", "--eval-steps", "2", "--eval-guidance", "1,2"]
    )
    assert np.isfinite(stats["final_loss_last100"])
    assert set(stats["sample_accuracy"]) == {1.0, 2.0}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in stats["sample_accuracy"].values())
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["label_embedding"] == ["halodiff.models.digits", "LabelEmbedding"]
    assert list((tmp_path / "unet").glob("*.safetensors")) and (tmp_path / "README.md").is_file()
    pipe = DigitsPipeline.from_pretrained(str(tmp_path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.label_embedding, LabelEmbedding)
    images = pipe([0, 7], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 1) and images.min() >= 0.0 and images.max() <= 1.0


def test_shipped_pipeline_generates(shipped: DigitsPipeline) -> None:
    assert (DIGITS_MODEL_DIR / "README.md").is_file()
    assert isinstance(shipped.label_embedding, LabelEmbedding)
    gen = torch.Generator().manual_seed(0)
    images = shipped(3, num_inference_steps=5, generator=gen, output_type="np").images
    assert images.shape == (1, 32, 32, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    pil = shipped([1, 2], num_inference_steps=2, output_type="pil").images
    assert len(pil) == 2 and pil[0].mode == "L" and pil[0].size == (32, 32)
    pt = shipped(4, num_inference_steps=2, output_type="pt").images
    assert pt.shape == (1, 1, 32, 32)


def test_cfg_is_one_batched_unet_call_per_step(shipped: DigitsPipeline) -> None:
    batches: list[int] = []
    handle = shipped.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    try:
        shipped([1, 2, 3], num_inference_steps=4, guidance_scale=2.0, output_type="latent")
        shipped([1, 2, 3], num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    finally:
        handle.remove()
    assert batches == [6] * 4 + [3] * 3


def test_generation_is_seeded(shipped: DigitsPipeline) -> None:
    run = lambda: shipped([5, 6], num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert torch.equal(run(), run())


def test_shipped_samples_are_the_requested_digits(shipped: DigitsPipeline) -> None:
    acc, images = sample_accuracy(shipped, per_class=2, num_inference_steps=10, seed=123)
    assert images.shape == (20, 32, 32, 1)
    assert acc >= 0.6, f"only {acc:.0%} of generated digits were classified as requested"
