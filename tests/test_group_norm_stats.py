"""GroupNorm statistics that stay exact at large mean/std, the fused stale GroupNorm (DistriFusion's async
steps), channels_last without copies, weight/bias in their own dtype, and the Triton launch counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, run_device
from kernel_utils import AtenOps, triton_module
from halodiff import ops
from halodiff._native import native
from halodiff.ops import reference

LOW = [torch.float16, torch.bfloat16]


def _exact_var(x: torch.Tensor, G: int) -> torch.Tensor:
    """Biased per-group variance of x's values, two-pass in float64."""
    return x.double().reshape(x.shape[0], G, -1).var(-1, unbiased=False)


def _var_from_sums(s: torch.Tensor, n: float) -> torch.Tensor:
    mean = s[..., 0] / n
    return s[..., 1] / n - mean * mean


@pytest.mark.parametrize("ratio", [100, 300])
@pytest.mark.parametrize("dtype", [torch.float32] + LOW)
def test_variance_exact_at_large_mean(backend, ratio, dtype):
    """≤ 1e-5 relative variance error at mean/std = 100 and 300, from the image's sums and from the sums of
    3 row bands added up (what the patch-parallel all-reduce does)."""
    B, C, H, W, G = 2, 16, 20, 12, 4
    dev = run_device(backend)
    g = torch.Generator().manual_seed(ratio)
    std = 0.7
    x = (torch.randn(B, C, H, W, generator=g) * std + ratio * std).to(dtype).to(dev)
    n = C // G * H * W
    with ops.use_backend(backend):
        full = ops.group_stats(x, G)
        bands = sum(ops.group_stats(x[:, :, a:b].contiguous(), G) for a, b in ((0, 7), (7, 13), (13, 20)))
    assert full.dtype == bands.dtype == torch.float64
    exact = _exact_var(x, G)
    for s in (full, bands):
        err = ((_var_from_sums(s, n) - exact).abs() / exact).max().item()
        assert err <= 1e-5, f"{backend} {dtype} mean/std={ratio}: relative variance error {err:.2e}"
    if dtype == torch.float32 and ratio == 300:  # the test has teeth: plain float32 Σx, Σx² fail it
        xf = x.float().cpu().reshape(B, G, -1)
        naive = torch.stack([xf.sum(-1), (xf * xf).sum(-1)], -1).double()
        assert ((_var_from_sums(naive, n) - exact.cpu()).abs() / exact.cpu()).max() > 1e-5


def test_variance_exact_channels_last_and_split_blocks(backend, monkeypatch):
    """The same bound for a channels_last input and with the statistics split over several blocks per group
    (Triton on the CPU: as many splits as a 64-SM GPU would use)."""
    if backend == "triton":
        monkeypatch.setattr(triton_module("group_norm"), "sm_count", lambda device: 64)
    dev = run_device(backend)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 24, 40, 36, generator=g) * 0.5 + 150).to(dev).contiguous(memory_format=torch.channels_last)
    with ops.use_backend(backend):
        s = ops.group_stats(x, 3)
        s_nchw = ops.group_stats(x.contiguous(), 3)
    exact = _exact_var(x, 3)
    for got in (s, s_nchw):
        assert ((_var_from_sums(got, 8 * 40 * 36) - exact).abs() / exact).max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_at_large_mean_matches_float64(backend, dtype):
    """GroupNorm (own stats and summed band stats) at mean/std = 300 vs F.group_norm in float64: normalised
    outputs within 2e-4 (float32 x·scale + shift rounds at |x·scale| ≈ 300) / 1e-9 for float64 x."""
    dev = run_device(backend)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 8, 9, 10, generator=g) + 300).to(dtype).to(dev)
    want = F.group_norm(x.double(), 2, eps=1e-6)
    with ops.use_backend(backend):
        own = ops.group_norm(x, 2, eps=1e-6)
        stats = ops.group_stats(x[:, :, :4], 2) + ops.group_stats(x[:, :, 4:], 2)
        ext = ops.group_norm(x, 2, eps=1e-6, stats=stats, count=4 * 9 * 10)
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    for got in (own, ext):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------------
# group_norm_stale

# (B, C, h, W, G): odd shapes: 1 row, C/G = 1, W = 1, B = 3.
STALE_SHAPES = [(2, 32, 5, 8, 8), (3, 12, 1, 7, 4), (1, 6, 4, 1, 6), (2, 40, 3, 9, 5)]


