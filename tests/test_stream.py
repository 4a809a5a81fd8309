"""halodiff.StreamDiffusion: same numbers as the `streamdiffusion` 0.1.1 package, the package's defects fixed,
SDXL / TAESD / pixel-space pipelines, the similarity filter, frame conversion and bad input (tiny random UNets)."""
from __future__ import annotations

import random
import time

import numpy as np
import PIL.Image
import pytest
import torch

import halodiff
from halodiff.errors import HalodiffError
from halodiff.stream import SimilarImageFilter, StreamDiffusion, to_pil, to_tensor
from parallel_utils import prompt_embeds, tiny_sd_pipeline, tiny_sdxl_unet, tiny_vae

REL = 1e-5  # fp32, relative L2 error vs the reference
SIZE = 64  # pixels: 8x8 latents with the tiny 8x VAE
COND, UNCOND = prompt_embeds()
COND2, _ = prompt_embeds(seed=12)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_stream(pipe, t_index_list, *, guidance_scale: float = 1.5, delta: float = 0.8, seed: int = 3,
                size: int = SIZE, **kw) -> StreamDiffusion:
    """A prepared stream on the tiny SD pipeline's prompt embeddings."""
    stream = StreamDiffusion(pipe, t_index_list, width=size, height=size, **kw)
    stream.prepare(prompt_embeds=COND, negative_prompt_embeds=UNCOND, guidance_scale=guidance_scale, delta=delta,
                   seed=seed)
    return stream


