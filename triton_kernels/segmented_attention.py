"""Triton segmented-KV attention: softmax(q·Kᵀ·scale)·V with K/V given as a list of segments.

Flash-attention forward with an outer loop over segments, so the concatenated K/V never exists.
Program (b·H + h, m) reads its BLOCK_M query rows of head (b, h) once, streams every segment's K/V rows
in BLOCK_N-row tiles (each K/V element read once per program, software-pipelined into cp.async),
keeps the running row max / row sum / output in registers (online softmax in base-2 units) and writes
its BLOCK_M output rows once.

- Segments are scalar kernel arguments: SLOTS per launch (pointer, length and b/h/row strides of K and
  V each), no device table. Longer lists take ceil(n / SLOTS) launches that carry every query row's
  running (acc, max, sum) in float32 buffers (a log-sum-exp merge); the state is per row, so launches
  may use different tiles.
- The head dim is a constexpr padded to a multiple of 16 only (40 -> 48, 80 -> 80, 100 -> 112), split into
  at most three power-of-two pieces (48 = 32 + 16) that each feed tl.dot.
- Strides are passed in units of ALIGN elements and multiplied by the constexpr ALIGN in-kernel, the largest
  power of two (<= 16 bytes) that the host checked divides every stride of the launch (strides of size-1 dims
  are passed as 0): Triton then proves 16-byte alignment and loads rows as 16-byte vectors / cp.async.
  (`tl.multiple_of` on a scalar kernel argument is silently dropped, so it cannot carry the hint.)
- Batch·heads on grid axis 0 (2^31 - 1 programs), int64 base offsets, pointers advanced per tile.
- A small autotune set per (head dim, dtype, Lq, keys), one fixed config under the CPU interpreter.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _common
from ._common import device_guard, interpreting, kernel_dtype, pow2

SLOTS = 4  # segments per launch
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


def head_dim_pieces(d: int) -> tuple[int, int, int]:
    """Power-of-two pieces (>= 16, at most three, zeros for absent ones) summing to D padded to a multiple
    of 16 (240 has four set bits and is padded to 256)."""
    units = -(-d // 16)
    if bin(units).count("1") > 3:
        units = pow2(units)
    pieces = [16 << i for i in reversed(range(units.bit_length())) if units >> i & 1]
    return tuple(pieces + [0] * (3 - len(pieces)))  # type: ignore[return-value]


@triton.jit
def _attend(acc0, acc1, acc2, m_i, l_i, q0, q1, q2, K, V, L, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, off_b, off_h,
            qk_scale, ALIGN: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with every K/V row of one segment, BLOCK_N rows a step.
    Tile offsets and head-dim masks are loop-invariant; only the int64 row base moves per step."""
    k_sl = k_sl * ALIGN
    v_sl = v_sl * ALIGN
    kb = K + off_b.to(tl.int64) * k_sb * ALIGN + off_h.to(tl.int64) * k_sh * ALIGN
    vb = V + off_b.to(tl.int64) * v_sb * ALIGN + off_h.to(tl.int64) * v_sh * ALIGN
    offs_n = tl.arange(0, BLOCK_N)
    c0 = tl.arange(0, P0)
    c1 = P0 + tl.arange(0, P1 if P1 > 0 else 16)
    c2 = P0 + P1 + tl.arange(0, P2 if P2 > 0 else 16)
    ko0 = offs_n[:, None] * k_sl + c0[None, :]
    ko1 = offs_n[:, None] * k_sl + c1[None, :]
    ko2 = offs_n[:, None] * k_sl + c2[None, :]
    vo0 = offs_n[:, None] * v_sl + c0[None, :]
    vo1 = offs_n[:, None] * v_sl + c1[None, :]
    vo2 = offs_n[:, None] * v_sl + c2[None, :]
    cm0 = (c0 < HEAD_DIM)[None, :]
    cm1 = (c1 < HEAD_DIM)[None, :]
    cm2 = (c2 < HEAD_DIM)[None, :]
    for n0 in range(0, L, BLOCK_N):
        kn = kb + tl.cast(n0, tl.int64) * k_sl
        vn = vb + tl.cast(n0, tl.int64) * v_sl
        rows_ok = (n0 + offs_n) < L
        rm = rows_ok[:, None]
        s = tl.dot(q0, tl.trans(tl.load(kn + ko0, mask=rm & cm0, other=0.0)), input_precision=PRECISION)
        if P1 > 0:
            s = tl.dot(q1, tl.trans(tl.load(kn + ko1, mask=rm & cm1, other=0.0)), s, input_precision=PRECISION)
        if P2 > 0:
            s = tl.dot(q2, tl.trans(tl.load(kn + ko2, mask=rm & cm2, other=0.0)), s, input_precision=PRECISION)
        s = tl.where(rows_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(q0.dtype)
        acc0 = tl.dot(pv, tl.load(vn + vo0, mask=rm & cm0, other=0.0), acc0 * alpha[:, None],
                      input_precision=PRECISION)
        if P1 > 0:
            acc1 = tl.dot(pv, tl.load(vn + vo1, mask=rm & cm1, other=0.0), acc1 * alpha[:, None],
                          input_precision=PRECISION)
        if P2 > 0:
            acc2 = tl.dot(pv, tl.load(vn + vo2, mask=rm & cm2, other=0.0), acc2 * alpha[:, None],
                          input_precision=PRECISION)
        m_i = m_new
    return acc0, acc1, acc2, m_i, l_i


@triton.jit
def _tile(ptr, row0, rows_left, row_stride, col_stride, D0: tl.constexpr, P: tl.constexpr, HEAD_DIM: tl.constexpr,
          BLOCK_M: tl.constexpr):
    """Pointers and mask of a [BLOCK_M, P] tile of rows row0.. (masked to rows_left) and columns D0..D0+P."""
    offs_m = tl.arange(0, BLOCK_M)
    cols = D0 + tl.arange(0, P)
    ptrs = ptr + row0 * row_stride + offs_m[:, None] * row_stride + cols[None, :] * col_stride
    mask = (offs_m < rows_left)[:, None]
    if D0 + P > HEAD_DIM:
        mask = mask & (cols < HEAD_DIM)[None, :]
    return ptrs, mask


@triton.jit
def _state_io(acc0, acc1, acc2, m_i, l_i, Acc, Mx, Sm, srow, rows_left, STORE: tl.constexpr, P0: tl.constexpr,
              P1: tl.constexpr, P2: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Store (STORE) or load the float32 running state of BLOCK_M query rows starting at state row srow."""
    p, mk = _tile(Acc, srow, rows_left, D_PAD, 1, 0, P0, D_PAD, BLOCK_M)
    mrow = tl.arange(0, BLOCK_M) < rows_left
    if STORE:
        tl.store(p, acc0, mask=mk)
        if P1 > 0:
            p, mk = _tile(Acc, srow, rows_left, D_PAD, 1, P0, P1, D_PAD, BLOCK_M)
            tl.store(p, acc1, mask=mk)
        if P2 > 0:
            p, mk = _tile(Acc, srow, rows_left, D_PAD, 1, P0 + P1, P2, D_PAD, BLOCK_M)
            tl.store(p, acc2, mask=mk)
        tl.store(Mx + srow + tl.arange(0, BLOCK_M), m_i, mask=mrow)
        tl.store(Sm + srow + tl.arange(0, BLOCK_M), l_i, mask=mrow)
    else:
        acc0 = tl.load(p, mask=mk, other=0.0)
        if P1 > 0:
            p, mk = _tile(Acc, srow, rows_left, D_PAD, 1, P0, P1, D_PAD, BLOCK_M)
            acc1 = tl.load(p, mask=mk, other=0.0)
        if P2 > 0:
            p, mk = _tile(Acc, srow, rows_left, D_PAD, 1, P0 + P1, P2, D_PAD, BLOCK_M)
            acc2 = tl.load(p, mask=mk, other=0.0)
        m_i = tl.load(Mx + srow + tl.arange(0, BLOCK_M), mask=mrow, other=float("-inf"))
        l_i = tl.load(Sm + srow + tl.arange(0, BLOCK_M), mask=mrow, other=0.0)
    return acc0, acc1, acc2, m_i, l_i


# Lengths and strides: runtime values (no specialisation on 1 or on %16; alignment comes from ALIGN units).
_SCALAR_ARGS = [f"L{i}" for i in range(SLOTS)] + [
    f"{t}{i}_s{d}" for i in range(SLOTS) for t in ("k", "v") for d in ("b", "h", "l")
] + ["q_sb", "q_sh", "q_sl", "o_sb", "o_sh", "o_sl"]


@triton.jit(do_not_specialize=_SCALAR_ARGS)
def _segmented_attention_fwd(
    Q, Out, AccIn, MxIn, SmIn, AccOut, MxOut, SmOut,
    K0, V0, L0, k0_sb, k0_sh, k0_sl, v0_sb, v0_sh, v0_sl,
    K1, V1, L1, k1_sb, k1_sh, k1_sl, v1_sb, v1_sh, v1_sl,
    K2, V2, L2, k2_sb, k2_sh, k2_sl, v2_sb, v2_sh, v2_sl,
    K3, V3, L3, k3_sb, k3_sh, k3_sl, v3_sb, v3_sh, v3_sl,
    q_sb, q_sh, q_sl, o_sb, o_sh, o_sl, H, Lq, qk_scale, lk_bucket,
    NSEG: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (b·H + h, m): query rows m·BLOCK_M.. of head (b, h) against segments 0..NSEG-1 of this launch.

    Reads the Q rows once and every K/V row of the NSEG segments once; writes the output rows (LAST) or the
    running float32 state AccOut [B·H·Lq, D_PAD], MxOut / SmOut [B·H·Lq] for the next launch (not LAST), which
    reads it as AccIn/MxIn/SmIn (two buffers, so a relaunch by the autotuner gives the same result).
    `lk_bucket` (a power of two >= the launch's keys) only keys the autotuner.
    """
    bh = tl.program_id(0)
    row0 = tl.program_id(1) * BLOCK_M
    off_b = bh // H
    off_h = bh % H
    rows_left = Lq - row0
    qb = Q + off_b.to(tl.int64) * q_sb * ALIGN + off_h.to(tl.int64) * q_sh * ALIGN
    q_sl = q_sl * ALIGN
    p, mk = _tile(qb, row0.to(tl.int64), rows_left, q_sl, 1, 0, P0, HEAD_DIM, BLOCK_M)
    q0 = tl.load(p, mask=mk, other=0.0)
    q1 = tl.zeros([BLOCK_M, 16], dtype=q0.dtype)
    q2 = tl.zeros([BLOCK_M, 16], dtype=q0.dtype)
    if P1 > 0:
        p, mk = _tile(qb, row0.to(tl.int64), rows_left, q_sl, 1, P0, P1, HEAD_DIM, BLOCK_M)
        q1 = tl.load(p, mask=mk, other=0.0)
    if P2 > 0:
        p, mk = _tile(qb, row0.to(tl.int64), rows_left, q_sl, 1, P0 + P1, P2, HEAD_DIM, BLOCK_M)
        q2 = tl.load(p, mask=mk, other=0.0)
    acc0 = tl.zeros([BLOCK_M, P0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, P1 if P1 > 0 else 16], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, P2 if P2 > 0 else 16], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    srow = bh.to(tl.int64) * Lq + row0  # running-state row of the tile's first query row
    if not FIRST:
        acc0, acc1, acc2, m_i, l_i = _state_io(acc0, acc1, acc2, m_i, l_i, AccIn, MxIn, SmIn, srow, rows_left, False,
                                               P0, P1, P2, P0 + P1 + P2, BLOCK_M)
    acc0, acc1, acc2, m_i, l_i = _attend(acc0, acc1, acc2, m_i, l_i, q0, q1, q2, K0, V0, L0, k0_sb, k0_sh, k0_sl,
                                         v0_sb, v0_sh, v0_sl, off_b, off_h, qk_scale, ALIGN, P0, P1, P2, HEAD_DIM,
                                         BLOCK_N, PRECISION)
    if NSEG > 1:
        acc0, acc1, acc2, m_i, l_i = _attend(acc0, acc1, acc2, m_i, l_i, q0, q1, q2, K1, V1, L1, k1_sb, k1_sh,
                                             k1_sl, v1_sb, v1_sh, v1_sl, off_b, off_h, qk_scale, ALIGN, P0, P1, P2,
                                             HEAD_DIM, BLOCK_N, PRECISION)
    if NSEG > 2:
        acc0, acc1, acc2, m_i, l_i = _attend(acc0, acc1, acc2, m_i, l_i, q0, q1, q2, K2, V2, L2, k2_sb, k2_sh,
                                             k2_sl, v2_sb, v2_sh, v2_sl, off_b, off_h, qk_scale, ALIGN, P0, P1, P2,
                                             HEAD_DIM, BLOCK_N, PRECISION)
    if NSEG > 3:
        acc0, acc1, acc2, m_i, l_i = _attend(acc0, acc1, acc2, m_i, l_i, q0, q1, q2, K3, V3, L3, k3_sb, k3_sh,
                                             k3_sl, v3_sb, v3_sh, v3_sl, off_b, off_h, qk_scale, ALIGN, P0, P1, P2,
                                             HEAD_DIM, BLOCK_N, PRECISION)
    if LAST:
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        ob = Out + off_b.to(tl.int64) * o_sb * ALIGN + off_h.to(tl.int64) * o_sh * ALIGN
        o_sl = o_sl * ALIGN
        p, mk = _tile(ob, row0.to(tl.int64), rows_left, o_sl, 1, 0, P0, HEAD_DIM, BLOCK_M)
        tl.store(p, (acc0 * inv[:, None]).to(Out.dtype.element_ty), mask=mk)
        if P1 > 0:
            p, mk = _tile(ob, row0.to(tl.int64), rows_left, o_sl, 1, P0, P1, HEAD_DIM, BLOCK_M)
            tl.store(p, (acc1 * inv[:, None]).to(Out.dtype.element_ty), mask=mk)
        if P2 > 0:
            p, mk = _tile(ob, row0.to(tl.int64), rows_left, o_sl, 1, P0 + P1, P2, HEAD_DIM, BLOCK_M)
            tl.store(p, (acc2 * inv[:, None]).to(Out.dtype.element_ty), mask=mk)
    else:
        _state_io(acc0, acc1, acc2, m_i, l_i, AccOut, MxOut, SmOut, srow, rows_left, True, P0, P1, P2, P0 + P1 + P2,
                  BLOCK_M)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates by (element size, padded head dim), each compiled
# ahead of time for sm_80 and sm_90 without register spills (fp32 wide heads: <= 28 spill bytes on sm_90).
# 16-bit: tensor-core tiles with a 2-3 stage cp.async pipeline, plus a short-query tile (32 rows) for per-rank
# bands; fp32 (exact "ieee" dots, no tensor cores) and wide heads: smaller tiles, more warps.
_CONFIGS = {
    (2, 64): [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2), (32, 64, 4, 3)],
    (2, 128): [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 2), (32, 64, 4, 3)],
    (2, 256): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 3)],
    (4, 64): [(32, 32, 8, 2), (64, 32, 8, 2)],
    (4, 128): [(64, 16, 8, 2)],
    (4, 256): [(32, 16, 8, 2)],
}
# Candidates that spill at one padded head dim on one side of sm_90 (mma.sync below, wgmma from sm_90 on), and
# the tile that replaces them there: (element size, padded head dim, sm_90+) -> {candidate: replacement}.
# Head dim 128 (Flux, Qwen-Image): 16-bit 128 x 64 (8 warps, 3 stages) spills 12 bytes on sm_80 (128 x 32:
# 184 registers, none); fp32 64 x 16 spills 1,524 bytes on sm_90 (32 x 16: 76 registers, none).
_SPILL_FIXES = {
    (2, 128, False): {(128, 64, 8, 3): (128, 32, 8, 3)},
    (4, 128, True): {(64, 16, 8, 2): (32, 16, 8, 2)},
}