def _stale_inputs(B, C, h, W, G, dev, dtype, seed=0, ranks=3):
    """Band x of a `ranks`-band image, last step's global sums and last step's sums of this band."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, h, W, generator=g) * 2 + 1).to(dtype).to(dev)
    prev = torch.randn(B, C, h * ranks, W, generator=g).to(dev) * 2 + 1.2
    stale_global = reference.group_stats(prev, G).to(dev)
    stale_local = reference.group_stats(prev[:, :, :h], G).to(dev)
    return x, stale_global, stale_local, float(C // G * h * ranks * W)


@pytest.mark.parametrize("shape", STALE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stale_matches_reference(backend, shape, dtype):
    dev = run_device(backend)
    B, C = shape[:2]
    x, sg, sl, count = _stale_inputs(*shape, dev, dtype)
    w, b = torch.randn(C).to(dev), torch.randn(C).to(dtype).to(dev)
    with ops.use_backend(backend):
        y, local = ops.group_norm_stale(x, shape[4], w, b, 1e-5, silu=True, stale_global=sg, stale_local=sl,
                                        count=count)
    want_y, want_local = reference.group_norm_stale(x, shape[4], w, b, 1e-5, True, sg, sl, count)
    assert y.dtype == dtype and y.shape == x.shape and local.dtype == torch.float64 and local.shape == (B, shape[4], 2)
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(local, want_local, rtol=3e-6 if dtype == torch.float32 else 1e-13, atol=1e-6)


def test_stale_with_fresh_sums_equals_full_group_norm(backend):
    """If the stale sums are this step's (sync), the corrected estimate is exact: each band's output is its
    rows of the whole image's GroupNorm (+ SiLU)."""
    dev = run_device(backend)
    x = torch.randn(2, 24, 12, 7, device=dev) * 3 - 1
    w, b = torch.randn(24, device=dev), torch.randn(24, device=dev)
    bands = [x[:, :, :5], x[:, :, 5:9], x[:, :, 9:]]
    with ops.use_backend(backend):
        sums = [ops.group_stats(t, 6) for t in bands]
        outs = [ops.group_norm_stale(t, 6, w, b, 1e-6, silu=True, stale_global=sum(sums), stale_local=s,
                                     count=4 * 12 * 7) for t, s in zip(bands, sums)]
    want = F.silu(F.group_norm(x, 6, w, b, 1e-6))
    torch.testing.assert_close(torch.cat([y for y, _ in outs], 2), want, rtol=1e-5, atol=2e-5)
    for (_, local), s in zip(outs, sums):
        torch.testing.assert_close(local, s, rtol=1e-6, atol=1e-6)


def test_stale_negative_variance_falls_back_to_band_variance(backend):
    """Groups whose corrected estimate has var < 0 use the band's own variance with the estimate's mean."""
    dev = run_device(backend)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 8, 3, 5, generator=g) * 1.5 + 0.3).double().to(dev)
    local = reference.group_stats(x, 4)
    count = 2 * 3 * 5 * 2.0
    sg = local * 2.1  # a plausible estimate...
    sl = local.clone()
    sl[0, 1, 1] += 10 * sg[0, 1, 1]  # ...except group (0, 1): its stale band sums dwarf the global ones
    sl[1, 3, 1] += 10 * sg[1, 3, 1]
    est = sg - sl + local
    est_var = est[..., 1] / count - (est[..., 0] / count) ** 2
    assert (est_var < 0).sum() == 2 and est_var[0, 1] < 0 and est_var[1, 3] < 0  # the fallback really fires
    with ops.use_backend(backend):
        y, _ = ops.group_norm_stale(x, 4, None, None, 1e-5, stale_global=sg, stale_local=sl, count=count)
    n_loc = 2 * 3 * 5
    mean = (est[..., 0] / count)[..., None]
    var = torch.where(est_var < 0, local[..., 1] / n_loc - (local[..., 0] / n_loc) ** 2, est_var)[..., None]
    want = ((x.reshape(2, 4, -1) - mean) / torch.sqrt(var + 1e-5)).reshape(x.shape)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert y[0, 2:4].abs().max() < 10  # normalised by the band's variance, not blown up by eps alone


@pytest.mark.parametrize("dtype", LOW)
def test_stale_low_precision_within_2x_torch(backend, dtype):
    """Error vs the float32 reference on the same low-precision input ≤ 2× torch's own low-precision GroupNorm
    error (with the same statistics: fresh sums, so the op equals GroupNorm)."""
    dev = run_device(backend)
    x32 = torch.randn(2, 16, 6, 9, device=dev) * 3 + 1
    x = x32.to(dtype)
    w, b = torch.randn(16, device=dev), torch.randn(16, device=dev)
    s = reference.group_stats(x, 4)
    with ops.use_backend(backend):
        y, _ = ops.group_norm_stale(x, 4, w, b, 1e-5, silu=True, stale_global=s, stale_local=s, count=4 * 54.0)
    ref32 = F.silu(F.group_norm(x.float(), 4, w, b, 1e-5))
    torch_lp = F.silu(F.group_norm(x, 4, w.to(dtype), b.to(dtype), 1e-5))
    err = (y.float() - ref32).abs().max().item()
    base = (torch_lp.float() - ref32).abs().max().item()
    assert y.dtype == dtype and err <= 2 * base + 1e-6, f"error {err:.3g} > 2 x torch's {base:.3g}"


# ------------------------------------------------------------------------------------------------
# Layouts and parameter dtypes


