"""Frame conversion for streams: PIL / numpy / torch images in, ``[B, C, H, W]`` tensors in [0, 1] out, and back.

Inputs: a PIL image or a list of them; a numpy array ``[H, W]``, ``[H, W, C]`` or ``[B, H, W, C]`` (uint8 0..255 or
float 0..1); a torch tensor ``[C, H, W]`` or ``[B, C, H, W]`` in [0, 1] (uint8 tensors: 0..255). Frames are never
resized: a frame of another size is an error (see :func:`check_frames`).
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._optional import require

if TYPE_CHECKING:
    import PIL.Image


def _pil_mode(channels: int) -> str:
    return {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, "RGB")


def _is_pil(image: Any) -> bool:
    """Whether ``image`` is a PIL image, without importing PIL (a PIL image implies PIL is imported)."""
    mod = sys.modules.get("PIL.Image")
    return mod is not None and isinstance(image, mod.Image)


def _numpy_to_pt(arr: np.ndarray) -> torch.Tensor:
    """``[B, H, W(, C)]`` float arrays -> ``[B, C, H, W]`` tensors (as diffusers' VaeImageProcessor.numpy_to_pt)."""
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(arr.transpose(0, 3, 1, 2))


def to_tensor(image: Any, channels: int) -> torch.Tensor:
    """``image`` as a float32 ``[B, C, H, W]`` tensor in [0, 1] with ``channels`` channels (PIL converts)."""
    if _is_pil(image) or (isinstance(image, (list, tuple)) and image and all(_is_pil(i) for i in image)):
        images = [image] if _is_pil(image) else list(image)
        arr = np.stack([np.array(im.convert(_pil_mode(channels))).astype(np.float32) / 255.0 for im in images])
        return _numpy_to_pt(arr)
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        if arr.ndim == 2:
            arr = arr[None, :, :, None]
        elif arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"stream frame: numpy images must be [H, W], [H, W, C] or [B, H, W, C]; got shape "
                             f"{image.shape}")
        return _numpy_to_pt(arr)
    if isinstance(image, torch.Tensor):
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"stream frame: tensors must be [C, H, W] or [B, C, H, W]; got shape {tuple(image.shape)}")
        return x
    raise TypeError(f"stream frame: expected a PIL image, a list of PIL images, a numpy array or a torch tensor; "
                    f"got {type(image).__name__}")


def check_frames(x: torch.Tensor, frames: int, channels: int, height: int, width: int) -> None:
    """Raise ValueError naming the fix when ``x`` is not ``[frames, channels, height, width]``."""
    b, c, h, w = x.shape
    if (h, w) != (height, width):
        raise ValueError(f"stream frame is {w}x{h} (width x height) but the stream was built for {width}x{height}; "
                         f"frames are not resized: resize them first (e.g. PIL.Image.resize(({width}, {height}))) or "
                         f"build the stream with width={w}, height={h}")
    if c != channels:
        raise ValueError(f"stream frame has {c} channel(s) but the model takes {channels}; convert the frames "
                         f"(PIL images are converted automatically)")
    if b != frames:
        raise ValueError(f"stream got a batch of {b} frame(s) but frame_buffer_size={frames}; pass exactly "
                         f"{frames} frame(s) per call or build the stream with frame_buffer_size={b}")


def to_pil(images: torch.Tensor) -> list[PIL.Image.Image]:
    """``[B, C, H, W]`` images in [0, 1] -> PIL images (grayscale for one channel; needs pillow)."""
    image = require("PIL.Image", "stream output as PIL images (to_pil)")
    return [image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in to_uint8(images)]  # 2-D uint8: "L"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` images in [0, 1] -> ``[B, H, W, C]`` uint8 arrays."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
