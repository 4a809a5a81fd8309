"""segmented_attention: every backend vs the reference (torch.cat + SDPA), layouts, errors, opcheck, compile."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, run_device
from kernel_utils import AtenOps, joint_attention_inputs, triton_module
from halodiff import BackendUnavailableError, ops
from halodiff._native import native
from halodiff.ops import reference

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# (B, H, Lq, D, segment lengths): 1-8 segments, empty ones, Lq != Lk, odd lengths (1, 17, 33), odd B/H,
# SD head dims 40/64/80 and non-multiples of 16 (24, 72, 100).
CASES = [
    (2, 2, 33, 40, [17, 1, 40]),
    (3, 5, 17, 64, [33]),
    (1, 2, 70, 80, [5, 64, 0, 9]),
    (2, 1, 1, 24, [3, 0, 1]),
    (1, 3, 45, 72, [20, 7, 1, 13, 2, 30, 5, 9]),
    (1, 1, 100, 100, [31, 2]),
    (2, 2, 16, 40, [0, 0, 16]),
]


def _make(B, H, L, D, dev, dtype, layout):
    """A [B, H, L, D] tensor laid out like the attention inputs of a UNet ("bshd": a transposed view of a
    [B, L, H*D] projection), contiguous ("bhld"), a row slice of a longer tensor ("slice"), or with a
    non-dense last dim ("lastdim")."""
    if layout == "bshd":
        return torch.randn(B, L, H, D, device=dev).to(dtype).transpose(1, 2)
    if layout == "slice":
        return torch.randn(B, H, L + 5, D, device=dev).to(dtype)[:, :, 3 : 3 + L]
    if layout == "lastdim":
        return torch.randn(B, H, D, L, device=dev).to(dtype).transpose(2, 3)
    return torch.randn(B, H, L, D, device=dev).to(dtype)


def _inputs(B, H, Lq, D, lens, dev, dtype=torch.float32, layout="bshd"):
    q = _make(B, H, Lq, D, dev, dtype, layout)
    ks = [_make(B, H, n, D, dev, dtype, layout) for n in lens]
    vs = [_make(B, H, n, D, dev, dtype, "bhld" if layout == "bshd" else layout) for n in lens]
    return q, ks, vs


def _exact(q, ks, vs, scale=None):
    """The reference in float64 on the same (possibly low-precision) inputs."""
    return reference.segmented_attention(q.double(), [k.double() for k in ks], [v.double() for v in vs], scale)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}Lq{c[2]}D{c[3]}x{len(c[4])}")
def test_fp32_matches_reference(backend, case):
    B, H, Lq, D, lens = case
    torch.manual_seed(0)
    q, ks, vs = _inputs(B, H, Lq, D, lens, run_device(backend))
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs)
    assert got.shape == (B, H, Lq, D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _exact(q, ks, vs), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("layout", ["bhld", "slice", "lastdim"])
def test_layouts_and_scale(backend, layout):
    torch.manual_seed(1)
    q, ks, vs = _inputs(2, 3, 29, 40, [11, 0, 20], run_device(backend), layout=layout)
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs, scale=0.05)
    torch.testing.assert_close(got.double(), _exact(q, ks, vs, 0.05), rtol=1e-5, atol=2e-5)


def test_output_layout_and_matches_cat_sdpa(backend):
    """A [B, H, Lq, D] view of a contiguous [B, Lq, H, D] buffer; same values as torch.cat + SDPA."""
    torch.manual_seed(2)
    q, ks, vs = _inputs(2, 4, 21, 64, [9, 30], run_device(backend))
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs)
    assert got.transpose(1, 2).is_contiguous()
    want = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 3, 40, 40, [13, 50, 7]), (1, 2, 33, 80, [64, 1])], ids=["D40", "D80"])
def test_low_precision_within_2x_torch(backend, dtype, case):
    """Error vs the exact result on the same low-precision inputs ≤ 2× the error of torch's own
    low-precision SDPA on the concatenated K/V."""
    B, H, Lq, D, lens = case
    torch.manual_seed(3)
    q, ks, vs = _inputs(B, H, Lq, D, lens, run_device(backend), dtype)
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs)
    assert got.dtype == dtype
    exact = _exact(q, ks, vs)
    torch_lp = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))
    err = (got.double() - exact).abs().max().item()
    base = (torch_lp.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6, f"{backend} {dtype} error {err:.3g} > 2 x torch's {base:.3g}"


def test_blocking_boundaries(backend):
    """Query rows and segments longer than every kernel's tiles (CPU: 256 rows x 128 keys; CUDA: 64 x 64;
    Triton: 64 x 64), a head dim that is not a multiple of 8 or 16, and fp16 through the same tiling."""
    torch.manual_seed(7)
    dev = run_device(backend)
    q, ks, vs = _inputs(1, 2, 260, 100, [129, 7, 300], dev)
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs)
        got16 = ops.segmented_attention(q.half(), [k.half() for k in ks], [v.half() for v in vs])
    torch.testing.assert_close(got.double(), _exact(q, ks, vs), rtol=1e-5, atol=2e-5)
    exact16 = _exact(q.half(), [k.half() for k in ks], [v.half() for v in vs])
    torch16 = F.scaled_dot_product_attention(q.half(), torch.cat(ks, 2).half(), torch.cat(vs, 2).half())
    assert (got16.double() - exact16).abs().max() <= 2 * (torch16.double() - exact16).abs().max() + 1e-6


# DiT joint attention under patch parallelism (SD3, PixArt: D = 64; Flux, Qwen-Image: D = 128): q = one rank's
# text + image band tokens (text first: Flux/Qwen, last: SD3), keys [text, bands...] (kernel_utils.joint_attention_
# inputs). Bands of 3x5 / 2x5 tokens (5-token rows), text 7 or 13 tokens; PCPP halos of partial rows, an empty
# segment (no band above rank 0) and a 1-token one. name: (text, bands, rank, text_first, halo).
JOINT_LAYOUTS = {
    "distrifusion-text-first": (7, [15, 15, 10], 1, True, None),
    "distrifusion-text-last-edge": (13, [15, 15, 10], 2, False, None),
    "pcpp-top-text-first": (7, [10, 15, 15], 0, True, (0, 1)),
    "pcpp-mid-text-last": (13, [15, 10, 15], 1, False, (5, 7)),
}


def _check_joint(got, q, ks, vs, what):
    """fp32: within 1e-5 of the exact result (float64 SDPA on the concatenated K/V); fp16/bf16: error vs it
    <= 2x that of torch's own low-precision SDPA on the concatenated K/V."""
    assert got.shape == q.shape and got.dtype == q.dtype and got.transpose(1, 2).is_contiguous(), what
    k, v = torch.cat(ks, 2), torch.cat(vs, 2)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    if q.dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")
        return
    err = (got.double() - exact).abs().max().item()
    base = (F.scaled_dot_product_attention(q, k, v).double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6, f"{what}: error {err:.3g} > 2 x torch's {base:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("layout", list(JOINT_LAYOUTS))
def test_dit_joint_attention(backend, monkeypatch, layout, D, dtype):
    """Every backend on the joint-attention layouts of DiTs; the native CPU op on both of its paths."""
    text, bands, rank, text_first, halo = JOINT_LAYOUTS[layout]
    torch.manual_seed(D)
    q, ks, vs = joint_attention_inputs(1, 2, D, text, bands, rank, text_first=text_first, halo=halo,
                                       device=run_device(backend), dtype=dtype)
    assert q.shape[2] == text + bands[rank] and ks[0].shape[2] == text
    for path in ("fused", "flash") if backend == "cpu" else ("",):
        if path:
            monkeypatch.setenv("HALODIFF_CPU_ATTENTION", path)
        with ops.use_backend(backend):
            got = ops.segmented_attention(q, ks, vs)
        _check_joint(got, q, ks, vs, f"{backend} {path} {layout} D={D} {dtype}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64(backend):
    """float64 runs on the native CPU kernel (torch's CPU flash attention per segment + log-sum-exp merge)
    and the reference; both are exact to rounding."""
    if backend == "cpu" and not native().loaded:
        pytest.skip(native().error)
    torch.manual_seed(8)
    q, ks, vs = _inputs(2, 3, 40, 40, [13, 0, 50, 7], "cpu", torch.float64)
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs)
        single = ops.segmented_attention(q, ks[2:3], vs[2:3])
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _exact(q, ks, vs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single, _exact(q, ks[2:3], vs[2:3]), rtol=1e-12, atol=1e-12)


def test_many_segments(backend):
    """More segments than the Triton kernel's per-launch slots (16): chained launches carry the state."""
    torch.manual_seed(4)
    lens = [3, 0, 5, 1, 2, 8, 4, 0, 6, 2, 1, 7, 3, 5, 2, 1, 9, 4, 2, 6]
    q, ks, vs = _inputs(1, 2, 19, 40, lens, run_device(backend))
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs)
    torch.testing.assert_close(got.double(), _exact(q, ks, vs), rtol=1e-5, atol=2e-5)


