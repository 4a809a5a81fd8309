"""Denoiser adapters: the one place that knows how a pipeline's denoisers are called.

`denoisers(pipe)` finds the networks that run once per denoising step (the UNet, a ControlNet, every net of
a MultiControlNet; a `torch.compile`d model is unwrapped to the module it compiles) and describes each with a
`Denoiser`: the names of its sample/timestep arguments, the residual kwargs it accepts, where its prediction
sits in its output, and whether its output is the step's prediction (a UNet) or conditioning for another
denoiser (a ControlNet). Features (patch parallelism, DeepCache, streams) use these instead of hard-coding
UNet details; a DiT adapter later adds its own `Denoiser` kind without touching them.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
import weakref
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PatchError

UNET_RESIDUAL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual",
                        "down_intrablock_additional_residuals")


def unwrap(module: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper (OptimizedModule) compiles, else `module` itself."""
    return getattr(module, "_orig_mod", module)


def _arg_index(module: nn.Module, name: str) -> int | None:
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return None
    return params.index(name) if name in params else None


@dataclass
class Denoiser:
    """One network called once per denoising step.

    tag: "unet", "controlnet" or "controlnet.<i>" (names in messages and per-denoiser state).
    module: where hooks and overrides go (the compiled module's original for `torch.compile`d models).
    predicts: its output is the step's prediction (the UNet) rather than conditioning residuals (ControlNet).
    """

    tag: str
    module_: InitVar[nn.Module]
    predicts: bool
    sample_name: str = "sample"
    timestep_name: str = "timestep"
    residual_kwargs: tuple[str, ...] = ()
    _positions: dict[str, int | None] = field(default_factory=dict, repr=False)
    _ref: weakref.ReferenceType | None = field(default=None, repr=False)

    def __post_init__(self, module_: nn.Module) -> None:
        self._ref = weakref.ref(module_)  # weak: the runtime must not keep a dropped pipeline alive
        for name in (self.sample_name, self.timestep_name):
            self._positions[name] = _arg_index(module_, name)

    @property
    def module(self) -> nn.Module:
        return self._ref()

    def _get(self, name: str, args: tuple, kwargs: dict) -> Any:
        i = self._positions.get(name)
        if i is not None and i < len(args):
            return args[i]
        return kwargs.get(name)

    def sample(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        s = self._get(self.sample_name, args, kwargs)
        return s if isinstance(s, torch.Tensor) else None

    def timestep(self, args: tuple, kwargs: dict) -> Any:
        return self._get(self.timestep_name, args, kwargs)

    def guess_mode(self, kwargs: dict) -> bool:
        """A ControlNet in guess mode sees only the conditional half of a CFG batch."""
        return not self.predicts and kwargs.get("guess_mode") is True

    @staticmethod
    def prediction(output: Any) -> torch.Tensor:
        """The predicted sample of a UNet output (tuple or `*Output` dataclass)."""
        return output[0] if isinstance(output, tuple) else output.sample

    @staticmethod
    def with_prediction(output: Any, sample: torch.Tensor) -> Any:
        if isinstance(output, tuple):
            return (sample, *output[1:])
        return type(output)(sample=sample)



def denoisers(pipe: Any, feature: str = "halodiff") -> list[Denoiser]:
    """The denoisers of a diffusers pipeline, or of a bare UNet passed as `pipe`."""
    if isinstance(pipe, nn.Module):
        return [Denoiser("unet", unwrap(pipe), True, residual_kwargs=UNET_RESIDUAL_KWARGS)]
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise PatchError(f"{feature}: {type(pipe).__name__} has no .unet; pass a diffusers UNet pipeline "
                         "(StableDiffusion*, StableDiffusionXL*, ControlNet pipelines) or a UNet2DConditionModel")
    found = [Denoiser("unet", unwrap(unet), True, residual_kwargs=UNET_RESIDUAL_KWARGS)]
    controlnet = getattr(pipe, "controlnet", None)
    if isinstance(controlnet, nn.Module):
        nets = getattr(unwrap(controlnet), "nets", None)
        if isinstance(nets, nn.ModuleList):
            found += [Denoiser(f"controlnet.{i}", unwrap(n), False) for i, n in enumerate(nets)]
        else:
            found.append(Denoiser("controlnet", unwrap(controlnet), False))
    return found


def unet_of(pipe: Any, feature: str = "halodiff") -> nn.Module:
    """The pipeline's UNet (unwrapped from torch.compile)."""
    return denoisers(pipe, feature)[0].module


def scheduler_source(pipe: Any, scheduler: Any = None) -> Callable[[], Any]:
    """A callable returning the scheduler whose timesteps drive the denoisers: `scheduler` if given, else the
    pipeline's current `.scheduler` (read on every call, since users swap schedulers)."""
    if scheduler is not None:
        return lambda: scheduler
    if isinstance(pipe, nn.Module):
        return lambda: None
    ref = weakref.ref(pipe)
    return lambda: getattr(ref(), "scheduler", None) if ref() is not None else None


def latent_scale(pipe: Any) -> int | None:
    """Pixels per latent row (the VAE's downscale factor), for messages; None for a bare denoiser."""
    if isinstance(pipe, nn.Module):
        return None
    factor = getattr(pipe, "vae_scale_factor", None)
    return int(factor) if isinstance(factor, int) and factor > 0 else None


def norm_act_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(GroupNorm, SiLU) submodule names where the norm's output goes straight into the activation, so the
    activation can be fused into the norm: diffusers' ResnetBlock2D (norm1 -> nonlinearity; norm2 ->
    nonlinearity unless a scale-shift time embedding sits between them) and the UNet's conv_norm_out -> conv_act."""
    pairs = []
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        act = getattr(m, "nonlinearity", None)
        if isinstance(act, nn.SiLU) and hasattr(m, "time_embedding_norm"):
            if isinstance(getattr(m, "norm1", None), nn.GroupNorm):
                pairs.append((prefix + "norm1", prefix + "nonlinearity"))
            if isinstance(getattr(m, "norm2", None), nn.GroupNorm) and m.time_embedding_norm == "default":
                pairs.append((prefix + "norm2", prefix + "nonlinearity"))
        if isinstance(getattr(m, "conv_norm_out", None), nn.GroupNorm) and isinstance(getattr(m, "conv_act", None),
                                                                                        nn.SiLU):
            pairs.append((prefix + "conv_norm_out", prefix + "conv_act"))
    return pairs
