"""The tiny offline DiT helpers (tests/dit_utils.py): bare transformers on non-square token grids, per-step inputs
identical in names, shapes and dtypes to what each pipeline passes, and the four pipelines end to end from a text
prompt (tiny real tokenizers and text encoders), with and without negative prompts / CFG, latent and pt output."""
from __future__ import annotations

import contextlib

import pytest
import torch

import dit_utils as du
from dit_utils import FAMILIES

GRIDS = [(4, 3), (10, 6), (7, 4)]
H, W = du.DEFAULT_HW
LATENT_SHAPE = {"sd3": (1, 16, H // 8, W // 8), "flux": (1, (H // 16) * (W // 16), 64),
                "pixart": (1, 4, H // 8, W // 8), "qwen": (1, (H // 16) * (W // 16), 64)}
# (call overrides, transformer calls per step, batch of each call): no CFG, CFG with a negative prompt, and
# for the batched-CFG pipelines CFG with the default (empty) negative prompt.
CFG = {
    "sd3": [({"guidance_scale": 1.0}, 1, 1), ({"guidance_scale": 5.0, "negative_prompt": "blurry"}, 1, 2),
            ({"guidance_scale": 5.0}, 1, 2)],
    "flux": [({}, 1, 1), ({"true_cfg_scale": 4.0, "negative_prompt": "blurry"}, 2, 1)],
    "pixart": [({"guidance_scale": 1.0}, 1, 1), ({"guidance_scale": 4.5, "negative_prompt": "blurry"}, 1, 2),
               ({"guidance_scale": 4.5}, 1, 2)],
    "qwen": [({"true_cfg_scale": 1.0}, 1, 1), ({"true_cfg_scale": 4.0, "negative_prompt": "blurry"}, 2, 1)],
}
PIPE_CASES = [(f, i) for f in FAMILIES for i in range(len(CFG[f]))]


class _record:
    """Records each transformer forward's kwargs (PixArt's positional hidden states as hidden_states) and the
    `cache_context` name it ran under (None outside one)."""

    def __init__(self, model):
        self.model, self.calls, self.context = model, [], [None]

    def __enter__(self) -> list[dict]:
        original = getattr(self.model, "cache_context", None)  # SD3 and PixArt have none

        @contextlib.contextmanager
        def cache_context(name, **kw):
            self.context.append(name)
            try:
                with original(name, **kw):
                    yield
            finally:
                self.context.pop()

        def hook(m, args, kwargs):
            self.calls.append({**({"hidden_states": args[0]} if args else {}), **kwargs, "_context": self.context[-1]})

        if original is not None:
            self.model.cache_context = cache_context
        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self.calls

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.model.__dict__.pop("cache_context", None)


@pytest.mark.parametrize("family, extra", [(f, {}) for f in FAMILIES] + [("sd3", {"dual": True})])
def test_transformer_forward_shapes(family, extra):
    model = du.tiny_transformer(family, **extra)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.abs().max() > 0 for p in model.parameters()), "zero-initialised weights must be randomised"
    for rows, cols in GRIDS:
        sample, kwargs = du.dit_inputs(family, 2, rows, cols, seed=1)
        tokens = sample.shape[1] if sample.dim() == 3 else sample.shape[-2] * sample.shape[-1] // 4
        assert tokens == rows * cols
        out = du.dit_forward(model, family, sample, kwargs, t=700)
        assert tuple(out.shape) == du.expected_output_shape(family, sample), (family, rows, cols, out.shape)
        assert torch.isfinite(out).all()
    # deterministic by seed, and the seed matters
    same, other = du.tiny_transformer(family, 0, **extra), du.tiny_transformer(family, 1, **extra)
    sd, sd1 = model.state_dict(), other.state_dict()
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in sd.items())
    assert not all(torch.equal(v, sd1[k]) for k, v in sd.items())


def test_transformer_configs():
    sd3, sd35 = du.tiny_transformer("sd3"), du.tiny_transformer("sd3", dual=True)
    assert sd3.config.patch_size == 2 and not sd3.config.dual_attention_layers and sd3.config.qk_norm is None
    assert tuple(sd35.config.dual_attention_layers) == (0, 1) and sd35.config.qk_norm == "rms_norm"
    flux = du.tiny_transformer("flux")
    assert flux.config.patch_size == 1 and flux.config.num_layers >= 2 and flux.config.num_single_layers >= 2
    pixart = du.tiny_transformer("pixart")
    assert pixart.config.norm_type == "ada_norm_single" and pixart.config.patch_size == 2
    assert du.tiny_transformer("qwen").config.patch_size == 2
    for m in (sd3, flux, pixart, du.tiny_transformer("qwen")):
        assert m.config.num_attention_heads == 2 and 8 <= m.config.attention_head_dim <= 16


@pytest.mark.parametrize("family", FAMILIES)
def test_dit_inputs_match_the_pipeline_call(family):
    """dit_inputs(..., t=t) has exactly the kwargs names, shapes, dtypes (and the non-tensor values) of the
    pipeline's own transformer call at the default size, CFG on where the pipeline batches it."""
    pipe = du.tiny_pipeline(family)
    overrides, _, batch = CFG[family][1]
    with _record(pipe.transformer) as calls:
        pipe(**du.pipe_kwargs(family, **overrides))
    got = {k: v for k, v in calls[0].items() if k != "_context"}
    t = pipe.scheduler.timesteps[0]
    sample, want = du.dit_inputs(family, batch, H // 16, W // 16, t=t)
    want["hidden_states"] = sample
    assert set(got) == set(want), (family, sorted(got), sorted(want))
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert (tuple(got[k].shape), got[k].dtype) == (tuple(v.shape), v.dtype), (family, k, got[k].shape, v.shape)
        else:
            assert got[k] == v, (family, k, got[k], v)
    assert torch.allclose(got["timestep"].double(), want["timestep"].double())
    if family == "flux":
        assert torch.equal(got["img_ids"], want["img_ids"]) and torch.equal(got["txt_ids"], want["txt_ids"])
    if family == "pixart":
        assert torch.equal(got["encoder_attention_mask"][-1], want["encoder_attention_mask"][-1])  # "a cat" = 3


@pytest.mark.parametrize("family, case", PIPE_CASES)
def test_pipeline_generates(family, case):
    overrides, per_step, batch = CFG[family][case]
    pipe = du.tiny_pipeline(family)
    with _record(pipe.transformer) as calls:
        latent = pipe(**du.pipe_kwargs(family, output_type="latent", **overrides)).images
        image = pipe(**du.pipe_kwargs(family, output_type="pt", **overrides)).images
    assert tuple(latent.shape) == LATENT_SHAPE[family] and torch.isfinite(latent).all()
    assert tuple(image.shape) == (1, 3, H, W) and image.min() >= 0 and image.max() <= 1
    assert len(calls) == 2 * 2 * per_step, "2 steps, two runs"
    assert all(c["hidden_states"].shape[0] == batch for c in calls)
    # text tokens per call: fixed by padding, except Qwen-Image's own lengths ("a cat": 7, "blurry": 6)
    want_text = [du.TEXT_LEN[family]] * per_step if family != "qwen" else [7, 6][:per_step]
    assert [c["encoder_hidden_states"].shape[1] for c in calls[:per_step]] == want_text
    want_ctx = ["cond", "uncond"][:per_step] if family in ("flux", "qwen") else [None]
    assert [c["_context"] for c in calls[:per_step]] == want_ctx


def test_text_token_counts_and_prompts_matter():
    lens = {}
    for family in FAMILIES:
        pipe = du.tiny_pipeline(family)
        with _record(pipe.transformer) as calls:
            cat = pipe(**du.pipe_kwargs(family, **CFG[family][0][0])).images
            dog = pipe(**du.pipe_kwargs(family, prompt="a dog", **CFG[family][0][0])).images
        lens[family] = calls[0]["encoder_hidden_states"].shape[1]
        assert not torch.equal(cat, dog), f"{family}: the prompt must change the result"
    assert lens == du.TEXT_LEN == {"sd3": 28, "flux": 16, "pixart": 16, "qwen": 7}


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompt_matters(family):
    overrides = dict(CFG[family][1][0])
    pipe = du.tiny_pipeline(family)
    a = pipe(**du.pipe_kwargs(family, **overrides)).images
    b = pipe(**du.pipe_kwargs(family, **{**overrides, "negative_prompt": "low quality"})).images
    assert not torch.equal(a, b)


def test_qwen_template_and_padded_batch():
    pipe = du.tiny_qwen_pipeline()
    tok = pipe.tokenizer
    system = pipe.prompt_template_encode.split("{}")[0]
    assert len(tok(system).input_ids) == pipe.prompt_template_encode_start_idx == 34
    embeds, mask = pipe.encode_prompt(["a cat", "a photo of a red dog"], device="cpu")
    assert embeds.shape == (2, 11, du.QWEN_TEXT_DIM) and mask.tolist() == [[1] * 7 + [0] * 4, [1] * 11]
    with _record(pipe.transformer) as calls:
        out = pipe(**du.pipe_kwargs("qwen", prompt=["a cat", "a photo of a red dog"], true_cfg_scale=1.0)).images
    assert out.shape[0] == 2 and calls[0]["encoder_hidden_states_mask"].shape == (2, 11)


def test_tokenizers_roundtrip():
    assert du.tiny_clip_tokenizer().batch_decode(du.tiny_clip_tokenizer()(["a cat"]).input_ids,
                                                 skip_special_tokens=True) == ["a cat"]
    t5 = du.tiny_t5_tokenizer()
    assert t5.convert_ids_to_tokens(t5("a cat").input_ids) == ["▁a", "▁cat", "</s>"]
    assert t5.decode(t5("A zebra!").input_ids, skip_special_tokens=True) == "A zebra!"


def test_cached_and_fresh():
    pipe = du.tiny_pixart_pipeline()
    assert du.tiny_pixart_pipeline() is pipe
    fresh = du.tiny_pixart_pipeline(fresh=True)
    assert fresh is not pipe and fresh.transformer is not pipe.transformer
    assert torch.equal(fresh(**du.pipe_kwargs("pixart")).images, pipe(**du.pipe_kwargs("pixart")).images)
