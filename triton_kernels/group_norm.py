"""Triton GroupNorm (+ fused SiLU) in two kernels.

- `_partial_sums`: program (bg, s) reads its chunk of group bg once and writes [Σx, Σx²] (fp32).
- `_apply`: program (bc, j) reads BLOCK elements of plane (b, c) once and writes y once, using the
  per-(b, c) scale/shift (B*C floats) computed from the stats.
Bytes moved: stats 1 read of x, apply 1 read + 1 write of x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import prepare

STATS_BLOCK = 1024
APPLY_BLOCK = 1024


@triton.jit
def _partial_sums(x_ptr, part_ptr, group_numel, chunk, n_splits, BLOCK: tl.constexpr, ACC: tl.constexpr):
    bg = tl.program_id(0)
    s = tl.program_id(1)
    base = x_ptr + bg.to(tl.int64) * group_numel
    start = s * chunk
    end = tl.minimum(start + chunk, group_numel)
    acc1 = tl.zeros([BLOCK], dtype=ACC)
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        v = tl.load(base + idx, mask=idx < end, other=0.0).to(ACC)
        acc1 += v
        acc2 += v * v
    out = part_ptr + (bg.to(tl.int64) * n_splits + s) * 2
    tl.store(out, tl.sum(acc1, axis=0))
    tl.store(out + 1, tl.sum(acc2, axis=0))


@triton.jit
def _apply(x_ptr, y_ptr, scale_ptr, shift_ptr, HW, SILU: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    bc = tl.program_id(0)
    j = tl.program_id(1)
    sc = tl.load(scale_ptr + bc)
    sh = tl.load(shift_ptr + bc)
    idx = j * BLOCK + tl.arange(0, BLOCK)
    mask = idx < HW
    off = bc.to(tl.int64) * HW + idx
    v = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC) * sc + sh
    if SILU:
        v = v / (1.0 + tl.exp(-v))
    tl.store(y_ptr + off, v.to(y_ptr.dtype.element_ty), mask=mask)


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """Sums are float32, float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _splits(n_bg: int, group_numel: int, device: torch.device) -> tuple[int, int]:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = max(1, -(-4 * sms // max(n_bg, 1)))
    splits = max(1, min(want, -(-group_numel // (STATS_BLOCK * 4))))
    chunk = -(-group_numel // splits)
    chunk = -(-chunk // STATS_BLOCK) * STATS_BLOCK
    return -(-group_numel // chunk), chunk


@triton_op("halodiff_triton::group_stats", mutates_args=())
def _group_stats_op(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    B = x.shape[0]
    n_bg = B * num_groups
    group_numel = x.numel() // max(n_bg, 1)
    if n_bg == 0 or group_numel == 0:
        return torch.zeros((B, num_groups, 2), dtype=_stats_dtype(x), device=x.device)
    splits, chunk = _splits(n_bg, group_numel, x.device)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty((n_bg, splits, 2), dtype=acc, device=x.device)
    wrap_triton(_partial_sums)[(n_bg, splits)](x, partial, group_numel, chunk, splits, BLOCK=STATS_BLOCK,
                                               ACC=tl.float64 if acc == torch.float64 else tl.float32)
    return partial.sum(1).view(B, num_groups, 2)


@_group_stats_op.register_fake
def _(x, num_groups):
    return x.new_empty((x.shape[0], num_groups, 2), dtype=_stats_dtype(x))


@triton_op("halodiff_triton::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    stats: torch.Tensor | None,
    count: float,
) -> torch.Tensor:
    B, C, H, W = x.shape
    if stats is None:
        stats = _group_stats_op(x, num_groups)
        count = float(C // num_groups * H * W)
    mean = stats[..., 0].double() / count
    var = (stats[..., 1].double() / count - mean * mean).clamp_min(0)
    rstd = torch.rsqrt(var + eps)
    cpg = C // num_groups
    scale = rstd.repeat_interleave(cpg, dim=1)  # [B, C]
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.repeat_interleave(cpg, dim=1) * scale
    if bias is not None:
        shift = shift + bias.double()
    f64 = x.dtype == torch.float64
    scale = scale.to(torch.float64 if f64 else torch.float32).contiguous()
    shift = shift.to(scale.dtype).contiguous()
    y = torch.empty_like(x)
    if x.numel():
        grid = (B * C, triton.cdiv(H * W, APPLY_BLOCK))
        wrap_triton(_apply)[grid](x, y, scale, shift, H * W, SILU=silu, BLOCK=APPLY_BLOCK,
                                  ACC=tl.float64 if f64 else tl.float32)
    return y


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, stats, count):
    return torch.empty_like(x)


def group_stats(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    return _group_stats_op(prepare(x), num_groups)


def group_norm(x, num_groups, weight, bias, eps, silu, stats, count):
    y = _group_norm_op(prepare(x), num_groups, weight, bias, eps, silu, stats, 0.0 if count is None else count)
    return y.to(x.dtype)
