"""halodiff ops: one function per op, dispatching to the CUDA, Triton, native CPU or reference backend.

    group_stats(x, num_groups)                     -> [B, G, 2] float64 (Σx, Σx²), additive over bands
    group_norm(x, num_groups, weight, bias, eps, *, silu, stats, count)
    group_norm_stale(x, num_groups, weight, bias, eps, *, silu, stale_global, stale_local, count) -> (y, local)
    segmented_attention(q, ks, vs, scale=None)     -> softmax(q·Kᵀ·scale)·V over concatenated segments

Backends are tried in the order cuda → triton → cpu → reference; see `registry` for forcing one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _validate as _v
from . import reference
from .registry import BACKEND_ORDER, OPS, register, report, use_backend

__all__ = [
    "BACKEND_ORDER",
    "group_norm",
    "group_norm_stale",
    "group_stats",
    "reference",
    "report",
    "segmented_attention",
    "use_backend",
]


# --------------------------------------------------------------------------------------------
# Public API


def group_stats(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-(batch, group) Σx and Σx² of x[B, C, H, W] (any memory format) as float64 [B, G, 2].

    Precision and additivity: every kernel sums blocks of ≤ a few thousand elements in float32 (float64
    for float64 x) *shifted* by the block's first element, then converts each block to unshifted
    float64 sums (Σx = s₁ + nK, Σx² = s₂ + 2K·s₁ + nK²) and adds the blocks in float64. The result is
    a plain float64 (Σx, Σx²) pair, so sums of row bands (e.g. all-reduced over ranks) equal the
    image's sums, and var = Σx²/n − mean² keeps ≤ 1e-5 relative error up to mean/std ≈ 1000
    (float64 loses log10((mean/std)²) of its 16 digits; the float32 block sums are of x − K ≈ std).
    """
    x, num_groups = _v.group_input(x, num_groups)
    return OPS["group_stats"](x.device, x, num_groups)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    silu: bool = False,
    stats: torch.Tensor | None = None,
    count: float | None = None,
) -> torch.Tensor:
    """GroupNorm with torch's biased variance, optional fused SiLU and optional external stats.

    `stats`: float64 [B, G, 2] sums as `group_stats` returns (e.g. summed over ranks) and `count`: the
    number of elements per group they cover. With `stats=None` the result equals `F.group_norm` (then
    `F.silu` if `silu`). weight/bias are read in their own dtype. The result has x's dtype; it is
    channels_last when x is (read in place), contiguous otherwise.
    """
    x, num_groups = _v.group_input(x, num_groups)
    _v.affine(weight, x, "weight")
    _v.affine(bias, x, "bias")
    count = _v.stats(stats, count, x, num_groups)
    return OPS["group_norm"](x.device, x, num_groups, weight, bias, _v.eps(eps), bool(silu), stats, count)


def group_norm_stale(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    silu: bool = False,
    stale_global: torch.Tensor,
    stale_local: torch.Tensor,
    count: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DistriFusion's asynchronous GroupNorm of one band in one fused op: returns (y, local).

    `local` = group_stats(x) (float64 [B, G, 2], to be all-reduced for the next step). The statistics
    used are the corrected stale estimate est = stale_global − stale_local + local (the band's stale
    contribution replaced by its fresh one; `stale_global`: last step's all-reduced sums, `stale_local`:
    last step's sums of this band, both float64 [B, G, 2]) over `count` elements per group:
    mean = est₁/count, var = est₂/count − mean², and where var < 0 the band's own variance
    (local over its C/G·h·w elements) with that mean. y = (x − mean)·rsqrt(var + eps)·w + b, then SiLU
    if `silu`; x's dtype, channels_last when x is. CUDA and Triton: 2-3 launches (statistics partials,
    their reduction into `local` when a group spans several blocks, the apply pass); native CPU: one
    pass over x for the sums and one for y.
    """
    x, num_groups = _v.group_input(x, num_groups)
    _v.affine(weight, x, "weight")
    _v.affine(bias, x, "bias")
    _v.sums(stale_global, "stale_global", x, num_groups)
    _v.sums(stale_local, "stale_local", x, num_groups)
    return OPS["group_norm_stale"](x.device, x, num_groups, weight, bias, _v.eps(eps), bool(silu), stale_global,
                                   stale_local, _v.count(count, "stale_global"))


_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _attention_args(q, ks, vs, scale):
    """Validate segmented_attention's arguments; returns them with every last dim dense."""
    _v.tensor(q, "q")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, H, Lq, D], got shape {tuple(q.shape)}; "
                         "view [B, L, H*D] projections as [B, L, H, D] and transpose(1, 2)")
    if q.dtype not in _ATTENTION_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if q.shape[-1] == 0:
        raise ValueError(f"q must have a head dim D >= 1, got shape {tuple(q.shape)}")
    for name, seq in (("ks", ks), ("vs", vs)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list of [B, H, Lk_i, D] tensors (wrap a single tensor as [t])")
    ks, vs = list(ks), list(vs)
    if not ks:
        raise ValueError("ks must be a non-empty list of [B, H, Lk_i, D] key segments")
    if len(ks) != len(vs):
        raise ValueError(f"ks and vs must have the same length (one V segment per K segment), got {len(ks)} and {len(vs)}")
    B, H, _, D = q.shape
    for i, (k, v) in enumerate(zip(ks, vs)):
        for name, t in ((f"ks[{i}]", k), (f"vs[{i}]", v)):
            _v.tensor(t, name)
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
                raise ValueError(f"{name} must have shape [B, H, Lk, D] = [{B}, {H}, Lk, {D}] to match q, "
                                 f"got {tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move it with .to(q.device)")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"ks[{i}] has {k.shape[2]} rows but vs[{i}] has {v.shape[2]}; "
                             "each K segment needs a V segment of the same length")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None (= 1/sqrt(D)), got {type(scale).__name__}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0 (or None for 1/sqrt(D)), got {scale}")

    def dense(t):  # the kernels read any B/H/L strides in place but need a dense last dim
        return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()

    return dense(q), [dense(k) for k in ks], [dense(v) for v in vs], scale


