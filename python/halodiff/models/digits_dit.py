"""A tiny class-conditional diffusion transformer (SD3 architecture) of sklearn's handwritten digits.

Same data, label tokens and classifier as :mod:`halodiff.models.digits` (32x32x1 images in [-1, 1],
label 10 = null label for classifier-free guidance), but the denoiser is a diffusers
``SD3Transformer2DModel`` (MMDiT: joint attention over image and label tokens, AdaLN-Zero modulation)
with ``patch_size=2``, i.e. a 16x16 grid of image tokens, trained as a rectified flow (velocity
prediction) and sampled with SD3's own ``FlowMatchEulerDiscreteScheduler``.

Conditioning: :class:`~halodiff.models.digits.LabelEmbedding` gives ``num_tokens`` learned tokens per label;
they are the ``encoder_hidden_states`` (``joint_attention_dim`` = token width) and their mean over the
token axis is the ``pooled_projections`` vector (``pooled_projection_dim`` = token width), so one table
of per-label parameters drives both the joint-attention stream and the AdaLN modulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._optional import require

require("diffusers", "the shipped digits DiT model (halodiff.models.digits_dit)")
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, SD3Transformer2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from halodiff.models.digits import IMAGE_SIZE, LabelEmbedding, latents_to_output, validate_labels

DIGITS_DIT_MODEL_DIR: Path = Path(__file__).resolve().parent / "digits_dit_model"
# Best classifier accuracy measured for the shipped model (digits_dit_model/README.md): 1.00 at 3 and 4 on two
# seeds, 0.99 at 2; 3 is the smaller of the best scales (higher scales lower the samples' diversity).
DEFAULT_GUIDANCE_SCALE: float = 3.0
PATCH_SIZE: int = 2


@dataclass(frozen=True)
class DigitsDiTSpec:
    """The knobs of :func:`digits_dit_config` that differ between the shipped and the tiny model."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    joint_attention_dim: int  # width of the label tokens (and of the pooled vector)


_SPECS = {
    False: DigitsDiTSpec(num_layers=6, num_attention_heads=4, attention_head_dim=16, joint_attention_dim=64),
    True: DigitsDiTSpec(num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=16),
}


def digits_dit_config(tiny: bool = False) -> dict[str, Any]:
    """``SD3Transformer2DModel`` config: patch 2 on 32x32x1 -> 16x16 image tokens, SD3.0 blocks."""
    spec = _SPECS[bool(tiny)]
    inner_dim = spec.num_attention_heads * spec.attention_head_dim
    return {
        "sample_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "in_channels": 1,
        "out_channels": 1,
        "num_layers": spec.num_layers,
        "attention_head_dim": spec.attention_head_dim,
        "num_attention_heads": spec.num_attention_heads,
        "joint_attention_dim": spec.joint_attention_dim,
        "caption_projection_dim": inner_dim,  # the context stream runs at the image stream's width
        "pooled_projection_dim": spec.joint_attention_dim,
        "pos_embed_max_size": IMAGE_SIZE // PATCH_SIZE,
    }


def default_flow_scheduler_config() -> dict[str, Any]:
    """Rectified-flow schedule (SD3's scheduler; no resolution shift at 32x32)."""
    return {"num_train_timesteps": 1000, "shift": 1.0}


def label_conditioning(label_embedding: LabelEmbedding, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(encoder_hidden_states [B, num_tokens, dim], pooled_projections [B, dim])`` for ``labels``."""
    tokens = label_embedding(labels)
    return tokens, tokens.mean(dim=1)


class DigitsDiTPipeline(DiffusionPipeline):
    """Class-conditional digit generation with an SD3 transformer, rectified flow and batched CFG."""

    model_cpu_offload_seq = "label_embedding->transformer"

    def __init__(
        self, transformer: SD3Transformer2DModel, label_embedding: LabelEmbedding, scheduler: SchedulerMixin
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, label_embedding=label_embedding, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        labels: int | list[int],
        num_inference_steps: int = 20,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per entry of ``labels`` (digits 0..9); outputs as in ``DigitsPipeline``.

        ``output_type``: ``"pil"`` (grayscale 32x32), ``"np"`` (float ``[B, 32, 32, 1]`` in [0, 1]),
        ``"pt"`` (``[B, 1, 32, 32]`` in [0, 1]) or ``"latent"`` (raw ``[B, 1, 32, 32]`` in about [-1, 1]).
        """
        label_list = validate_labels(labels, self.label_embedding.config.num_labels, output_type)
        device = self._execution_device
        batch = len(label_list)
        do_cfg = guidance_scale > 1.0
        dtype = self.transformer.dtype

        cond_labels = torch.tensor(label_list, device=device)
        if do_cfg:  # [uncond, cond], as StableDiffusion3Pipeline concatenates negative and positive prompts
            cond_labels = torch.cat([torch.full_like(cond_labels, self.label_embedding.null_label), cond_labels])
        prompt_embeds, pooled_embeds = (e.to(dtype) for e in label_conditioning(self.label_embedding, cond_labels))

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        cfg = self.transformer.config
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

        for t in self.progress_bar(self.scheduler.timesteps):
            latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
            timestep = t.expand(latent_model_input.shape[0])
            noise_pred = self.transformer(
                hidden_states=latent_model_input,
                timestep=timestep,
                encoder_hidden_states=prompt_embeds,
                pooled_projections=pooled_embeds,
                return_dict=False,
            )[0]
            if do_cfg:
                noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

        self.maybe_free_model_hooks()
        images = latents_to_output(latents, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def build_digits_dit_pipeline(
    tiny: bool = False, num_tokens: int = 4, scheduler_config: dict | None = None
) -> DigitsDiTPipeline:
    """A freshly initialised (untrained) pipeline with a flow-matching Euler scheduler."""
    cfg = digits_dit_config(tiny)
    transformer = SD3Transformer2DModel(**cfg)
    label_embedding = LabelEmbedding(cross_attention_dim=cfg["joint_attention_dim"], num_tokens=num_tokens)
    scheduler = FlowMatchEulerDiscreteScheduler(**(scheduler_config or default_flow_scheduler_config()))
    return DigitsDiTPipeline(transformer=transformer, label_embedding=label_embedding, scheduler=scheduler)


def load_digits_dit_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path | None = None,
) -> DigitsDiTPipeline:
    """Load the shipped trained pipeline (offline) from :data:`DIGITS_DIT_MODEL_DIR` (or ``path``)."""
    folder = Path(path) if path is not None else DIGITS_DIT_MODEL_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"no trained digits DiT pipeline at {folder}")
    pipe = DigitsDiTPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