def configs_for(head_dim: int, elem_size: int, arch: int = 90) -> list[tuple[int, int, int, int]]:
    """The autotune candidates on a GPU of compute capability `arch` (80, 86, 90, ...) for a head dim and element
    size."""
    d_pad = sum(head_dim_pieces(head_dim))
    elem = min(elem_size, 4)
    fixes = _SPILL_FIXES.get((elem, d_pad, arch >= 90), {})
    return [fixes.get(c, c) for c in _CONFIGS[(elem, 64 if d_pad <= 64 else 128 if d_pad <= 128 else 256)]]


@functools.cache
def _arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


# The CPU interpreter has no register file; its cost is per op and program plus numpy's (slow) fp16 matmuls.
_INTERPRETER_CONFIG = (64, 64, 4, 3)


def _prune(configs, named_args, **kwargs):
    d_pad = kwargs["P0"] + kwargs["P1"] + kwargs["P2"]
    q = named_args["Q"]
    if interpreting():
        allowed = [_INTERPRETER_CONFIG]
    else:
        allowed = configs_for(d_pad, q.element_size(), _arch(q.device.index or 0))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


def _triton_config(c: tuple[int, int, int, int]) -> triton.Config:
    return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1]}, num_warps=c[2], num_stages=c[3])


_ALL_CONFIGS = list(dict.fromkeys([c for cs in _CONFIGS.values() for c in cs] +
                                   [c for fix in _SPILL_FIXES.values() for c in fix.values()]))