def latents(count: int, frames: int = 1, seed: int = 0, shape=(4, 8, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(frames, *shape, generator=g) for _ in range(count)]


def images(count: int, frames: int = 1, seed: int = 0, size: int = SIZE, channels: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(frames, channels, size, size, generator=g) for _ in range(count)]


def fake_text_encoder(pipe, table: dict[str, torch.Tensor]) -> None:
    """Give a tiny pipeline without tokenizer an `encode_prompt` mapping prompts to fixed embeddings (test only)."""

    def encode_prompt(prompt=None, negative_prompt=None, do_classifier_free_guidance=False, prompt_embeds=None,
                      negative_prompt_embeds=None, **_):
        cond = prompt_embeds if prompt_embeds is not None else table[prompt]
        uncond = negative_prompt_embeds if negative_prompt_embeds is not None else table[negative_prompt or ""]
        return cond, uncond if do_classifier_free_guidance else None

    pipe.encode_prompt = encode_prompt


@pytest.fixture(scope="module")
def pipe():
    p = tiny_sd_pipeline()
    fake_text_encoder(p, {"a": COND, "b": COND2, "": UNCOND})
    return p


def _package():
    return pytest.importorskip("streamdiffusion", reason="the streamdiffusion package (test-only, installed by "
                               "`pip install --no-deps -r requirements-nodeps.txt`) is missing").StreamDiffusion


def package_stream(pipe, t_index_list, cfg_type, *, guidance_scale=1.5, delta=0.8, seed=3, **kw):
    pkg = _package()(pipe, t_index_list, torch_dtype=torch.float32, width=SIZE, height=SIZE, cfg_type=cfg_type, **kw)
    pkg.prepare("a", guidance_scale=guidance_scale, delta=delta, seed=seed)
    return pkg


# ------------------------------------------------------------------------------------------ the package
@pytest.mark.parametrize("t_index_list", [[32], [20, 35], [10, 25, 40]])
def test_predict_x0_equals_package_for_every_cfg_type(pipe, t_index_list):
    cases = [(cfg, True) for cfg in ("none", "full", "self", "initialize")] + [("self", False)]
    for cfg, add_noise in cases:
        if cfg == "self" and len(t_index_list) == 1:
            continue  # one slot + self: a package defect, see test_one_slot_self_cfg_uses_the_frame_noise
        pkg = package_stream(pipe, t_index_list, cfg, do_add_noise=add_noise)
        ours = make_stream(pipe, t_index_list, cfg_type=cfg, do_add_noise=add_noise)
        for k, x in enumerate(latents(4)):
            with torch.no_grad():
                want = pkg.predict_x0_batch(x.clone())
            got = ours.predict_x0(x.clone())
            assert rel(got, want) <= REL, (t_index_list, cfg, add_noise, k, rel(got, want))


def test_same_seed_same_noise_and_constants_as_package(pipe):
    pkg = package_stream(pipe, [10, 25, 40], "self")
    ours = make_stream(pipe, [10, 25, 40], cfg_type="self")
    assert torch.equal(ours.init_noise, pkg.init_noise)
    assert torch.equal(ours.schedule.timesteps, pkg.sub_timesteps_tensor)
    for name, ref in (("alpha", pkg.alpha_prod_t_sqrt), ("beta", pkg.beta_prod_t_sqrt), ("c_skip", pkg.c_skip),
                      ("c_out", pkg.c_out)):
        assert torch.equal(getattr(ours.schedule, name), ref.flatten()), name


# ------------------------------------------------------------------------------------------ fixes
def test_one_slot_self_cfg_uses_the_frame_noise(pipe):
    """n=1, cfg "self": the uncond prediction is the frame's own noise (delta * init_noise), so the stream is
    stateless. The package uses zeros on the first frame and carries the previous frame's correction over."""
    ours = make_stream(pipe, [30], cfg_type="self")
    x = latents(1)[0]
    with torch.no_grad():
        eps_c = pipe.unet(x, ours.schedule.timesteps, encoder_hidden_states=COND).sample
    s = ours.schedule
    eps_u = 0.8 * ours.init_noise
    eps = eps_u + 1.5 * (eps_c - eps_u)
    want = s.c_out * ((x - s.beta * eps) / s.alpha) + s.c_skip * x
    first, second = ours.predict_x0(x), ours.predict_x0(x)
    assert rel(first, want) <= REL and rel(second, want) <= REL
    pkg = package_stream(pipe, [30], "self")
    with torch.no_grad():
        p1, p2 = pkg.predict_x0_batch(x.clone()), pkg.predict_x0_batch(x.clone())
    assert rel(p1, p2) > 1e-3  # the package's output depends on the previous frame


@pytest.mark.parametrize("frames", [1, 2])
def test_batch_mode_equals_sequential_mode_n_minus_1_frames_later(pipe, frames):
    """Sequential mode (RCFG with stock noise, slot noise, no fresh randomness) is Stream Batch without the lag."""
    t = [10, 25, 40]
    for cfg in ("none", "full", "self", "initialize"):
        batch = make_stream(pipe, t, cfg_type=cfg, frame_buffer_size=frames)
        seq = make_stream(pipe, t, cfg_type=cfg, frame_buffer_size=frames, use_denoising_batch=False)
        xs = latents(4, frames)
        out_b = [batch.predict_x0(x) for x in xs]
        out_s = [seq.predict_x0(x) for x in xs]
        for k in range(len(xs) - 2):
            assert rel(out_b[k + 2], out_s[k]) <= REL, (cfg, k)
        assert seq.stats.unet_calls == 3 * len(xs) and batch.stats.unet_calls == len(xs)


def test_sequential_mode_is_deterministic_and_package_never_updates_stock_noise(pipe):
    seq = [make_stream(pipe, [10, 25], cfg_type="self", use_denoising_batch=False) for _ in range(2)]
    x = latents(1)[0]
    assert torch.equal(seq[0].predict_x0(x), seq[1].predict_x0(x))
    # the package never updates the stock noise in sequential mode: "self" there is eps = 1.5 * eps_cond
    with pytest.raises(NameError):  # the package cannot prepare full CFG in sequential mode
        package_stream(pipe, [10, 25], "full", use_denoising_batch=False)
    pkg = package_stream(pipe, [10, 25], "self", use_denoising_batch=False)
    with torch.no_grad():
        assert pkg.stock_noise.abs().max() == 0
        pkg.predict_x0_batch(x.clone())
    assert pkg.stock_noise.abs().max() == 0


def test_frame_buffer_frames_are_independent_streams(pipe):
    """F=2, n=2: frame j of every call equals a one-frame stream whose slot noise is rows j::F."""
    F, t = 2, [15, 35]
    for cfg in ("self", "initialize", "full"):
        multi = make_stream(pipe, t, cfg_type=cfg, frame_buffer_size=F)
        singles = [make_stream(pipe, t, cfg_type=cfg) for _ in range(F)]
        for j, s in enumerate(singles):
            s.init_noise.copy_(multi.init_noise[j::F])  # the plans hold views of init_noise
        for x in latents(3, F):
            out = multi.predict_x0(x)
            for j, s in enumerate(singles):
                assert rel(out[j:j + 1], s.predict_x0(x[j:j + 1])) <= REL, cfg
    with pytest.raises(RuntimeError):  # the package cannot run this configuration
        pkg = package_stream(pipe, t, "self", frame_buffer_size=F)
        with torch.no_grad():
            for x in latents(2, F):
                pkg.predict_x0_batch(x)


@pytest.mark.parametrize("cfg", ["full", "initialize", "self"])
def test_update_prompt_keeps_the_uncond_rows(pipe, cfg):
    switched = StreamDiffusion(pipe, [20, 35], width=SIZE, height=SIZE, cfg_type=cfg)
    switched.prepare("a", guidance_scale=1.5, delta=0.8, seed=3)
    switched.update_prompt("b")
    fresh = StreamDiffusion(pipe, [20, 35], width=SIZE, height=SIZE, cfg_type=cfg)
    fresh.prepare("b", guidance_scale=1.5, delta=0.8, seed=3)
    embeds = make_stream(pipe, [20, 35], cfg_type=cfg)
    embeds.update_prompt(prompt_embeds=COND2)
    for x in latents(3):
        want = fresh.predict_x0(x)
        assert rel(switched.predict_x0(x), want) <= REL and rel(embeds.predict_x0(x), want) <= REL
    if cfg != "self":  # the package drops the uncond rows: its next UNet call gets too few embeddings
        pkg = package_stream(pipe, [20, 35], cfg)
        pkg.update_prompt("b")
        with pytest.raises(RuntimeError), torch.no_grad():
            pkg.predict_x0_batch(latents(1)[0])


def test_ready_flags_the_zero_buffer_warmup(pipe):
    stream = make_stream(pipe, [10, 25, 40], cfg_type="none")
    assert not stream.ready
    flags = []
    for x in latents(4):
        stream.predict_x0(x)
        flags.append(stream.ready)
    assert flags == [False, False, True, True]
    stream.prepare(prompt_embeds=COND, seed=3)
    assert not stream.ready
    seq = make_stream(pipe, [10, 25, 40], cfg_type="none", use_denoising_batch=False)
    seq.predict_x0(latents(1)[0])
    assert seq.ready


# ------------------------------------------------------------------------------------------ UNet calls
def test_one_unet_call_per_frame_with_per_sample_timesteps(pipe):
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].shape[0], args[1].clone(),
                                             kwargs["encoder_hidden_states"].shape[0])), with_kwargs=True)
    try:
        F, t = 2, [10, 25, 40]
        rows = {"none": 3 * F, "self": 3 * F, "initialize": 4 * F, "full": 6 * F}
        for cfg, want in rows.items():
            seen.clear()
            stream = make_stream(pipe, t, cfg_type=cfg, frame_buffer_size=F)
            for x in latents(2, F):
                stream.predict_x0(x)
            assert [s[0] for s in seen] == [want, want] and all(s[2] == want for s in seen), cfg
            ts = seen[0][1]
            assert ts.ndim == 1 and ts.dtype == torch.long and len(ts) == want
            assert ts[-3 * F:].tolist() == stream.schedule.timesteps.repeat_interleave(F).tolist()
            assert stream.stats.unet_rows == 2 * want
        seen.clear()
        make_stream(pipe, t, cfg_type="full", frame_buffer_size=F, use_denoising_batch=False).predict_x0(
            latents(1, F)[0])
        assert [s[0] for s in seen] == [2 * F] * 3
    finally:
        hook.remove()


