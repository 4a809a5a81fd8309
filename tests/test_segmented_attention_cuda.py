"""GPU-only: every CUDA segmented-attention kernel variant against the exact result (skipped without a GPU).

`torch.ops.halodiff._segmented_attention_cuda(q, ks, vs, scale, version, block_m, splits)` runs one variant:
version 1 (the previous kernel, HALODIFF_ATTENTION_KERNEL=v1) or 2 (default), the v2 query tile (16, 64, 128
rows; 0 = chosen) and its K/V splits (0 = chosen). Low precision: error vs the float64 result on the same
inputs <= 2x torch's own SDPA error on the concatenated K/V (+1e-6).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from halodiff._native import native
from halodiff.ops import reference
from kernel_utils import joint_attention_inputs

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def _native_cuda():
    state = native()
    if not state.loaded or not state.cuda:
        pytest.skip(f"no CUDA build of halodiff._C: {state.error or 'built without CUDA'}")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the fp16/bf16 kernels need sm_80+")


def run(q, ks, vs, version=2, block_m=0, splits=0, scale=None):
    return torch.ops.halodiff._segmented_attention_cuda(q, ks, vs, scale, version, block_m, splits)


def make(B, H, L, D, dtype, layout="bshd", offset=0):
    """bshd: a transposed view of a [B, L, H*D] projection; 'odd': a view starting `offset` elements into its
    storage (rows not 16-byte aligned), 'lastdim': a non-dense last dim."""
    if layout == "odd":
        flat = torch.randn(B * H * L * D + offset, device="cuda").to(dtype)
        return flat[offset:].view(B, H, L, D)
    if layout == "lastdim":
        return torch.randn(B, H, D, L, device="cuda").to(dtype).transpose(2, 3)
    return torch.randn(B, L, H, D, device="cuda").to(dtype).transpose(1, 2)


def inputs(B, H, Lq, D, lens, dtype=torch.float16, layout="bshd", offset=0):
    q = make(B, H, Lq, D, dtype, layout, offset)
    ks = [make(B, H, n, D, dtype, layout, offset) for n in lens]
    vs = [make(B, H, n, D, dtype, layout, offset + 1) for n in lens]
    return q, ks, vs


def check(got, q, ks, vs, scale=None):
    exact = reference.segmented_attention(q.double(), [k.double() for k in ks], [v.double() for v in vs], scale)
    assert got.shape == q.shape and got.dtype == q.dtype and got.transpose(1, 2).is_contiguous()
    if q.dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=2e-5)
        return
    live = [i for i, k in enumerate(ks) if k.shape[2]]
    torch_lp = F.scaled_dot_product_attention(q, torch.cat([ks[i] for i in live], 2),
                                              torch.cat([vs[i] for i in live], 2), scale=scale)
    err = (got.double() - exact).abs().max().item()
    base = (torch_lp.double() - exact).abs().max().item()
    assert err <= 2 * base + 1e-6, f"error {err:.3g} > 2 x torch's {base:.3g}"


VARIANTS = [(1, 0, 0), (2, 0, 0), (2, 16, 1), (2, 64, 1), (2, 128, 1), (2, 64, 3), (2, 16, 5), (2, 128, 16)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"v{v[0]}-bm{v[1]}-s{v[2]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [40, 64, 80, 128, 160, 24, 100, 256])
def test_variants(variant, dtype, D):
    version, block_m, splits = variant
    if block_m == 128 and D > 64 or block_m == 16 and D > 160:
        with pytest.raises(ValueError, match="tile"):
            run(*inputs(1, 1, 8, D, [8], dtype), version, block_m, splits)
        return
    torch.manual_seed(D)
    q, ks, vs = inputs(2, 3, 150, D, [0, 65, 200, 1, 31], dtype)
    check(run(q, ks, vs, version, block_m, splits), q, ks, vs)


# DiT joint attention on patch-parallel ranks (kernel_utils.joint_attention_inputs): q = text + own band (text
# first: Flux/Qwen-Image, last: SD3), keys [text, bands...]; 4 ranks of 5/5/4/4 rows x 24 tokens, text 77 or 154,
# PCPP halos of partial rows, an empty segment at the top edge, a 1-token one. name: (text, bands, rank,
# text_first, halo).
JOINT = {
    "distrifusion-text-first": (77, [120, 120, 96, 96], 1, True, None),
    "distrifusion-text-last": (154, [120, 120, 96, 96], 3, False, None),
    "pcpp-top-text-last": (154, [120, 120, 96, 96], 0, False, (0, 1)),
    "pcpp-mid-text-first": (77, [120, 120, 96, 96], 2, True, (37, 29)),
}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"v{v[0]}-bm{v[1]}-s{v[2]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("layout", list(JOINT))
def test_dit_joint_attention_layouts(layout, D, dtype, variant):
    """Every kernel variant (v1, v2 tiles and splits; fp32: the SIMT kernel) on DiT joint-attention layouts."""
    version, block_m, splits = variant
    if block_m == 128 and D > 64 or dtype == torch.float32 and variant != (2, 0, 0):
        pytest.skip("no 128-row tile above head dim 64" if block_m == 128 else "fp32 has one kernel")
    text, bands, rank, text_first, halo = JOINT[layout]
    torch.manual_seed(D + rank)
    q, ks, vs = joint_attention_inputs(2, 3, D, text, bands, rank, text_first=text_first, halo=halo, device="cuda",
                                       dtype=dtype)
    check(run(q, ks, vs, version, block_m, splits), q, ks, vs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_dit_joint_attention_full_size(model, dtype):
    """Per-rank shapes at 1024 px on 4 ranks (64 x 64 tokens, 24 heads): SD3 (D = 64, text 333, text last) and
    Flux (D = 128, text 512, text first); DistriFusion (every band) and PCPP (1.5 rows of each neighbour)."""
    D, text, text_first = (64, 333, False) if model == "sd3" else (128, 512, True)
    torch.manual_seed(16)
    for halo in (None, (96, 96)):
        q, ks, vs = joint_attention_inputs(1, 24, D, text, [16 * 64] * 4, 1, text_first=text_first, halo=halo,
                                           device="cuda", dtype=dtype)
        for version in (1, 2):
            check(run(q, ks, vs, version), q, ks, vs)


@pytest.mark.parametrize("Lq", [1, 7, 16, 17, 63])
def test_short_queries_and_per_rank_shapes(Lq):
    """Lq < 64: the short-query tile and K/V splits (SD1.5 on 4 ranks: 16 rows of 64 keys at D=160)."""
    torch.manual_seed(Lq)
    for D, lens in ((160, [16, 16, 16, 16]), (40, [300, 1, 723]), (80, [256])):
        q, ks, vs = inputs(2, 8, Lq, D, lens)
        check(run(q, ks, vs), q, ks, vs)
        check(run(q, ks, vs, 2, 16, 4), q, ks, vs)


@pytest.mark.parametrize("layout", ["odd", "lastdim"])
@pytest.mark.parametrize("version", [1, 2])
def test_unaligned_and_strided_inputs(layout, version):
    """Rows that do not start 16-byte aligned (odd-offset views) and non-dense last dims."""
    torch.manual_seed(11)
    for D in (40, 64, 33):
        q, ks, vs = inputs(2, 2, 70, D, [17, 64, 5], layout=layout, offset=3)
        check(run(q, ks, vs, version), q, ks, vs, scale=0.07)


def test_many_segments_and_empty_ones():
    torch.manual_seed(12)
    lens = [int(x) for x in torch.randint(0, 9, (64,))]
    q, ks, vs = inputs(1, 2, 40, 64, lens)
    for v in (1, 2):
        check(run(q, ks, vs, v), q, ks, vs)
    q, ks, vs = inputs(1, 2, 5, 64, [0, 0, 0])
    assert torch.equal(run(q, ks, vs), torch.zeros_like(q))


def test_fp32_simt_path():
    torch.manual_seed(13)
    q, ks, vs = inputs(2, 3, 90, 80, [40, 0, 77], torch.float32)
    for v in (1, 2):
        check(run(q, ks, vs, v), q, ks, vs)


def test_no_host_sync_and_cuda_graph_capture():
    """The op neither syncs (sync debug mode 'error') nor allocates pageable host memory: it captures."""
    torch.manual_seed(14)
    q, ks, vs = inputs(2, 8, 256, 40, [256, 512, 256])
    want = run(q, ks, vs)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for v, bm, s in VARIANTS:
            run(q, ks, vs, v, bm, s)
        from halodiff import ops

        ops.segmented_attention(q, ks, vs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(q, ks, vs)  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            out = run(q, ks, vs, 2, 128, 4)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)


def test_wide_smem_kernels_launch_repeatedly():
    """> 48 KB dynamic shared memory (head dim 128/256): the attribute is set once per kernel and device."""
    torch.manual_seed(15)
    for D in (128, 256):
        q, ks, vs = inputs(1, 2, 130, D, [100, 90])
        for _ in range(3):
            check(run(q, ks, vs, 2, 64, 1), q, ks, vs)


@pytest.mark.parametrize("value, ok", [("v1", True), ("v2", True), ("", True), ("v3", False)])
def test_kernel_selection_env(value, ok):
    """HALODIFF_ATTENTION_KERNEL is read once per process (a fresh interpreter per value)."""
    code = ("import torch, halodiff\nfrom halodiff import ops\nfrom halodiff._native import native\nnative()\n"
            "q = torch.randn(1, 2, 9, 40, device='cuda', dtype=torch.float16)\n"
            "out = torch.ops.halodiff.segmented_attention(q, [q], [q], None)\n"
            "ref = torch.nn.functional.scaled_dot_product_attention(q, q, q)\n"
            "torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)\n")
    env = dict(os.environ, HALODIFF_ATTENTION_KERNEL=value)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if ok:
        assert res.returncode == 0, res.stderr[-2000:]
    else:
        assert res.returncode != 0 and "HALODIFF_ATTENTION_KERNEL must be v1 or v2" in res.stderr
