"""StreamDiffusion (Kodaira et al. 2023) on an existing diffusers pipeline: docs/algorithms.md §6.

The stream holds the pipeline's parts (UNet, VAE, text encoder via ``pipe.encode_prompt``) and its own
``LCMScheduler.from_config(pipe.scheduler.config)``; it installs nothing on the pipeline. Every UNet call goes
through :meth:`StreamDiffusion._denoise` with a per-sample timestep tensor.

Same numbers as the ``streamdiffusion`` 0.1.1 package (``predict_x0_batch``) for every cfg_type with
``frame_buffer_size=1`` in batch mode, and its defects fixed:

- ``frame_buffer_size > 1`` with more than one slot (the package mixes slot and frame rows and fails);
- ``update_prompt`` keeps the uncond rows "full" / "initialize" need (the package drops them);
- sequential mode (``use_denoising_batch=False``) runs RCFG with the stock noise and re-noises each slot with that
  slot's ``init_noise`` like batch mode (the package kept a zero stock noise, drew fresh unseeded noise and
  overwrote ``init_noise`` with the input); its output equals batch mode's n-1 frames earlier;
- with one slot, RCFG "self" uses the frame's own noise as uncond prediction (the package carried the previous
  frame's last-slot correction over, and zeros on the first frame);
- full CFG in sequential mode works (the package raised a NameError);
- the scheduler config's ``clip_sample`` clips the x0 prediction as ``LCMScheduler.step`` does (the package
  ignores it; the digits model's scheduler sets it); latent channels come from the UNet config (the package
  hard-codes 4);
- the first n-1 outputs of batch mode come from the zero-initialised buffer: :attr:`StreamDiffusion.ready`
  tells, and ``halodiff.stream.run(..., align=True)`` drops them and flushes the pipeline at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._optional import require
from ..comm.slots import SlotComm, SlotRange, group_size
from ..errors import HalodiffError, PatchError
from ..runtime import runtime_of
from . import conditioning, io
from .config import Guidance, StreamConfig
from .filter import SimilarImageFilter
from .plan import SlotPlan, SlotSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class StreamStats:
    """Counters since the last ``prepare``: frames through ``__call__``/``txt2img``, frames the similarity filter
    skipped, UNet calls and UNet rows (batch entries)."""

    frames: int = 0
    skipped: int = 0
    unet_calls: int = 0
    unet_rows: int = 0


@dataclass
class EncodedFrame:
    """A frame after the input stage: skipped by the filter (this rank's decision), or its noisy latent."""

    skip: bool
    latent: torch.Tensor | None


class StreamDiffusion:
    """Streaming img2img / txt2img with Stream Batch, residual CFG and a similarity filter.

    Args:
        pipe: a diffusers pipeline with ``unet`` and ``scheduler`` (SD 1.x/2.x, SDXL, ...); ``vae`` optional
            (without one the UNet works in pixel space, like halodiff's digits model), any VAE incl.
            ``AutoencoderTiny``.
        t_index_list: one index into the LCM timesteps per denoising slot, strictly increasing (n slots).
        width, height: frame size in pixels (frames are not resized: another size is an error).
        frame_buffer_size: frames per call (F).
        cfg_type: "none", "full" (2n·F UNet rows), "self" (residual CFG from the stock noise, n·F rows) or
            "initialize" (as self, slot 0's uncond prediction computed: (n+1)·F rows).
        use_denoising_batch: Stream Batch (one UNet call per frame over all slots; the output lags the input by n-1
            frames) or sequential (n UNet calls per frame, no lag).
        do_add_noise: re-noise each slot's output with its slot noise before the next slot.
        torch_dtype: the stream's dtype; None = the UNet's (a different one is an error: move the pipeline).
        group: torch.distributed group whose ranks share the slots (None = the default group when initialised).
            With more than one rank each runs a contiguous range of slots (pipeline parallel); every rank must
            call the stream with the same frames and gets the same outputs.
    """

    def __init__(self, pipe: Any, t_index_list: list[int] | tuple[int, ...], width: int = 512, height: int = 512,
                 frame_buffer_size: int = 1, cfg_type: str = "self", use_denoising_batch: bool = True,
                 do_add_noise: bool = True, torch_dtype: torch.dtype | None = None, group=None) -> None:
        diffusers = require("diffusers", "StreamDiffusion (its LCM scheduler)")
        if not isinstance(t_index_list, (list, tuple)):
            raise ValueError(f"StreamDiffusion: t_index_list must be a list of ints; got {t_index_list!r}")
        self.config = StreamConfig(tuple(t_index_list), width, height, frame_buffer_size, cfg_type,
                                   bool(use_denoising_batch), bool(do_add_noise))
        self.unet = getattr(pipe, "unet", None)
        if self.unet is None or getattr(pipe, "scheduler", None) is None:
            raise ValueError("StreamDiffusion: pipe must have a .unet and a .scheduler (a diffusers pipeline)")
        self.pipe = pipe
        self.vae = getattr(pipe, "vae", None)
        self.device = self.unet.device
        self.dtype = torch_dtype or self.unet.dtype
        if self.dtype != self.unet.dtype:
            raise ValueError(f"StreamDiffusion: torch_dtype={self.dtype} but the UNet is {self.unet.dtype}; move the "
                             f"pipeline first (pipe.to(dtype={self.dtype})) or pass torch_dtype=None")
        self.latent_channels = self.unet.config.in_channels
        self.image_channels = self.vae.config.in_channels if self.vae is not None else self.latent_channels
        scale = self._vae_scale_factor()
        if width % scale or height % scale:
            raise ValueError(f"StreamDiffusion: width and height must be multiples of the VAE's scale factor {scale}; "
                             f"got {width}x{height}")
        self.latent_shape = (self.latent_channels, height // scale, width // scale)
        self.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
        sc = self.scheduler.config
        if sc.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"StreamDiffusion: prediction_type {sc.prediction_type!r} is not supported; supported: "
                             f"{', '.join(PREDICTION_TYPES)}")
        if sc.thresholding:
            raise ValueError("StreamDiffusion: the scheduler's dynamic thresholding is not supported; use a scheduler "
                             "config with thresholding=False")
        self._clip = float(sc.clip_sample_range) if sc.clip_sample else None  # as LCMScheduler.step
        n = self.config.n
        self.comm = SlotComm(group, n) if group_size(group) > 1 else None
        if self.comm is not None and not use_denoising_batch:
            raise ValueError("StreamDiffusion: use_denoising_batch=False runs a frame's slots one after another, so "
                             "there is nothing to spread over ranks; use use_denoising_batch=True with several ranks")
        self.slots: SlotRange = self.comm.slots if self.comm is not None else SlotRange(n, 1, 0, 0, n)
        self.filter: SimilarImageFilter | None = None
        self.stats = StreamStats()
        self._prepared = False

    # ----------------------------------------------------------------------------------- setup
    def _vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        factor = getattr(self.pipe, "vae_scale_factor", None)
        return int(factor) if factor else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def prepare(self, prompt: str | None = None, negative_prompt: str = "", num_inference_steps: int = 50,
                guidance_scale: float = 1.2, delta: float = 1.0, seed: int = 2, *,
                prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                pooled_prompt_embeds: torch.Tensor | None = None,
                negative_pooled_prompt_embeds: torch.Tensor | None = None) -> None:
        """Set the schedule, the slot noise (``randn((n·F, C, h, w))`` from ``Generator().manual_seed(seed)``, as
        the package) and the prompt; reset the stream (buffer, stock noise, filter, counters)."""
        cfg = self.config
        self._prepared = False  # until this prepare completes
        cfg.check_steps(num_inference_steps)
        self.guidance = Guidance(cfg.cfg_type, 1.0 if cfg.cfg_type == "none" else guidance_scale, delta)
        if self.comm is not None:
            self._refuse_patched_unet()
            self.comm.drain()
        self.scheduler.set_timesteps(num_inference_steps, self.device)
        self.schedule = SlotSchedule.build(self.scheduler, cfg.t_index_list, self.device, self.dtype)
        self._generator = torch.Generator().manual_seed(seed)
        F = cfg.frame_buffer_size
        self.init_noise = torch.randn((cfg.n * F, *self.latent_shape), generator=self._generator).to(
            device=self.device, dtype=self.dtype)
        if cfg.use_denoising_batch:  # one plan over this rank's slots, else one per slot
            ranges = [(self.slots.start, self.slots.stop)]
        else:
            ranges = [(i, i + 1) for i in range(cfg.n)]
        self._plans = [SlotPlan.build(self.schedule, a, b, F, self.guidance.uncond_rows, self.init_noise)
                       for a, b in ranges]
        self._set_prompt(conditioning.Prompt(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                             pooled_prompt_embeds, negative_pooled_prompt_embeds))
        rows = self.slots.count * F
        zeros = torch.zeros((rows, *self.latent_shape), device=self.device, dtype=self.dtype)
        self._next_latents = zeros  # this rank's slots' latents for their next slot (buffer)
        self._next_stock = zeros.clone()  # and their stock noise
        self._recv = torch.zeros((2 * F, *self.latent_shape), device=self.device, dtype=self.dtype)
        self._prev_output: torch.Tensor | None = None
        self.stats = StreamStats()
        if self.filter is not None:
            self.filter.reset()
        self._prepared = True

    def _refuse_patched_unet(self) -> None:
        """Slots across ranks + halodiff.patch on the same UNet would assemble bands of different slots."""
        from ..parallel import comm_stats

        try:
            comm_stats(self.unet)
        except PatchError:
            return
        raise PatchError(
            f"StreamDiffusion: this stream spreads its slots over {self.slots.world} ranks and halodiff.patch() also "
            "splits every UNet call of this pipeline over ranks; the two are not combined (each rank would assemble "
            "bands computed from other ranks' slots). Unpatch the pipeline (halodiff.unpatch), or keep the stream on "
            "one rank (group= a one-rank group) and patch across the ranks")

    def _set_prompt(self, p: conditioning.Prompt) -> None:
        cfg = self.config
        self._cond = conditioning.encode(self.pipe, self.unet, p, self.guidance.uncond_rows is not None, self.device,
                                         self.dtype, cfg.height, cfg.width)
        self._prompt = p
        for plan in self._plans:
            plan.condition(self._cond)

    @torch.no_grad()
    def update_prompt(self, prompt: str | None = None, negative_prompt: str | None = None, *,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      pooled_prompt_embeds: torch.Tensor | None = None,
                      negative_pooled_prompt_embeds: torch.Tensor | None = None) -> None:
        """Switch the prompt mid-stream (the buffer keeps going). The negative prompt / embeddings of ``prepare`` are
        kept unless given."""
        self._require_prepared()
        old = self._prompt
        keep_negative = negative_prompt is None and negative_prompt_embeds is None
        self._set_prompt(conditioning.Prompt(
            prompt, old.negative_prompt if negative_prompt is None else negative_prompt, prompt_embeds,
            old.negative_prompt_embeds if keep_negative else negative_prompt_embeds, pooled_prompt_embeds,
            old.negative_pooled_prompt_embeds if negative_pooled_prompt_embeds is None
            else negative_pooled_prompt_embeds))

    def enable_similar_image_filter(self, threshold: float = 0.98, max_skip_frame: int = 10, seed: int = 0) -> None:
        """Skip frames similar to the last processed one (returning the previous output); see ``filter.py``. With
        several ranks the first rank decides and tells the others."""
        self.filter = SimilarImageFilter(threshold, max_skip_frame, seed)

    def disable_similar_image_filter(self) -> None:
        self.filter = None

    @property
    def ready(self) -> bool:
        """Whether the last output came from a real frame (batch mode: not during the first n-1 frames)."""
        lag = self.config.n if self.config.use_denoising_batch else 1
        return self._prepared and self.stats.frames - self.stats.skipped >= lag

    def _require_prepared(self) -> None:
        if not self._prepared:
            raise HalodiffError("StreamDiffusion: call stream.prepare(prompt, ...) before streaming frames")

    # ------------------------------------------------------------------------------------ UNet
    def _denoise(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                 added_cond_kwargs: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """The only UNet call of the stream: ``x`` ``[B, C, h, w]``, ``t`` ``[B]`` (one timestep per row)."""
        self.stats.unet_calls += 1
        self.stats.unet_rows += x.shape[0]
        kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
        rt = runtime_of(self.unet)
        if rt is not None:  # features on this UNet (patch, DeepCache) learn that every row has its own timestep
            rt.stream_call()
        return self.unet(x, t, encoder_hidden_states=emb, return_dict=False, **kwargs)[0]

    def _run_plan(self, plan: SlotPlan, x: torch.Tensor, stock: torch.Tensor | None):
        """One UNet call over a slot range: (x0 of every row, next-slot latents, next-slot stock noise)."""
        g = self.guidance
        F = plan.frames
        inp = plan.expand(x)
        eps = self._denoise(inp, plan.t, plan.emb, plan.added)
        if self.scheduler.config.prediction_type == "v_prediction":
            eps = plan.alpha_in * eps + plan.beta_in * inp
        if plan.extra == "full":
            eps_u, eps_c = eps.chunk(2)
        elif plan.extra == "initialize":
            stock = torch.cat([eps[:F], stock[F:]])
            eps_c = eps[F:]
        else:
            eps_c = eps
        if g.residual:
            eps_u = stock * g.delta
        e = eps_u + g.scale * (eps_c - eps_u) if g.active else eps_c
        f_theta = (x - plan.beta * e) / plan.alpha
        if self._clip is not None:
            f_theta = f_theta.clamp(-self._clip, self._clip)
        x0 = plan.c_out * f_theta + plan.c_skip * x
        k = plan.next_rows
        if not k:
            return x0, None, None
        x_next = plan.alpha_next * x0[:k]
        if self.config.do_add_noise:
            x_next = x_next + plan.beta_next * plan.noise_next
        stock_next = None
        if g.residual:
            scaled = plan.beta[:k] * stock[:k]
            dx = plan.c_out[:k] * ((scaled - plan.beta[:k] * e[:k]) / plan.alpha[:k]) + plan.c_skip[:k] * scaled
            stock_next = plan.noise_next + (plan.alpha_next * dx) / plan.beta_next
        return x0, x_next, stock_next

    @torch.no_grad()
    def predict_x0(self, x_t: torch.Tensor | None) -> torch.Tensor:
        """The Stream Batch step on noisy latents ``[F, C, h, w]`` (at slot 0's timestep) -> denoised ``[F, C, h, w]``.

        Batch mode returns the frame that entered n-1 calls earlier (zeros-buffer warm-up first: see ``ready``).
        With several ranks only the first rank reads ``x_t`` (others may pass None); all return the same output.
        """
        self._require_prepared()
        F = self.config.frame_buffer_size
        if self.slots.first:
            if not isinstance(x_t, torch.Tensor) or tuple(x_t.shape) != (F, *self.latent_shape):
                got = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
                raise ValueError(f"StreamDiffusion.predict_x0: expected latents of shape {(F, *self.latent_shape)} "
                                 f"(frame_buffer_size, channels, height/scale, width/scale); got {got}")
            x_t = x_t.to(device=self.device, dtype=self.dtype)
        out = self._step_batch(x_t) if self.config.use_denoising_batch else self._step_sequential(x_t)
        self.stats.frames += 1
        return out

    def _step_sequential(self, x: torch.Tensor) -> torch.Tensor:
        stock = self.init_noise[: self.config.frame_buffer_size] if self.guidance.residual else None
        for plan in self._plans:
            x0, x, stock = self._run_plan(plan, x, stock)
        return x0

    def _step_batch(self, x_t: torch.Tensor | None) -> torch.Tensor:
        F = self.config.frame_buffer_size
        comm, plan = self.comm, self._plans[0]
        if comm is not None:
            comm.wait_boundary()  # the previous rank's latents (and stock) for my first slot
        x_in = x_t if self.slots.first else self._recv[:F]
        stock_in = self.init_noise[:F] if self.slots.first else self._recv[F:]
        keep = plan.rows - F  # rows of my slots after the first: from my own previous step
        x = torch.cat([x_in, self._next_latents[:keep]])
        stock = torch.cat([stock_in, self._next_stock[:keep]]) if self.guidance.residual else None
        x0, x_next, stock_next = self._run_plan(plan, x, stock)
        if x_next is not None:
            self._next_latents = x_next
        if stock_next is not None:
            self._next_stock = stock_next
        out = x0[-F:]
        if comm is not None:
            send = None
            if not self.slots.last:
                send = x_next[-F:] if stock_next is None else torch.cat([x_next[-F:], stock_next[-F:]])
            rows = F if not self.guidance.residual else 2 * F
            self._recv = None if self.slots.first else torch.empty((rows, *self.latent_shape), device=self.device,
                                                                   dtype=self.dtype)
            comm.exchange(send, self._recv)
            out = comm.broadcast_output(out.contiguous() if self.slots.last else torch.empty_like(out))
        return out

    # ------------------------------------------------------------------------------- images
    def preprocess(self, image: Any) -> torch.Tensor:
        """A frame (see ``io.py``) as ``[F, C, H, W]`` in [-1, 1] on the stream's device and dtype."""
        x = io.to_tensor(image, self.image_channels)
        io.check_frames(x, self.config.frame_buffer_size, self.image_channels, self.config.height, self.config.width)
        return (x * 2 - 1).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed frames -> slot 0's noisy latents ``alpha_0 * z + beta_0 * init_noise[:F]``. The VAE's
        posterior mean is used (deterministic; the package samples it)."""
        self._require_prepared()
        if self.vae is None:
            z = x
        else:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

            z = retrieve_latents(self.vae.encode(x.to(self.vae.dtype)), sample_mode="argmax")
            shift = getattr(self.vae.config, "shift_factor", None)
            z = (z - shift if shift else z) * self.vae.config.scaling_factor
        F = self.config.frame_buffer_size
        return self.schedule.alpha[0] * z.to(self.dtype) + self.schedule.beta[0] * self.init_noise[:F]

    @torch.no_grad()
    def decode_image(self, x0: torch.Tensor) -> torch.Tensor:
        """Denoised latents -> images ``[F, C, H, W]`` in [0, 1]."""
        if self.vae is None:
            img = x0
        else:
            shift = getattr(self.vae.config, "shift_factor", None)
            z = x0.to(self.vae.dtype) / self.vae.config.scaling_factor
            img = self.vae.decode(z + shift if shift else z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    # The three stages of a frame; `run` puts each on its own thread, __call__ runs them in turn.
    def encode_frame(self, image: Any) -> EncodedFrame:
        """Input stage: preprocess, similarity filter (first rank), VAE encode (first rank only)."""
        self._require_prepared()
        x = self.preprocess(image)
        skip = self.filter.should_skip(x) if self.filter is not None and self.slots.first else False
        latent = self.encode_image(x) if self.slots.first and not skip else None
        return EncodedFrame(skip, latent)

    def denoise_frame(self, frame: EncodedFrame) -> torch.Tensor | None:
        """UNet stage: the denoised latents, or None for a frame the filter skipped (agreed across ranks)."""
        skip = frame.skip
        if self.filter is not None and self.comm is not None:
            skip = self.comm.agree(skip, self.device)
        if skip:
            self.stats.frames += 1
            self.stats.skipped += 1
            return None
        return self.predict_x0(frame.latent)

    def decode_frame(self, x0: torch.Tensor | None) -> torch.Tensor:
        """Output stage: decoded images, or the previous output again for a skipped frame."""
        if x0 is None:
            return self._prev_output
        self._prev_output = self.decode_image(x0)
        return self._prev_output

    def __call__(self, image: Any) -> torch.Tensor:
        """img2img: one call per F frames -> images ``[F, C, H, W]`` in [0, 1] (lagging n-1 calls in batch mode)."""
        return self.decode_frame(self.denoise_frame(self.encode_frame(image)))

    @torch.no_grad()
    def txt2img(self) -> torch.Tensor:
        """txt2img: slot 0 gets pure noise (drawn from the prepare seed's generator) -> images ``[F, C, H, W]``."""
        self._require_prepared()
        x = torch.randn((self.config.frame_buffer_size, *self.latent_shape), generator=self._generator)
        x0 = self.predict_x0(x.to(device=self.device, dtype=self.dtype))
        self._prev_output = self.decode_image(x0)
        return self._prev_output
