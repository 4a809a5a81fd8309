"""The exact strategy (`mode="sync"`, and every warm-up step of the stale modes): fresh boundary data every step.

A strategy is policy only: for each layer kind ("conv", "groupnorm", "attention") it names the mechanism
(`parallel/layers/*.py`) a step uses: "fresh" (exchanged where the layer needs it and waited for on the spot),
"stale" (the previous step's data, this step's posted asynchronously) or "partial" (PCPP's neighbour rows).
Sync uses "fresh" everywhere, so it equals one device. The engine picks the strategy once, at `patch()`.
"""
from __future__ import annotations

KINDS = ("conv", "groupnorm", "attention")


class Sync:
    stale = False  # does any step use the previous step's data?
    partial_attention = False  # does any step need PCPP's neighbour-row slots for attention?

    def __init__(self, config) -> None:
        self.config = config

    def is_sync(self, steps_since_reset: int) -> bool:
        """Whether a step exchanges fresh data (`steps_since_reset` steps after a new generation)."""
        return True

    def mechanism(self, kind: str, sync: bool) -> str:
        """The mechanism layers of `kind` use in a step (`sync`: a fresh-data step)."""
        return "fresh"
