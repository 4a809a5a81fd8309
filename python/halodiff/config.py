"""User-facing configuration dataclasses, validated on construction with clear errors."""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("sync", "distrifusion", "pcpp")


@dataclass
class ParallelConfig:
    """Patch-parallel settings for `halodiff.patch`.

    mode: "sync" (fresh boundary data every step; equals one device), "distrifusion" (sync warm-up,
        then stale boundary data exchanged asynchronously), "pcpp" (as distrifusion, but self-attention
        sees only `halo_fraction` of each neighbouring band, and only those rows travel).
    warmup_steps: steps run in sync mode before switching to stale (async) exchange.
    halo_fraction: pcpp only: fraction p of a neighbour band's rows attended to (ceil(p*h) rows), in [0, 1].
    split_cfg: with an even number of ranks and an even UNet batch (classifier-free guidance), half of
        the ranks compute each half of the batch (uncond / cond), each half patch-parallel.
    timeout_s: how long a rank waits for a peer before raising CommTimeoutError.
    """

    mode: str = "distrifusion"
    warmup_steps: int = 4
    halo_fraction: float = 0.3
    split_cfg: bool = True
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"ParallelConfig.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"ParallelConfig.warmup_steps must be an int >= 0; got {self.warmup_steps!r}")
        if isinstance(self.halo_fraction, bool) or not isinstance(self.halo_fraction, (int, float)) or not (
            0.0 <= float(self.halo_fraction) <= 1.0
        ):
            raise ValueError(f"ParallelConfig.halo_fraction must be a number in [0, 1]; got {self.halo_fraction!r}")
        self.halo_fraction = float(self.halo_fraction)
        if not isinstance(self.split_cfg, bool):
            raise TypeError(f"ParallelConfig.split_cfg must be a bool; got {type(self.split_cfg).__name__}")
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"ParallelConfig.timeout_s must be > 0 seconds; got {self.timeout_s!r}")