def _installed(pipe) -> tuple:
    mods = tuple((n, m.__dict__.get("forward"), len(m._forward_hooks), len(m._forward_pre_hooks),
                  getattr(m, "processor", None)) for n, m in pipe.unet.named_modules())
    return mods, pipe.scheduler.__dict__.get("set_timesteps"), pipe.scheduler.timesteps.clone()


def test_the_stream_installs_nothing_on_the_pipeline(pipe):
    before = _installed(pipe)
    stream = make_stream(pipe, [20, 35])
    stream.predict_x0(latents(1)[0])
    after = _installed(pipe)
    assert stream.scheduler is not pipe.scheduler and type(stream.scheduler).__name__ == "LCMScheduler"
    assert after[:2] == before[:2] and torch.equal(after[2], before[2])


def test_v_prediction_is_converted_to_epsilon():
    from diffusers import DDIMScheduler

    p = tiny_sd_pipeline()
    p.scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    stream = make_stream(p, [25], cfg_type="none")
    x = latents(1)[0]
    s = stream.schedule
    with torch.no_grad():
        v = p.unet(x, s.timesteps, encoder_hidden_states=COND).sample
    eps = s.alpha * v + s.beta * x
    assert rel(stream.predict_x0(x), s.c_out * ((x - s.beta * eps) / s.alpha) + s.c_skip * x) <= REL


