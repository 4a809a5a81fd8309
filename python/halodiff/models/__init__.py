"""Small models shipped with halodiff (imported lazily to keep ``import halodiff.models`` cheap)."""

from __future__ import annotations

import importlib
from typing import Any

_DIGITS_NAMES = (
    "DigitClassifier",
    "DigitsPipeline",
    "LabelEmbedding",
    "digits_unet_config",
    "load_digits_pipeline",
    "DIGITS_MODEL_DIR",
)
_DIGITS_DIT_NAMES = (
    "DigitsDiTPipeline",
    "digits_dit_config",
    "load_digits_dit_pipeline",
    "DIGITS_DIT_MODEL_DIR",
)
__all__ = list(_DIGITS_NAMES) + list(_DIGITS_DIT_NAMES)


def __getattr__(name: str) -> Any:
    if name in _DIGITS_NAMES:
        return getattr(importlib.import_module(".digits", __name__), name)
    if name in _DIGITS_DIT_NAMES:
        return getattr(importlib.import_module(".digits_dit", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
