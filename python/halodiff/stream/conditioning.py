"""Prompt conditioning of a stream: encoded once per prompt, laid out per UNet row.

SD 1.x/2.x pipelines give ``encoder_hidden_states``; SDXL (UNet ``addition_embed_type == "text_time"``) also
``added_cond_kwargs`` (pooled text embeddings and the size/crop ``time_ids``). A pipeline without a text encoder
(e.g. the digits model) takes ``prompt_embeds=`` (and ``negative_prompt_embeds=`` for guidance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Prompt:
    """What the user asked for: a text prompt or ready embeddings (``*_embeds`` are ``[1, L, D]``)."""

    prompt: str | None = None
    negative_prompt: str | None = ""
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None


@dataclass(frozen=True)
class Conditioning:
    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def rows(self, n_uncond: int, n_cond: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``encoder_hidden_states`` (and ``added_cond_kwargs``) for ``n_uncond`` uncond rows then ``n_cond`` rows."""
        emb = self.cond.repeat(n_cond, 1, 1)
        if n_uncond:
            emb = torch.cat([self.uncond.repeat(n_uncond, 1, 1), emb])
        if self.pooled is None:
            return emb, None
        pooled = self.pooled.repeat(n_cond, 1)
        if n_uncond:
            pooled = torch.cat([self.uncond_pooled.repeat(n_uncond, 1), pooled])
        return emb, {"text_embeds": pooled, "time_ids": self.time_ids.repeat(n_uncond + n_cond, 1)}


def _is_sdxl(unet) -> bool:
    kind = getattr(unet.config, "addition_embed_type", None)
    if kind not in (None, "text_time"):
        raise ValueError(f"StreamDiffusion: UNets with addition_embed_type={kind!r} are not supported "
                         "(SD 1.x/2.x and SDXL 'text_time' are)")
    return kind == "text_time"


def _one(name: str, t: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.ndim != ndim or t.shape[0] != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"StreamDiffusion: {name} must be a tensor with batch 1 and {ndim} dims (one prompt for "
                         f"every frame); got {shape}")
    return t


def encode(pipe: Any, unet, p: Prompt, need_uncond: bool, device: torch.device, dtype: torch.dtype, height: int,
           width: int) -> Conditioning:
    """Encode ``p`` with the pipeline's text encoder(s) unless embeddings are given."""
    sdxl = _is_sdxl(unet)
    cond = _one("prompt_embeds", p.prompt_embeds, 3)
    uncond = _one("negative_prompt_embeds", p.negative_prompt_embeds, 3)
    pooled = _one("pooled_prompt_embeds", p.pooled_prompt_embeds, 2)
    uncond_pooled = _one("negative_pooled_prompt_embeds", p.negative_pooled_prompt_embeds, 2)
    wanted = {"prompt_embeds": cond, "pooled_prompt_embeds": pooled if sdxl else 0,
              "negative_prompt_embeds": uncond if need_uncond else 0,
              "negative_pooled_prompt_embeds": uncond_pooled if sdxl and need_uncond else 0}
    missing = ", ".join(f"{k}=" for k, v in wanted.items() if v is None)
    if missing:
        if p.prompt is None and cond is None:
            raise ValueError("StreamDiffusion.prepare: give a prompt or prompt_embeds=")
        encode_prompt = getattr(pipe, "encode_prompt", None)
        if encode_prompt is None:
            raise ValueError(f"StreamDiffusion.prepare: {type(pipe).__name__} cannot encode text; pass {missing}")
        kwargs: dict[str, Any] = dict(prompt=p.prompt if cond is None else None, device=device,
                                      num_images_per_prompt=1, do_classifier_free_guidance=need_uncond,
                                      negative_prompt=p.negative_prompt, prompt_embeds=cond,
                                      negative_prompt_embeds=uncond)
        if sdxl:
            kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=uncond_pooled)
        try:
            out = encode_prompt(**kwargs)
        except (AttributeError, TypeError) as exc:  # e.g. a pipeline built without tokenizer / text encoder
            raise ValueError(f"StreamDiffusion.prepare: the pipeline could not encode the prompt ({exc}); pass "
                             f"{missing}") from exc
        cond, uncond = out[0], out[1]
        if sdxl:
            pooled, uncond_pooled = out[2], out[3]
    if sdxl and pooled is None:
        raise ValueError("StreamDiffusion.prepare: an SDXL UNet needs pooled_prompt_embeds= with prompt_embeds=")
    if need_uncond and (uncond is None or (sdxl and uncond_pooled is None)):
        raise ValueError("StreamDiffusion.prepare: guidance needs negative_prompt_embeds= (and "
                         "negative_pooled_prompt_embeds= on SDXL)")

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype) if sdxl else None
    return Conditioning(cast(cond), cast(uncond) if need_uncond else None, cast(pooled),
                        cast(uncond_pooled) if need_uncond else None, time_ids)
