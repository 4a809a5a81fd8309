"""How a band layer gets the boundary data of the other bands in one step.

`SyncExchange` is the exact algorithm (`mode="sync"`, and every warm-up step of the async modes): fresh
halos, all-reduced GroupNorm sums and all-gathered K/V, each exchanged when the layer needs it and waited for
on the spot; the result equals one device. `parallel/distrifusion.py` and `parallel/pcpp.py` subclass it with
their papers' stale, asynchronous versions. The engine picks the class once, at `patch()`; the class also
lays out the static exchange slots of every band layer once per input signature (`layout`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm.manager import RowSpec, SumSpec
from .state import ModelState, ParallelContext, StepInfo


@dataclass
class KVBuffers:
    """Persistent all-gather buffers of one attention layer: send [B, Lmax, 2C], recv [n, B, Lmax, 2C], and
    their K/V views, made once: `send_k`/`send_v` [B, L, H, D] to write this band into, `segments` the
    [B, H, L_i, D] K/V of every band i as the recv buffer holds them."""

    shape: tuple
    send: torch.Tensor
    recv: torch.Tensor
    lens: list[int]
    payload: dict[str, int]
    send_k: torch.Tensor
    send_v: torch.Tensor
    segments: list[tuple[torch.Tensor, torch.Tensor]]


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

    # --------------------------------------------------------------------------------- layout
    def layout(self, st: ModelState, step: StepInfo) -> tuple[list[RowSpec], list[SumSpec]]:
        """Static exchange slots of every band layer of the traced model, in call order."""
        from .layers import halo_spec

        rows, sums = [], []
        for key, info in st.layers.items():
            if info.kind == "conv":
                rows.append(halo_spec(key, info, step.bands, step.topo))
            elif info.kind == "groupnorm":
                sums.append(SumSpec(key, (info.in_shape[0], info.params[0], 2)))
            elif info.kind == "attention":
                spec = self.attention_spec(key, info, step)
                if spec is not None:
                    rows.append(spec)
        return rows, sums

    def attention_spec(self, key: str, info, step: StepInfo) -> RowSpec | None:
        return None  # whole-band K/V travel in all-gathers, not in the neighbour messages

    # ------------------------------------------------------------------------------ conv halos
    def halo_rows(self, step: StepInfo, key: str, x: torch.Tensor):
        """(rows from the band above, rows from the band below) for a k x k conv's input band x."""
        return step.comm.exchange_rows(key, x, step.topo)

    def after_halo(self, step: StepInfo, key: str, x: torch.Tensor) -> None:
        """The conv has consumed its halo rows (async modes queue this step's rows here)."""

    # ------------------------------------------------------------------------------- GroupNorm
    def group_norm(self, step: StepInfo, key: str, gn: torch.nn.GroupNorm, x: torch.Tensor, count: float,
                   silu: bool) -> torch.Tensor:
        ops = self.ctx.ops
        local = ops.group_stats(x, gn.num_groups)
        glob = step.comm.all_reduce_sums(key, local, step.topo)
        return ops.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps, silu, glob, count)

    # ------------------------------------------------------------------------------- attention
    def kv_buffers(self, step: StepInfo, key: str, k: torch.Tensor, rows: int, cols: int) -> KVBuffers:
        topo = step.topo
        lens = [h * cols for h in step.bands.heights(rows)]
        B, H, L, D = k.shape
        C2 = 2 * H * D
        shape = (topo.ranks, B, max(lens), C2, k.dtype, k.device)
        buf = self.kv.get(key)
        if buf is None or buf.shape != shape:
            esize = k.element_size()
            send, recv = k.new_zeros(B, max(lens), C2), k.new_zeros(topo.n, B, max(lens), C2)
            mine = send[:, :L].view(B, L, 2, H, D)
            buf = self.kv[key] = KVBuffers(
                shape, send, recv, lens,
                dict(payload_received=(sum(lens) - L) * B * C2 * esize, payload_sent=L * B * C2 * esize * (topo.n - 1)),
                mine[:, :, 0], mine[:, :, 1], [split_kv(recv[i, :, :n], H, D) for i, n in enumerate(lens)])
        return buf

    def gather_kv(self, step: StepInfo, buf: KVBuffers, k: torch.Tensor, v: torch.Tensor, key: str | None = None):
        """All-gather this band's K/V into `buf.recv`: fresh, or (with `key`) posted for the next step."""
        buf.send_k.copy_(k.transpose(1, 2))
        buf.send_v.copy_(v.transpose(1, 2))
        step.comm.all_gather(buf.recv, buf.send, step.topo, "attention", key=key, **buf.payload)

    def band_segments(self, step: StepInfo, buf: KVBuffers, k: torch.Tensor, v: torch.Tensor):
        """K/V segments of every band in row order: the own band fresh, the others from `buf.recv`."""
        j = step.topo.index
        return ([k if i == j else s[0] for i, s in enumerate(buf.segments)],
                [v if i == j else s[1] for i, s in enumerate(buf.segments)])

    def attention(self, step: StepInfo, key: str, q, k, v, rows: int, cols: int, scale: float | None):
        """softmax(q Kᵀ) V over the K/V of every band. q, k, v: [B, H, L, D] of this band."""
        buf = self.kv_buffers(step, key, k, rows, cols)
        step.comm.arrive(key)  # an all-gather of the previous generation may still be writing `buf.recv`
        self.gather_kv(step, buf, k, v)
        ks, vs = self.band_segments(step, buf, k, v)
        return self.ctx.ops.segmented_attention(q, ks, vs, scale)
