"""Patch groups: which ranks share the work of one image and in which band order."""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """A patch group as seen by this rank: global ranks in band order and this rank's band index.
    group: the boundary data's process group; out_group: the same ranks for the gathered prediction (another
    NCCL communicator and stream, so the output does not queue behind boundary data still in flight)."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]
    index: int
    out_group: dist.ProcessGroup | None = None

    @property
    def n(self) -> int:
        return len(self.ranks)

    @property
    def up(self) -> int | None:
        return self.ranks[self.index - 1] if self.index > 0 else None

    @property
    def down(self) -> int | None:
        return self.ranks[self.index + 1] if self.index + 1 < self.n else None


def new_group(ranks: tuple[int, ...], timeout_s: float, device) -> dist.ProcessGroup:
    """A process group of `ranks` owned by halodiff (destroyed on unpatch).

    Created by its members only (`use_local_synchronization`: independent groups on other ranks may be created
    in any order), with `ParallelConfig.timeout_s` as the timeout of every operation on it, and initialised
    now rather than at the first step (a 1-element all-reduce on the model's device: NCCL builds its
    communicator lazily otherwise)."""
    kwargs = dict(timeout=datetime.timedelta(seconds=timeout_s), use_local_synchronization=True)
    if device is not None and device.type == "cuda":
        kwargs["device_id"] = device
    group = dist.new_group(list(ranks), **kwargs)
    probe = torch.zeros(1, device=device if device is not None else "cpu")
    dist.all_reduce(probe, group=group)
    return group


def destroy(groups: list) -> None:
    """Destroy halodiff's own groups (a communicator per group otherwise stays alive until the process ends)."""
    while groups:
        g = groups.pop()
        try:
            dist.destroy_process_group(g)
        except Exception:  # already torn down (e.g. the default group was destroyed first)
            pass