def test_all_segments_empty_gives_zeros(backend):
    dev = run_device(backend)
    q, ks, vs = _inputs(2, 3, 5, 40, [0, 0], dev)
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs)
        no_queries = ops.segmented_attention(q[:, :, :0], ks, vs)
    assert got.shape == q.shape and torch.equal(got, torch.zeros_like(got))
    assert no_queries.shape == (2, 3, 0, 40)


def test_cpu_dispatch_prefers_native_kernel():
    """On CPU the automatic choice is the native kernel (not the reference's cat + SDPA)."""
    if not native().loaded:
        pytest.skip(native().error)
    q, ks, vs = _inputs(1, 2, 8, 40, [4, 4], "cpu")
    assert ops.registry.OPS["segmented_attention"].select(q.device, q, ks, vs, None) == "cpu"


@pytest.mark.parametrize("path", ["fused", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_both_cpu_paths_match_reference(monkeypatch, path, dtype):
    """The native CPU op has two paths (the fused AVX2 kernel; torch's flash attention per segment + merge),
    chosen by the CPU's vector width; each is checked whatever this machine would choose."""
    if not native().loaded:
        pytest.skip(native().error)
    monkeypatch.setenv("HALODIFF_CPU_ATTENTION", path)
    torch.manual_seed(0)
    tol = {torch.float32: (1e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for B, H, Lq, D, lens in CASES[:5]:
        q, ks, vs = _inputs(B, H, Lq, D, lens, "cpu", dtype)
        with ops.use_backend("cpu"):
            got = ops.segmented_attention(q, ks, vs)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), _exact(q, ks, vs), rtol=tol[0], atol=tol[1])


def test_cpu_path_variable_is_checked(monkeypatch):
    if not native().loaded:
        pytest.skip(native().error)
    monkeypatch.setenv("HALODIFF_CPU_ATTENTION", "fast")
    q, ks, vs = _inputs(1, 2, 8, 40, [4, 4], "cpu")
    with ops.use_backend("cpu"), pytest.raises(ValueError, match="HALODIFF_CPU_ATTENTION must be 'fused', 'flash'"):
        ops.segmented_attention(q, ks, vs)


def test_unsupported_inputs_fall_through():
    """Kernels declare what they cannot run; a forced backend then says why, automatic dispatch moves on."""
    op = ops.registry.OPS["segmented_attention"]
    q, ks, vs = _inputs(1, 1, 4, 300, [3], "cpu")
    assert any("head dim 300" in r for r in op.checks["triton"](q, ks, vs, None))
    assert any("head dim 300" in r for r in op.checks["cuda"](q, ks, vs, None))
    q64, ks64, vs64 = (q.double(), [k.double() for k in ks], [v.double() for v in vs])
    assert any("float64" in r for r in op.checks["cuda"](q64, ks64, vs64, None))
    many = [torch.randn(1, 1, 1, 300) for _ in range(65)]
    assert any("65 non-empty segments" in r for r in op.checks["cuda"](q, many, many, None))
    with pytest.raises(BackendUnavailableError, match="head dim 300"):
        with ops.use_backend("triton"):
            ops.segmented_attention(q, ks, vs)
    torch.testing.assert_close(ops.segmented_attention(q64, ks64, vs64), _exact(q, ks, vs))


def _bad(**kw):
    base = dict(q=torch.randn(2, 3, 5, 8), ks=[torch.randn(2, 3, 4, 8)], vs=[torch.randn(2, 3, 4, 8)])
    base.update(kw)
    return lambda: ops.segmented_attention(base["q"], base["ks"], base["vs"], base.get("scale"))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (_bad(q=torch.randn(3, 5, 8)), ValueError, "q must be 4-D"),
        (_bad(q=torch.ones(2, 3, 5, 8, dtype=torch.int32)), TypeError, "q must be float16"),
        (_bad(q=torch.randn(2, 3, 5, 0)), ValueError, "head dim D >= 1"),
        (_bad(ks=[], vs=[]), ValueError, "non-empty list"),
        (_bad(ks=torch.randn(2, 3, 4, 8)), TypeError, "ks must be a list"),
        (_bad(vs=[torch.randn(2, 3, 4, 8)] * 2), ValueError, "same length"),
        (_bad(ks=[torch.randn(2, 4, 4, 8)]), ValueError, r"ks\[0\] must have shape \[B, H, Lk, D\] = \[2, 3, Lk, 8\]"),
        (_bad(vs=[torch.randn(2, 3, 4, 9)]), ValueError, r"vs\[0\] must have shape"),
        (_bad(ks=[torch.randn(2, 3, 4)]), ValueError, r"ks\[0\] must have shape"),
        (_bad(ks=[torch.randn(2, 3, 4, 8).half()]), TypeError, r"ks\[0\] has dtype torch.float16"),
        (_bad(vs=[torch.randn(2, 3, 6, 8)]), ValueError, r"ks\[0\] has 4 rows but vs\[0\] has 6"),
        (_bad(ks=["k"]), TypeError, r"ks\[0\] must be a torch.Tensor"),
        (_bad(scale=0.0), ValueError, "scale must be a finite number > 0"),
        (_bad(scale=-1.0), ValueError, "scale must be a finite number > 0"),
        (_bad(scale=float("nan")), ValueError, "scale must be a finite number > 0"),
        (_bad(scale="0.1"), TypeError, "scale must be a float"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_device_mismatch_is_reported():
    q = torch.randn(1, 1, 2, 8, device="meta")
    with pytest.raises(ValueError, match=r"ks\[0\] is on cpu but q is on meta"):
        ops.segmented_attention(q, [torch.randn(1, 1, 2, 8)], [torch.randn(1, 1, 2, 8)])


def test_native_op_checks_raise_value_errors():
    """Direct torch.ops calls are guarded in C++ too (TORCH_CHECK_VALUE -> ValueError)."""
    if not native().loaded:
        pytest.skip(native().error)
    op = torch.ops.halodiff.segmented_attention
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="same length"):
        op(q, [torch.randn(1, 2, 3, 8)], [], None)
    with pytest.raises(ValueError, match=r"ks\[0\] has 3 rows but vs\[0\] has 4"):
        op(q, [torch.randn(1, 2, 3, 8)], [torch.randn(1, 2, 4, 8)], None)
    with pytest.raises(ValueError, match="scale must be"):
        op(q, [q], [q], -2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_native(device):
    if not native().loaded:
        pytest.skip(native().error)
    torch.manual_seed(5)
    q, ks, vs = _inputs(2, 2, 9, 40, [4, 0, 7], device)
    torch.library.opcheck(torch.ops.halodiff.segmented_attention.default, (q, ks, vs, None))
    torch.library.opcheck(torch.ops.halodiff.segmented_attention.default, (q.contiguous(), ks[:1], vs[:1], 0.2))


@pytest.mark.triton
def test_opcheck_triton():
    from halodiff import triton_kernels  # noqa: F401  (registers halodiff_triton::*)

    q, ks, vs = _inputs(1, 2, 9, 40, [4, 0, 7], "cuda" if HAS_CUDA else "cpu")
    torch.library.opcheck(torch.ops.halodiff_triton.segmented_attention.default, (q, ks, vs, 0.15),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """The public op traces into one graph (no graph breaks) inside an attention-shaped function."""
    if not native().loaded:
        pytest.skip(native().error)
    torch._dynamo.reset()
    B, L, H, D = 2, 12, 2, 40

    def attn(x, halo_above, halo_below):
        def heads(t):
            return t.view(B, -1, H, D).transpose(1, 2)

        ks = [heads(halo_above), heads(x), heads(halo_below)]
        out = ops.segmented_attention(heads(x), ks, [k * 0.5 for k in ks])
        return out.transpose(1, 2).reshape(B, L, H * D)

    x = torch.randn(B, L, H * D, device=device)
    above, below = torch.randn(B, 3, H * D, device=device), torch.randn(B, 0, H * D, device=device)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, above, below), attn(x, above, below))
    kv = torch.cat([above, x, below], 1).view(B, -1, H, D).transpose(1, 2)
    want = F.scaled_dot_product_attention(x.view(B, L, H, D).transpose(1, 2), kv, kv * 0.5)
    torch.testing.assert_close(compiled(x, above, below), want.transpose(1, 2).reshape(B, L, H * D),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [40, 64, 80, 128, 160, 100, 256])
def test_cuda_kernels(backend, dtype, D):
    """GPU paths: tensor cores (fp16/bf16), exact fp32, wide heads (BN = 32 tiles), non-16-multiple D."""
    torch.manual_seed(6)
    q, ks, vs = _inputs(2, 3, 150, D, [0, 65, 200, 1, 31], "cuda", dtype)
    with ops.use_backend(backend):
        got = ops.segmented_attention(q, ks, vs)
    exact = _exact(q, ks, vs)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=2e-5)
        return
    torch_lp = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))
    err = (got.double() - exact).abs().max().item()
    base = (torch_lp.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6, f"{backend} {dtype} D={D}: error {err:.3g} > 2 x torch's {base:.3g}"


@pytest.mark.cuda
def test_cuda_compile_triton_op():
    """On a GPU the Triton op decomposes into wrap_triton kernels under torch.compile (inductor)."""
    torch._dynamo.reset()
    q, ks, vs = _inputs(2, 2, 70, 64, [30, 64, 20], "cuda", torch.float16)

    def f(q, ks, vs):
        return ops.segmented_attention(q, ks, vs) * 2

    with ops.use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True)
        torch.testing.assert_close(compiled(q, ks, vs), f(q, ks, vs))


