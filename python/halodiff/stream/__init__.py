"""StreamDiffusion for diffusers pipelines: Stream Batch, residual CFG, similarity filter, I/O queue, slots across
ranks (docs/algorithms.md §6)."""
from .config import CFG_TYPES, StreamConfig
from .filter import SimilarImageFilter
from .io import to_pil, to_tensor, to_uint8
from .runner import UpdatePrompt, run
from .stream import StreamDiffusion, StreamStats

__all__ = ["CFG_TYPES", "SimilarImageFilter", "StreamConfig", "StreamDiffusion", "StreamStats", "UpdatePrompt", "run",
           "to_pil", "to_tensor", "to_uint8"]
