"""Patch groups: which ranks share the work of one image and in which band order."""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """A patch group as seen by this rank: global ranks in band order and this rank's band index."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]
    index: int

    @property
    def n(self) -> int:
        return len(self.ranks)

    @property
    def up(self) -> int | None:
        return self.ranks[self.index - 1] if self.index > 0 else None

    @property
    def down(self) -> int | None:
        return self.ranks[self.index + 1] if self.index + 1 < self.n else None
