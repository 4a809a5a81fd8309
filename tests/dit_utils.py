"""Tiny, offline, random-weight DiT transformers and pipelines for the tests (CPU, fp32, seconds to build).

Four families: "sd3" (`SD3Transformer2DModel`, `StableDiffusion3Pipeline`), "flux" (`FluxTransformer2DModel`,
`FluxPipeline`), "pixart" (`PixArtTransformer2DModel`, `PixArtSigmaPipeline`) and "qwen"
(`QwenImageTransformer2DModel`, `QwenImagePipeline`; halodiff.specs calls it "qwen_image", accepted as an alias).

* `tiny_*_transformer(seed)` / `tiny_transformer(family)`: the bare denoisers, deterministic by seed,
  zero-initialised weights randomised so that every path matters, fp32, eval.
* `dit_inputs(family, batch, rows, cols, text_len, seed)` -> (sample, kwargs): the tensors the family's pipeline
  passes to its transformer in one step, for a `rows` x `cols` token grid (any sizes, e.g. 10 x 6 or 7 x 4).
  kwargs hold everything but the hidden states and the timestep, so a sampling loop can add its own
  (`model(hidden_states=x, timestep=..., return_dict=False, **kwargs)`); `pipeline_timestep(family, t, batch)`
  scales a scheduler timestep as the pipeline does (Flux, Qwen: t / 1000), and `dit_inputs(..., t=...)` or
  `dit_forward(model, family, sample, kwargs, t)` give the complete per-step call.
* `tiny_*_pipeline()` / `tiny_pipeline(family)`: the real diffusers pipelines with real tiny text encoders *and*
  tokenizers built in code (no files, no hub), so `pipe(prompt="a cat", ...)` runs every text path, negative
  prompts and CFG included. Call them with `pipe_kwargs(family, ...)` (or at least with `PIPE_KW[family]`): small
  `max_sequence_length`, and PixArt without resolution binning (its aspect-ratio bins would resize a tiny image
  to >= 256 px). Pipelines are cached per process: undo what you change (halodiff.unpatch) or pass fresh=True.

Tokenizers (transformers 5 builds them from in-memory vocabularies):
* CLIP (SD3 x2, Flux): `CLIPTokenizer`, byte-level BPE over the 256 byte characters (and their `</w>` forms),
  no merges: one token per character, `CLIP_MAX_LENGTH` positions.
* T5 (SD3, Flux, PixArt): `T5Tokenizer` (Unigram over `WORDS` plus single characters; pad 0, eos 1, unk 2).
* Qwen (Qwen-Image): `Qwen2Tokenizer` (byte-level BPE with Qwen's pre-tokenizer; whole words of the pipeline's
  prompt template and `WORDS` are single tokens, anything else falls back to bytes), so the template's system
  part is exactly `prompt_template_encode_start_idx` = 34 tokens, as with the real tokenizer.

Text tokens per prompt (defaults): SD3 `CLIP_MAX_LENGTH + T5_MAX_LENGTH` = 12 + 16 = 28; Flux and PixArt
`T5_MAX_LENGTH` = 16 (PixArt masks the padding); Qwen-Image the prompt's own length after the template's 34
dropped tokens ("a cat": 7; "": 5), padded to the longest in the batch with a mask.
"""
from __future__ import annotations

import copy
import functools
import re
import string

import torch

from parallel_utils import _randomize_zero_inits, tiny_vae

FAMILIES = ("sd3", "flux", "pixart", "qwen")

CLIP_MAX_LENGTH = 12  # CLIP tokenizer model_max_length (= the CLIP text models' positions)
T5_MAX_LENGTH = 16  # max_sequence_length the pipelines are called with (PIPE_KW)
DEFAULT_HW = (64, 48)  # (height, width) px: a 4 x 3 token grid in every family (VAE /8, then 2x2 patches)

# Widths tying the text encoders to the transformers.
CLIP_L_DIM, CLIP_G_DIM = 16, 24  # CLIP hidden = projection widths (SD3 pooled = 16 + 24; Flux pooled = 16)
T5_DIM = 48  # T5 d_model: SD3/Flux joint_attention_dim, PixArt caption_channels (>= CLIP_L + CLIP_G for SD3)
QWEN_TEXT_DIM = 32  # Qwen2.5-VL hidden size: Qwen-Image joint_attention_dim

