"""A tiny class-conditional diffusion model of sklearn's handwritten digits.

The 8x8 ``sklearn.datasets.load_digits`` images (values 0..16) are upsampled to 32x32 by
nearest-neighbour (each pixel becomes a 4x4 block) and scaled to [-1, 1]. The denoiser is a
diffusers ``UNet2DConditionModel`` built from the same block types as Stable Diffusion, conditioned
through cross-attention on a learned per-label token sequence (:class:`LabelEmbedding`, label 10 is the
"null" label used for classifier-free guidance). :class:`DigitClassifier` scores generated images by
average-pooling them back to 8x8 (the exact inverse of the upsampling) and running an SVM trained on
the real digits.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._optional import require

require("diffusers", "the shipped digits model (halodiff.models.digits)")
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

DIGITS_MODEL_DIR: Path = Path(__file__).resolve().parent / "digits_model"
NUM_CLASSES: int = 10
NULL_LABEL: int = NUM_CLASSES  # label id used for the unconditional branch of CFG
IMAGE_SIZE: int = 32
SOURCE_SIZE: int = 8
_SCALE: int = IMAGE_SIZE // SOURCE_SIZE
_SKLEARN_MAX: float = 16.0


# --------------------------------------------------------------------------------------- data


def upsample_digits(images8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map sklearn digits ``[N, 8, 8]`` (or ``[N, 64]``) in 0..16 to ``[N, 1, 32, 32]`` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images8), dtype=torch.float32).reshape(-1, 1, SOURCE_SIZE, SOURCE_SIZE)
    x = x / (_SKLEARN_MAX / 2) - 1.0
    return F.interpolate(x, scale_factor=_SCALE, mode="nearest")


def downsample_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Inverse of :func:`upsample_digits` for images in [0, 1].

    Accepts ``[B, 32, 32]``, ``[B, 32, 32, 1]`` (numpy layout) or ``[B, 1, 32, 32]`` and returns
    ``[B, 64]`` float64 features on sklearn's 0..16 scale (4x4 average pooling).
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).float().cpu()
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    elif x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or tuple(x.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images of shape [B, {IMAGE_SIZE}, {IMAGE_SIZE}(, 1)], got {tuple(x.shape)}")
    pooled = F.avg_pool2d(x[:, None], kernel_size=_SCALE)
    return (pooled.clamp(0.0, 1.0) * _SKLEARN_MAX).reshape(len(x), -1).double().numpy()


@functools.lru_cache(maxsize=1)
def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = require("sklearn.datasets", "the digits dataset (sklearn's load_digits)")
    data = datasets.load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 bundled digits as ``([N, 1, 32, 32] in [-1, 1], labels [N])`` tensors."""
    images8, labels = _load_sklearn_digits()
    return upsample_digits(images8), torch.from_numpy(labels)


