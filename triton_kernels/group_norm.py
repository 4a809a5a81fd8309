"""Triton GroupNorm (+ fused SiLU), plain, with external stats, and DistriFusion's stale variant.

Kernels (NCHW, or channels_last read in place):
- `_partials_nchw` / `_partials_nhwc`: program (b·G + g, s) reads its chunk of group g once: sums of x − K
  (K = the chunk's first element) in float32 (float64 for float64 x), written as unshifted float64 (Σx, Σx²)
  partials.
- `_reduce`: program per block of (b, g) adds the split partials in a fixed order -> float64 [B, G, 2].
- `_apply`: program (b, channel block, position block) computes mean/rstd of its channels' groups in
  float64 in-kernel (from the partials, external stats or the stale estimate), scale/shift per channel
  with weight/bias read in their own dtype, then reads its [channels x positions] tile of x once and
  writes y once. Tiles are sized to the spatial extent (8x8 planes fill whole tiles).
Launches: group_stats 1-2 (reduce only with several splits), group_norm 2 (1 with external stats),
group_norm_stale 2-3 (tensor allocations only besides). The extent that is contiguous in memory (H·W for
NCHW, C and C/G for channels_last) is passed in units of VEC elements (the largest power of two <= 16 bytes
dividing it), so Triton proves the alignment and loads 16-byte vectors. Precision/additivity of the sums:
see `halodiff.ops.group_stats`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import _common
from ._common import device_guard, kernel_dtype, pow2, sm_count, split_f64

TILE = 2048  # elements per program in the apply pass
STATS_TILE = 1024  # elements per loop step in the statistics pass
MODE_OWN, MODE_GIVEN, MODE_STALE = 0, 1, 2


@triton.jit
def _store_sums(part_ptr, idx, acc1, acc2, k, n):
    """Shifted block sums -> unshifted float64 (Σx, Σx²) = (s1 + nK, s2 + K(2·s1 + nK)) at part[idx]."""
    s1 = tl.sum(acc1).to(tl.float64)
    s2 = tl.sum(acc2).to(tl.float64)
    kd = k.to(tl.float64)
    nd = n.to(tl.float64)
    tl.store(part_ptr + idx * 2, s1 + nd * kd)
    tl.store(part_ptr + idx * 2 + 1, s2 + kd * (2.0 * s1 + nd * kd))


@triton.jit
def _partials_nchw(x_ptr, part_ptr, gn_v, chunk_v, n_splits, VEC: tl.constexpr, BLOCK: tl.constexpr,
                   ACC: tl.constexpr):
    """Program (bg, s): elements [s·chunk, ...) of the contiguous group bg (gn elements). gn and chunk arrive in
    units of VEC elements (VEC divides H·W), so the loads are VEC-aligned. Writes 2 float64 to part[bg, s]."""
    bg = tl.program_id(0)
    s = tl.program_id(1)
    gn = gn_v * VEC
    base = x_ptr + bg.to(tl.int64) * gn
    i0 = s * chunk_v * VEC
    i1 = tl.minimum(i0 + chunk_v * VEC, gn)
    k = tl.load(base + i0).to(ACC)
    acc1 = tl.zeros([BLOCK], dtype=ACC)
    acc2 = tl.zeros([BLOCK], dtype=ACC)
    for off in range(i0, i1, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < i1
        d = tl.where(m, tl.load(base + idx, mask=m, other=0.0).to(ACC) - k, 0.0)
        acc1 += d
        acc2 += d * d
    _store_sums(part_ptr, bg.to(tl.int64) * n_splits + s, acc1, acc2, k, i1 - i0)


@triton.jit
def _partials_nhwc(x_ptr, part_ptr, C_v, HW, G, CPG_v, chunk, n_splits, VEC: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Program (bg, s): rows (positions) [s·chunk, ...) of group bg's CPG channels, C elements apart. C and CPG
    arrive in units of VEC elements (VEC divides C/G). Writes 2 float64 to part[bg, s]."""
    bg = tl.program_id(0)
    s = tl.program_id(1)
    C = C_v * VEC
    CPG = CPG_v * VEC
    base = x_ptr + (bg // G).to(tl.int64) * HW * C + (bg % G) * CPG
    r0 = s * chunk
    r1 = tl.minimum(r0 + chunk, HW)
    k = tl.load(base + r0.to(tl.int64) * C).to(ACC)
    cols = tl.arange(0, BLOCK_C)
    acc1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        m = (rows < r1)[:, None] & (cols < CPG)[None, :]
        v = tl.load(base + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m, other=0.0).to(ACC)
        d = tl.where(m, v - k, 0.0)
        acc1 += d
        acc2 += d * d
    _store_sums(part_ptr, bg.to(tl.int64) * n_splits + s, acc1, acc2, k, (r1 - r0) * CPG)


@triton.jit
def _reduce(part_ptr, out_ptr, n_bg, n_splits, BLOCK: tl.constexpr):
    """Program i: (b, g) rows [i·BLOCK, ...) of the [B·G, n_splits, 2] partials, added in split order."""
    bg = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = bg < n_bg
    s1 = tl.zeros([BLOCK], dtype=tl.float64)
    s2 = tl.zeros([BLOCK], dtype=tl.float64)
    for s in range(0, n_splits):
        p = part_ptr + (bg.to(tl.int64) * n_splits + s) * 2
        s1 += tl.load(p, mask=m, other=0.0)
        s2 += tl.load(p + 1, mask=m, other=0.0)
    tl.store(out_ptr + bg * 2, s1, mask=m)
    tl.store(out_ptr + bg * 2 + 1, s2, mask=m)


@triton.jit
def _apply(x_ptr, y_ptr, w_ptr, b_ptr, sums_ptr, n_splits, given_ptr, sg_ptr, sl_ptr, count_hi, count_lo,
           n_local_hi, n_local_lo, eps_hi, eps_lo, C_v, HW_v, G, CPG, n_cblocks, MODE: tl.constexpr,
           HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr,
           VEC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, ACC: tl.constexpr):
    """Program (b·n_cblocks + cb, j): channels [cb·BLOCK_C, ...) x positions [j·BLOCK_HW, ...) of batch b.
    count / n_local / eps arrive as float32 (hi, lo) pairs of their float64 values; the contiguous extent (H·W
    for NCHW, C for channels_last) in units of VEC elements, the other one with VEC = 1 (C_v = C or HW_v = HW)."""
    if CHANNELS_LAST:
        C = C_v * VEC
        HW = HW_v
    else:
        C = C_v
        HW = HW_v * VEC
    count = tl.cast(count_hi, tl.float64) + tl.cast(count_lo, tl.float64)
    n_local = tl.cast(n_local_hi, tl.float64) + tl.cast(n_local_lo, tl.float64)
    eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
    pid = tl.program_id(0)
    b = pid // n_cblocks
    c = (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cmask = c < C
    bg = (b * G + c // CPG).to(tl.int64)
    # float64 mean / rstd per channel (of its group), as halodiff.h's StatsSource::moments.
    if MODE == 1:
        mean = tl.load(given_ptr + bg * 2, mask=cmask, other=0.0) / count
        var = tl.load(given_ptr + bg * 2 + 1, mask=cmask, other=0.0) / count - mean * mean
    else:
        l1 = tl.zeros([BLOCK_C], dtype=tl.float64)
        l2 = tl.zeros([BLOCK_C], dtype=tl.float64)
        for s in range(0, n_splits):
            l1 += tl.load(sums_ptr + (bg * n_splits + s) * 2, mask=cmask, other=0.0)
            l2 += tl.load(sums_ptr + (bg * n_splits + s) * 2 + 1, mask=cmask, other=0.0)
        if MODE == 2:
            e1 = tl.load(sg_ptr + bg * 2, mask=cmask, other=0.0) - tl.load(sl_ptr + bg * 2, mask=cmask, other=0.0)
            e2 = tl.load(sg_ptr + bg * 2 + 1, mask=cmask, other=0.0) - tl.load(sl_ptr + bg * 2 + 1, mask=cmask,
                                                                             other=0.0)
            mean = (e1 + l1) / count
            var = (e2 + l2) / count - mean * mean
            lm = l1 / n_local
            var = tl.where(var < 0, l2 / n_local - lm * lm, var)
        else:
            mean = l1 / n_local
            var = l2 / n_local - mean * mean
    rstd = 1.0 / tl.sqrt(tl.where(var < 0, 0.0, var) + eps)
    sc = rstd
    if HAS_W:
        sc = sc * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float64)
    sh = -mean * sc
    if HAS_B:
        sh += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float64)
    sc = sc.to(ACC)
    sh = sh.to(ACC)
    m = cmask[:, None] & (hw < HW)[None, :]
    if CHANNELS_LAST:
        off = b.to(tl.int64) * HW * C + hw.to(tl.int64)[None, :] * C + c[:, None]
    else:
        off = (b.to(tl.int64) * C + c[:, None]) * HW + hw[None, :]
    v = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC) * sc[:, None] + sh[:, None]
    if SILU:
        v = v / (1.0 + tl.exp(-v))
    tl.store(y_ptr + off, v.to(y_ptr.dtype.element_ty), mask=m)