# In-channels of the denoisers' inputs: latent channels (SD3/PixArt), packed 2x2 latent channels (Flux/Qwen).
SAMPLE_CHANNELS = {"sd3": 16, "flux": 64, "pixart": 4, "qwen": 64}
TEXT_DIM = {"sd3": T5_DIM, "flux": T5_DIM, "pixart": T5_DIM, "qwen": QWEN_TEXT_DIM}
TEXT_LEN = {"sd3": CLIP_MAX_LENGTH + T5_MAX_LENGTH, "flux": T5_MAX_LENGTH, "pixart": T5_MAX_LENGTH,
            "qwen": 7}

# Keyword arguments every call of a tiny pipeline needs (see the module docstring).
PIPE_KW: dict[str, dict] = {
    "sd3": {"max_sequence_length": T5_MAX_LENGTH},
    "flux": {"max_sequence_length": T5_MAX_LENGTH},
    "pixart": {"max_sequence_length": T5_MAX_LENGTH, "use_resolution_binning": False, "clean_caption": False},
    "qwen": {},
}

# Words the T5 and Qwen tokenizers know as single tokens (besides the Qwen prompt template's words).
WORDS = ("a an the of and in on with at photo picture image painting drawing cat cats dog dogs bird red green "
         "blue white black small large big cute sitting standing tree house car sky city street night day "
         "blurry low quality bad ugly deformed text watermark astronaut riding horse mountain lake forest "
         "sunset beach portrait style high detailed").split()


def _family(family: str) -> str:
    family = "qwen" if family == "qwen_image" else family
    if family not in FAMILIES:
        raise ValueError(f"unknown DiT family {family!r}; expected one of {FAMILIES}")
    return family


# ---------------------------------------------------------------------------------------------------------
# Bare transformers


def tiny_sd3_transformer(seed: int = 0, dual: bool = False):
    """SD3 MMDiT: 3 joint blocks (the last context_pre_only), 2 heads x 8, patch 2, 16 latent channels.
    dual=True: SD3.5-style, with `dual_attention_layers` (0, 1) and `qk_norm="rms_norm"`."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16,
        pooled_projection_dim=CLIP_L_DIM + CLIP_G_DIM, pos_embed_max_size=32,
        dual_attention_layers=(0, 1) if dual else (), qk_norm="rms_norm" if dual else None)
    _randomize_zero_inits(model)
    return model.eval()


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True):
    """Flux: 2 double-stream + 2 single-stream blocks, 2 heads x 16 (RoPE axes 4+6+6), patch_size 1 on the
    pipeline's 2x2-packed latents (64 channels); guidance-distilled (FLUX.1-dev style) unless told otherwise."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_L_DIM,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    _randomize_zero_inits(model)
    return model.eval()


def tiny_pixart_transformer(seed: int = 0):
    """PixArt-Sigma: 2 blocks with self-attention, cross-attention to T5 and `ada_norm_single`, 2 heads x 8,
    patch 2, 4 latent channels in, 8 out (learned sigma, which the pipeline drops)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False, caption_channels=T5_DIM)
    _randomize_zero_inits(model)
    return model.eval()


def tiny_qwen_transformer(seed: int = 0):
    """Qwen-Image MMDiT: 2 blocks, 2 heads x 16 (RoPE axes 4+6+6), patch 2 on 16 latent channels (64 packed)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=QWEN_TEXT_DIM, axes_dims_rope=(4, 6, 6))
    _randomize_zero_inits(model)
    return model.eval()


