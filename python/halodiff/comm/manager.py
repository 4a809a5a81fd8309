"""The comm manager: the only code that talks to torch.distributed for patch parallelism.

- Sync steps exchange right away and block (`exchange_rows`, `all_reduce_sum`, `all_gather`).
- Async steps read the *stale* data of the previous step (`stale_rows`, `stale_sums`) and queue
  this step's data (`queue_rows`, `queue_sums`); `flush` sends the queue at the end of the step as
  one P2P message per neighbour (all rows packed by one `halo_pack` launch into a cached flat
  buffer) plus one all-reduce of all GroupNorm sums. The next step waits for them only where used.
- Every byte this rank receives from / sends to other ranks is counted in one `CommStats`.
"""
from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import ops
from ..errors import CommTimeoutError
from .stats import KINDS, CommStats
from .topology import Topology


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group):
    """Async all-gather of 1-D tensors (`all_gather_single` where torch has it, else the older name)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=True)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class _Pending:
    """Handles of one posted message; waited for once, on first use."""

    def __init__(self, works: list, what: str, comm: CommManager):
        self.works, self.what, self.comm = works, what, comm

    def wait(self) -> None:
        if self.works:
            works, self.works = self.works, []
            for w in works:
                self.comm.wait(w, self.what)


@dataclass
class _RowEntry:
    key: str
    tensor: torch.Tensor  # viewed as [..., rows, row_len]
    send_up: int
    send_down: int
    recv_up: int
    recv_down: int
    kind: str


@dataclass
class _RowLayout:
    """Cached buffers of one step-message layout (same layers, same shapes): no allocation per step."""

    send: torch.Tensor
    n_send_up: int
    recv_up: torch.Tensor | None
    recv_down: torch.Tensor | None
    views: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
    recv_bytes_by_kind: dict[str, int]
    pending: _Pending | None = None  # the last message sent from / received into these buffers


class CommManager:
    """Per-patch comm state: stale buffers, queued step data, cached message layouts, the byte counter."""

    def __init__(self, stats: CommStats, timeout_s: float):
        self.stats = stats
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self._rows: dict[str, tuple[torch.Tensor | None, torch.Tensor | None, _Pending | None]] = {}
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor, _Pending | None]] = {}
        self._row_queue: list[_RowEntry] = []
        self._sum_queue: list[tuple[str, torch.Tensor]] = []
        self._row_layouts: dict[tuple, _RowLayout] = {}
        self._sum_layouts: dict[tuple, tuple[torch.Tensor, _Pending | None]] = {}
        self._sync_bufs: dict[tuple, torch.Tensor] = {}
        self._pending: list[_Pending] = []

    # ------------------------------------------------------------------------------------ basics
    def wait(self, work, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except RuntimeError as exc:
            raise CommTimeoutError(
                f"halodiff: {what}: a peer rank did not answer within timeout_s={self.timeout_s:g}s or failed "
                f"({exc}). A rank may have died; check every rank's log. Raise ParallelConfig.timeout_s for "
                "very slow steps."
            ) from exc
        if ok is False:
            raise CommTimeoutError(f"halodiff: {what}: timed out after {self.timeout_s:g}s waiting for a peer rank")

    def drain(self) -> None:
        """Wait for everything in flight (before reuse of buffers, at a new generation, at unpatch)."""
        pending, self._pending = self._pending, []
        for p in pending:
            p.wait()

    def reset(self) -> None:
        """Forget all stale state (a new generation starts with sync steps)."""
        self.drain()
        self._rows.clear()
        self._sums.clear()
        self._row_queue.clear()
        self._sum_queue.clear()

    def _sync_buf(self, key: tuple, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        buf = self._sync_bufs.get(key)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(shape)
            self._sync_bufs[key] = buf
        return buf

    # ------------------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: torch.Tensor, topo: Topology, kind: str, *, async_op: bool = False):
        works = self._start_all_reduce(t, topo.group)
        self.stats.add(kind, _nbytes(t) * (topo.n - 1), _nbytes(t) * (topo.n - 1))
        pending = _Pending(works, f"all-reduce ({kind})", self)
        if async_op:
            return pending
        pending.wait()
        return None

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, topo: Topology, kind: str, *,
                   payload_received: int, payload_sent: int, async_op: bool = False):
        """Gather `inp` of every rank into `out` ([n, *inp.shape], contiguous); payload_* are the unpadded
        bytes for the counter."""
        works = self._start_all_gather(out.view(-1), inp.view(-1), topo.group)
        self.stats.add(kind, payload_received, payload_sent)
        pending = _Pending(works, f"all-gather ({kind})", self)
        if async_op:
            self._pending = [p for p in self._pending if p.works]
            self._pending.append(pending)
            return pending
        pending.wait()
        return None

    def gather_bands(self, band: torch.Tensor, heights: Sequence[int], topo: Topology, kind: str) -> torch.Tensor:
        """All-gather [..., h_i, W] bands of unequal heights (dim -2) into the full [..., Σh_i, W] tensor."""
        hmax = max(heights)
        send = self._sync_buf(("gather_send", kind), (*band.shape[:-2], hmax, band.shape[-1]), band)
        send[..., : band.shape[-2], :].copy_(band)
        recv = self._sync_buf(("gather_recv", kind), (topo.n, *send.shape), band)
        row = _nbytes(band) // max(band.shape[-2], 1)
        self.all_gather(recv, send, topo, kind, payload_received=row * (sum(heights) - band.shape[-2]),
                        payload_sent=_nbytes(band) * (topo.n - 1))
        return torch.cat([recv[i, ..., :h, :] for i, h in enumerate(heights)], dim=-2)

    def all_gather_batch(self, t: torch.Tensor, group: dist.ProcessGroup | None, n: int, kind: str) -> torch.Tensor:
        """Concatenate equal-shape tensors of the `n` ranks of `group` along dim 0."""
        out = t.new_empty((n * t.shape[0], *t.shape[1:]))
        works = self._start_all_gather(out.view(-1), t.contiguous().view(-1), group)
        self.stats.add(kind, _nbytes(t) * (n - 1), _nbytes(t) * (n - 1))
        _Pending(works, f"all-gather ({kind})", self).wait()
        return out

    # ------------------------------------------------------------ torch.distributed primitives
    # The only calls into torch.distributed; each starts async work and returns its handles.
    # `SimulatedComm` overrides these three to project multi-GPU runs on one device.
    def _start_all_reduce(self, t: torch.Tensor, group) -> list:
        return [dist.all_reduce(t, group=group, async_op=True)]

    def _start_all_gather(self, out: torch.Tensor, inp: torch.Tensor, group) -> list:
        return [_all_gather_flat(out, inp, group)]

    # ------------------------------------------------------------------------- neighbour rows
    def _p2p(self, topo: Topology, sends: list[tuple[torch.Tensor, int | None]],
             recvs: list[tuple[torch.Tensor | None, int | None]]) -> list:
        ops_ = [dist.P2POp(dist.isend, t, peer, topo.group) for t, peer in sends if peer is not None and t.numel()]
        ops_ += [dist.P2POp(dist.irecv, t, peer, topo.group)
                 for t, peer in recvs if peer is not None and t is not None and t.numel()]
        return dist.batch_isend_irecv(ops_) if ops_ else []

    def exchange_rows(self, key: str, x: torch.Tensor, topo: Topology, *, send_up: int, send_down: int,
                      recv_up: int, recv_down: int, kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Sync: send my first `send_up` rows up and last `send_down` rows down; receive `recv_up` rows
        from the rank above and `recv_down` from the rank below. Blocks; keeps them as next step's stale rows."""
        send_up = send_up if topo.up is not None else 0
        send_down = send_down if topo.down is not None else 0
        # x twice, (up, 0) and (0, down): a 1-row band sends its row both ways (halo_pack forbids overlap).
        packed = ops.halo_pack([x, x], [send_up, 0], [0, send_down])
        lead = x.shape[:-2]
        top = self._sync_buf((key, "up"), (*lead, recv_up, x.shape[-1]), x) if topo.up is not None and recv_up else None
        bot = (self._sync_buf((key, "down"), (*lead, recv_down, x.shape[-1]), x)
               if topo.down is not None and recv_down else None)
        n_up = packed.numel() - (x[..., :send_down, :].numel() if send_down else 0)
        works = self._p2p(topo, [(packed[:n_up], topo.up), (packed[n_up:], topo.down)], [(top, topo.up), (bot, topo.down)])
        self.stats.add(kind, _nbytes(top) + _nbytes(bot), _nbytes(packed), messages=len(works))
        for w in works:
            self.wait(w, f"halo exchange ({kind}, {key})")
        self._rows[key] = (top, bot, None)
        return top, bot

    def store_rows(self, key: str, top: torch.Tensor | None, bottom: torch.Tensor | None) -> None:
        """Record rows obtained otherwise (e.g. cut from a sync all-gather) as next step's stale rows."""
        self._rows[key] = (top, bottom, None)

    def stale_rows(self, key: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The neighbour rows of the last step that exchanged them (waits for that message)."""
        if key not in self._rows:
            raise RuntimeError(f"halodiff: no stale rows for {key}: an async step ran before any sync step")
        top, bot, pending = self._rows[key]
        if pending is not None:
            pending.wait()
        return top, bot

    def queue_rows(self, key: str, x: torch.Tensor, *, send_up: int, send_down: int, recv_up: int, recv_down: int,
                   kind: str) -> None:
        """Async: add x's boundary rows to this step's neighbour messages (sent by `flush`)."""
        self._row_queue.append(_RowEntry(key, x, send_up, send_down, recv_up, recv_down, kind))

    # ----------------------------------------------------------------------------- group sums
    def store_sums(self, key: str, glob: torch.Tensor, local: torch.Tensor) -> None:
        self._sums[key] = (glob, local, None)

    def stale_sums(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._sums:
            raise RuntimeError(f"halodiff: no stale GroupNorm sums for {key}: an async step ran before any sync step")
        glob, local, pending = self._sums[key]
        if pending is not None:
            pending.wait()
        return glob, local

    def queue_sums(self, key: str, local: torch.Tensor) -> None:
        self._sum_queue.append((key, local))

    # ---------------------------------------------------------------------------------- flush
    def _row_layout(self, entries: list[_RowEntry], topo: Topology) -> _RowLayout:
        sig = (topo.ranks, topo.index) + tuple(
            (e.key, tuple(e.tensor.shape), e.tensor.dtype, e.send_up, e.send_down, e.recv_up, e.recv_down)
            for e in entries)
        layout = self._row_layouts.get(sig)
        if layout is not None:
            return layout
        like = entries[0].tensor
        ups = [e.send_up if topo.up is not None else 0 for e in entries]
        downs = [e.send_down if topo.down is not None else 0 for e in entries]
        sizes = [(e.tensor.numel() // max(e.tensor.shape[-2], 1)) for e in entries]  # elements per row
        n_send = sum(s * (u + d) for s, u, d in zip(sizes, ups, downs))
        n_up = sum(s * u for s, u in zip(sizes, ups))
        r_up = [e.recv_up if topo.up is not None else 0 for e in entries]
        r_down = [e.recv_down if topo.down is not None else 0 for e in entries]
        recv_up = like.new_empty(sum(s * r for s, r in zip(sizes, r_up))) if topo.up is not None else None
        recv_down = like.new_empty(sum(s * r for s, r in zip(sizes, r_down))) if topo.down is not None else None
        views: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        by_kind = dict.fromkeys(KINDS, 0)
        o_up = o_down = 0
        for e, s, ru, rd in zip(entries, sizes, r_up, r_down):
            shape = e.tensor.shape
            top = bot = None
            if recv_up is not None and ru:
                top = recv_up[o_up: o_up + s * ru].view(*shape[:-2], ru, shape[-1])
                o_up += s * ru
            if recv_down is not None and rd:
                bot = recv_down[o_down: o_down + s * rd].view(*shape[:-2], rd, shape[-1])
                o_down += s * rd
            views[e.key] = (top, bot)
            by_kind[e.kind] += (s * (ru + rd)) * like.element_size()
        layout = _RowLayout(like.new_empty(n_send), n_up, recv_up, recv_down, views, by_kind)
        self._row_layouts[sig] = layout
        return layout

    def flush(self, topo: Topology, send: bool) -> None:
        """End of an async step: send the queued rows and sums (unless `send` is False: last step)."""
        rows, sums = self._row_queue, self._sum_queue
        self._row_queue, self._sum_queue = [], []
        if not send:
            return
        if rows:
            layout = self._row_layout(rows, topo)
            if layout.pending is not None:  # buffers still in use by the previous message of this layout
                layout.pending.wait()
            ups = [e.send_up if topo.up is not None else 0 for e in rows]
            downs = [e.send_down if topo.down is not None else 0 for e in rows]
            tensors = [e.tensor for e in rows]
            ops.halo_pack(tensors + tensors, ups + [0] * len(rows), [0] * len(rows) + downs, out=layout.send)
            works = self._p2p(topo, [(layout.send[: layout.n_send_up], topo.up),
                                     (layout.send[layout.n_send_up:], topo.down)],
                              [(layout.recv_up, topo.up), (layout.recv_down, topo.down)])
            pending = _Pending(works, "neighbour message (conv halos / K/V rows)", self)
            layout.pending = pending
            self._pending.append(pending)
            for kind, nbytes in layout.recv_bytes_by_kind.items():
                if nbytes:
                    self.stats.add(kind, nbytes, 0, messages=0)
            self.stats.bytes_sent += _nbytes(layout.send)
            self.stats.messages += len(works)
            for e in rows:
                top, bot = layout.views[e.key]
                self._rows[e.key] = (top, bot, pending)
        if sums:
            sig = tuple((k, tuple(t.shape)) for k, t in sums)
            flat, prev = self._sum_layouts.get(sig, (None, None))
            if flat is None:
                flat = sums[0][1].new_empty(sum(t.numel() for _, t in sums))
            elif prev is not None:
                prev.wait()
            torch.cat([t.reshape(-1) for _, t in sums], out=flat)
            pending = self.all_reduce_sum(flat, topo, "groupnorm", async_op=True)
            self._sum_layouts[sig] = (flat, pending)
            self._pending.append(pending)
            o = 0
            for key, local in sums:
                self._sums[key] = (flat[o: o + local.numel()].view(local.shape), local, pending)
                o += local.numel()
