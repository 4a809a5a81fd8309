"""Model specs: one module per model family, registered by class name; the only code that knows a model.

    unet2d.py      UNet2DConditionModel (SD1.5 / SD2.x / SDXL), UNetMotionModel, ControlNetModel, MultiControlNetModel
    sd3.py         SD3Transformer2DModel (SD3 / SD3.5: joint attention, dual-attention layers)
    flux.py        FluxTransformer2DModel (Flux.1: double- and single-stream blocks, RoPE from img_ids)
    pixart.py      PixArtTransformer2DModel (PixArt-alpha / Sigma: self + cross attention)
    qwen_image.py  QwenImageTransformer2DModel (Qwen-Image: joint attention, RoPE from img_shapes)

`spec_for(module)` finds the spec of a model (walking its class's MRO, so subclasses are served too);
`find_denoisers(pipe)` the denoisers of a pipeline. Adding a family: a new module here that subclasses
`ModelSpec` and calls `register`, imported below.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import PatchError
from .base import Blocks, Layer, ModelSpec, TokenGather, TokenSplit, UNetLevels

_SPECS: dict[str, ModelSpec] = {}  # class name -> spec

# Pipeline components that are denoisers (called once per step); any other component (VAE, text encoders,
# image encoders, adapters called once per generation) is not touched.
DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2", "controlnet")


def register(spec: ModelSpec) -> ModelSpec:
    for name in spec.classes:
        if name in _SPECS and _SPECS[name] is not spec:
            raise ValueError(f"halodiff.specs: {name} is already served by the {_SPECS[name].family} spec")
        _SPECS[name] = spec
    return spec


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)


def spec_for(module: nn.Module) -> ModelSpec | None:
    """The spec serving `module`'s class (or its nearest registered base class), or None."""
    for cls in type(_unwrap(module)).__mro__:
        spec = _SPECS.get(cls.__name__)
        if spec is not None:
            return spec
    return None


def supported() -> dict[str, list[str]]:
    """Family -> the class names its spec serves."""
    out: dict[str, list[str]] = {}
    for name, spec in _SPECS.items():
        out.setdefault(spec.family, []).append(name)
    return out


def _unsupported(module: nn.Module, feature: str, where: str) -> PatchError:
    families = "; ".join(f"{fam}: {', '.join(names)}" for fam, names in supported().items())
    return PatchError(f"{feature}: {where}{type(_unwrap(module)).__name__} has no halodiff model spec, so it cannot "
                      f"be split or cached (it would run unchanged). Supported families — {families}")


def _components(pipe: Any) -> list[tuple[str, Any]]:
    comps = getattr(pipe, "components", None)
    if isinstance(comps, dict):
        return [(n, comps[n]) for n in DENOISER_COMPONENTS if n in comps] + \
               [(n, m) for n, m in comps.items() if n not in DENOISER_COMPONENTS]
    return [(n, getattr(pipe, n, None)) for n in DENOISER_COMPONENTS]


def find_denoisers(pipe: Any, feature: str = "halodiff") -> list[tuple[str, nn.Module, ModelSpec]]:
    """(tag, module, spec) of every denoiser of a pipeline, predicting ones first; a bare model is its own.

    A torch.compile'd model is unwrapped to the module it compiles. A denoiser component without a spec is a
    PatchError naming its class and the supported families (never a silent unsplit run)."""
    if isinstance(pipe, nn.Module):
        spec = spec_for(pipe)
        if spec is None:
            raise _unsupported(pipe, feature, "")
        return _expand(spec.tag or "model", _unwrap(pipe), spec)
    found: list[tuple[str, nn.Module, ModelSpec]] = []
    for name, comp in _components(pipe):
        if not isinstance(comp, nn.Module):
            continue
        spec = spec_for(comp)
        if spec is None:
            if name in DENOISER_COMPONENTS:
                raise _unsupported(comp, feature, f"the pipeline's .{name} ({type(pipe).__name__}): ")
            continue
        found += _expand(name, _unwrap(comp), spec)
    if not any(spec.predicts for _, _, spec in found):
        raise PatchError(f"{feature}: {type(pipe).__name__} has no denoiser halodiff knows (.unet / .transformer "
                         f"of a supported family: {', '.join(supported())}); pass a diffusers pipeline or the model")
    found.sort(key=lambda f: not f[2].predicts)  # stable: predicting denoisers first, then conditioning ones
    return found


def _expand(tag: str, module: nn.Module, spec: ModelSpec) -> list[tuple[str, nn.Module, ModelSpec]]:
    kids = spec.children(module)
    if kids is None:
        return [(tag, module, spec)]
    out = []
    for suffix, net in kids:
        sub = spec_for(net)
        if sub is None:
            raise _unsupported(net, "halodiff", f"{tag}.{suffix}: ")
        out += _expand(f"{tag}.{suffix}", _unwrap(net), sub)
    return out


from . import flux, pixart, qwen_image, sd3, unet2d  # noqa: E402,F401  (each registers its spec)

__all__ = ["Blocks", "Layer", "ModelSpec", "TokenGather", "TokenSplit", "UNetLevels", "find_denoisers", "register",
           "spec_for", "supported"]