def test_channels_last_in_place(backend):
    """channels_last x gives channels_last y with the values of the NCHW computation, in every op."""
    dev = run_device(backend)
    x = (torch.randn(2, 24, 5, 7, device=dev) * 2).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(24, device=dev), torch.randn(24, device=dev)
    s = reference.group_stats(x, 6)
    with ops.use_backend(backend):
        y = ops.group_norm(x, 6, w, b, silu=True)
        y_ext = ops.group_norm(x, 6, w, b, stats=s * 2, count=2 * 4 * 35.0)
        y_st, local = ops.group_norm_stale(x, 6, w, b, stale_global=s * 3, stale_local=s, count=3 * 4 * 35.0)
        stats = ops.group_stats(x, 6)
    for got in (y, y_ext, y_st):
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    xc = x.contiguous()
    torch.testing.assert_close(y, F.silu(F.group_norm(xc, 6, w, b)), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(y_ext, reference.group_norm(xc, 6, w, b, stats=s * 2, count=2 * 4 * 35.0),
                               rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(y_st, reference.group_norm_stale(xc, 6, w, b, 1e-5, False, s * 3, s, 3 * 4 * 35.0)[0],
                               rtol=1e-5, atol=2e-5)
    for got in (stats, local):  # float32 block sums: ~1e-6 of Σx² (see test_ops.test_group_stats_fp32)
        assert ((got - s).abs() / s[..., 1:]).max() < 3e-6


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_native_channels_last_makes_no_copy(device):
    """The native kernels read a channels_last x in place: no aten copy/clone/contiguous in the profile."""
    if not native().loaded:
        pytest.skip(native().error)
    x = torch.randn(2, 16, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    s = torch.zeros(2, 4, 2, dtype=torch.float64, device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.halodiff.group_norm(x, 4, None, None, 1e-5, True, None, 0.0)
        torch.ops.halodiff.group_stats(x, 4)
        torch.ops.halodiff.group_norm_stale(x, 4, None, None, 1e-5, False, s, s, 10.0)
    names = {e.name for e in prof.events()}
    assert "halodiff::group_norm_stale" in names  # the profile does see inside the ops
    assert not names & {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}, names


@pytest.mark.parametrize("x_dtype, p_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                              (torch.float64, torch.float16)])
def test_weight_bias_in_their_own_dtype(backend, x_dtype, p_dtype):
    dev = run_device(backend)
    x = (torch.randn(2, 12, 4, 5) * 2).to(x_dtype).to(dev)
    w, b = torch.randn(12).to(p_dtype).to(dev), torch.randn(12).to(p_dtype).to(dev)
    with ops.use_backend(backend):
        got = ops.group_norm(x, 3, w, b, silu=True)
    want = F.silu(F.group_norm(x.double(), 3, w.double(), b.double()))
    tol = {torch.float16: 4e-3, torch.float32: 2e-5, torch.float64: 1e-12}[x_dtype]
    assert got.dtype == x_dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# Launch counts (Triton; the CUDA launcher's counts are stated in csrc/group_norm.cu)


@pytest.mark.parametrize("splits_sms", [1, 64], ids=["one-split", "split-groups"])
def test_triton_launch_counts(monkeypatch, splits_sms):
    """Every kernel launch of the Triton launchers goes through _common.launch: count them, and check that the
    launchers run no torch compute op (only allocations), for NCHW and channels_last."""
    from halodiff.triton_kernels import _common

    tgn = triton_module("group_norm")
    launches: list[str] = []
    monkeypatch.setattr(_common, "launch", lambda kernel, grid, *a, **k: launches.append(kernel.__name__))
    monkeypatch.setattr(tgn, "sm_count", lambda device: splits_sms)
    many = splits_sms > 1
    s = torch.zeros(2, 8, 2, dtype=torch.float64)
    x0 = torch.randn(2, 32, 48, 48)  # 9216 elements per group: several blocks per group on a 64-SM GPU
    for x in (x0, x0.contiguous(memory_format=torch.channels_last)):
        w, b = torch.randn(32), torch.randn(32)
        calls = {
            "group_stats": (lambda: tgn.group_stats_impl(x, 8), 2 if many else 1),
            "group_norm": (lambda: tgn.group_norm_impl(x, 8, w, b, 1e-5, True, None, 0.0), 2),
            "group_norm(stats)": (lambda: tgn.group_norm_impl(x, 8, w, b, 1e-5, True, s, 5.0), 1),
            "group_norm_stale": (lambda: tgn.group_norm_stale_impl(x, 8, w, b, 1e-5, True, s, s, 5.0), 3 if many else 2),
        }
        for name, (call, want) in calls.items():
            launches.clear()
            with AtenOps() as rec:
                call()
            assert len(launches) == want <= 3, f"{name}: {launches}"
            assert set(rec.names) <= {"empty", "empty_like", "empty_strided"}, (name, rec.names)


def test_strided_weight_and_stats_views(backend):
    """weight/bias as strided views and stats as a non-contiguous view are read correctly."""
    dev = run_device(backend)
    x = torch.randn(2, 12, 4, 5, device=dev)
    wb = torch.randn(24, device=dev)
    w, b = wb[::2], wb[1::2]
    s = reference.group_stats(x, 3)
    s_t = s.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    with ops.use_backend(backend):
        y = ops.group_norm(x, 3, w, b, stats=s_t, count=80.0)
    torch.testing.assert_close(y, F.group_norm(x, 3, w, b), rtol=1e-5, atol=2e-5)