@pytest.mark.parametrize("clip", [False, True])
def test_x0_equals_lcm_scheduler_step_denoised(clip):
    """One slot, no guidance: the stream's x0 is diffusers' LCMScheduler.step(...).denoised, incl. clip_sample
    (the package ignores clip_sample; the digits model's scheduler sets it)."""
    from diffusers import DDIMScheduler, LCMScheduler

    p = tiny_sd_pipeline()
    p.scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=clip, clip_sample_range=0.5)
    stream = make_stream(p, [30], cfg_type="none")
    x = latents(1)[0] * 3
    t = stream.schedule.timesteps
    with torch.no_grad():
        eps = p.unet(x, t, encoder_hidden_states=COND).sample
    lcm = LCMScheduler.from_config(p.scheduler.config)
    lcm.set_timesteps(50)
    want = lcm.step(eps, t[0], x).denoised
    assert rel(stream.predict_x0(x), want) <= REL
    s = stream.schedule
    unclipped = s.c_out * ((x - s.beta * eps) / s.alpha) + s.c_skip * x
    assert (rel(unclipped, want) > 1e-2) == clip


# ------------------------------------------------------------------------------------------ pipelines
def _sdxl_pipe():
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                  tokenizer_2=None, unet=tiny_sdxl_unet(), force_zeros_for_empty_prompt=False,
                                  scheduler=DDIMScheduler(num_train_timesteps=1000, steps_offset=1))
    p.set_progress_bar_config(disable=True)
    return p


def test_sdxl_added_cond_kwargs_per_row():
    p = _sdxl_pipe()
    g = torch.Generator().manual_seed(4)
    pooled, neg_pooled = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    streams = []
    for batch in (True, False):
        s = StreamDiffusion(p, [15, 35], width=SIZE, height=SIZE, cfg_type="full", use_denoising_batch=batch)
        s.prepare(prompt_embeds=COND, negative_prompt_embeds=UNCOND, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=neg_pooled, guidance_scale=2.0)
        streams.append(s)
    with pytest.raises(ValueError, match="pooled"):
        StreamDiffusion(p, [15, 35], width=SIZE, height=SIZE, cfg_type="none").prepare(prompt_embeds=COND)
    seen = []
    hook = p.unet.register_forward_pre_hook(lambda m, a, k: seen.append(k["added_cond_kwargs"]), with_kwargs=True)
    try:
        xs = latents(3)
        out_b = [streams[0].predict_x0(x) for x in xs]
        out_s = [streams[1].predict_x0(x) for x in xs]
    finally:
        hook.remove()
    added = seen[0]
    assert added["text_embeds"].shape == (4, 16) and added["time_ids"].shape == (4, 6)
    assert torch.equal(added["text_embeds"][:2], neg_pooled.repeat(2, 1))
    assert torch.equal(added["text_embeds"][2:], pooled.repeat(2, 1))
    assert added["time_ids"][0].tolist() == [SIZE, SIZE, 0, 0, SIZE, SIZE]
    for k in range(2):
        assert rel(out_b[k + 1], out_s[k]) <= REL


def _taesd_pipe():
    from diffusers import AutoencoderTiny

    torch.manual_seed(6)
    vae = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4).eval()
    p = tiny_sd_pipeline()
    p.vae = vae
    return p


def test_img2img_with_autoencoder_tiny():
    p = _taesd_pipe()
    stream = make_stream(p, [20, 35], frame_buffer_size=2)
    frames = images(3, 2)
    outs = [stream(f) for f in frames]
    assert all(o.shape == (2, 3, SIZE, SIZE) and 0 <= o.min() and o.max() <= 1 for o in outs)
    x = stream.preprocess(frames[0])
    with torch.no_grad():
        z = p.vae.encode(x).latents * p.vae.config.scaling_factor
        want = stream.schedule.alpha[0] * z + stream.schedule.beta[0] * stream.init_noise[:2]
        assert rel(stream.encode_image(x), want) <= REL
        assert rel(stream.decode_image(z), (p.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)) <= REL