_attention_kernel = triton.autotune(
    configs=[_triton_config(c) for c in _ALL_CONFIGS],
    key=["Lq", "lk_bucket", "HEAD_DIM", "NSEG", "FIRST", "LAST"],
    prune_configs_by={"early_config_prune": _prune},
)(_segmented_attention_fwd)


def _strides(t: torch.Tensor, align: int = 1) -> tuple[int, int, int]:
    """(b, h, l) strides in units of `align` elements, 0 for size-1 dims (never stepped, so no alignment
    depends on them)."""
    return tuple(0 if t.shape[d] == 1 else t.stride(d) // align for d in range(3))  # type: ignore[return-value]


def _align(tensors: list[torch.Tensor]) -> int:
    """Largest power-of-two element count (<= 16 bytes) dividing every stride of the launch's tensors."""
    align = 16 // tensors[0].element_size()
    for t in tensors:
        for s in _strides(t):
            while align > 1 and s % align:
                align //= 2
    return align


def segmented_attention_impl(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                             scale: float) -> torch.Tensor:
    """The launcher behind halodiff_triton::segmented_attention (plain Python: tests count its launches)."""
    B, H, Lq, D = q.shape
    out = q.new_empty((B, Lq, H, D)).transpose(1, 2)
    segs = [(k, v) for k, v in zip(ks, vs) if k.shape[2] > 0]
    if out.numel() == 0:
        return out
    if not segs:
        return out.zero_()  # every segment is empty: no keys, the result is defined as zeros
    p0, p1, p2 = head_dim_pieces(D)
    chunks = [segs[i : i + SLOTS] for i in range(0, len(segs), SLOTS)]
    rows, d_pad = B * H * Lq, p0 + p1 + p2
    n_state = min(2, len(chunks) - 1)  # ping-pong state buffers between chained launches
    state = [(torch.empty((rows, d_pad), dtype=torch.float32, device=q.device),
              torch.empty((rows,), dtype=torch.float32, device=q.device),
              torch.empty((rows,), dtype=torch.float32, device=q.device)) for _ in range(n_state)]
    unused = (q.new_empty((0,), dtype=torch.float32),) * 3  # a single FIRST+LAST launch touches no state
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # exact fp32 dots; 16-bit inputs ignore it

    def grid(meta):
        return B * H, triton.cdiv(Lq, meta["BLOCK_M"])

    with device_guard(q):
        for i, chunk in enumerate(chunks):
            align = _align([q, out] + [t for pair in chunk for t in pair])
            args = []
            for j in range(SLOTS):  # unused slots repeat q with length 0
                k, v = chunk[j] if j < len(chunk) else (q, q)
                args += [k, v, k.shape[2] if j < len(chunk) else 0, *_strides(k, align), *_strides(v, align)]
            state_in = state[(i - 1) % 2] if i > 0 else unused
            state_out = state[i % 2] if i < len(chunks) - 1 else unused
            _common.launch(
                _attention_kernel, grid, q, out, *state_in, *state_out, *args, *_strides(q, align),
                *_strides(out, align), H, Lq,
                scale * _LOG2E, pow2(sum(k.shape[2] for k, _ in chunk)),
                NSEG=len(chunk), FIRST=i == 0, LAST=i == len(chunks) - 1, HEAD_DIM=D, ALIGN=align, P0=p0, P1=p1, P2=p2,
                PRECISION=precision,
            )
    return out


_segmented_attention_op = triton_op("halodiff_triton::segmented_attention", mutates_args=())(segmented_attention_impl)


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


def audit_configs() -> list[dict]:
    """Every autotune candidate at the SD/SDXL head dims (SD1.5: 40/80/160, SDXL: 64) and the DiT ones (SD3,
    PixArt: 64; Flux, Qwen-Image: 128), per dtype, as launched for a PCPP band (3 segments, one launch), with the
    archs (sm_80, sm_90) whose candidate lists hold it. Pointers are 16-byte aligned; strides in units of ALIGN."""
    fn = _segmented_attention_fwd
    out = []
    for dtype, elem, tt in (("fp16", 2, "*fp16"), ("bf16", 2, "*bf16"), ("fp32", 4, "*fp32")):
        for d in (40, 64, 80, 128, 160):
            p0, p1, p2 = head_dim_pieces(d)
            consts = dict(NSEG=3, FIRST=True, LAST=True, HEAD_DIM=d, ALIGN=16 // elem, P0=p0, P1=p1, P2=p2,
                          PRECISION="ieee" if elem == 4 else "tf32")
            per_arch = {arch: configs_for(d, elem, arch) for arch in (80, 90)}
            for bm, bn, warps, stages in dict.fromkeys(c for cs in per_arch.values() for c in cs):
                archs = tuple(a for a, cs in per_arch.items() if (bm, bn, warps, stages) in cs)
                sig = {}
                for name in fn.arg_names:
                    if name in consts or name in ("BLOCK_M", "BLOCK_N"):
                        sig[name] = "constexpr"
                    elif name in ("AccIn", "MxIn", "SmIn", "AccOut", "MxOut", "SmOut"):
                        sig[name] = "*fp32"
                    elif name in ("Q", "Out") or name[0] in "KV" and name[1:].isdigit():
                        sig[name] = tt
                    else:
                        sig[name] = "fp32" if name == "qk_scale" else "i32"
                out.append(dict(name="segmented_attention", fn=fn, signature=sig,
                                constexprs=dict(consts, BLOCK_M=bm, BLOCK_N=bn),
                                attrs=[n for n, t in sig.items() if t.startswith("*")], num_warps=warps,
                                num_stages=stages, dtype=dtype, head_dim=d, archs=archs))
    return out
