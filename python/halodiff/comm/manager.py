"""The comm manager: the only code that talks to torch.distributed for patch parallelism.

Designed for NCCL (one GPU per rank), tested on gloo:
- Every wait is `work.wait()` without a timeout: on NCCL that makes only the compute stream wait (no host
  sync); the timeout is the process group's (halodiff creates its patch groups with `ParallelConfig.timeout_s`).
- Sync steps exchange when a layer needs the data and wait for it (`exchange_rows`, `all_reduce_sums`,
  `all_gather`, `gather_bands`).
- Async steps read the previous step's data from static slots (`stale_rows`, `stale_sums`), copy this step's
  data into the same slots as soon as a layer has consumed its stale data (`queue_rows`, `queue_sums`: only a
  GroupNorm's own [B, G, 2] sums are kept as they are), and post it in checkpoints during the forward (every `checkpoint` layers, or where a
  layer is skipped, e.g. on DeepCache partial steps): the transfers overlap the rest of the forward.
  `end_step` posts the remainder. A message is waited for where the next step first reads its data
  (`arrive`), so transfers also overlap the end of this step and the start of the next; with `join_at_end`
  (CUDA-graph mode) every message is joined before the forward returns, so a step is self-contained.
- All buffers of a layout are allocated once per input signature (`set_layout`): fixed addresses, no
  allocation per step.
Every byte this rank receives from / sends to other ranks is counted in one `CommStats`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import CommTimeoutError
from .stats import CommStats
from .topology import Topology


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group):
    """Async all-gather of 1-D tensors (`all_gather_single` where torch has it, else the older name)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=True)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass(frozen=True)
class RowSpec:
    """A layer whose boundary rows travel to / from the neighbour bands (conv halos, PCPP K/V rows).

    lead: leading dims of its input viewed as [*lead, rows, row_len]; send_up/send_down: rows this band sends
    to the band above / below; recv_up/recv_down: rows it receives from them."""

    key: str
    kind: str
    lead: tuple[int, ...]
    row_len: int
    send_up: int
    send_down: int
    recv_up: int
    recv_down: int


@dataclass(frozen=True)
class SumSpec:
    """A GroupNorm whose [B, G, 2] float64 sums are all-reduced over the patch group."""

    key: str
    shape: tuple[int, ...]


@dataclass
class _RowSlot:
    index: int
    spec: RowSpec
    offsets: tuple[int, int, int, int]  # into send_up, send_down, recv_up, recv_down
    send_up: torch.Tensor | None
    send_down: torch.Tensor | None
    recv_up: torch.Tensor | None
    recv_down: torch.Tensor | None


@dataclass
class _SumSlot:
    index: int
    offset: int
    glob: torch.Tensor  # all-reduced in place
    local: torch.Tensor | None = None  # this band's own sums of the same step (the op's output, kept)


@dataclass
class _Layout:
    """Static exchange buffers of one input signature: a slot per band layer, in call order."""

    topo: Topology
    rows: dict[str, _RowSlot]
    row_order: list[_RowSlot]
    row_ends: list[tuple[int, int, int, int]]  # cumulative element offsets after each row slot
    sums: dict[str, _SumSlot]
    sum_order: list[_SumSlot]
    buffers: dict[str, torch.Tensor | None]
    esize: int  # bytes per element of the row buffers


class _Message:
    """The works of one posted message; waited for once (a gloo P2P work must not be waited twice)."""

    def __init__(self, works: list, what: str):
        self.works, self.what = list(works), what

    def wait(self, comm: CommManager) -> None:
        works, self.works = self.works, []
        for w in works:
            comm.wait(w, self.what)


@dataclass
class _Pending:
    start: int = -1
    end: int = -1  # slot indices [start, end) queued and not posted

    def __bool__(self) -> bool:
        return self.end > self.start


def _views(flat: torch.Tensor | None, offset: int, lead: tuple[int, ...], rows: int, row_len: int):
    if flat is None or rows == 0:
        return None
    n = math.prod(lead) * rows * row_len
    return flat[offset: offset + n].view(*lead, rows, row_len)