def tiny_transformer(family: str, seed: int = 0, **kwargs):
    """The bare tiny transformer of `family`; kwargs go to its builder (e.g. dual=True for "sd3")."""
    return {"sd3": tiny_sd3_transformer, "flux": tiny_flux_transformer, "pixart": tiny_pixart_transformer,
            "qwen": tiny_qwen_transformer}[_family(family)](seed, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Per-step inputs of the bare transformers


def pipeline_timestep(family: str, t, batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scheduler timestep `t` (a number or 0-d tensor, in [0, 1000]) as `family`'s pipeline passes it: [batch],
    float for SD3, float / 1000 for Flux and Qwen-Image, int64 for PixArt (DPM-Solver timesteps are integers)."""
    family = _family(family)
    t = torch.as_tensor(t)
    if family == "pixart":
        return t.to(torch.int64).reshape(1).expand(batch)
    t = t.to(dtype).reshape(1).expand(batch)
    return t / 1000 if family in ("flux", "qwen") else t


def dit_inputs(family: str, batch: int = 1, rows: int = 4, cols: int = 3, text_len: int | None = None,
               seed: int = 0, text_valid: int | None = None, guidance: float | None = 3.5, t: float | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict]:
    """(sample, kwargs) as `family`'s pipeline passes them to its transformer in one step, for a token grid of
    rows x cols and `text_len` text tokens (default `TEXT_LEN[family]`, what the tiny pipeline produces).

    sample: SD3/PixArt latents [B, C, 2*rows, 2*cols]; Flux/Qwen packed 2x2 latents [B, rows*cols, 64].
    kwargs, by the names the pipelines use (L = text_len):
      sd3:    encoder_hidden_states [B, L, 48], pooled_projections [B, 40], joint_attention_kwargs None
      flux:   guidance [B] (3.5; None for a `guidance_embeds=False` model), pooled_projections [B, 16],
              encoder_hidden_states [B, L, 48], txt_ids [L, 3] zeros, img_ids [rows*cols, 3] = (0, row, col),
              joint_attention_kwargs {}
      pixart: encoder_hidden_states [B, L, 48], encoder_attention_mask [B, L] int64 (the first `text_valid`
              ones, default 3: a short prompt padded to L), added_cond_kwargs {"resolution": None,
              "aspect_ratio": None}
      qwen:   guidance None, encoder_hidden_states [B, L, 32], encoder_hidden_states_mask (None when all L
              tokens are valid, the default; else the first `text_valid` ones), img_shapes [[(1, rows, cols)]] * B,
              attention_kwargs {}
    With t (a scheduler timestep) kwargs also hold `timestep=pipeline_timestep(family, t, B)` and
    return_dict=False: then `model(hidden_states=sample, **kwargs)[0]` is exactly the pipeline's call."""
    family = _family(family)
    L = TEXT_LEN[family] if text_len is None else text_len
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    C = SAMPLE_CHANNELS[family]
    sample = randn(batch, C, 2 * rows, 2 * cols) if family in ("sd3", "pixart") else randn(batch, rows * cols, C)
    text = randn(batch, L, TEXT_DIM[family])
    if family == "sd3":
        kwargs = {"encoder_hidden_states": text, "pooled_projections": randn(batch, CLIP_L_DIM + CLIP_G_DIM),
                  "joint_attention_kwargs": None}
    elif family == "flux":
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] += torch.arange(rows)[:, None]
        img_ids[..., 2] += torch.arange(cols)[None, :]
        kwargs = {"guidance": None if guidance is None else torch.full((batch,), guidance, dtype=torch.float32),
                  "pooled_projections": randn(batch, CLIP_L_DIM), "encoder_hidden_states": text,
                  "txt_ids": torch.zeros(L, 3, dtype=dtype), "img_ids": img_ids.reshape(rows * cols, 3).to(dtype),
                  "joint_attention_kwargs": {}}
    elif family == "pixart":
        valid = min(3, L) if text_valid is None else text_valid
        kwargs = {"encoder_hidden_states": text,
                  "encoder_attention_mask": (torch.arange(L) < valid).long().expand(batch, L).clone(),
                  "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    else:
        valid = L if text_valid is None else text_valid
        mask = None if valid >= L else (torch.arange(L) < valid).long().expand(batch, L).clone()
        kwargs = {"guidance": None, "encoder_hidden_states_mask": mask, "encoder_hidden_states": text,
                  "img_shapes": [[(1, rows, cols)]] * batch, "attention_kwargs": {}}
    if t is not None:
        kwargs.update(timestep=pipeline_timestep(family, t, batch, dtype), return_dict=False)
    return sample, kwargs


def dit_forward(model, family: str, sample: torch.Tensor, kwargs: dict, t: float = 500.0) -> torch.Tensor:
    """One denoiser call as `family`'s pipeline makes it (no grad; PixArt's hidden states positional, the others'
    by keyword) at scheduler timestep t; returns the prediction (PixArt: mean and variance, 2C channels)."""
    kw = {**kwargs, "timestep": pipeline_timestep(_family(family), t, sample.shape[0], sample.dtype),
          "return_dict": False}
    with torch.no_grad():
        if _family(family) == "pixart":
            return model(sample, **kw)[0]
        return model(hidden_states=sample, **kw)[0]


def expected_output_shape(family: str, sample: torch.Tensor) -> tuple[int, ...]:
    """Shape of the transformer's prediction for `sample` (PixArt predicts mean and variance: 2C channels)."""
    if _family(family) == "pixart":
        B, C, H, W = sample.shape
        return (B, 2 * C, H, W)
    return tuple(sample.shape)


# ---------------------------------------------------------------------------------------------------------
# Tokenizers (in memory; cached: tokenizers are not mutated by the pipelines)

_QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                  "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")


@functools.cache
def tiny_clip_tokenizer():
    """`CLIPTokenizer`: byte-level BPE, one token per byte character (`</w>` marks a word's last one);
    bos <|startoftext|> = 512, eos = pad = <|endoftext|> = 513, `CLIP_MAX_LENGTH` positions."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


@functools.cache
def tiny_t5_tokenizer():
    """`T5Tokenizer` (Unigram): <pad> 0, </s> 1, <unk> 2, "▁word" for `WORDS`, then single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -4.0) for w in WORDS]
    pieces += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


