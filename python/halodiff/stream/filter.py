"""Similarity filter: skip a frame that looks like the last processed one (StreamDiffusion's Stochastic
Similarity Filter).

The package's rule: ``cos`` = cosine similarity of the whole preprocessed frame with the last *processed* frame;
skip with probability ``p = max(0, 1 - (1 - cos) / (1 - threshold))`` (``threshold >= 1``: never skip), i.e. skip
when ``U(0, 1) <= p``; after more than ``max_skip_frame`` skips in a row the frame is processed anyway.

Differences from the package (`streamdiffusion.image_filter.SimilarImageFilter`):
- its own ``random.Random(seed)`` instead of the global ``random`` module, so a stream is reproducible and other
  code's random draws do not change which frames are skipped (the draws equal the package's after
  ``random.seed(seed)``);
- the skip counter restarts whenever a frame is processed; the package only resets it on a *forced* processing,
  so after a naturally processed frame it cut the next static stretch short.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass
class SimilarImageFilter:
    threshold: float = 0.98
    max_skip_frame: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold > 1:
            raise ValueError(f"similar image filter: threshold must be a cosine similarity <= 1 (1 = never skip); "
                             f"got {self.threshold!r}")
        if isinstance(self.max_skip_frame, bool) or not isinstance(self.max_skip_frame, (int, float)) \
                or self.max_skip_frame < 0:
            raise ValueError(f"similar image filter: max_skip_frame must be >= 0; got {self.max_skip_frame!r}")
        self.reset()

    def reset(self) -> None:
        """Forget the last processed frame, restart the skip counter and the random stream."""
        self._rng = random.Random(self.seed)
        self._prev: torch.Tensor | None = None
        self.skip_count = 0
        self.skipped = 0
        self.seen = 0

    def skip_probability(self, x: torch.Tensor) -> float:
        """The package's probability of skipping ``x`` (0 for the first frame)."""
        if self._prev is None or self.threshold >= 1:
            return 0.0
        cos = torch.nn.functional.cosine_similarity(self._prev.reshape(-1), x.reshape(-1), dim=0, eps=1e-6).item()
        return max(0.0, 1.0 - (1.0 - cos) / (1.0 - self.threshold))

    def should_skip(self, x: torch.Tensor) -> bool:
        """Decide for frame ``x`` (``[F, C, H, W]``); a processed frame becomes the new reference."""
        self.seen += 1
        if self._prev is not None:
            p = self.skip_probability(x)
            if self._rng.uniform(0, 1) <= p and self.skip_count <= self.max_skip_frame:
                self.skip_count += 1
                self.skipped += 1
                return True
        self.skip_count = 0
        self._prev = x.detach().clone()
        return False
