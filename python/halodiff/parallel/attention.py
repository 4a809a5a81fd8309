"""Patch-parallel self-attention (attn1) processor for diffusers `Attention` modules.

Q comes from the own band; K/V are given to `ops.segmented_attention` as segments, never concatenated:
- distrifusion (and every sync step): K/V of every band, all-gathered (stale for other bands in async steps);
- pcpp async steps: own band + the ceil(p*h) rows of each neighbour band nearest the boundary, which
  travel point to point in the step message (`CommManager.queue_rows`).
Cross-attention (attn2) and single-rank runs call the original processor.
"""
from __future__ import annotations

import math

import torch

from .. import ops
from ..errors import PatchError
from .context import LayerInfo, ParallelContext, StepInfo


def pcpp_rows(p: float, h: int) -> int:
    """Rows of a neighbour band of height h that a pcpp band attends to."""
    return min(h, math.ceil(p * h - 1e-9))


class PatchAttnProcessor:
    def __init__(self, ctx: ParallelContext, key: str, original):
        self.ctx, self.key, self.original = ctx, key, original
        self._gather: dict[str, object] = {}  # persistent gather buffers and the in-flight handle

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        ctx, step = self.ctx, self.ctx.active
        if encoder_hidden_states is not None or (not ctx.tracing and (step is None or step.topo.n == 1)):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        if ctx.tracing:
            shape = tuple(hidden_states.shape)
            ctx.record(self.key, LayerInfo(shape, hw=tuple(shape[-2:]) if len(shape) == 4 else None))
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        info = step.layer(self.key)
        rows, cols = info.hw
        tokens = hidden_states.shape[-2] * hidden_states.shape[-1] if hidden_states.ndim == 4 else hidden_states.shape[1]
        if tokens == rows * cols:  # replicated input: nothing to exchange
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        if attention_mask is not None or attn.group_norm is not None or getattr(attn, "fused_projections", False):
            raise PatchError(f"halodiff: {self.key}: self-attention with a mask, a group_norm or fused QKV "
                             "projections cannot be split into bands")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b4, c4, h4, w4 = hidden_states.shape
            hidden_states = hidden_states.view(b4, c4, h4 * w4).transpose(1, 2)
        B, L, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = attn.heads
        D = k.shape[-1] // heads
        q4 = q.view(B, L, heads, D).transpose(1, 2)
        k4 = k.view(B, L, heads, D).transpose(1, 2)
        if attn.norm_q is not None:
            q4 = attn.norm_q(q4)
        if attn.norm_k is not None:
            k4 = attn.norm_k(k4)
            k = k4.transpose(1, 2).reshape(B, L, heads * D)
        kv = torch.cat([k, v], dim=-1)  # [B, L, 2C]: one buffer per layer to exchange
        if self.ctx.config.mode == "pcpp" and not step.sync:
            ks, vs = self._pcpp_segments(step, kv, cols, heads, D)
        else:
            ks, vs = self._gather_segments(step, kv, rows, cols, heads, D)
        out = ops.segmented_attention(q4, ks, vs, scale=attn.scale)
        if self.ctx.config.mode == "distrifusion" and not step.sync and not step.last:
            self._start_next_exchange(step, kv)
        out = out.transpose(1, 2).reshape(B, L, heads * D).to(q.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b4, c4, h4, w4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _split(kv: torch.Tensor, heads: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, 2C] -> K, V views [B, heads, L, D] (strided, no copy)."""
        B, L, _ = kv.shape
        C = heads * D
        return (kv[..., :C].view(B, L, heads, D).transpose(1, 2), kv[..., C:].view(B, L, heads, D).transpose(1, 2))

    def _gather_segments(self, step: StepInfo, kv: torch.Tensor, rows: int, cols: int, heads: int, D: int):
        """All bands' K/V from an all-gather: fresh and blocking in sync steps; in async steps the one
        started by the previous step (stale for the other bands; the own band is always fresh)."""
        topo, j = step.topo, step.topo.index
        lens = [h * cols for h in step.bands.heights(rows)]
        B, L, C2 = kv.shape
        g = self._gather
        if g.get("shape") != (topo.ranks, B, max(lens), C2, kv.dtype):
            g.clear()
            g["shape"] = (topo.ranks, B, max(lens), C2, kv.dtype)
            g["send"] = kv.new_zeros(B, max(lens), C2)
            g["recv"] = kv.new_zeros(topo.n, B, max(lens), C2)
        g["payload"] = dict(payload_received=(sum(lens) - L) * B * C2 * kv.element_size(),
                            payload_sent=L * B * C2 * kv.element_size() * (topo.n - 1))
        pending = g.pop("pending", None)
        if step.sync:
            g["send"][:, :L].copy_(kv)
            step.comm.all_gather(g["recv"], g["send"], topo, "attention", **g["payload"])
        elif pending is not None:
            pending.wait()
        ks, vs = [], []
        for i, n in enumerate(lens):
            k_i, v_i = self._split(kv if i == j else g["recv"][i, :, :n], heads, D)
            ks.append(k_i)
            vs.append(v_i)
        if step.sync and self.ctx.config.mode == "pcpp":
            self._store_pcpp_rows(step, g["recv"], lens, cols)
        return ks, vs

    def _start_next_exchange(self, step: StepInfo, kv: torch.Tensor) -> None:
        """distrifusion async step, after the attention ran: start the all-gather the next step reads
        (it overlaps the rest of this step and the next one until this layer)."""
        g = self._gather
        g["send"][:, : kv.shape[1]].copy_(kv)
        g["pending"] = step.comm.all_gather(g["recv"], g["send"], step.topo, "attention", async_op=True,
                                            **g["payload"])

    def _store_pcpp_rows(self, step: StepInfo, recv: torch.Tensor, lens: list[int], cols: int) -> None:
        """After a sync gather in pcpp mode: keep the neighbour rows the next async step attends to."""
        topo, j, p = step.topo, step.topo.index, self.ctx.config.halo_fraction
        heights = [n // cols for n in lens]
        top = bot = None
        if j > 0:
            r = pcpp_rows(p, heights[j - 1])
            top = recv[j - 1, :, (heights[j - 1] - r) * cols: heights[j - 1] * cols].unflatten(1, (r, cols)).flatten(2)
        if j + 1 < topo.n:
            r = pcpp_rows(p, heights[j + 1])
            bot = recv[j + 1, :, : r * cols].unflatten(1, (r, cols)).flatten(2)
        step.comm.store_rows(self.key, top, bot)

    def _pcpp_segments(self, step: StepInfo, kv: torch.Tensor, cols: int, heads: int, D: int):
        topo, j, p = step.topo, step.topo.index, self.ctx.config.halo_fraction
        rows = self.ctx.active.layer(self.key).hw[0]
        heights = step.bands.heights(rows)
        B, L, C2 = kv.shape
        top, bot = step.comm.stale_rows(self.key)
        mine = pcpp_rows(p, heights[j])
        step.comm.queue_rows(
            self.key, kv.view(B, heights[j], cols * C2), send_up=mine, send_down=mine,
            recv_up=pcpp_rows(p, heights[j - 1]) if j > 0 else 0,
            recv_down=pcpp_rows(p, heights[j + 1]) if j + 1 < topo.n else 0, kind="attention")
        segs = [t.reshape(B, -1, C2) for t in (top, kv, bot) if t is not None and t.numel()]
        if not segs:
            segs = [kv]
        pairs = [self._split(s, heads, D) for s in segs]
        return [k for k, _ in pairs], [v for _, v in pairs]