# --------------------------------------------------------------------------------------- classifier


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of :class:`DigitClassifier` (RBF SVM on the 64 raw pixel values)."""

    test_size: float = 0.25
    seed: int = 0
    gamma: float = 0.001
    C: float = 10.0


@functools.lru_cache(maxsize=4)
def _fit_classifier(cfg: ClassifierConfig) -> tuple[Any, float]:
    train_test_split = require("sklearn.model_selection", "the digits classifier").train_test_split
    SVC = require("sklearn.svm", "the digits classifier").SVC  # noqa: N806

    images8, labels = _load_sklearn_digits()
    x = images8.reshape(len(images8), -1).astype(np.float64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, labels, test_size=cfg.test_size, random_state=cfg.seed, stratify=labels
    )
    clf = SVC(gamma=cfg.gamma, C=cfg.C, random_state=cfg.seed).fit(x_tr, y_tr)
    return clf, float(clf.score(x_te, y_te))


class DigitClassifier:
    """Scores 32x32 images in [0, 1] against sklearn's digits (fit once per process, < 1 s)."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        self.config = config or ClassifierConfig()
        self._clf, self.held_out_accuracy = _fit_classifier(self.config)

    def predict(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted digit per image; ``images`` is ``[B, 32, 32]`` or ``[B, 32, 32, 1]`` in [0, 1]."""
        return self._clf.predict(downsample_images(images)).astype(np.int64)

    def accuracy(self, images: np.ndarray | torch.Tensor, labels: Any) -> float:
        """Fraction of ``images`` classified as the corresponding entry of ``labels``."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        pred = self.predict(images)
        if len(pred) != len(labels):
            raise ValueError(f"{len(pred)} images but {len(labels)} labels")
        return float((pred == labels).mean())


# --------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class DigitsUNetSpec:
    """The knobs of :func:`digits_unet_config` that differ between the shipped and the tiny model."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    cross_attention_dim: int
    attention_heads: int
    norm_num_groups: int


_SPECS = {
    False: DigitsUNetSpec((16, 32, 64), layers_per_block=1, cross_attention_dim=64, attention_heads=4, norm_num_groups=8),
    True: DigitsUNetSpec((8, 16, 16), layers_per_block=1, cross_attention_dim=16, attention_heads=2, norm_num_groups=4),
}


def digits_unet_config(tiny: bool = False) -> dict[str, Any]:
    """``UNet2DConditionModel`` config: SD block types, 2 stride-2 downsamples (32 -> 16 -> 8 rows)."""
    spec = _SPECS[bool(tiny)]
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": spec.block_out_channels,
        "layers_per_block": spec.layers_per_block,
        "cross_attention_dim": spec.cross_attention_dim,
        # diffusers (like SD 1.x) reads ``attention_head_dim`` as the number of heads here.
        "attention_head_dim": spec.attention_heads,
        "norm_num_groups": spec.norm_num_groups,
    }


class LabelEmbedding(ModelMixin, ConfigMixin):
    """Learned tokens per label (0..9, plus ``num_labels`` = null) -> ``[B, num_tokens, dim]``."""

    @register_to_config
    def __init__(self, num_labels: int = NUM_CLASSES, cross_attention_dim: int = 64, num_tokens: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_labels + 1, num_tokens * cross_attention_dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    @property
    def null_label(self) -> int:
        return self.config.num_labels

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        tokens = self.embedding(labels.to(self.embedding.weight.device, torch.long))
        return tokens.view(labels.shape[0], self.config.num_tokens, self.config.cross_attention_dim)


OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")


def validate_labels(labels: int | list[int], num_labels: int, output_type: str) -> list[int]:
    """``labels`` as a non-empty list of ints in ``[0, num_labels)``; also checks ``output_type``."""
    label_list = [labels] if isinstance(labels, int) else [int(v) for v in labels]
    if not label_list or any(not 0 <= v < num_labels for v in label_list):
        raise ValueError(f"labels must be a non-empty list of ints in [0, {num_labels}), got {labels!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}")
    return label_list


def latents_to_output(latents: torch.Tensor, output_type: str) -> Any:
    """Final ``[B, 1, 32, 32]`` latents in about [-1, 1] -> ``output_type`` (see ``DigitsPipeline.__call__``)."""
    if output_type == "latent":
        return latents
    images = (latents / 2 + 0.5).clamp(0, 1).float()
    if output_type == "pt":
        return images
    images = images.permute(0, 2, 3, 1).cpu().numpy()
    return DiffusionPipeline.numpy_to_pil(images) if output_type == "pil" else images


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional digit generation with classifier-free guidance (DDIM by default)."""

    model_cpu_offload_seq = "label_embedding->unet"

    def __init__(self, unet: UNet2DConditionModel, label_embedding: LabelEmbedding, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, label_embedding=label_embedding, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        labels: int | list[int],
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per entry of ``labels`` (digits 0..9).

        ``output_type``: ``"pil"`` (grayscale 32x32), ``"np"`` (float ``[B, 32, 32, 1]`` in [0, 1]),
        ``"pt"`` (``[B, 1, 32, 32]`` in [0, 1]) or ``"latent"`` (raw ``[B, 1, 32, 32]`` in about [-1, 1]).
        """
        label_list = validate_labels(labels, self.label_embedding.config.num_labels, output_type)
        device = self._execution_device
        batch = len(label_list)
        do_cfg = guidance_scale > 1.0

        cond_labels = torch.tensor(label_list, device=device)
        embeds = self.label_embedding(cond_labels)
        if do_cfg:
            uncond = self.label_embedding(torch.full_like(cond_labels, self.label_embedding.null_label))
            embeds = torch.cat([uncond, embeds])
        embeds = embeds.to(self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        cfg = self.unet.config
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        extra_step_kwargs = {"eta": eta} if "eta" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            latents_in = torch.cat([latents] * 2) if do_cfg else latents
            latents_in = self.scheduler.scale_model_input(latents_in, t)
            noise_pred = self.unet(latents_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if do_cfg:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

        self.maybe_free_model_hooks()
        images = latents_to_output(latents, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def build_digits_pipeline(tiny: bool = False, num_tokens: int = 4, scheduler_config: dict | None = None) -> DigitsPipeline:
    """A freshly initialised (untrained) pipeline with a DDIM scheduler."""
    unet_cfg = digits_unet_config(tiny)
    unet = UNet2DConditionModel(**unet_cfg)
    label_embedding = LabelEmbedding(cross_attention_dim=unet_cfg["cross_attention_dim"], num_tokens=num_tokens)
    scheduler = DDIMScheduler(**(scheduler_config or default_scheduler_config()))
    return DigitsPipeline(unet=unet, label_embedding=label_embedding, scheduler=scheduler)


def default_scheduler_config() -> dict[str, Any]:
    """Noise schedule shared by training (DDPM) and sampling (DDIM)."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": True,
        "timestep_spacing": "trailing",
    }


def load_digits_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path | None = None,
) -> DigitsPipeline:
    """Load the shipped trained pipeline (offline) from :data:`DIGITS_MODEL_DIR` (or ``path``)."""
    folder = Path(path) if path is not None else DIGITS_MODEL_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no trained digits pipeline at {folder}")
    pipe = DigitsPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample_accuracy(
    pipe: DiffusionPipeline,
    per_class: int = 10,
    num_inference_steps: int = 20,
    guidance_scale: float = 2.0,
    seed: int = 0,
    classifier: DigitClassifier | None = None,
) -> tuple[float, np.ndarray]:
    """Generate ``per_class`` images of each digit; return (classifier accuracy, images ``[B,32,32,1]``).

    ``pipe`` is any digits pipeline with ``DigitsPipeline``'s call signature (e.g. ``DigitsDiTPipeline``).
    """
    labels = [d for d in range(NUM_CLASSES) for _ in range(per_class)]
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipe(
        labels,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="np",
    ).images
    return (classifier or DigitClassifier()).accuracy(images, labels), images
