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
    """Per-(batch, group) [Σx, Σx²] of x[B, C, H, W] as [B, G, 2]: float32, float64 for float64 x."""
    xa = x.to(_acc_dtype(x)).reshape(x.shape[0], num_groups, -1)
    return torch.stack([xa.sum(-1), (xa * xa).sum(-1)], dim=-1)


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

    With `stats` ([B, G, 2] sums from `group_stats`, possibly summed over ranks) and `count`
    (elements per group they cover): mean = S1/count, var = max(S2/count - mean², 0).
    Without: exactly `F.group_norm` (then `F.silu`).
    """
    acc = _acc_dtype(x)
    if stats is None:
        y = F.group_norm(x.to(acc), num_groups, None, None, eps)
    else:
        B, C = x.shape[:2]
        s = stats.to(acc)
        mean = s[..., 0] / count
        var = (s[..., 1] / count - mean * mean).clamp_min(0)
        rstd = torch.rsqrt(var + eps)
        xg = x.to(acc).reshape(B, num_groups, -1)
        y = ((xg - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(acc).reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def _as_list(v: int | Sequence[int], n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(t) for t in v]


def halo_pack(tensors: Sequence[torch.Tensor], top: int | Sequence[int], bottom: int | Sequence[int]) -> torch.Tensor:
    """Flat buffer [tops of t0..tn, bottoms of t0..tn]; each part is t[..., :top, :] or t[..., h-bottom:, :]."""
    tops, bottoms = _as_list(top, len(tensors)), _as_list(bottom, len(tensors))
    parts = [t[..., :k, :].reshape(-1) for t, k in zip(tensors, tops)]
    parts += [t[..., t.shape[-2] - k :, :].reshape(-1) for t, k in zip(tensors, bottoms)]
    return torch.cat(parts)


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
