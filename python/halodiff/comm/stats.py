"""The one byte counter of halodiff's communication."""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("attention", "conv_halo", "groupnorm", "output")


@dataclass
class CommStats:
    """This rank's payload bytes to and from other ranks since the last reset.

    bytes_by_kind splits bytes_received into attention (K/V), conv_halo, groupnorm (sums) and
    output (the gathered prediction). Collectives count their logical payload: an all-gather
    receives the other ranks' parts; an all-reduce of S bytes counts S from each other rank.
    wait_s: host seconds spent waiting for communication (gloo and simulated links: the exposed
    communication time; on NCCL the waits are stream-ordered, so the host does not wait and this stays ~0:
    measure exposed time on the GPU timeline, e.g. step time vs a compute-only run).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    steps: int = 0
    wait_s: float = 0.0
    bytes_by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.messages = self.steps = 0
        self.wait_s = 0.0
        self.bytes_by_kind = dict.fromkeys(KINDS, 0)

    def add(self, kind: str, received: int, sent: int, messages: int = 1) -> None:
        self.bytes_received += int(received)
        self.bytes_sent += int(sent)
        self.messages += messages
        self.bytes_by_kind[kind] += int(received)
