"""Point-to-point traffic of a StreamDiffusion stream whose denoising slots live on several ranks.

Pipeline parallel over slots (docs/algorithms.md §6, halodiff's own): rank r of the group holds a contiguous range of the
n slots (:func:`split_slots`). Per frame every rank runs its own slots' UNet rows, then

- sends the latent its last slot hands to the next slot (and that slot's stock noise, for RCFG) to rank r+1 and
  receives the same from rank r-1 (:meth:`SlotComm.exchange`, posted asynchronously; the next frame waits for it
  in :meth:`SlotComm.wait_boundary`, so the transfer overlaps the output broadcast and the VAE work);
- receives the denoised output of the frame from the last rank (:meth:`SlotComm.broadcast_output`).

Waits are ``work.wait()`` without a timeout: on NCCL that only makes the compute stream wait (no host sync in the
step path). A dead or silent peer:

- gloo: the wait fails once the process group's timeout (``init_process_group(timeout=...)``) has passed, or as
  soon as the peer's connection closes; :class:`~halodiff.errors.CommTimeoutError` is raised naming the step.
- NCCL: a stream-ordered wait cannot time out on the host; NCCL's watchdog aborts the communicator after the
  process group's timeout and (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, default on) tears the process down. Set the
  timeout in ``init_process_group``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CommTimeoutError
from .stats import CommStats

SLOT_KINDS = ("latents", "output", "filter")
_BOUNDARY = "slot boundary latents from/to a neighbour rank"


@dataclass(frozen=True)
class SlotRange:
    """The slots ``[start, stop)`` of one rank (``index`` in its group of ``world``) out of ``n``."""

    n: int
    world: int
    index: int
    start: int
    stop: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.world - 1

    @property
    def count(self) -> int:
        return self.stop - self.start


def split_slots(n: int, world: int, index: int) -> SlotRange:
    """Contiguous, balanced slot ranges (the first ``n % world`` ranks hold one more)."""
    if world < 1 or not 0 <= index < world:
        raise ValueError(f"rank index {index} is not in a group of {world} ranks")
    if n < world:
        raise ValueError(
            f"StreamDiffusion across ranks: {n} denoising slot(s) (len(t_index_list)) cannot be spread over {world} "
            f"ranks; every rank needs at least one slot: use a t_index_list with >= {world} entries or a group of "
            f"<= {n} ranks (group=...)")
    base, extra = divmod(n, world)
    start = index * base + min(index, extra)
    return SlotRange(n, world, index, start, start + base + (1 if index < extra else 0))


def group_size(group) -> int:
    """Ranks in ``group`` (None = the default group); 1 without an initialised torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("StreamDiffusion: group= was given but torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first or pass group=None")
        return 1
    return dist.get_world_size(group)


class SlotComm:
    """This rank's link to its neighbours in the slot pipeline (one instance per stream)."""

    def __init__(self, group, n: int) -> None:
        self.group = group
        world = dist.get_world_size(group)
        index = dist.get_rank(group)
        self.slots = split_slots(n, world, index)
        self.ranks = tuple(dist.get_global_rank(group, i) if group is not None else i for i in range(world))
        self.stats = CommStats(bytes_by_kind=dict.fromkeys(SLOT_KINDS, 0))
        self._boundary: list = []

    @property
    def prev(self) -> int | None:
        return self.ranks[self.slots.index - 1] if not self.slots.first else None

    @property
    def next(self) -> int | None:
        return self.ranks[self.slots.index + 1] if not self.slots.last else None

    @contextmanager
    def _failures(self, what: str):
        """A failed post or wait (gloo: peer gone, or the process group's timeout passed) -> CommTimeoutError."""
        try:
            yield
        except RuntimeError as exc:
            raise CommTimeoutError(
                f"halodiff stream: {what}: a peer rank did not answer within the process group's timeout or failed "
                f"({exc}). A rank may have died; check every rank's log. The timeout is init_process_group(timeout=)."
            ) from exc

    def _wait(self, works: list, what: str) -> None:
        with self._failures(what):
            for w in works:
                w.wait()

    def exchange(self, send: torch.Tensor | None, recv: torch.Tensor | None) -> None:
        """Post this frame's boundary message: ``send`` to the next rank, ``recv`` from the previous one."""
        self.wait_boundary()
        ops = []
        if send is not None and self.next is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), self.next, self.group))
            self.stats.add("latents", 0, send.numel() * send.element_size())
        if recv is not None and self.prev is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group))
            self.stats.add("latents", recv.numel() * recv.element_size(), 0)
        with self._failures(_BOUNDARY):
            self._boundary = dist.batch_isend_irecv(ops) if ops else []

    def wait_boundary(self) -> None:
        """Wait for the last posted boundary message (its receive buffer is then valid)."""
        works, self._boundary = self._boundary, []
        self._wait(works, _BOUNDARY)

    def _broadcast(self, t: torch.Tensor, src: int, what: str) -> None:
        with self._failures(what):
            work = dist.broadcast(t, src, group=self.group, async_op=True)
        self._wait([work], what)

    def broadcast_output(self, out: torch.Tensor) -> torch.Tensor:
        """The last rank's ``out`` on every rank (``out`` is the receive buffer elsewhere)."""
        nbytes = out.numel() * out.element_size()
        if self.slots.last:
            self.stats.add("output", 0, nbytes * (self.slots.world - 1))
        else:
            self.stats.add("output", nbytes, 0)
        self._broadcast(out, self.ranks[-1], "output broadcast from the last slot's rank")
        return out

    def agree(self, flag: bool, device: torch.device) -> bool:
        """The first rank's ``flag`` on every rank (one decision for the similarity filter; a host read)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        self.stats.add("filter", 0 if self.slots.first else 4, 4 * (self.slots.world - 1) if self.slots.first else 0)
        self._broadcast(t, self.ranks[0], "similarity-filter decision from the first rank")
        return bool(t.item())

    def drain(self) -> None:
        """Wait for anything still in flight (before the stream is re-prepared or dropped)."""
        self.wait_boundary()
