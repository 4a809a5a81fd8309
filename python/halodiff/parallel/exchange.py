"""How a band layer gets the boundary data of the other bands in one step.

`SyncExchange` is the exact algorithm (`mode="sync"`, and every warm-up step of the async modes): fresh
halos, all-reduced GroupNorm sums and all-gathered K/V, each exchanged when the layer needs it and waited for
on the spot; the result equals one device. `parallel/distrifusion.py` and `parallel/pcpp.py` subclass it with
their papers' stale, asynchronous versions. The engine picks the class once, at `patch()`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from .state import ParallelContext, StepInfo


@dataclass
class KVBuffers:
    """Persistent all-gather buffers of one attention layer: send [B, Lmax, 2C], recv [n, B, Lmax, 2C]."""

    shape: tuple
    send: torch.Tensor
    recv: torch.Tensor
    lens: list[int]
    payload: dict[str, int]
    pending: object = None  # an all-gather in flight into `recv`


def split_kv(kv: torch.Tensor, heads: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, 2C] -> K, V views [B, heads, L, D] (strided, no copy)."""
    B, L, _ = kv.shape
    C = heads * D
    return kv[..., :C].view(B, L, heads, D).transpose(1, 2), kv[..., C:].view(B, L, heads, D).transpose(1, 2)


class SyncExchange:
    """Fresh boundary data every step, exchanged where it is used (blocking)."""

    stale = False  # does any step use the previous step's data?

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.kv: dict[str, KVBuffers] = {}

    def is_sync(self, steps_since_reset: int) -> bool:
        """Whether a step exchanges fresh data (`steps_since_reset` steps after a new generation)."""
        return True

    # ------------------------------------------------------------------------------ conv halos
    def halo_rows(self, step: StepInfo, key: str, x: torch.Tensor, kw: dict):
        """(rows from the band above, rows from the band below) for a k x k conv's input band x."""
        return step.comm.exchange_rows(key, x, step.topo, **kw)

    # ------------------------------------------------------------------------------- GroupNorm
    def group_norm(self, step: StepInfo, key: str, gn: torch.nn.GroupNorm, x: torch.Tensor, count: float):
        local = ops.group_stats(x, gn.num_groups)
        glob = local.clone()
        step.comm.all_reduce_sum(glob, step.topo, "groupnorm")
        step.comm.store_sums(key, glob, local)
        return ops.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps, stats=glob, count=count)

    # ------------------------------------------------------------------------------- attention
    def kv_buffers(self, step: StepInfo, key: str, kv: torch.Tensor, rows: int, cols: int) -> KVBuffers:
        topo = step.topo
        lens = [h * cols for h in step.bands.heights(rows)]
        B, L, C2 = kv.shape
        shape = (topo.ranks, B, max(lens), C2, kv.dtype, kv.device)
        buf = self.kv.get(key)
        if buf is None or buf.shape != shape:
            esize = kv.element_size()
            buf = self.kv[key] = KVBuffers(
                shape, kv.new_zeros(B, max(lens), C2), kv.new_zeros(topo.n, B, max(lens), C2), lens,
                dict(payload_received=(sum(lens) - L) * B * C2 * esize, payload_sent=L * B * C2 * esize * (topo.n - 1)))
        return buf

    def gather_kv(self, step: StepInfo, buf: KVBuffers, kv: torch.Tensor, async_op: bool = False):
        """All-gather this band's K/V ([B, L, 2C]) into `buf.recv` (fresh, or in flight with async_op)."""
        self.join_kv(buf)
        buf.send[:, : kv.shape[1]].copy_(kv)
        return step.comm.all_gather(buf.recv, buf.send, step.topo, "attention", async_op=async_op, **buf.payload)

    @staticmethod
    def join_kv(buf: KVBuffers) -> None:
        """Wait for the all-gather in flight into `buf.recv`, if any."""
        if buf.pending is not None:
            buf.pending.wait()
            buf.pending = None

    def band_segments(self, step: StepInfo, buf: KVBuffers, kv: torch.Tensor, heads: int, D: int):
        """K/V segments of every band in row order: the own band from `kv`, the others from `buf.recv`."""
        ks, vs = [], []
        for i, n in enumerate(buf.lens):
            k_i, v_i = split_kv(kv if i == step.topo.index else buf.recv[i, :, :n], heads, D)
            ks.append(k_i)
            vs.append(v_i)
        return ks, vs

    def attention(self, step: StepInfo, key: str, q: torch.Tensor, kv: torch.Tensor, rows: int, cols: int,
                  scale: float | None) -> torch.Tensor:
        """softmax(q Kᵀ) V over the K/V of every band. q: [B, H, Lq, D]; kv: this band's [B, L, 2C]."""
        heads, D = q.shape[1], q.shape[-1]
        buf = self.kv_buffers(step, key, kv, rows, cols)
        self.gather_kv(step, buf, kv)
        ks, vs = self.band_segments(step, buf, kv, heads, D)
        return ops.segmented_attention(q, ks, vs, scale=scale)
