"""Triton halo pack: the first `top` / last `bottom` rows of many tensors into one flat buffer, one launch.

A segment table (int64 [n, 10]: src address, outer, stride_outer, stride_row, rows, row_len, top,
bottom, top_offset, bottom_offset) tells program (r, s) which row of segment s it copies; the source
address is cast to a pointer in the kernel, so any number of tensors share one launch. Each program
reads and writes one row once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import kernel_dtype, prepare

ROW_BLOCK = 256
_FIELDS = 10


@triton.jit
def _pack(meta_ptr, out_ptr, NF: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    m = meta_ptr + s * NF
    outer = tl.load(m + 1)
    top = tl.load(m + 6)
    bottom = tl.load(m + 7)
    per_outer = top + bottom
    if r < outer * per_outer:
        src = tl.load(m + 0).to(tl.pointer_type(out_ptr.dtype.element_ty))
        stride_outer = tl.load(m + 2)
        stride_row = tl.load(m + 3)
        rows = tl.load(m + 4)
        row_len = tl.load(m + 5)
        o = r // per_outer
        k = r % per_outer
        is_top = k < top
        src_row = tl.where(is_top, k, rows - bottom + (k - top))
        dst = tl.where(is_top, tl.load(m + 8) + (o * top + k) * row_len,
                       tl.load(m + 9) + (o * bottom + (k - top)) * row_len)
        for c in range(0, row_len, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            mask = cols < row_len
            v = tl.load(src + o * stride_outer + src_row * stride_row + cols, mask=mask)
            tl.store(out_ptr + dst + cols, v, mask=mask)


def halo_pack(tensors: list[torch.Tensor], tops: list[int], bottoms: list[int], out: torch.Tensor | None):
    dtype = kernel_dtype(tensors[0])
    srcs = [prepare(t) for t in tensors]
    meta, offset = [], 0
    for t, a in zip(srcs, tops):
        meta.append([t.data_ptr(), t.numel() // max(t.shape[-2] * t.shape[-1], 1), t.shape[-2] * t.shape[-1],
                     t.shape[-1], t.shape[-2], t.shape[-1], a, 0, offset, 0])
        offset += meta[-1][1] * a * t.shape[-1]
    for row, b in zip(meta, bottoms):
        row[7], row[9] = b, offset
        offset += row[1] * b * row[5]
    direct = out is not None and out.dtype == dtype
    buf = out if direct else torch.empty(offset, dtype=dtype, device=tensors[0].device)
    max_rows = max(row[1] * (row[6] + row[7]) for row in meta)
    if offset and max_rows:
        table = torch.tensor(meta, dtype=torch.int64, device=buf.device)
        _pack[(max_rows, len(meta))](table, buf, NF=_FIELDS, BLOCK=ROW_BLOCK)
    if direct:
        return out
    if out is None:
        return buf.to(tensors[0].dtype)
    return out.copy_(buf)
