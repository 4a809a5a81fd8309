"""Kernel microbenchmarks: each op and backend vs its torch baseline at SD shapes.

group_norm(+SiLU) GB/s counts the bytes our design moves: stats read x once, the apply pass reads x
and writes y (3 × numel × itemsize); the torch baseline row uses the same byte count so GB/s compare.
halo_pack GB/s counts the packed bytes read + written (2 × buffer bytes); baselines: slicing + torch.cat,
and one contiguous copy of the same number of bytes (the memcpy floor).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA
from halodiff import ops
from halodiff.ops import registry
from shapes import conv_halo_inputs

GN_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16)]
DTYPE = torch.float16 if HAS_CUDA else torch.float32
# The Triton interpreter is far too slow for benchmarks: Triton is benchmarked on GPUs only.
BACKENDS = [b for b in ("cuda", "triton", "cpu", "reference")
            if not registry.backend_reasons(b) and not registry.device_reasons(b, torch.device(DEVICE))]


def _gn_inputs(shape):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=g).to(DTYPE)
    w = torch.randn(shape[1], device=DEVICE, generator=g).to(DTYPE)
    b = torch.randn(shape[1], device=DEVICE, generator=g).to(DTYPE)
    return x, w, b


@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch"] + BACKENDS)
def test_group_norm_silu(bench, backend, shape):
    x, w, b = _gn_inputs(shape)
    nbytes = 3 * x.numel() * x.element_size()
    if backend == "torch":
        fn = lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))  # noqa: E731
    else:
        def fn():
            with ops.use_backend(backend):
                return ops.group_norm(x, 32, w, b, 1e-5, silu=True)
    y = bench(fn, name="group_norm_silu", shape=shape, dtype=DTYPE, backend=backend, bytes=nbytes)
    torch.testing.assert_close(y.float(), F.silu(F.group_norm(x.float(), 32, w.float(), b.float())),
                               rtol=2e-2, atol=2e-2)


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


@pytest.mark.parametrize("backend", ["torch", "memcpy"] + BACKENDS)
def test_halo_pack_sd15_step(bench, backend):
    """All boundary rows (1 top + 1 bottom) of every 3x3 conv input of an SD1.5 step, N=2, 64x64 latent."""
    shapes = conv_halo_inputs(latent=64, batch=2, ranks=2)
    ts = [torch.randn(s, device=DEVICE).to(DTYPE) for s in shapes]
    total = sum(t[:, :, :1].numel() * 2 for t in ts)
    nbytes = 2 * total * ts[0].element_size()
    out = torch.empty(total, device=DEVICE, dtype=DTYPE)
    src = torch.randn(total, device=DEVICE).to(DTYPE)
    if backend == "torch":
        fn = lambda: torch.cat([t[:, :, :1].reshape(-1) for t in ts] + [t[:, :, -1:].reshape(-1) for t in ts])  # noqa: E731
    elif backend == "memcpy":
        fn = lambda: out.copy_(src)  # noqa: E731
    else:
        def fn():
            with ops.use_backend(backend):
                return ops.halo_pack(ts, 1, 1, out=out)
    shape = (len(ts), total)
    bench(fn, name="halo_pack_sd15_step", shape=shape, dtype=DTYPE, backend=backend, bytes=nbytes)
