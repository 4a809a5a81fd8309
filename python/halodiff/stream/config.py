"""Settings of a StreamDiffusion stream, validated with errors that name the fix."""
from __future__ import annotations

from dataclasses import dataclass

CFG_TYPES = ("none", "full", "self", "initialize")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"StreamDiffusion: {name} must be an int >= 1; got {value!r}")


@dataclass(frozen=True)
class StreamConfig:
    """What :class:`~halodiff.StreamDiffusion` is built with (see its docstring)."""

    t_index_list: tuple[int, ...]
    width: int = 512
    height: int = 512
    frame_buffer_size: int = 1
    cfg_type: str = "self"
    use_denoising_batch: bool = True
    do_add_noise: bool = True

    def __post_init__(self) -> None:
        t = self.t_index_list
        if not t:
            raise ValueError("StreamDiffusion: t_index_list is empty; give one timestep index per denoising slot, "
                             "e.g. [32, 45] (indices into the LCM schedule of num_inference_steps steps)")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in t):
            raise ValueError(f"StreamDiffusion: t_index_list must hold ints >= 0; got {list(t)!r}")
        if any(b <= a for a, b in zip(t, t[1:])):
            raise ValueError(f"StreamDiffusion: t_index_list must be strictly increasing (slot 0 is the noisiest "
                             f"step); got {list(t)!r}, use {sorted(set(t))!r}")
        if self.cfg_type not in CFG_TYPES:
            raise ValueError(f"StreamDiffusion: unknown cfg_type {self.cfg_type!r}; choose one of "
                             f"{', '.join(CFG_TYPES)}")
        _positive_int("width", self.width)
        _positive_int("height", self.height)
        _positive_int("frame_buffer_size", self.frame_buffer_size)

    @property
    def n(self) -> int:
        """Denoising slots (UNet steps per frame)."""
        return len(self.t_index_list)

    def check_steps(self, num_inference_steps: int) -> None:
        _positive_int("num_inference_steps", num_inference_steps)
        if self.t_index_list[-1] >= num_inference_steps:
            raise ValueError(
                f"StreamDiffusion: t_index_list {list(self.t_index_list)} indexes the {num_inference_steps} timesteps "
                f"of num_inference_steps={num_inference_steps}: every index must be < {num_inference_steps}; raise "
                f"num_inference_steps or lower the indices")


@dataclass(frozen=True)
class Guidance:
    """prepare()'s guidance settings; ``scale`` is forced to 1 for cfg_type "none" (as the package)."""

    cfg_type: str
    scale: float
    delta: float

    def __post_init__(self) -> None:
        for name, v in (("guidance_scale", self.scale), ("delta", self.delta)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"StreamDiffusion.prepare: {name} must be a number; got {v!r}")
        if self.cfg_type != "none" and self.scale < 1:
            raise ValueError(f"StreamDiffusion.prepare: guidance_scale={self.scale} < 1 with cfg_type="
                             f"{self.cfg_type!r}; use guidance_scale >= 1 (1 = no guidance) or cfg_type='none'")

    @property
    def active(self) -> bool:
        """Whether guidance changes the prediction (the package's ``guidance_scale > 1``)."""
        return self.cfg_type != "none" and self.scale > 1

    @property
    def residual(self) -> bool:
        """RCFG: the uncond prediction comes from the stock noise."""
        return self.active and self.cfg_type in ("self", "initialize")

    @property
    def uncond_rows(self) -> str | None:
        """Extra UNet rows: "full" (all rows twice), "initialize" (slot 0 once more) or None."""
        return self.cfg_type if self.active and self.cfg_type in ("full", "initialize") else None
