"""Denoiser adapters: how features call what the model specs (`halodiff.specs`) found in a pipeline.

`denoisers(pipe)` lists the networks that run once per denoising step (the UNet or transformer, a ControlNet,
every net of a MultiControlNet; a `torch.compile`d model is unwrapped to the module it compiles), each as a
`Denoiser`: its tag, its spec (argument names, residual kwargs, output layout, layer roles) and whether its
output is the step's prediction or conditioning for another denoiser. Features use these instead of knowing a
model; a new family is a new spec module, nothing here.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch
from torch import nn

from ..specs import ModelSpec, find_denoisers
from ..specs.base import arg_index


def unwrap(module: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper (OptimizedModule) compiles, else `module` itself."""
    return getattr(module, "_orig_mod", module)


@dataclass
class Denoiser:
    """One network called once per denoising step.

    tag: "unet", "transformer", "controlnet" or "controlnet.<i>" (names in messages and per-denoiser state).
    module: where hooks and overrides go (the compiled module's original for `torch.compile`d models).
    spec: the model spec of its family.
    """

    tag: str
    module_: InitVar[nn.Module]
    spec: ModelSpec
    _positions: dict[str, int | None] = field(default_factory=dict, repr=False)
    _ref: weakref.ReferenceType | None = field(default=None, repr=False)

    def __post_init__(self, module_: nn.Module) -> None:
        self._ref = weakref.ref(module_)  # weak: the runtime must not keep a dropped pipeline alive
        for name in (self.spec.sample, self.spec.timestep):
            self._positions[name] = arg_index(module_, name)

    @property
    def module(self) -> nn.Module:
        return self._ref()

    @property
    def predicts(self) -> bool:
        """Its output is the step's prediction (the UNet / transformer) rather than conditioning (ControlNet)."""
        return self.spec.predicts

    @property
    def residual_kwargs(self) -> tuple[str, ...]:
        return self.spec.residuals

    def _get(self, name: str, args: tuple, kwargs: dict) -> Any:
        i = self._positions.get(name)
        if i is not None and i < len(args):
            return args[i]
        return kwargs.get(name)

    def sample(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        s = self._get(self.spec.sample, args, kwargs)
        return s if isinstance(s, torch.Tensor) else None

    def timestep(self, args: tuple, kwargs: dict) -> Any:
        return self._get(self.spec.timestep, args, kwargs)

    def guess_mode(self, kwargs: dict) -> bool:
        """A ControlNet in guess mode sees only the conditional half of a CFG batch."""
        return not self.predicts and kwargs.get("guess_mode") is True

    def prediction(self, output: Any) -> torch.Tensor:
        """The predicted sample of an output (tuple or `*Output` dataclass)."""
        return self.spec.prediction(output)

    def with_prediction(self, output: Any, sample: torch.Tensor) -> Any:
        return self.spec.with_prediction(output, sample)


def denoisers(pipe: Any, feature: str = "halodiff") -> list[Denoiser]:
    """The denoisers of a diffusers pipeline, or of a bare model passed as `pipe` (PatchError if none is known)."""
    return [Denoiser(tag, module, spec) for tag, module, spec in find_denoisers(pipe, feature)]


def predictor_of(pipe: Any, feature: str = "halodiff") -> Denoiser:
    """The denoiser whose output is the step's prediction (the UNet / transformer)."""
    return next(d for d in denoisers(pipe, feature) if d.predicts)


def unet_of(pipe: Any, feature: str = "halodiff") -> nn.Module:
    """The pipeline's predicting denoiser module (UNet or transformer; unwrapped from torch.compile)."""
    return predictor_of(pipe, feature).module


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
