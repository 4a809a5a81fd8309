"""Triton halo pack: the first `top` / last `bottom` rows (dim -2) of many tensors into one flat buffer.

Up to SLOTS tensors per launch, each described by scalar kernel arguments (its pointer; leading-dims
count and stride, row stride, rows, row length, top/bottom row counts and their offsets in the buffer):
no device table and no host-to-device copy. Longer lists take ceil(n / SLOTS) launches into disjoint
parts of the buffer. Program (i, s) copies work rows [i·BLOCK_R, ...) of tensor s (a work row is one
copied row: (leading index, top or bottom row)); every copied element is read once and written once.
Strides, row lengths and offsets arrive in units of ALIGN elements (the largest power of two <= 16 bytes
the host checked divides all of them), so rows move as 16-byte vectors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import device_guard, kernel_dtype, pow2

SLOTS = 8
_FIELDS = ("outer", "s_outer", "s_row", "rows", "row_len", "top", "bottom", "top_off", "bot_off")


@triton.jit
def _copy_rows(src, out_ptr, r0, outer, s_outer, s_row, rows, row_len, top, bottom, top_off, bot_off,
               ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Work rows r0..r0+BLOCK_R of one tensor: row k of leading index o is a top row (k < top) or bottom row."""
    per = top + bottom
    r = r0 + tl.arange(0, BLOCK_R)
    rmask = r < outer * per
    o = (r // per).to(tl.int64)
    k = r % per
    is_top = k < top
    # Offsets in units of ALIGN elements, times ALIGN last (after the select), so Triton sees the alignment.
    src_u = o * s_outer + tl.where(is_top, k, rows - bottom + (k - top)).to(tl.int64) * s_row
    dst_u = tl.where(is_top, tl.cast(top_off, tl.int64) + (o * top + k) * row_len,
                     tl.cast(bot_off, tl.int64) + (o * bottom + (k - top)) * row_len)
    src_off = src_u * ALIGN
    dst_off = dst_u * ALIGN
    row_len = row_len * ALIGN
    for c in range(0, row_len, BLOCK_W):
        cols = c + tl.arange(0, BLOCK_W)
        m = rmask[:, None] & (cols < row_len)[None, :]
        v = tl.load(src + src_off[:, None] + cols[None, :], mask=m)
        tl.store(out_ptr + dst_off[:, None] + cols[None, :], v, mask=m)


_SCALARS = [f"{f}{i}" for i in range(SLOTS) for f in _FIELDS]


@triton.jit(do_not_specialize=_SCALARS)
def _pack(out_ptr,
          S0, outer0, s_outer0, s_row0, rows0, row_len0, top0, bottom0, top_off0, bot_off0,
          S1, outer1, s_outer1, s_row1, rows1, row_len1, top1, bottom1, top_off1, bot_off1,
          S2, outer2, s_outer2, s_row2, rows2, row_len2, top2, bottom2, top_off2, bot_off2,
          S3, outer3, s_outer3, s_row3, rows3, row_len3, top3, bottom3, top_off3, bot_off3,
          S4, outer4, s_outer4, s_row4, rows4, row_len4, top4, bottom4, top_off4, bot_off4,
          S5, outer5, s_outer5, s_row5, rows5, row_len5, top5, bottom5, top_off5, bot_off5,
          S6, outer6, s_outer6, s_row6, rows6, row_len6, top6, bottom6, top_off6, bot_off6,
          S7, outer7, s_outer7, s_row7, rows7, row_len7, top7, bottom7, top_off7, bot_off7,
          NSEG: tl.constexpr, ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program (i, s): work rows [i·BLOCK_R, ...) of slot s (slots >= NSEG are never launched)."""
    r0 = tl.program_id(0) * BLOCK_R
    s = tl.program_id(1)
    if s == 0:
        _copy_rows(S0, out_ptr, r0, outer0, s_outer0, s_row0, rows0, row_len0, top0, bottom0, top_off0, bot_off0,
                   ALIGN, BLOCK_R, BLOCK_W)
    if NSEG > 1 and s == 1:
        _copy_rows(S1, out_ptr, r0, outer1, s_outer1, s_row1, rows1, row_len1, top1, bottom1, top_off1, bot_off1,
                   ALIGN, BLOCK_R, BLOCK_W)
    if NSEG > 2 and s == 2:
        _copy_rows(S2, out_ptr, r0, outer2, s_outer2, s_row2, rows2, row_len2, top2, bottom2, top_off2, bot_off2,
                   ALIGN, BLOCK_R, BLOCK_W)
    if NSEG > 3 and s == 3:
        _copy_rows(S3, out_ptr, r0, outer3, s_outer3, s_row3, rows3, row_len3, top3, bottom3, top_off3, bot_off3,
                   ALIGN, BLOCK_R, BLOCK_W)
    if NSEG > 4 and s == 4:
        _copy_rows(S4, out_ptr, r0, outer4, s_outer4, s_row4, rows4, row_len4, top4, bottom4, top_off4, bot_off4,
                   ALIGN, BLOCK_R, BLOCK_W)
    if NSEG > 5 and s == 5:
        _copy_rows(S5, out_ptr, r0, outer5, s_outer5, s_row5, rows5, row_len5, top5, bottom5, top_off5, bot_off5,
                   ALIGN, BLOCK_R, BLOCK_W)
    if NSEG > 6 and s == 6:
        _copy_rows(S6, out_ptr, r0, outer6, s_outer6, s_row6, rows6, row_len6, top6, bottom6, top_off6, bot_off6,
                   ALIGN, BLOCK_R, BLOCK_W)
    if NSEG > 7 and s == 7:
        _copy_rows(S7, out_ptr, r0, outer7, s_outer7, s_row7, rows7, row_len7, top7, bottom7, top_off7, bot_off7,
                   ALIGN, BLOCK_R, BLOCK_W)


def _outer(t: torch.Tensor) -> tuple[int, int]:
    """(number of leading indices, stride between consecutive ones) of t's leading dims, which must flatten to
    one stride with a dense last dim (halodiff.ops passes such tensors)."""
    lead = [d for d in range(t.dim() - 2) if t.shape[d] != 1]
    for inner, outer in zip(lead[1:], lead):
        if t.stride(outer) != t.stride(inner) * t.shape[inner]:
            raise ValueError(f"halo_pack: leading dims of a {tuple(t.shape)} tensor with strides {t.stride()} do not "
                             "flatten to one stride; pass t.contiguous()")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"halo_pack: the last dim must be dense, got strides {t.stride()}; pass t.contiguous()")
    return int(torch.Size(t.shape[:-2]).numel()), t.stride(lead[-1]) if lead else 0


def _block(rows: int, row_len: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_W): up to 2048 elements per program step, the row width rounded to a power of two."""
    block_w = min(256, pow2(row_len))
    return max(1, min(pow2(rows), 2048 // block_w)), block_w


def halo_pack(tensors: list[torch.Tensor], tops: list[int], bottoms: list[int], out: torch.Tensor | None):
    dtype = kernel_dtype(tensors[0])
    srcs = [t.to(dtype) for t in tensors]
    segs, offset = [], 0
    for t, a in zip(srcs, tops):
        outer, s_outer = _outer(t)
        segs.append(dict(t=t, outer=outer, s_outer=s_outer, s_row=t.stride(-2) if t.shape[-2] > 1 else 0,
                         rows=t.shape[-2],
                         row_len=t.shape[-1], top=a, top_off=offset))
        offset += outer * a * t.shape[-1]
    for seg, b in zip(segs, bottoms):
        seg["bottom"], seg["bot_off"] = b, offset
        offset += seg["outer"] * b * seg["row_len"]
    direct = out is not None and out.dtype == dtype
    buf = out if direct else torch.empty(offset, dtype=dtype, device=tensors[0].device)
    live = [s for s in segs if s["outer"] * (s["top"] + s["bottom"]) * s["row_len"] > 0]
    with device_guard(buf):
        for i in range(0, len(live), SLOTS):
            chunk = live[i : i + SLOTS]
            align = 16 // buf.element_size()
            for s in chunk:
                for v in (s["s_outer"], s["s_row"], s["row_len"], s["top_off"], s["bot_off"]):
                    while align > 1 and v % align:
                        align //= 2
            args = []
            for j in range(SLOTS):  # unused slots repeat the buffer with zero rows
                s = chunk[j] if j < len(chunk) else dict(t=buf, **{f: 0 for f in _FIELDS})
                scaled = {f: s[f] // align if f in ("s_outer", "s_row", "row_len", "top_off", "bot_off") else s[f]
                          for f in _FIELDS}
                args += [s["t"], *(scaled[f] for f in _FIELDS)]
            max_rows = max(s["outer"] * (s["top"] + s["bottom"]) for s in chunk)
            block_r, block_w = _block(max_rows, max(s["row_len"] for s in chunk))
            _common.launch(_pack, (triton.cdiv(max_rows, block_r), len(chunk)), buf, *args,
                           NSEG=len(chunk), ALIGN=align, BLOCK_R=block_r, BLOCK_W=block_w)
    if direct:
        return out
    if out is None:
        return buf.to(tensors[0].dtype)
    return out.copy_(buf)


def audit_configs() -> list[dict]:
    """The pack of an SD1.5 step's conv halos (8 tensors per launch, rows of 64 elements, fp16 and fp32)."""
    sig = {"out_ptr": None}
    for i in range(SLOTS):
        sig[f"S{i}"] = None
        sig.update({f"{f}{i}": "i32" for f in _FIELDS})
    sig.update({n: "constexpr" for n in ("NSEG", "ALIGN", "BLOCK_R", "BLOCK_W")})
    out = []
    for dtype, tt, elem in (("fp16", "*fp16", 2), ("fp32", "*fp32", 4)):
        s = {n: (tt if t is None else t) for n, t in sig.items()}
        block_r, block_w = _block(2 * 320 * 2, 64)
        out.append(dict(name="halo_pack", fn=_pack, signature=s,
                        constexprs=dict(NSEG=SLOTS, ALIGN=16 // elem, BLOCK_R=block_r, BLOCK_W=block_w),
                        attrs=[n for n, t in s.items() if t.startswith("*")], num_warps=4, num_stages=2,
                        dtype=dtype, shape="SD1.5 conv halos, 64-wide rows, 8 tensors per launch"))
    return out