@functools.cache
def tiny_qwen_tokenizer():
    """`Qwen2Tokenizer`: the 256 byte characters, the words of QwenImagePipeline's prompt template and `WORDS`
    (bare and with the byte-level space "Ġ") as whole tokens, Qwen's chat special tokens. The template's
    system part is 34 tokens, as with the real Qwen2.5-VL tokenizer."""
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    words = sorted(set(re.findall(r"[A-Za-z]+", _QWEN_TEMPLATE + "assistant")) | set(WORDS))
    for w in words:
        for piece in (w, "Ġ" + w):
            vocab.setdefault(piece, len(vocab))
    for s in _QWEN_SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    # No merges: whole words are found in the vocabulary directly (ignore_merges), other text falls to bytes.
    tok.backend_tokenizer.model = BPE(vocab=vocab, merges=[], ignore_merges=True, continuing_subword_prefix="",
                                      end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tok.add_tokens([AddedToken(s, special=True) for s in _QWEN_SPECIALS[1:]])
    return tok


# ---------------------------------------------------------------------------------------------------------
# Text encoders


def tiny_clip_text_encoder(seed: int = 0, hidden: int = CLIP_L_DIM, projection: bool = True):
    """2-layer CLIP text model over `tiny_clip_tokenizer`'s vocabulary: `CLIPTextModelWithProjection`
    (projection width = hidden) or, projection=False, `CLIPTextModel` (Flux: pooler output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_clip_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         projection_dim=hidden, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_t5_encoder(seed: int = 0):
    """2-layer `T5EncoderModel` (d_model `T5_DIM`, 2 heads x 8, gated-gelu) over `tiny_t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    tok = tiny_t5_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval()


def tiny_qwen_text_encoder(seed: int = 0):
    """`Qwen2_5_VLForConditionalGeneration` (what QwenImagePipeline takes) with a 2-layer text model of width
    `QWEN_TEXT_DIM` (2 heads x 16, M-RoPE sections 2+3+3) and a 1-block vision tower (unused by text prompts)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny_qwen_tokenizer()
    ids = tok.convert_tokens_to_ids
    text = {"vocab_size": len(tok), "hidden_size": QWEN_TEXT_DIM, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": QWEN_TEXT_DIM,
              "fullatt_block_indexes": [0]}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"))
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


# ---------------------------------------------------------------------------------------------------------
# VAEs


def tiny_vae16(scaling_factor: float, shift_factor: float):
    """A tiny AutoencoderKL with 16 latent channels, 4 levels (vae_scale_factor 8) and no quant convs,
    as the SD3 and Flux VAEs (which differ only in scaling/shift)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=4,
                         layers_per_block=1, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


def tiny_qwen_vae():
    """A tiny AutoencoderKLQwenImage (causal 3D convs, z_dim 16, 3 spatial downsamples: vae_scale_factor 8)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(3)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True, True]).eval()


# ---------------------------------------------------------------------------------------------------------
# Pipelines


def pipe_kwargs(family: str, **overrides) -> dict:
    """Call kwargs for a tiny pipeline: prompt "a cat", `DEFAULT_HW`, 2 steps, latent output, a seeded
    generator, the family's `PIPE_KW`; `overrides` win."""
    family = _family(family)
    h, w = DEFAULT_HW
    kw = {"prompt": "a cat", "height": h, "width": w, "num_inference_steps": 2, "output_type": "latent",
          "generator": torch.Generator().manual_seed(0), **PIPE_KW[family]}
    kw.update(overrides)
    return kw


def token_grid(family: str, height: int, width: int) -> tuple[int, int]:
    """The transformer's token grid (rows, cols) for an image of height x width px (/8 VAE, 2x2 patches)."""
    _family(family)
    return height // 16, width // 16


def _finish(pipe, fresh: bool):
    pipe.set_progress_bar_config(disable=True)
    return copy.deepcopy(pipe) if fresh else pipe


@functools.cache
def _sd3(seed: int, dual: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed, dual=dual),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae16(scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=tiny_clip_text_encoder(1, CLIP_L_DIM), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_text_encoder(2, CLIP_G_DIM), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(3), tokenizer_3=tiny_t5_tokenizer())


def tiny_sd3_pipeline(seed: int = 0, dual: bool = False, fresh: bool = False):
    """StableDiffusion3Pipeline: `tiny_sd3_transformer(seed, dual)`, two CLIPTextModelWithProjection (16 and
    24 wide: pooled 40, hidden states zero-padded to T5's 48), T5, FlowMatchEuler (shift 3), 16-channel VAE.

    Cached per (seed, dual): callers must leave it as they found it (undo any patch) unless fresh=True,
    which returns a deep copy."""
    return _finish(_sd3(seed, dual), fresh)


@functools.cache
def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        transformer=tiny_flux_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                  base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                                  max_shift=1.15),
        vae=tiny_vae16(scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=tiny_clip_text_encoder(1, CLIP_L_DIM, projection=False), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(3), tokenizer_2=tiny_t5_tokenizer())


def tiny_flux_pipeline(seed: int = 0, fresh: bool = False):
    """FluxPipeline (FLUX.1-dev style, guidance embedded): `tiny_flux_transformer(seed)`, CLIPTextModel
    (pooled 16), T5 (48), FlowMatchEuler with dynamic shifting, 16-channel VAE. Cached: see tiny_sd3_pipeline."""
    return _finish(_flux(seed), fresh)


@functools.cache
def _pixart(seed: int):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    return PixArtSigmaPipeline(
        transformer=tiny_pixart_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                              beta_schedule="linear", prediction_type="epsilon", solver_order=2,
                                              algorithm_type="dpmsolver++", solver_type="midpoint",
                                              lower_order_final=True, timestep_spacing="linspace"),
        vae=tiny_vae(), text_encoder=tiny_t5_encoder(3), tokenizer=tiny_t5_tokenizer())


def tiny_pixart_pipeline(seed: int = 0, fresh: bool = False):
    """PixArtSigmaPipeline: `tiny_pixart_transformer(seed)`, T5 (48), DPM-Solver++ (PixArt-Sigma's config),
    the 4-channel `tiny_vae`. Call with use_resolution_binning=False (PIPE_KW). Cached: see tiny_sd3_pipeline."""
    return _finish(_pixart(seed), fresh)


@functools.cache
def _qwen(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(
        transformer=tiny_qwen_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                  base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5,
                                                  max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential"),
        vae=tiny_qwen_vae(), text_encoder=tiny_qwen_text_encoder(4), tokenizer=tiny_qwen_tokenizer())


def tiny_qwen_pipeline(seed: int = 0, fresh: bool = False):
    """QwenImagePipeline: `tiny_qwen_transformer(seed)`, a tiny Qwen2.5-VL text encoder (32), FlowMatchEuler
    (Qwen-Image's exponential dynamic shift), AutoencoderKLQwenImage. Cached: see tiny_sd3_pipeline."""
    return _finish(_qwen(seed), fresh)


def tiny_pipeline(family: str, seed: int = 0, fresh: bool = False):
    """The tiny pipeline of `family` (see the tiny_*_pipeline builders)."""
    return {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "pixart": tiny_pixart_pipeline,
            "qwen": tiny_qwen_pipeline}[_family(family)](seed=seed, fresh=fresh)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def pipeline_params(pipe) -> dict[str, int]:
    """Parameter counts of a pipeline's torch modules, by component name."""
    return {name: n_params(c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}

