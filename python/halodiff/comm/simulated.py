"""Transports without peers, for measuring one rank on one process.

`SimulatedComm` sends nothing and completes at once: one rank's compute and bytes (multi-GPU projections).
`SimulatedLink` also sends nothing, but every message occupies one serial link for latency + bytes / bandwidth
(FIFO) and a wait blocks until the message would have arrived: the compute runs meanwhile, so a step's wall
time shows how much communication its schedule exposes (bench/overlap.py).
"""
from __future__ import annotations

import time

import torch

from .manager import CommManager
from .stats import CommStats


class SimulatedComm(CommManager):
    """Plays one rank of an N-rank group on a single device: buffers, packing, counting and waits happen
    exactly as in a real run, but nothing is sent (received buffers keep whatever they hold). Used to
    time one rank's compute and count its bytes for multi-GPU projections (bench/project_gpus.py)."""

    def _start_all_reduce(self, t, group) -> list:
        return []

    def _start_all_gather(self, out, inp, group) -> list:
        return []

    def _p2p(self, topo, sends, recvs) -> list:
        return []


class _LinkWork:
    """A message on the simulated link: done at `done_at` (time.perf_counter seconds)."""

    def __init__(self, done_at: float):
        self.done_at = done_at

    def wait(self) -> bool:
        delay = self.done_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return True


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class SimulatedLink(SimulatedComm):
    """One rank of an `n`-rank group behind a link of `bandwidth` bytes/s and `latency_s` per message.

    Message times (ring algorithms): all-reduce of S bytes 2(n-1)/n·S, all-gather the (n-1) other parts,
    a batch of neighbour sends/receives max(sent, received) bytes. The link carries one message at a time per
    process group: boundary data in order, the gathered prediction (its own group) beside it."""

    def __init__(self, stats: CommStats, checkpoint: int, n: int, bandwidth: float, latency_s: float = 20e-6):
        super().__init__(stats, checkpoint)
        if bandwidth <= 0 or latency_s < 0 or n < 2:
            raise ValueError(f"SimulatedLink needs bandwidth > 0, latency_s >= 0 and n >= 2; got {bandwidth}, "
                             f"{latency_s}, {n}")
        self.n, self.bandwidth, self.latency_s = n, float(bandwidth), float(latency_s)
        self.free_at = {"step": 0.0, "output": 0.0}  # the output gather has its own group (NCCL stream)
        self._lane = "step"
        self.busy_s = 0.0  # total link time of the messages posted

    def _occupy(self, nbytes: float) -> list:
        duration = self.latency_s + nbytes / self.bandwidth
        start = max(time.perf_counter(), self.free_at[self._lane])
        self.free_at[self._lane] = start + duration
        self.busy_s += duration
        return [_LinkWork(start + duration)]

    def gather_bands(self, *args, **kwargs):
        self._lane = "output"
        try:
            return super().gather_bands(*args, **kwargs)
        finally:
            self._lane = "step"

    def _start_all_reduce(self, t, group) -> list:
        return self._occupy(2 * (self.n - 1) / self.n * _nbytes(t))

    def _start_all_gather(self, out, inp, group) -> list:
        return self._occupy(_nbytes(out) - _nbytes(inp))

    def _p2p(self, topo, sends, recvs) -> list:
        sent = sum(_nbytes(t) for t, peer in sends if peer is not None)
        received = sum(_nbytes(t) for t, peer in recvs if peer is not None)
        return self._occupy(max(sent, received)) if sent or received else []