class CommManager:
    """Per patched denoiser: its exchange buffers, posted work and counters."""

    def __init__(self, stats: CommStats, checkpoint: int = 8):
        self.stats = stats
        self.checkpoint = checkpoint  # layers per posted message in async steps (0: post everything at the end)
        self.layout: _Layout | None = None
        self._sync_bufs: dict[tuple, torch.Tensor] = {}
        self._inflight: list[_Message] = []  # every posted message not known to be complete
        self._by_key: dict[str, _Message] = {}  # layer -> the message carrying its data for the next step
        self.join_at_end = False
        self._deferred: list[tuple] = []  # all-gathers posted by end_step (checkpoint == 0)
        self._rows_pending = _Pending()
        self._sums_pending = _Pending()
        self.sending = False  # this async step sends its data (False on the last step)
        self.timeout_s: float | None = None  # the process groups' timeout (for messages)

    # ------------------------------------------------------------------------------------ basics
    def wait(self, work, what: str) -> None:
        """Stream-ordered wait (NCCL: the compute stream waits, the host does not); errors name the cause."""
        t0 = time.perf_counter()
        try:
            work.wait()
        except Exception as exc:  # gloo: a dead or silent peer fails the op after the group's timeout
            limit = f"timeout_s={self.timeout_s:g}s" if self.timeout_s is not None else "the process group's timeout"
            raise CommTimeoutError(
                f"halodiff: {what}: a peer rank did not answer within {limit} or failed "
                f"({type(exc).__name__}: {str(exc)[:300]}). A rank may have died; check every rank's log. Raise "
                "ParallelConfig.timeout_s for very slow steps."
            ) from exc
        finally:
            self.stats.wait_s += time.perf_counter() - t0

    def join(self) -> None:
        """Wait for everything posted (a new generation, unpatch; every step with join_at_end)."""
        inflight, self._inflight = self._inflight, []
        self._by_key.clear()
        for msg in inflight:
            msg.wait(self)

    def arrive(self, key: str) -> None:
        """Wait for the message that carries `key`'s data of the previous step (if still in flight)."""
        msg = self._by_key.pop(key, None)
        if msg is not None:
            msg.wait(self)

    def _posted(self, works: list, what: str, keys) -> None:
        if not works:
            return
        msg = _Message(works, what)
        self._inflight = [m for m in self._inflight if m.works]  # drop the ones waited for meanwhile
        self._inflight.append(msg)
        for key in keys:
            self._by_key[key] = msg

    def reset(self) -> None:
        """A new generation starts with sync steps: nothing may stay in flight."""
        self._deferred.clear()
        self.join()
        self._rows_pending = _Pending()
        self._sums_pending = _Pending()

    def _sync_buf(self, key: tuple, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        buf = self._sync_bufs.get(key)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_zeros(shape)  # once per shape (zeros: simulated ranks read them as peers' data)
            self._sync_bufs[key] = buf
        return buf

    # ------------------------------------------------------------ torch.distributed primitives
    # The only calls into torch.distributed; each starts async work and returns its handles.
    # `SimulatedComm` / `SimulatedLink` override these to project multi-GPU runs on one process.
    def _start_all_reduce(self, t: torch.Tensor, group) -> list:
        return [dist.all_reduce(t, group=group, async_op=True)]

    def _start_all_gather(self, out: torch.Tensor, inp: torch.Tensor, group) -> list:
        return [_all_gather_flat(out, inp, group)]

    def _p2p(self, topo: Topology, sends: list[tuple[torch.Tensor | None, int | None]],
             recvs: list[tuple[torch.Tensor | None, int | None]]) -> list:
        ops_ = [dist.P2POp(dist.isend, t, peer, topo.group) for t, peer in sends
                if peer is not None and t is not None and t.numel()]
        ops_ += [dist.P2POp(dist.irecv, t, peer, topo.group) for t, peer in recvs
                 if peer is not None and t is not None and t.numel()]
        return dist.batch_isend_irecv(ops_) if ops_ else []

    # ------------------------------------------------------------------------------------ layout
    def set_layout(self, rows: list[RowSpec], sums: list[SumSpec], like: torch.Tensor, topo: Topology) -> None:
        """Allocate the static slots of every band layer (call order) for one input signature."""
        self.join()
        up, down = topo.up is not None, topo.down is not None
        counts = [0, 0, 0, 0]
        ends, offsets = [], []
        for s in rows:
            n = math.prod(s.lead) * s.row_len
            offsets.append(tuple(counts))
            counts = [counts[0] + n * s.send_up * up, counts[1] + n * s.send_down * down,
                      counts[2] + n * s.recv_up * up, counts[3] + n * s.recv_down * down]
            ends.append(tuple(counts))
        names = ("send_up", "send_down", "recv_up", "recv_down")
        bufs: dict[str, torch.Tensor | None] = {
            name: like.new_zeros(c) if c else None for name, c in zip(names, counts)}
        total = sum(math.prod(s.shape) for s in sums)
        bufs["sums"] = like.new_zeros(total, dtype=torch.float64) if total else None
        row_slots = []
        for i, (s, off) in enumerate(zip(rows, offsets)):
            row_slots.append(_RowSlot(
                i, s, off,
                _views(bufs["send_up"], off[0], s.lead, s.send_up * up, s.row_len),
                _views(bufs["send_down"], off[1], s.lead, s.send_down * down, s.row_len),
                _views(bufs["recv_up"], off[2], s.lead, s.recv_up * up, s.row_len),
                _views(bufs["recv_down"], off[3], s.lead, s.recv_down * down, s.row_len)))
        sum_slots, o = [], 0
        for i, s in enumerate(sums):
            n = math.prod(s.shape)
            sum_slots.append(_SumSlot(i, o, bufs["sums"][o: o + n].view(s.shape)))
            o += n
        self.layout = _Layout(topo, {s.spec.key: s for s in row_slots}, row_slots, ends,
                              {s.key: slot for s, slot in zip(sums, sum_slots)}, sum_slots, bufs, like.element_size())
        self._rows_pending = _Pending()
        self._sums_pending = _Pending()

    def _row_range(self, start: int, end: int) -> tuple[list[int], list[int]]:
        ends = self.layout.row_ends
        first = [0, 0, 0, 0] if start == 0 else list(ends[start - 1])
        return first, list(ends[end - 1])

    # ----------------------------------------------------------------------------- collectives
    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, topo: Topology, kind: str, *,
                   payload_received: int, payload_sent: int, key: str | None = None) -> None:
        """Gather `inp` of every rank into `out` ([n, *inp.shape], contiguous); payload_* are the unpadded
        bytes for the counter. With `key`: posted for the next step, which waits for it in `arrive(key)`."""
        if key is not None and not self.checkpoint:  # everything of the step is posted when it ends
            self._deferred.append((out, inp, topo, kind, payload_received, payload_sent, key))
            return
        self._all_gather(out, inp, topo, kind, payload_received, payload_sent, key)

    def _all_gather(self, out, inp, topo: Topology, kind: str, received: int, sent: int, key: str | None) -> None:
        works = self._start_all_gather(out.view(-1), inp.view(-1), topo.group)
        self.stats.add(kind, received, sent, messages=len(works))
        if key is not None:
            self._posted(works, f"all-gather ({kind}, {key})", (key,))
            return
        for w in works:
            self.wait(w, f"all-gather ({kind})")

    def gather_bands(self, band: torch.Tensor, heights: Sequence[int], topo: Topology, kind: str) -> torch.Tensor:
        """All-gather [..., h_i, W] bands of unequal heights (dim -2) into the full [..., Σh_i, W] tensor."""
        hmax = max(heights)
        send = self._sync_buf(("gather_send", kind), (*band.shape[:-2], hmax, band.shape[-1]), band)
        send[..., : band.shape[-2], :].copy_(band)
        recv = self._sync_buf(("gather_recv", kind), (topo.n, *send.shape), band)
        row = _nbytes(band) // max(band.shape[-2], 1)
        # on its own group (its own NCCL stream): it must not queue behind the boundary data still in flight
        works = self._start_all_gather(recv.view(-1), send.view(-1), topo.out_group)
        self.stats.add(kind, row * (sum(heights) - band.shape[-2]), _nbytes(band) * (topo.n - 1), messages=len(works))
        for w in works:
            self.wait(w, f"all-gather ({kind})")
        return torch.cat([recv[i, ..., :h, :] for i, h in enumerate(heights)], dim=-2)

    def all_gather_batch(self, t: torch.Tensor, group: dist.ProcessGroup | None, n: int, kind: str) -> torch.Tensor:
        """Concatenate equal-shape tensors of the `n` ranks of `group` along dim 0."""
        out = self._sync_buf(("batch", kind), (n * t.shape[0], *t.shape[1:]), t)
        works = self._start_all_gather(out.view(-1), t.contiguous().view(-1), group)
        self.stats.add(kind, _nbytes(t) * (n - 1), _nbytes(t) * (n - 1), messages=len(works))
        for w in works:
            self.wait(w, f"all-gather ({kind})")
        return out

    # ------------------------------------------------------------------------- neighbour rows
    def _copy_rows(self, slot: _RowSlot, x: torch.Tensor) -> None:
        h = x.shape[-2]
        if slot.send_up is not None:
            slot.send_up.copy_(x[..., : slot.send_up.shape[-2], :])
        if slot.send_down is not None:
            slot.send_down.copy_(x[..., h - slot.send_down.shape[-2]:, :])

    def exchange_rows(self, key: str, x: torch.Tensor, topo: Topology) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Sync: send this band's boundary rows, receive the neighbours' (into the slot, where the next async
        step finds them) and wait. x: [*lead, rows, row_len]."""
        self.arrive(key)
        slot = self.layout.rows[key]
        self._copy_rows(slot, x)
        works = self._p2p(topo, [(slot.send_up, topo.up), (slot.send_down, topo.down)],
                          [(slot.recv_up, topo.up), (slot.recv_down, topo.down)])
        self.stats.add(slot.spec.kind, _nbytes(slot.recv_up) + _nbytes(slot.recv_down),
                       _nbytes(slot.send_up) + _nbytes(slot.send_down), messages=len(works))
        for w in works:
            self.wait(w, f"halo exchange ({slot.spec.kind}, {key})")
        return slot.recv_up, slot.recv_down

    def has_rows(self, key: str) -> bool:
        """Whether layer `key` has slots in the neighbour messages of the current layout."""
        return self.layout is not None and key in self.layout.rows

    def recv_slots(self, key: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The [*lead, rows, row_len] receive slots (from the band above, below) of a layer."""
        slot = self.layout.rows[key]
        return slot.recv_up, slot.recv_down

    def stale_rows(self, key: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The neighbour rows of the last step that exchanged them (waits for their message if needed)."""
        self.arrive(key)
        return self.recv_slots(key)

    def send_slots(self, key: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The [*lead, rows, row_len] send slots (to the band above, below) of a layer, to fill in place."""
        slot = self.layout.rows[key]
        return slot.send_up, slot.send_down

    def queue_rows(self, key: str, topo: Topology, x: torch.Tensor | None = None) -> None:
        """Async: copy this band's boundary rows of x ([*lead, rows, row_len]) into the slot (or the caller
        filled `send_slots` itself); they are posted at the next checkpoint."""
        if not self.sending:
            return
        slot = self.layout.rows[key]
        if x is not None:
            self._copy_rows(slot, x)
        self._add(self._rows_pending, slot.index, topo, self._post_rows)

    # ----------------------------------------------------------------------------- group sums
    def all_reduce_sums(self, key: str, local: torch.Tensor, topo: Topology) -> torch.Tensor:
        """Sync: this band's GroupNorm sums -> the image's (kept with the band's own for the next step)."""
        self.arrive(key)
        slot = self.layout.sums[key]
        slot.local = local
        slot.glob.copy_(local)
        works = self._start_all_reduce(slot.glob, topo.group)
        self.stats.add("groupnorm", _nbytes(slot.glob) * (topo.n - 1), _nbytes(slot.glob) * (topo.n - 1),
                       messages=len(works))
        for w in works:
            self.wait(w, f"all-reduce (groupnorm, {key})")
        return slot.glob

    def stale_sums(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(image sums, this band's sums) of the last step that exchanged them (waits for their message)."""
        self.arrive(key)
        slot = self.layout.sums[key]
        return slot.glob, slot.local

    def queue_sums(self, key: str, local: torch.Tensor, topo: Topology) -> None:
        if not self.sending:
            return
        slot = self.layout.sums[key]
        slot.local = local
        slot.glob.copy_(local)
        self._add(self._sums_pending, slot.index, topo, self._post_sums)

    # ------------------------------------------------------------------------------- posting
    def _add(self, pend: _Pending, index: int, topo: Topology, post) -> None:
        if pend and index != pend.end:  # a skipped layer: post what is contiguous so far
            post(topo)
        if not pend:
            pend.start = pend.end = index
        pend.end = index + 1
        if self.checkpoint and pend.end - pend.start >= self.checkpoint:
            post(topo)

    def _post_rows(self, topo: Topology) -> None:
        pend = self._rows_pending
        if not pend:
            return
        b = self.layout.buffers
        (s0, s1, s2, s3), (e0, e1, e2, e3) = self._row_range(pend.start, pend.end)
        part = lambda name, a, z: b[name][a:z] if b[name] is not None and z > a else None  # noqa: E731
        sends = [(part("send_up", s0, e0), topo.up), (part("send_down", s1, e1), topo.down)]
        recvs = [(part("recv_up", s2, e2), topo.up), (part("recv_down", s3, e3), topo.down)]
        works = self._p2p(topo, sends, recvs)
        esize = self.layout.esize
        for slot in self.layout.row_order[pend.start: pend.end]:
            self.stats.add(slot.spec.kind, _nbytes(slot.recv_up) + _nbytes(slot.recv_down), 0, messages=0)
        self.stats.bytes_sent += ((e0 - s0) + (e1 - s1)) * esize
        self.stats.messages += len(works)
        self._posted(works, "neighbour message (conv halos / K/V rows)",
                     [s.spec.key for s in self.layout.row_order[pend.start: pend.end]])
        self._rows_pending = _Pending()

    def _post_sums(self, topo: Topology) -> None:
        pend = self._sums_pending
        if not pend:
            return
        first, last = self.layout.sum_order[pend.start], self.layout.sum_order[pend.end - 1]
        chunk = self.layout.buffers["sums"][first.offset: last.offset + last.glob.numel()]
        works = self._start_all_reduce(chunk, topo.group)
        self.stats.add("groupnorm", _nbytes(chunk) * (topo.n - 1), _nbytes(chunk) * (topo.n - 1), messages=len(works))
        self._posted(works, "all-reduce (groupnorm sums)",
                     [k for k, s in self.layout.sums.items() if pend.start <= s.index < pend.end])
        self._sums_pending = _Pending()

    def start_step(self, sending: bool) -> None:
        """An async step begins; `sending` is False on the last step (its data would never be read)."""
        self.sending = sending

    def end_step(self, topo: Topology) -> None:
        """End of a step: post what is still queued (joined here with `join_at_end`, else where it is read)."""
        if self.sending:
            deferred, self._deferred = self._deferred, []
            for args in deferred:
                self._all_gather(*args)
            self._post_rows(topo)
            self._post_sums(topo)
        self.sending = False
        if self.join_at_end:
            self.join()
