"""Triton segmented-KV attention: softmax(q·Kᵀ·scale)·V with K/V given as a list of segments.

Flash-attention forward (as in the Triton fused-attention tutorial) with an outer loop over segments, so
the concatenated K/V never exists. Program (m, bh) reads its BLOCK_M query rows of head (b, h) once,
streams every segment's K/V rows in BLOCK_N-row tiles (each K/V element read once per program), keeps
the running row max / row sum / output in registers (online softmax in base-2 units) and writes its
BLOCK_M output rows once.

Segment pointers are separate kernel arguments (MAX_SEGMENTS slots, unused ones repeat q) so that
torch.compile's wrap_triton sees every tensor; each segment's length and strides come from a small
int64 table. More than MAX_SEGMENTS non-empty segments take several launches that carry every query
row's running (acc, max, sum) in float32 buffers. The head dim is padded to a power of two >= 16
(`tl.arange`) and masked.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import kernel_dtype

MAX_SEGMENTS = 16
MAX_HEAD_DIM = 256
_NF = 7  # table fields per segment: length, k strides (b, h, l), v strides (b, h, l)
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_segment(acc, m_i, l_i, q, K, V, table, SEG: tl.constexpr, off_b, off_h, offs_n, offs_d, D, qk_scale,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with every K/V row of segment SEG (BLOCK_N rows a step)."""
    row = table + SEG * 7
    L = tl.load(row)
    kb = K + off_b * tl.load(row + 1) + off_h * tl.load(row + 2)
    k_sl = tl.load(row + 3)
    vb = V + off_b * tl.load(row + 4) + off_h * tl.load(row + 5)
    v_sl = tl.load(row + 6)
    dmask = offs_d[None, :] < D
    for n0 in range(0, L, BLOCK_N):
        rows = n0 + offs_n
        rmask = rows < L
        k = tl.load(kb + rows[:, None] * k_sl + offs_d[None, :], mask=rmask[:, None] & dmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(rmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + rows[:, None] * v_sl + offs_d[None, :], mask=rmask[:, None] & dmask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _segmented_attention_fwd(
    Q, Out, Table, Acc, Mx, Sm,
    K0, V0, K1, V1, K2, V2, K3, V3, K4, V4, K5, V5, K6, V6, K7, V7,
    K8, V8, K9, V9, K10, V10, K11, V11, K12, V12, K13, V13, K14, V14, K15, V15,
    q_sb, q_sh, q_sl, o_sb, o_sh, o_sl, H, Lq, D, qk_scale,
    NSEG: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (m, bh): query rows m*BLOCK_M.. of head bh against segments 0..NSEG-1 of this launch.

    Reads Q rows once and every K/V row of the NSEG segments once; writes the output rows (LAST) or the
    running float32 state Acc [B*H*Lq, BLOCK_D], Mx / Sm [B*H*Lq] for the next launch (not LAST).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    off_b = bh // H
    off_h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D
    q = tl.load(Q + off_b * q_sb + off_h * q_sh + offs_m[:, None] * q_sl + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    srow = bh.to(tl.int64) * Lq + offs_m  # running-state row of each query row
    if FIRST:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.load(Acc + srow[:, None] * BLOCK_D + offs_d[None, :], mask=mmask[:, None], other=0.0)
        m_i = tl.load(Mx + srow, mask=mmask, other=float("-inf"))
        l_i = tl.load(Sm + srow, mask=mmask, other=0.0)
    acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K0, V0, Table, 0, off_b, off_h, offs_n, offs_d, D, qk_scale,
                                    BLOCK_N, PRECISION)
    if NSEG > 1:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K1, V1, Table, 1, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 2:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K2, V2, Table, 2, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 3:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K3, V3, Table, 3, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 4:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K4, V4, Table, 4, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 5:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K5, V5, Table, 5, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 6:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K6, V6, Table, 6, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 7:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K7, V7, Table, 7, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 8:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K8, V8, Table, 8, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 9:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K9, V9, Table, 9, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 10:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K10, V10, Table, 10, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 11:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K11, V11, Table, 11, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 12:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K12, V12, Table, 12, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 13:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K13, V13, Table, 13, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 14:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K14, V14, Table, 14, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if NSEG > 15:
        acc, m_i, l_i = _attend_segment(acc, m_i, l_i, q, K15, V15, Table, 15, off_b, off_h, offs_n, offs_d, D,
                                        qk_scale, BLOCK_N, PRECISION)
    if LAST:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + off_b * o_sb + off_h * o_sh + offs_m[:, None] * o_sl + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    else:
        tl.store(Acc + srow[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mmask[:, None])
        tl.store(Mx + srow, m_i, mask=mmask)
        tl.store(Sm + srow, l_i, mask=mmask)


def _config(block_d: int, elem_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): the accumulator is BLOCK_M x BLOCK_D fp32 in registers and
    the dot operands (Q, K, V tiles) pass through shared memory, so fp32 and wide heads get smaller tiles."""
    if elem_size <= 2:
        return (64, 64, 4, 2) if block_d <= 128 else (64, 32, 8, 2)
    if block_d <= 64:
        return 64, 32, 4, 2
    return (32, 32, 4, 1) if block_d <= 128 else (32, 16, 4, 1)


@triton_op("halodiff_triton::segmented_attention", mutates_args=())
def _segmented_attention_op(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                            scale: float) -> torch.Tensor:
    B, H, Lq, D = q.shape
    out = q.new_empty((B, Lq, H, D)).transpose(1, 2)
    segs = [(k, v) for k, v in zip(ks, vs) if k.shape[2] > 0]
    if out.numel() == 0:
        return out
    if not segs:
        return out.zero_()  # every segment is empty: no keys, the result is defined as zeros
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n, warps, stages = _config(block_d, q.element_size())
    chunks = [segs[i : i + MAX_SEGMENTS] for i in range(0, len(segs), MAX_SEGMENTS)]
    if len(chunks) > 1:
        acc = torch.empty((B * H * Lq, block_d), dtype=torch.float32, device=q.device)
        mx = torch.empty((B * H * Lq,), dtype=torch.float32, device=q.device)
        sm = torch.empty((B * H * Lq,), dtype=torch.float32, device=q.device)
    else:
        acc = mx = sm = q  # unused by a single FIRST+LAST launch
    grid = (triton.cdiv(Lq, block_m), B * H)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # exact fp32 dots; 16-bit inputs ignore it
    for i, chunk in enumerate(chunks):
        table = torch.tensor(
            [[k.shape[2], k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)]
             for k, v in chunk],
            dtype=torch.int64, device=q.device,
        )
        kv = [t for pair in chunk for t in pair] + [q] * (2 * (MAX_SEGMENTS - len(chunk)))
        wrap_triton(_segmented_attention_fwd)[grid](
            q, out, table, acc, mx, sm, *kv,
            q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, Lq, D, scale * _LOG2E,
            NSEG=len(chunk), FIRST=i == 0, LAST=i == len(chunks) - 1,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )
    return out


@_segmented_attention_op.register_fake
def _(q, ks, vs, scale):
    B, H, Lq, D = q.shape
    return q.new_empty((B, Lq, H, D)).transpose(1, 2)


def segmented_attention(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                        scale: float | None) -> torch.Tensor:
    """Launcher used by halodiff.ops (inputs validated there; last dims dense). Strides are read in place."""
    dt = kernel_dtype(q)  # the interpreter gets float32 for bfloat16
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = _segmented_attention_op(q.to(dt), [k.to(dt) for k in ks], [v.to(dt) for v in vs], s)
    return out.to(q.dtype)
