"""Kernel microbenchmarks: each op and backend vs its torch baseline at SD shapes.

group_norm(+SiLU) GB/s counts the bytes our design moves: stats read x once, the apply pass reads x
and writes y (3 × numel × itemsize); the torch baseline row uses the same byte count so GB/s compare.
NCHW and channels_last inputs (read in place by every backend). group_norm_stale (DistriFusion's async
GroupNorm: band stats + corrected stale estimate + normalise + SiLU in one op) is compared with the same
computation in plain torch ops (`reference.group_norm_stale`, what the engine ran before the fused op).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA
from halodiff import ops
from halodiff.ops import reference, registry

GN_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
DTYPE = torch.float16 if HAS_CUDA else torch.float32
# The Triton interpreter is far too slow for benchmarks: Triton is benchmarked on GPUs only.
BACKENDS = [b for b in ("cuda", "triton", "cpu", "reference")
            if not registry.backend_reasons(b) and not registry.device_reasons(b, torch.device(DEVICE))]


def _gn_inputs(shape, layout="nchw"):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=g).to(DTYPE)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], device=DEVICE, generator=g).to(DTYPE)
    b = torch.randn(shape[1], device=DEVICE, generator=g).to(DTYPE)
    return x, w, b


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_group_norm_silu(bench, backend, shape, layout):
    x, w, b = _gn_inputs(shape, layout)
    nbytes = 3 * x.numel() * x.element_size()
    if backend == "torch":
        fn = lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))  # noqa: E731
    else:
        def fn():
            with ops.use_backend(backend):
                return ops.group_norm(x, 32, w, b, 1e-5, silu=True)
    y = bench(fn, name="group_norm_silu", group=f"group_norm_silu_{layout}", shape=shape, dtype=DTYPE,
              backend=backend, bytes=nbytes)
    torch.testing.assert_close(y.float(), F.silu(F.group_norm(x.float(), 32, w.float(), b.float())),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_group_norm_stale(bench, backend, shape):
    """One rank's band (half the rows) of an async DistriFusion step, 2 ranks."""
    x, w, b = _gn_inputs(shape)
    band = x[:, :, : shape[2] // 2].contiguous()
    sg = reference.group_stats(x, 32) * 1.01
    sl = reference.group_stats(band, 32)
    count = float(shape[1] // 32 * shape[2] * shape[3])
    nbytes = 3 * band.numel() * band.element_size()
    if backend == "torch":
        def fn():
            return reference.group_norm_stale(band, 32, w, b, 1e-5, True, sg, sl, count)
    else:
        def fn():
            with ops.use_backend(backend):
                return ops.group_norm_stale(band, 32, w, b, 1e-5, silu=True, stale_global=sg, stale_local=sl,
                                            count=count)
    y, local = bench(fn, name="group_norm_stale", shape=band.shape, dtype=DTYPE, backend=backend, bytes=nbytes)
    want, want_local = reference.group_norm_stale(band, 32, w, b, 1e-5, True, sg, sl, count)
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(local, want_local, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_group_stats(bench, backend, shape):
    x, _, _ = _gn_inputs(shape)
    if backend == "torch":
        def fn():
            xf = x.view(shape[0], 32, -1).float()
            return torch.stack([xf.sum(-1), (xf * xf).sum(-1)], -1)
    else:
        def fn():
            with ops.use_backend(backend):
                return ops.group_stats(x, 32)
    bench(fn, name="group_stats", shape=shape, dtype=DTYPE, backend=backend, bytes=x.numel() * x.element_size())
