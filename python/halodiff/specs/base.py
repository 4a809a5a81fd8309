"""A model spec: everything halodiff knows about one model family, mostly as data.

Features never name a model. They ask the spec of each denoiser (`halodiff.specs.spec_for`):
- which arguments hold the sample and the timestep, which kwargs carry full-size residuals from a ControlNet;
- the role of each layer (`Layer`): a k x k conv that needs halo rows, a GroupNorm that needs the image's
  sums, self-attention over the image tokens, joint attention (image + text tokens in one SDPA, text replicated
  on every rank), cross-attention (band-local). Layers a spec does not list are token-local: they run on the
  band as they are;
- where the band split happens: UNets split at their first conv, which reads the full (replicated) latent and
  writes its band's rows, and gather the rows of the prediction; DiTs split the token sequence right after the
  patch embedding (`TokenSplit`: position embeddings / RoPE tables sliced the same way) and gather the tokens
  before the final unpatchify (`TokenGather`). `grid` gives the DiT's token grid (rows x cols);
- the skip branches a cache may use: `Blocks` (a transformer's block lists, for the first-block cache) and
  `UNetLevels` (down / mid / up blocks, for DeepCache).

A family is one module in this package that defines a `ModelSpec` subclass and registers it with `register`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PatchError

ROLES = ("halo_conv", "group_norm", "self_attention", "joint_attention", "cross_attention")


@dataclass(frozen=True)
class Layer:
    """The role of one layer under patch parallelism.

    text: joint_attention only: where the text tokens sit in its SDPA sequence ("first" or "last"); their
        number is whatever the sequence holds beyond the band's image tokens.
    text_mask: joint_attention only: an SDPA mask, if the processor passes one, masks text keys only (the
        processor builds the image part as all-true), e.g. Qwen-Image's padded prompts.
    fuse_silu: group_norm only: the SiLU module that consumes the norm's output directly (fused into the norm).
    """

    role: str
    text: str | None = None
    text_mask: bool = False
    fuse_silu: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown layer role {self.role!r}; roles: {', '.join(ROLES)}")
        if (self.role == "joint_attention") != (self.text in ("first", "last")):
            raise ValueError("joint_attention layers need text='first' or 'last' (and only they)")


@dataclass(frozen=True)
class TokenSplit:
    """The output of submodule `module` holds the image tokens along `dim`, in row-major grid order: patch
    parallelism keeps this rank's band of token rows. `items`: for a tuple output, which items hold tokens
    (None: the output itself, or every item of a tuple). `text_first`: the token dim starts with the text
    tokens (a joint RoPE table): those are kept whole."""

    module: str
    dim: int = 1
    items: tuple[int, ...] | None = None
    text_first: bool = False


@dataclass(frozen=True)
class TokenGather:
    """The output of submodule `module` holds the band's image tokens along `dim`: patch parallelism gathers
    every band there, so what follows (the unpatchify) sees the whole sequence."""

    module: str
    dim: int = 1


@dataclass(frozen=True)
class Blocks:
    """A transformer's residual blocks, for caches that skip blocks.

    lists: names of the block ModuleLists in call order. hidden / encoder: index of hidden_states /
    encoder_hidden_states in a block's tuple output (hidden None: the block returns hidden_states alone;
    encoder None: no text stream). Blocks take them as the arguments named `hidden_states` and
    `encoder_hidden_states`."""

    lists: tuple[str, ...]
    hidden: int | None = None
    encoder: int | None = None


@dataclass(frozen=True)
class UNetLevels:
    """A UNet's down / mid / up block names, for DeepCache's skip branches."""

    down: str = "down_blocks"
    mid: str = "mid_block"
    up: str = "up_blocks"


def arg_index(module: nn.Module, name: str) -> int | None:
    """Position of argument `name` in `module.forward` (None if it is not a parameter)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return None
    return params.index(name) if name in params else None


def get_arg(module: nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    """Argument `name` of a `module.forward(*args, **kwargs)` call, positional or keyword (None if absent)."""
    if name in kwargs:
        return kwargs[name]
    i = arg_index(module, name)
    return args[i] if i is not None and i < len(args) else None


def attention_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """diffusers attention modules (anything with a swappable `processor`) under `module`, by name."""
    return [(n, m) for n, m in module.named_modules()
            if callable(getattr(m, "set_processor", None)) and getattr(m, "processor", None) is not None]


class ModelSpec:
    """Base of every family's spec; subclasses set the class attributes and override what differs."""

    family: str = ""
    classes: tuple[str, ...] = ()  # class names served (matched on the model's MRO; no diffusers import needed)
    predicts: bool = True  # the output is the step's prediction (False: conditioning, e.g. a ControlNet)
    tag: str = ""  # default denoiser tag for a bare model ("unet", "transformer", "controlnet")
    sample: str = "sample"
    timestep: str = "timestep"
    timestep_scale: float = 1.0  # the scheduler's timestep = the model's timestep argument x this (Flux: 1000)
    residuals: tuple[str, ...] = ()  # kwargs with full-size ControlNet residuals (cut to the band)
    unbatched: tuple[str, ...] = ()  # tensor kwargs without a batch dim (never cut by the CFG split)
    split: tuple[TokenSplit, ...] = ()  # empty: the UNet way (the first conv reads the full input)
    gather: TokenGather | None = None  # None: the prediction's rows are gathered at the model's output

    @property
    def tokens(self) -> bool:
        """The band split is over a token sequence (a DiT), not over the rows of conv feature maps."""
        return bool(self.split)

    def layers(self, module: nn.Module) -> dict[str, Layer]:
        """Role of every layer that needs other bands' data (qualified names); the rest is token-local."""
        return {}

    def grid(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int] | None:
        """The token grid (rows, cols) of this call (DiTs); None: measured from the layer shapes (UNets)."""
        return None

    def check(self, module: nn.Module) -> None:
        """Raise PatchError for a configuration of this family that patch parallelism cannot split."""

    def blocks(self, module: nn.Module) -> Blocks | None:
        """The residual blocks a block-skipping cache may use (None: this family has none)."""
        return None

    def unet_levels(self, module: nn.Module) -> UNetLevels | None:
        """The UNet levels DeepCache cuts (None: not a UNet)."""
        return None

    def children(self, module: nn.Module) -> list[tuple[str, nn.Module]] | None:
        """A container of denoisers (MultiControlNet): (tag suffix, net) of each; None for a plain model."""
        return None

    def prediction(self, output: Any) -> torch.Tensor:
        """The predicted sample in this model's output (tuple or `*Output` dataclass)."""
        return output[0] if isinstance(output, tuple) else output.sample

    def with_prediction(self, output: Any, sample: torch.Tensor) -> Any:
        if isinstance(output, tuple):
            return (sample, *output[1:])
        return type(output)(sample=sample)


def config_value(module: nn.Module, name: str, default: Any = None) -> Any:
    cfg = getattr(module, "config", None)
    return getattr(cfg, name, default) if cfg is not None else default


def require(cond: bool, message: str) -> None:
    if not cond:
        raise PatchError(message)
