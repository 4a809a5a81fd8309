"""Transports without peers, for measuring one rank on one device."""
from __future__ import annotations

from .manager import CommManager


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