def test_pixel_space_pipeline_without_vae():
    """The digits model's layout: 1 channel, no VAE, label embeddings as prompt_embeds (tiny random weights)."""
    from halodiff.models.digits import build_digits_pipeline

    torch.manual_seed(0)
    p = build_digits_pipeline(tiny=True)
    labels = torch.tensor([3, p.label_embedding.null_label])
    cond, uncond = p.label_embedding(labels).detach().chunk(2)
    stream = StreamDiffusion(p, [10, 30], width=32, height=32, cfg_type="initialize")
    assert stream.latent_shape == (1, 32, 32)
    with pytest.raises(ValueError, match="prompt_embeds"):
        stream.prepare("three")
    stream.prepare(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=2.0)
    frame = torch.rand(1, 1, 32, 32)
    x = stream.preprocess(frame)
    assert rel(stream.encode_image(x), stream.schedule.alpha[0] * (frame * 2 - 1) +
               stream.schedule.beta[0] * stream.init_noise[:1]) <= REL
    out = stream(PIL.Image.fromarray((frame[0, 0].numpy() * 255).astype(np.uint8), mode="L"))
    assert out.shape == (1, 1, 32, 32)
    assert stream.txt2img().shape == (1, 1, 32, 32) and stream.ready


def test_txt2img_is_seeded(pipe):
    a, b = make_stream(pipe, [20, 35], seed=5), make_stream(pipe, [20, 35], seed=5)
    outs_a = [a.txt2img() for _ in range(3)]
    assert all(torch.equal(x, b.txt2img()) for x in outs_a)
    assert outs_a[-1].shape == (1, 3, SIZE, SIZE)


# ------------------------------------------------------------------------------------------ filter
def _drifting_frames(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Frames that change a little each step (cosine similarity to the previous ~0.97-0.999)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 16, 16, generator=g)
    out = []
    for _ in range(count):
        x = (x + 0.04 * torch.rand(1).item() * torch.randn(x.shape, generator=g)).clamp(0, 1)
        out.append(x * 2 - 1)
    return out


def test_filter_draws_and_decisions_equal_the_package():
    _package()
    from streamdiffusion.image_filter import SimilarImageFilter as PackageFilter

    frames = _drifting_frames(60)
    ours = SimilarImageFilter(threshold=0.98, max_skip_frame=1000, seed=7)
    pkg = PackageFilter(threshold=0.98, max_skip_frame=1000)
    random.seed(7)
    want = [pkg(f) is None for f in frames]
    random.seed(123)  # the global random stream does not matter to ours
    got = [ours.should_skip(f) for f in frames]
    assert got == want and 5 < sum(got) < 55  # both kinds of decision happen


def test_filter_forced_processing_and_counter_reset():
    same = [torch.ones(1, 3, 4, 4)] * 12
    f = SimilarImageFilter(threshold=0.98, max_skip_frame=3, seed=0)
    assert [f.should_skip(x) for x in same] == [False] + [True] * 4 + [False] + [True] * 4 + [False, True]
    # counter restarts on a naturally processed frame (the package keeps counting towards the forced one)
    f = SimilarImageFilter(threshold=0.98, max_skip_frame=3, seed=0)
    other = -torch.ones(1, 3, 4, 4)
    seq = [same[0], same[0], same[0], other, other, other, other, other, other]
    assert [f.should_skip(x) for x in seq] == [False, True, True, False, True, True, True, True, False]
    never = SimilarImageFilter(threshold=1.0, seed=0)
    assert not any(never.should_skip(x) for x in same)


def test_stream_filter_returns_previous_output_without_unet_or_sleep(pipe):
    stream = make_stream(pipe, [20, 35])
    stream.enable_similar_image_filter(threshold=0.98, max_skip_frame=2, seed=0)
    frame, other = images(2)
    first = stream(frame)
    calls = stream.stats.unet_calls
    t0 = time.perf_counter()
    again = [stream(frame) for _ in range(3)]  # identical frames: skipped (p = 1) up to max_skip_frame + 1 times
    elapsed = time.perf_counter() - t0
    assert all(a is first for a in again) and stream.stats.skipped == 3
    assert stream.stats.unet_calls == calls and elapsed < 0.5  # no UNet, no sleeping (the package sleeps)
    assert stream(frame) is not first and stream.stats.unet_calls == calls + 1  # forced after 3 skips in a row
    assert stream(other) is not first and stream.stats.unet_calls == calls + 2
    stream.disable_similar_image_filter()
    stream(other)
    assert stream.stats.unet_calls == calls + 3