def test_triton_head_dim_padding_is_a_multiple_of_16():
    """Head dims pad to a multiple of 16 (not a power of two), as at most three power-of-two dot pieces."""
    pieces = triton_module("segmented_attention").head_dim_pieces
    assert pieces(40) == (32, 16, 0) and pieces(64) == (64, 0, 0) and pieces(80) == (64, 16, 0)
    assert pieces(100) == (64, 32, 16) and pieces(160) == (128, 32, 0) and pieces(24) == (32, 0, 0)
    for d in range(1, 257):
        p = pieces(d)
        assert sum(p) >= d and all(x == 0 or x >= 16 and x & (x - 1) == 0 for x in p)
        assert sum(p) == -(-d // 16) * 16 or (d > 224 and sum(p) == 256)  # 240 = 4 pieces -> 256


@pytest.mark.parametrize("lens, launches", [([5, 0, 7], 1), ([2] * 17, 5)], ids=["pcpp", "17-segments"])
def test_triton_launcher_has_no_host_tables(monkeypatch, lens, launches):
    """Segments travel as scalar kernel arguments, SLOTS per launch: no torch.tensor(list) per call (no host to
    device copy), only allocations and views besides the launches."""
    from halodiff.triton_kernels import _common

    sa = triton_module("segmented_attention")
    calls = []
    monkeypatch.setattr(_common, "launch", lambda kernel, grid, *a, **k: calls.append(k))
    q, ks, vs = _inputs(1, 2, 9, 40, lens, "cpu")
    with AtenOps() as rec:
        sa.segmented_attention_impl(q, ks, vs, 0.2)
    assert len(calls) == launches
    n = sum(1 for x in lens if x)  # empty segments are skipped
    assert [c["NSEG"] for c in calls] == [min(sa.SLOTS, n - i) for i in range(0, n, sa.SLOTS)]
    assert calls[0]["FIRST"] and calls[-1]["LAST"] and calls[0]["ALIGN"] == 4  # fp32 rows of 40: 16-byte units
    assert set(rec.names) <= {"empty", "new_empty", "transpose", "empty_strided"}, rec.names