def _acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x in the kernel dtype, channels_last kept in place, other layouts contiguous (as the CUDA kernels)."""
    x = x.to(kernel_dtype(x))
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return (x, True) if cl else (x.contiguous(), False)


def _vec(elem_size: int, extent: int) -> int:
    """Largest power-of-two element count <= 16 bytes dividing the contiguous extent (H·W for NCHW, C/G for
    channels_last): the alignment the kernels are told about."""
    vec = 16 // elem_size
    while vec > 1 and extent % vec:
        vec //= 2
    return vec


def _nhwc_stats_tile(cpg: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) rows x channels of the channels_last statistics pass."""
    block_c = pow2(cpg)
    return max(1, STATS_TILE // block_c), block_c


def _launch_partials(x: torch.Tensor, cl: bool, num_groups: int, into: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Float64 partial sums [B·G, splits, 2] (written into `into` [B, G, 2] when one split suffices)."""
    B, C, H, W = x.shape
    n_bg, cpg, hw = B * num_groups, C // num_groups, H * W
    vec = _vec(x.element_size(), cpg if cl else hw)
    # Chunks of rows (channels_last) or of VEC-element units (NCHW); ~4 programs per SM, >= 4 loop steps each.
    if cl:
        block_r, block_c = _nhwc_stats_tile(cpg)
        extent, step = hw, block_r
    else:
        extent, step = cpg * hw // vec, STATS_TILE // vec
    want = max(1, -(-4 * sm_count(x.device) // n_bg))
    splits = max(1, min(want, -(-extent // (4 * step))))
    chunk = -(-extent // splits)
    splits = -(-extent // chunk)
    part = into if splits == 1 and into is not None else torch.empty((n_bg, splits, 2), dtype=torch.float64,
                                                                      device=x.device)
    if cl:
        _common.launch(_partials_nhwc, (n_bg, splits), x, part, C // vec, hw, num_groups, cpg // vec, chunk, splits,
                       VEC=vec, BLOCK_R=block_r, BLOCK_C=block_c, ACC=_acc(x))
    else:
        _common.launch(_partials_nchw, (n_bg, splits), x, part, cpg * hw // vec, chunk, splits, VEC=vec,
                       BLOCK=STATS_TILE, ACC=_acc(x))
    return part, splits


def _reduce_into(part: torch.Tensor, splits: int, out: torch.Tensor) -> None:
    if part is out:
        return
    n_bg = out.shape[0] * out.shape[1]
    block = min(256, pow2(n_bg))
    _common.launch(_reduce, (triton.cdiv(n_bg, block),), part, out, n_bg, splits, BLOCK=block)


def _apply_tiles(C: int, hw: int, cl: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): TILE elements, the contiguous dim first (positions for NCHW, channels for NHWC)."""
    if cl:
        block_c = min(64, pow2(C))
        return block_c, max(1, min(pow2(hw), TILE // block_c))
    block_hw = min(pow2(hw), 1024)
    return max(1, min(pow2(C), TILE // block_hw)), block_hw


def _launch_apply(x, cl, y, num_groups, weight, bias, eps, silu, mode, sums, splits, given, stale_g, stale_l, count):
    B, C, H, W = x.shape
    hw = H * W
    block_c, block_hw = _apply_tiles(C, hw, cl)
    n_cblocks = triton.cdiv(C, block_c)
    vec = _vec(x.element_size(), C if cl else hw)
    # Every pointer argument needs a tensor; those MODE leaves unread (and HAS_W/HAS_B off) get one of the right
    # dtype that is present anyway. No allocation, nothing read through them.
    present_f64 = next(t for t in (sums, given, stale_g) if t is not None)
    f64 = lambda t: t if t is not None else present_f64  # noqa: E731
    _common.launch(
        _apply, (B * n_cblocks, triton.cdiv(hw, block_hw)),
        x, y, weight if weight is not None else x, bias if bias is not None else x,
        f64(sums), splits, f64(given), f64(stale_g), f64(stale_l),
        *split_f64(count), *split_f64(C // num_groups * hw), *split_f64(eps), C // vec if cl else C,
        hw if cl else hw // vec, num_groups, C // num_groups, n_cblocks,
        MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None, SILU=bool(silu), CHANNELS_LAST=cl, VEC=vec,
        BLOCK_C=block_c, BLOCK_HW=block_hw, ACC=_acc(x),
    )


def _out_like(x: torch.Tensor, cl: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last if cl else torch.contiguous_format)


def _sums_like(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.empty((x.shape[0], num_groups, 2), dtype=torch.float64, device=x.device)


def _is_cl(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_stats_impl(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The launcher behind halodiff_triton::group_stats (plain Python: tests count its launches)."""
    out = _sums_like(x, num_groups)
    if out.numel() == 0:
        return out
    if x.numel() == 0:
        return out.zero_()
    x, cl = _layout(x)
    with device_guard(x):
        part, splits = _launch_partials(x, cl, num_groups, out)
        _reduce_into(part, splits, out)
    return out


_group_stats_op = triton_op("halodiff_triton::group_stats", mutates_args=())(group_stats_impl)


@_group_stats_op.register_fake
def _(x, num_groups):
    return x.new_empty((x.shape[0], num_groups, 2), dtype=torch.float64)


def group_norm_impl(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool, stats: torch.Tensor | None, count: float) -> torch.Tensor:
    """The launcher behind halodiff_triton::group_norm."""
    x, cl = _layout(x)
    y = _out_like(x, cl)
    if x.numel() == 0:
        return y
    with device_guard(x):
        if stats is not None:
            _launch_apply(x, cl, y, num_groups, weight, bias, eps, silu, MODE_GIVEN, None, 1, stats.contiguous(),
                          None, None, count)
        else:
            part, splits = _launch_partials(x, cl, num_groups, None)
            _launch_apply(x, cl, y, num_groups, weight, bias, eps, silu, MODE_OWN, part, splits, None, None, None,
                          1.0)
    return y


_group_norm_op = triton_op("halodiff_triton::group_norm", mutates_args=())(group_norm_impl)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, stats, count):
    return _out_like(x, _is_cl(x))


def group_norm_stale_impl(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float, silu: bool, stale_global: torch.Tensor, stale_local: torch.Tensor,
                          count: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher behind halodiff_triton::group_norm_stale."""
    x, cl = _layout(x)
    y = _out_like(x, cl)
    local = _sums_like(x, num_groups)
    if local.numel() == 0:
        return y, local
    if x.numel() == 0:
        return y, local.zero_()
    with device_guard(x):
        part, splits = _launch_partials(x, cl, num_groups, local)
        _reduce_into(part, splits, local)
        _launch_apply(x, cl, y, num_groups, weight, bias, eps, silu, MODE_STALE, local, 1, None,
                      stale_global.contiguous(), stale_local.contiguous(), count)
    return y, local


_group_norm_stale_op = triton_op("halodiff_triton::group_norm_stale", mutates_args=())(group_norm_stale_impl)


@_group_norm_stale_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, stale_global, stale_local, count):
    return _out_like(x, _is_cl(x)), x.new_empty((x.shape[0], num_groups, 2), dtype=torch.float64)


def _param(p: torch.Tensor | None) -> torch.Tensor | None:
    """weight/bias as the kernel indexes them: its own dtype (fp32 for bf16 under the interpreter), stride 1."""
    return None if p is None else p.to(kernel_dtype(p)).contiguous()


def group_stats(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    return _group_stats_op(x, num_groups)


def group_norm(x, num_groups, weight, bias, eps, silu, stats, count):
    y = _group_norm_op(x, num_groups, _param(weight), _param(bias), eps, silu, stats, 0.0 if count is None else count)
    return y.to(x.dtype)


def group_norm_stale(x, num_groups, weight, bias, eps, silu, stale_global, stale_local, count):
    y, local = _group_norm_stale_op(x, num_groups, _param(weight), _param(bias), eps, silu, stale_global,
                                    stale_local, count)
    return y.to(x.dtype), local


def _sig(fn, ptrs: dict[str, str], fp32: tuple[str, ...] = ()) -> dict[str, str]:
    """Signature of `fn`: the given pointer types, float32 scalars, constexprs, i32 for the rest."""
    consts = {n for n, a in fn.fn.__annotations__.items() if "constexpr" in str(a)}  # jit or interpreted
    return {n: ptrs.get(n) or ("constexpr" if n in consts else "fp32" if n in fp32 else "i32") for n in fn.arg_names}


def audit_configs() -> list[dict]:
    """The statistics, reduce and apply kernels at SD1.5 GroupNorm shapes (32 groups), NCHW and channels_last,
    fp16 and fp32, sized as the launchers size them (8x8 is the smallest UNet level). Pointers are 16-byte
    aligned; extents are passed in units of VEC as the launchers do."""
    out = []
    for dtype, tt, elem in (("fp16", "*fp16", 2), ("fp32", "*fp32", 4)):
        vec = 16 // elem
        for B, C, H, W in ((2, 320, 64, 64), (2, 1280, 8, 8)):
            for cl in (False, True):
                label = f"SD1.5 {B}x{C}x{H}x{W} G=32 {'NHWC' if cl else 'NCHW'}"
                ptrs = {"x_ptr": tt, "y_ptr": tt, "w_ptr": tt, "b_ptr": tt, "part_ptr": "*fp64", "sums_ptr": "*fp64",
                        "given_ptr": "*fp64", "sg_ptr": "*fp64", "sl_ptr": "*fp64"}
                common = dict(num_warps=4, num_stages=2, dtype=dtype, shape=label)
                cpg_vec = _vec(elem, C // 32)
                if cl:
                    block_r, block_c = _nhwc_stats_tile(C // 32)
                    sig = _sig(_partials_nhwc, ptrs)
                    out.append(dict(name="group_norm_partials", fn=_partials_nhwc, signature=sig,
                                    constexprs=dict(VEC=cpg_vec, BLOCK_R=block_r, BLOCK_C=block_c, ACC=tl.float32),
                                    attrs=["x_ptr", "part_ptr"], **common))
                else:
                    sig = _sig(_partials_nchw, ptrs)
                    out.append(dict(name="group_norm_partials", fn=_partials_nchw, signature=sig,
                                    constexprs=dict(VEC=vec, BLOCK=STATS_TILE, ACC=tl.float32),
                                    attrs=["x_ptr", "part_ptr"], **common))
                bc, bhw = _apply_tiles(C, H * W, cl)
                sig = _sig(_apply, ptrs, fp32=("count_hi", "count_lo", "n_local_hi", "n_local_lo", "eps_hi", "eps_lo"))
                for mode in (MODE_OWN, MODE_STALE):
                    out.append(dict(name="group_norm_apply" + ("_stale" if mode == MODE_STALE else ""), fn=_apply,
                                    signature=sig,
                                    constexprs=dict(MODE=mode, HAS_W=True, HAS_B=True, SILU=True, CHANNELS_LAST=cl,
                                                    VEC=vec, BLOCK_C=bc, BLOCK_HW=bhw, ACC=tl.float32),
                                    attrs=[n for n, t in sig.items() if t.startswith("*")], **common))
    out.append(dict(name="group_norm_reduce", fn=_reduce, signature=_sig(_reduce, {"part_ptr": "*fp64",
                                                                                  "out_ptr": "*fp64"}),
                    constexprs={"BLOCK": 64}, attrs=["part_ptr", "out_ptr"], num_warps=4, num_stages=2, dtype="fp64",
                    shape="B*G = 64"))
    return out
