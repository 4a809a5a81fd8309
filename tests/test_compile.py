"""opcheck on the native and Triton ops, and torch.compile through the public API."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA
from halodiff import ops
from halodiff._native import native

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _native_or_skip():
    if not native().loaded:
        pytest.skip(native().error)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_native(device):
    _native_or_skip()
    x = torch.randn(2, 12, 5, 7, device=device)
    w, b = torch.randn(12, device=device), torch.randn(12, device=device)
    stats = ops.group_stats(x, 3)
    count = 4.0 * 5 * 7
    torch.library.opcheck(torch.ops.halodiff.group_stats.default, (x, 3))
    torch.library.opcheck(torch.ops.halodiff.group_norm.default, (x, 3, w, b, 1e-5, True, None, 0.0))
    torch.library.opcheck(torch.ops.halodiff.group_norm.default, (x, 3, None, None, 1e-5, False, stats, count))
    stale = (stats * 2, stats, 2 * count)
    torch.library.opcheck(torch.ops.halodiff.group_norm_stale.default, (x, 3, w, b.half(), 1e-5, True, *stale))
    xcl = x.contiguous(memory_format=torch.channels_last)  # fake kernels must give the same (channels_last) strides
    torch.library.opcheck(torch.ops.halodiff.group_norm.default, (xcl, 3, w, b, 1e-5, True, None, 0.0))
    torch.library.opcheck(torch.ops.halodiff.group_norm_stale.default, (xcl, 3, None, None, 1e-5, False, *stale))
    q = torch.randn(2, 5, 3, 40, device=device).transpose(1, 2)  # [B, H, L, D] view, as attention gets it
    ks = [torch.randn(2, 3, n, 40, device=device) for n in (4, 0, 6)]
    vs = [torch.randn(2, 3, n, 40, device=device) for n in (4, 0, 6)]
    torch.library.opcheck(torch.ops.halodiff.segmented_attention.default, (q, ks, vs, None))
    torch.library.opcheck(torch.ops.halodiff.segmented_attention.default, (q, ks[:1], vs[:1], 0.3))


@pytest.mark.triton
def test_opcheck_triton():
    from halodiff import triton_kernels  # noqa: F401  (registers halodiff_triton::*)

    dev = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(2, 12, 5, 7, device=dev)
    w, b = torch.randn(12, device=dev), torch.randn(12, device=dev)
    torch.library.opcheck(torch.ops.halodiff_triton.group_stats.default, (x, 3),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.halodiff_triton.group_norm.default, (x, 3, w, b, 1e-5, True, None, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
    s = ops.reference.group_stats(x, 3)
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.halodiff_triton.group_norm_stale.default,
                          (xcl, 3, w, b, 1e-5, True, s * 2, s, 280.0), test_utils=("test_schema", "test_faketensor"))
    q = torch.randn(1, 5, 2, 40, device=dev).transpose(1, 2)
    ks = [torch.randn(1, 2, n, 40, device=dev) for n in (4, 0, 6)]
    torch.library.opcheck(torch.ops.halodiff_triton.segmented_attention.default, (q, ks, ks, 0.15),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """The public ops trace into one graph (no graph breaks) and match eager."""
    _native_or_skip()
    torch._dynamo.reset()

    def f(x, w, b):
        s = ops.group_stats(x, 4)
        y = ops.group_norm(x, 4, w, b, 1e-5, silu=True, stats=s, count=float(x[0, :2].numel()))
        y2, local = ops.group_norm_stale(x, 4, w, b, 1e-5, silu=True, stale_global=s, stale_local=s,
                                         count=float(x[0, :2].numel()))
        return y * 2, y2, local

    x = torch.randn(2, 8, 6, 5, device=device)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))
    want = F.silu(F.group_norm(x, 4, w, b))
    doubled, y2, _ = compiled(x, w, b)
    torch.testing.assert_close(doubled, want * 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, want, rtol=1e-5, atol=1e-5)  # fresh sums: the stale op equals GroupNorm
