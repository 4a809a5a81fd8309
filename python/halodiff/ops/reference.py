"""Pure-torch references: the semantics of every halodiff op. Tests compare all backends to these.

They compute in float32 (float64 for float64 inputs) and return the input dtype, like the kernels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_stats(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-(batch, group) [Σx, Σx²] of x[B, C, H, W] as float64 [B, G, 2], for every input dtype.

    float64 sums stay additive (bands summed over ranks give the image's sums) and keep
    var = Σx²/n − mean² accurate to ~1e-11 relative even at mean/std = 300.
    """
    xa = x.double().reshape(x.shape[0], num_groups, -1)
    return torch.stack([xa.sum(-1), (xa * xa).sum(-1)], dim=-1)


def stats_mean_var(stats: torch.Tensor, count: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and biased variance (clamped at 0) from [B, G, 2] sums covering `count` elements per group."""
    mean = stats[..., 0].double() / count
    return mean, (stats[..., 1].double() / count - mean * mean).clamp_min(0)


def stale_mean_var(local: torch.Tensor, stale_global: torch.Tensor, stale_local: torch.Tensor, count: float,
                   n_local: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DistriFusion's corrected stale estimate: est = stale_global − stale_local + local over `count` elements;
    where its variance is negative the band's own variance (over `n_local` elements) with est's mean."""
    est = stale_global.double() - stale_local.double() + local
    mean = est[..., 0] / count
    var = est[..., 1] / count - mean * mean
    loc_mean = local[..., 0] / n_local
    var = torch.where(var < 0, (local[..., 1] / n_local - loc_mean * loc_mean).clamp_min(0), var)
    return mean, var


def _apply(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight, bias, eps: float, silu: bool):
    """y = x·scale + shift per (b, c) with scale = rstd·w, shift = b − mean·scale (float64), applied in
    float32 (float64 for float64 x) like the kernels; then SiLU. Returns x's dtype and memory format."""
    B, C = x.shape[:2]
    G = mean.shape[1]
    rstd = torch.rsqrt(var + eps)
    scale = rstd.repeat_interleave(C // G, dim=1)  # [B, C]
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.repeat_interleave(C // G, dim=1) * scale
    if bias is not None:
        shift = shift + bias.double()
    acc = _acc_dtype(x)
    y = x.to(acc) * scale.to(acc)[:, :, None, None] + shift.to(acc)[:, :, None, None]
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=out_format(x))


def out_format(x: torch.Tensor) -> torch.memory_format:
    """The kernels' output layout: channels_last for a channels_last (and not also contiguous) x, else contiguous."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    silu: bool = False,
    stats: torch.Tensor | None = None,
    count: float | None = None,
) -> torch.Tensor:
    """GroupNorm (biased variance) with optional fused SiLU and optional external stats.

    With `stats` (float64 [B, G, 2] sums from `group_stats`, possibly summed over ranks) and `count`
    (elements per group they cover): mean = S1/count, var = max(S2/count − mean², 0) in float64.
    Without: exactly `F.group_norm` (then `F.silu`).
    """
    if stats is not None:
        mean, var = stats_mean_var(stats, count)
        return _apply(x, mean, var, weight, bias, eps, silu)
    acc = _acc_dtype(x)
    y = F.group_norm(x.to(acc), num_groups, None, None, eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(acc).reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=out_format(x))


def group_norm_stale(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    stale_global: torch.Tensor,
    stale_local: torch.Tensor,
    count: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DistriFusion's async GroupNorm of a band x: (y, local) with local = group_stats(x) (float64).

    est = stale_global − stale_local + local (this band's stale contribution replaced by its fresh one),
    mean = est₁/count, var = est₂/count − mean²; where var < 0 the band's own variance (over its
    n_local = C/G·h·w elements) with that mean. y = GroupNorm(x; mean, var)·w + b, then SiLU if `silu`.
    """
    local = group_stats(x, num_groups)
    n_local = float(x.shape[1] // num_groups * x.shape[2] * x.shape[3])
    mean, var = stale_mean_var(local, stale_global, stale_local, count, n_local)
    return _apply(x, mean, var, weight, bias, eps, silu), local


def segmented_attention(
    q: torch.Tensor, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], scale: float | None = None
) -> torch.Tensor:
    """softmax(q Kᵀ · scale) V over K = cat(ks, dim=-2), V = cat(vs, dim=-2); scale defaults to 1/sqrt(D).

    No keys at all (every segment empty) gives zeros. The result has q's dtype and shape [B, H, Lq, D], laid
    out as a view of a contiguous [B, Lq, H, D] buffer like every backend's.
    """
    B, H, Lq, D = q.shape
    out = q.new_empty((B, Lq, H, D)).transpose(1, 2)
    k = torch.cat(list(ks), dim=-2)
    v = torch.cat(list(vs), dim=-2)
    if k.shape[-2] == 0:
        return out.zero_()
    acc = _acc_dtype(q)
    s = scale if scale is not None else 1.0 / math.sqrt(D)
    return out.copy_(F.scaled_dot_product_attention(q.to(acc), k.to(acc), v.to(acc), scale=s))
