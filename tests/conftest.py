"""Shared test setup. Without a GPU, Triton kernels run in its interpreter: TRITON_INTERPRET must be set
before anything imports triton (diffusers does), so it is set here, before the test modules load."""
from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from halodiff.ops import registry  # noqa: E402

# One thread: spawned ranks run beside this process on the same 2 cores, and OpenMP spin-waits badly
# when oversubscribed.
torch.set_num_threads(1)


def backend_skip_reason(backend: str, device: str) -> str | None:
    reasons = registry.backend_reasons(backend) or registry.device_reasons(backend, torch.device(device), forced=True)
    return "; ".join(reasons) if reasons else None


def run_device(backend: str) -> str:
    """The device a backend is tested on: CUDA tensors for cuda (and triton when a GPU exists)."""
    if backend == "cuda" or (backend == "triton" and HAS_CUDA):
        return "cuda"
    return "cpu"


@pytest.fixture(params=["cuda", "triton", "cpu", "reference"])
def backend(request) -> str:
    reason = backend_skip_reason(request.param, run_device(request.param))
    if reason:
        pytest.skip(f"{request.param} backend unavailable: {reason}")
    return request.param


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Close the rank pools of parallel_utils (if a test used them) before the session ends: under pytest-xdist
    this runs in each worker before it reports back, atexit only after (possibly too late, see close_pools)."""
    import sys

    utils = sys.modules.get("parallel_utils")
    if utils is not None:
        utils.close_pools()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); the CUDA sources are still compiled")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