def segmented_attention(
    q: torch.Tensor,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q·Kᵀ·scale)·V over K/V given as segments, in one pass without concatenating them.

    `q`: [B, H, Lq, D]; `ks`, `vs`: equally long lists of [B, H, Lk_i, D] segments (e.g. halo above, own band,
    halo below; Lk_i may be 0). The result equals attention over K = cat(ks, dim=2), V = cat(vs, dim=2);
    `scale` defaults to 1/sqrt(D). With no keys at all (every segment empty) the result is zeros.
    Returns q's dtype, shape [B, H, Lq, D], as a view of a contiguous [B, Lq, H, D] buffer (like torch's SDPA),
    so `out.transpose(1, 2).reshape(B, Lq, H * D)` costs no copy. Inputs with any B/H/L strides (e.g.
    transposed views of Linear outputs) are read in place; a last dim that is not dense is copied first.
    """
    q, ks, vs, scale = _attention_args(q, ks, vs, scale)
    return OPS["segmented_attention"](q.device, q, ks, vs, scale)


# --------------------------------------------------------------------------------------------
# Backend implementations. Native CPU and CUDA share the torch.ops.halodiff schema; the dispatcher
# routes by device.


def _native_group_stats(x, num_groups):
    return torch.ops.halodiff.group_stats(x, num_groups)


def _native_group_norm(x, num_groups, weight, bias, eps, silu, stats, count):
    return torch.ops.halodiff.group_norm(x, num_groups, weight, bias, eps, silu, stats, count or 0.0)


def _native_group_norm_stale(x, num_groups, weight, bias, eps, silu, stale_global, stale_local, count):
    return torch.ops.halodiff.group_norm_stale(x, num_groups, weight, bias, eps, silu, stale_global, stale_local,
                                               count)


def _triton(name: str):
    def call(*args):
        from .. import triton_kernels

        return getattr(triton_kernels, name)(*args)

    call.__name__ = f"triton_{name}"
    return call


for _backend in ("cuda", "cpu"):
    register("group_stats", _backend)(_native_group_stats)
    register("group_norm", _backend)(_native_group_norm)
    register("group_norm_stale", _backend)(_native_group_norm_stale)
for _name in ("group_stats", "group_norm", "group_norm_stale"):
    register(_name, "triton")(_triton(_name))
register("group_stats", "reference")(reference.group_stats)
register("group_norm", "reference")(reference.group_norm)
register("group_norm_stale", "reference")(reference.group_norm_stale)


# segmented_attention: what each backend's kernel cannot run (dispatch then falls through to the next one).
_CUDA_ATTENTION_MAX_SEGMENTS = 64  # kMaxSegments in csrc/segmented_attention.cu (one launch)
_ATTENTION_MAX_HEAD_DIM = 256  # CUDA and Triton kernels


@torch.compiler.assume_constant_result
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _kernel_attention_reasons(q, ks, vs, scale) -> list[str]:
    reasons = []
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"the kernel supports float16/bfloat16/float32, got {q.dtype}")
    if q.shape[-1] > _ATTENTION_MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {_ATTENTION_MAX_HEAD_DIM}")
    return reasons


def _cuda_attention_reasons(q, ks, vs, scale) -> list[str]:
    reasons = _kernel_attention_reasons(q, ks, vs, scale)
    n = sum(1 for k in ks if k.shape[2] > 0)
    if n > _CUDA_ATTENTION_MAX_SEGMENTS:
        reasons.append(f"{n} non-empty segments > {_CUDA_ATTENTION_MAX_SEGMENTS} (the CUDA kernel's one-launch table)")
    if q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cuda" and _cuda_major(q.device.index or 0) < 8:
        reasons.append("the float16/bfloat16 CUDA kernel uses sm_80+ tensor cores (mma.sync bf16/f16)")
    return reasons


def _native_segmented_attention(q, ks, vs, scale):
    return torch.ops.halodiff.segmented_attention(q, ks, vs, scale)


register("segmented_attention", "cuda", check=_cuda_attention_reasons)(_native_segmented_attention)
register("segmented_attention", "triton", check=_kernel_attention_reasons)(_triton("segmented_attention"))
register("segmented_attention", "cpu")(_native_segmented_attention)
register("segmented_attention", "reference")(reference.segmented_attention)