# ------------------------------------------------------------------------------------------ frames
def test_frame_conversion_pil_numpy_tensor():
    arr = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    want = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(to_tensor(PIL.Image.fromarray(arr), 3), want)
    assert torch.allclose(to_tensor(arr, 3), want)
    assert torch.allclose(to_tensor(arr.astype(np.float32) / 255, 3), want)
    assert torch.allclose(to_tensor(want[0], 3), want)
    assert torch.allclose(to_tensor([PIL.Image.fromarray(arr)] * 2, 3), want.repeat(2, 1, 1, 1))
    gray = to_tensor(PIL.Image.fromarray(arr), 1)
    assert gray.shape == (1, 1, SIZE, SIZE)
    back = to_pil(want)[0]
    assert np.array_equal(np.asarray(back), arr)
    with pytest.raises(TypeError, match="PIL image"):
        to_tensor("frame.png", 3)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_construction_arguments(pipe):
    cases = [
        (dict(t_index_list=[]), "empty"),
        (dict(t_index_list=[30, 10]), "strictly increasing"),
        (dict(t_index_list=[10, 10]), "strictly increasing"),
        (dict(t_index_list=[-1]), ">= 0"),
        (dict(t_index_list=[10], cfg_type="half"), "unknown cfg_type"),
        (dict(t_index_list=[10], width=60), "multiples of the VAE"),
        (dict(t_index_list=[10], frame_buffer_size=0), "frame_buffer_size"),
        (dict(t_index_list=[10], torch_dtype=torch.float16), "move the pipeline"),
        (dict(t_index_list=10), "list of ints"),
    ]
    for kwargs, match in cases:
        kwargs = {"width": SIZE, "height": SIZE, **kwargs}
        with pytest.raises(ValueError, match=match):
            StreamDiffusion(pipe, **kwargs)


def test_bad_prepare_and_frames(pipe):
    stream = StreamDiffusion(pipe, [10, 49], width=SIZE, height=SIZE)
    with pytest.raises(HalodiffError, match="prepare"):
        stream.predict_x0(latents(1)[0])
    with pytest.raises(HalodiffError, match="prepare"):
        stream(images(1)[0])
    with pytest.raises(ValueError, match="< 40"):
        stream.prepare(prompt_embeds=COND, num_inference_steps=40)
    with pytest.raises(ValueError, match="guidance_scale"):
        stream.prepare(prompt_embeds=COND, guidance_scale=0.5)
    StreamDiffusion(pipe, [10], width=SIZE, height=SIZE, cfg_type="none").prepare(prompt_embeds=COND,
                                                                                   guidance_scale=0.5)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        StreamDiffusion(tiny_sd_pipeline(), [10], width=SIZE, height=SIZE, cfg_type="full").prepare(
            prompt_embeds=COND)
    with pytest.raises(ValueError, match="batch 1"):
        stream.prepare(prompt_embeds=COND.repeat(2, 1, 1))
    stream.prepare(prompt_embeds=COND)
    with pytest.raises(ValueError, match="resize them first"):
        stream(torch.rand(1, 3, SIZE, SIZE + 8))
    with pytest.raises(ValueError, match="frame_buffer_size=1"):
        stream(torch.rand(2, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="channel"):
        stream(torch.rand(1, 4, SIZE, SIZE))
    with pytest.raises(ValueError, match="expected latents of shape"):
        stream.predict_x0(torch.randn(1, 4, 8, 9))
    with pytest.raises(ValueError, match="threshold"):
        stream.enable_similar_image_filter(threshold=1.5)
    with pytest.raises(ValueError, match="init_process_group"):
        StreamDiffusion(pipe, [10], width=SIZE, height=SIZE, group=object())


def test_top_level_export():
    assert halodiff.StreamDiffusion is StreamDiffusion and "StreamDiffusion" in halodiff.__all__
