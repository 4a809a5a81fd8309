"""Bad input raises ValueError/TypeError naming the argument and the fix — never a raw index error."""
from __future__ import annotations

import re

import pytest
import torch

from halodiff import BackendUnavailableError, ops


def _sums(B: int, G: int) -> torch.Tensor:
    return torch.zeros(B, G, 2, dtype=torch.float64)


def _stale(**kw):
    args = dict(x=torch.randn(2, 8, 4, 4), weight=None, stale_global=_sums(2, 2), stale_local=_sums(2, 2), count=64.0)
    args.update(kw)
    return ops.group_norm_stale(args.pop("x"), 2, args.pop("weight"), None, 1e-5, **args)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.group_stats(torch.randn(2, 8, 4), 2), ValueError, "4-D"),
        (lambda: ops.group_stats(torch.randn(2, 8, 4, 4), 3), ValueError, "divide the channel count"),
        (lambda: ops.group_stats(torch.randn(2, 8, 4, 4), 0), ValueError, "positive"),
        (lambda: ops.group_stats(torch.ones(2, 8, 4, 4, dtype=torch.int32), 2), TypeError, "floating"),
        (lambda: ops.group_stats([1, 2], 2), TypeError, "torch.Tensor"),
        (lambda: ops.group_norm(torch.randn(2, 8, 4, 4), 2, torch.randn(4)), ValueError, "weight must have shape"),
        (lambda: ops.group_norm(torch.randn(2, 8, 4, 4), 2, None, torch.randn(8, 1)), ValueError, "bias"),
        (lambda: ops.group_norm(torch.randn(2, 8, 4, 4), 2, stats=torch.zeros(2, 3, 2), count=4), ValueError, "stats"),
        (lambda: ops.group_norm(torch.randn(2, 8, 4, 4), 2, stats=_sums(2, 2)), ValueError, "count"),
        (lambda: ops.group_norm(torch.randn(2, 8, 4, 4), 2, stats=_sums(2, 2), count=0), ValueError, "count"),
        (lambda: ops.group_norm(torch.randn(2, 8, 4, 4), 2, stats=torch.zeros(2, 2, 2), count=4),
         TypeError, "stats must be float64"),
        (lambda: ops.group_norm(torch.randn(2, 8, 4, 4), 2, count=4), ValueError, "count is only used"),
        (lambda: ops.group_norm(torch.randn(2, 8, 4, 4), 2, eps=-1.0), ValueError, "eps must be"),
        (lambda: _stale(stale_global=_sums(2, 3)), ValueError, r"stale_global must have shape \[B, G, 2\]"),
        (lambda: _stale(stale_local=torch.zeros(2, 2, 2)), TypeError, "stale_local must be float64"),
        (lambda: _stale(stale_local=[0.0]), TypeError, "stale_local must be a torch.Tensor"),
        (lambda: _stale(count=0.0), ValueError, "count"),
        (lambda: _stale(count=float("nan")), ValueError, "count"),
        (lambda: _stale(weight=torch.randn(3)), ValueError, "weight must have shape"),
        (lambda: _stale(x=torch.randn(2, 8, 4)), ValueError, "4-D"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_native_op_checks_raise_value_errors():
    """Direct torch.ops calls are guarded in C++ too (TORCH_CHECK_VALUE -> ValueError)."""
    from halodiff._native import native

    if not native().loaded:
        pytest.skip(native().error)
    with pytest.raises(ValueError, match="divisible"):
        torch.ops.halodiff.group_stats(torch.randn(2, 8, 4, 4), 3)
    with pytest.raises(ValueError, match="ks and vs must have the same length"):
        torch.ops.halodiff.segmented_attention(torch.randn(1, 2, 3, 8), [torch.randn(1, 2, 3, 8)], [], None)


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    """Forcing a backend that cannot run the inputs names it and the reason this environment really has:
    without a GPU, cuda (no device / no CUDA build); with one, cpu on CUDA tensors."""
    forced, dev = ("cuda", "cpu") if not torch.cuda.is_available() else ("cpu", "cuda")
    reasons = ops.registry.backend_reasons(forced) or ops.registry.device_reasons(forced, torch.device(dev), True)
    assert reasons
    want = re.escape(f"halodiff backend {forced!r} cannot run group_norm here: {'; '.join(reasons)}.")
    with pytest.raises(BackendUnavailableError, match=want):
        with ops.use_backend(forced):
            ops.group_norm(torch.randn(1, 4, 2, 2, device=dev), 2)
    monkeypatch.setenv("HALODIFF_BACKEND", "nonsense")
    with pytest.raises(BackendUnavailableError, match="unknown halodiff backend"):
        ops.group_stats(torch.randn(1, 4, 2, 2), 2)
    with pytest.raises(BackendUnavailableError, match="unknown"):
        with ops.use_backend("fast"):
            pass


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("HALODIFF_BACKEND", "reference")
    calls = []
    op = ops.registry.OPS["group_stats"]
    orig = op.impls["reference"]
    monkeypatch.setitem(op.impls, "reference", lambda *a: calls.append(1) or orig(*a))
    ops.group_stats(torch.randn(1, 4, 2, 2), 2)
    assert calls == [1]
