"""Every backend of group_stats / group_norm vs the pure-torch reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_device
from halodiff import ops
from halodiff.ops import reference

# (B, C, H, W, G): odd shapes: C not a power of two, h = 1, W not a multiple of any block, B = 3.
GN_SHAPES = [(2, 64, 8, 8, 32), (3, 96, 5, 7, 8), (1, 48, 1, 13, 6), (2, 40, 9, 1, 4), (1, 6, 33, 31, 3)]


def _low_precision_ok(ours: torch.Tensor, torch_lp: torch.Tensor, ref32: torch.Tensor) -> tuple[float, float]:
    err = (ours.float() - ref32).abs().max().item()
    base = (torch_lp.float() - ref32).abs().max().item()
    return err, base


@pytest.mark.parametrize("shape", GN_SHAPES)
def test_group_stats_fp32(backend, shape):
    B, C, H, W, G = shape
    dev = run_device(backend)
    x = torch.randn(B, C, H, W, device=dev) * 3 + 0.5
    with ops.use_backend(backend):
        got = ops.group_stats(x, G)
    want = reference.group_stats(x.double(), G)
    assert got.dtype == torch.float64 and got.shape == (B, G, 2)
    # Kernels sum x − K (K: the block's first element, E[(x−K)²] = 2σ²) in float32 lanes: ~1e-6 of Σx² at mean ≈ 0.
    scale = x.double().abs().reshape(B, G, -1).pow(2).sum(-1).clamp_min(1)[..., None]
    assert ((got - want).abs() / scale).max() < 3e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_stats_low_precision_inputs(backend, dtype):
    dev = run_device(backend)
    x = (torch.randn(3, 24, 5, 11, device=dev) * 2).to(dtype)
    with ops.use_backend(backend):
        got = ops.group_stats(x, 6)
    want = reference.group_stats(x.double(), 6)  # exact sums of the low-precision values
    scale = x.double().pow(2).reshape(3, 6, -1).sum(-1).clamp_min(1)[..., None]
    assert got.dtype == torch.float64 and ((got - want).abs() / scale).max() < 3e-6  # as test_group_stats_fp32


@pytest.mark.parametrize("shape", GN_SHAPES)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_fp32(backend, shape, silu, affine):
    B, C, H, W, G = shape
    dev = run_device(backend)
    x = torch.randn(B, C, H, W, device=dev) * 2 + 1
    w = torch.randn(C, device=dev) if affine else None
    b = torch.randn(C, device=dev) if affine else None
    with ops.use_backend(backend):
        got = ops.group_norm(x, G, w, b, 1e-5, silu=silu)
    want = F.group_norm(x.double(), G, None if w is None else w.double(), None if b is None else b.double(), 1e-5)
    if silu:
        want = F.silu(want)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_low_precision(backend, dtype, silu):
    """Kernel error vs the fp32 reference ≤ 2× the error of torch's own low-precision GroupNorm."""
    dev = run_device(backend)
    x32 = torch.randn(2, 40, 9, 13, device=dev) * 3 + 1
    w, b = torch.randn(40, device=dev), torch.randn(40, device=dev)
    x = x32.to(dtype)
    ref32 = F.group_norm(x.float(), 8, w, b, 1e-5)
    torch_lp = F.group_norm(x, 8, w.to(dtype), b.to(dtype), 1e-5)
    if silu:
        ref32, torch_lp = F.silu(ref32), F.silu(torch_lp)
    with ops.use_backend(backend):
        got = ops.group_norm(x, 8, w, b, 1e-5, silu=silu)
    assert got.dtype == dtype
    err, base = _low_precision_ok(got, torch_lp, ref32)
    assert err <= 2 * base + 1e-6, f"kernel error {err:.3g} > 2 x torch {dtype} error {base:.3g}"


def test_group_norm_external_stats_matches_full(backend):
    """Stats of the whole image applied to a band == the band of the full GroupNorm (the patch-parallel use)."""
    dev = run_device(backend)
    x = torch.randn(2, 32, 12, 10, device=dev)
    w, b = torch.randn(32, device=dev), torch.randn(32, device=dev)
    full = F.silu(F.group_norm(x, 4, w, b, 1e-6))
    bands = [x[:, :, :5], x[:, :, 5:]]
    with ops.use_backend(backend):
        stats = sum(ops.group_stats(t, 4) for t in bands)
        outs = [ops.group_norm(t, 4, w, b, 1e-6, silu=True, stats=stats, count=8 * 12 * 10) for t in bands]
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)


def test_group_norm_negative_variance_from_stats_is_clamped(backend):
    dev = run_device(backend)
    x = torch.randn(1, 4, 3, 3, device=dev)
    stats = torch.tensor([[[9.0, 1.0], [0.0, 9.0]]], device=dev, dtype=torch.float64)  # var = 1/9 - 1 < 0, group 0
    with ops.use_backend(backend):
        got = ops.group_norm(x, 2, stats=stats, count=9.0, eps=1e-5)
    want = reference.group_norm(x, 2, stats=stats, count=9.0, eps=1e-5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_group_ops_float64_keep_float64_precision(backend):
    """float64 inputs get float64 sums, so patch-parallel GroupNorm in float64 stays exact to ~1e-15."""
    dev = run_device(backend)
    x = torch.randn(2, 12, 7, 5, device=dev, dtype=torch.float64) * 3 + 2
    w = torch.randn(12, device=dev, dtype=torch.float64)
    b = torch.randn(12, device=dev, dtype=torch.float64)
    with ops.use_backend(backend):
        stats = ops.group_stats(x, 3)
        y = ops.group_norm(x, 3, stats=stats, count=4.0 * 7 * 5, eps=1e-6)
        y_affine = ops.group_norm(x, 3, w, b, eps=1e-6, silu=True)  # float64 weights stay float64 too
    assert stats.dtype == torch.float64
    torch.testing.assert_close(stats, reference.group_stats(x, 3), rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(y, F.group_norm(x, 3, eps=1e-6), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_affine, F.silu(F.group_norm(x, 3, w, b, eps=1e-6)), rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
def test_triton_ops_launch_on_the_tensors_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the Triton launchers guard the device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    dev = "cuda:1"
    x = torch.randn(2, 8, 6, 6, device=dev)
    q = torch.randn(1, 2, 9, 40, device=dev, dtype=torch.float16)
    with torch.cuda.device(0), ops.use_backend("triton"):
        y = ops.group_norm(x, 2, silu=True)
        a = ops.segmented_attention(q, [q[:, :, :4], q[:, :, 4:]], [q[:, :, :4], q[:, :, 4:]])
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 2)), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(a, F.scaled_dot_product_attention(q, q, q), rtol=2e-3, atol=2e-3)
