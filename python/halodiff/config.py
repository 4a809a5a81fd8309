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
    timeout_s: the timeout of the process groups halodiff creates for the patch (every collective / send /
        receive on them). A dead or silent peer: on gloo the waiting rank raises CommTimeoutError after it; on
        NCCL the waits are stream-ordered (the host never blocks), and NCCL's watchdog aborts the process after
        it (TORCH_NCCL_ASYNC_ERROR_HANDLING).
    comm_checkpoint: async steps post the boundary data of every `comm_checkpoint` band layers as soon as
        those layers ran, so it travels while the rest of the forward computes (0: all at the end of the step).
    cuda_graphs: capture one CUDA graph per step kind after one eager step and replay it (CUDA only; falls
        back to eager with a warning where capture is impossible).
    """

    mode: str = "distrifusion"
    warmup_steps: int = 4
    halo_fraction: float = 0.3
    split_cfg: bool = True
    timeout_s: float = 600.0
    comm_checkpoint: int = 8
    cuda_graphs: bool = False

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
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"ParallelConfig.timeout_s must be > 0 seconds; got {self.timeout_s!r}")
        if isinstance(self.comm_checkpoint, bool) or not isinstance(self.comm_checkpoint, int) or self.comm_checkpoint < 0:
            raise ValueError("ParallelConfig.comm_checkpoint must be an int >= 0 (band layers per posted message; "
                             f"0 = post at the end of the step); got {self.comm_checkpoint!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"ParallelConfig.cuda_graphs must be a bool; got {type(self.cuda_graphs).__name__}")
