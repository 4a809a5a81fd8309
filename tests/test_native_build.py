"""The built extension really contains CPU and CUDA kernels; CMakeLists.txt builds the same ops."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from halodiff._native import native
from halodiff.audit.tools import find_tool

ROOT = Path(__file__).resolve().parents[1]
OPS = ["group_stats", "group_norm", "group_norm_stale", "segmented_attention"]


def _require_native():
    state = native()
    if not state.loaded:
        pytest.skip(f"native extension not built: {state.error}")
    return state


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op):
    _require_native()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"halodiff::{op}", "CPU")


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    """With a CUDA build of torch the .cu kernels are compiled (sm_80, sm_90) into halodiff._C_cuda."""
    state = _require_native()
    if not torch.version.cuda:
        pytest.skip("CPU-only torch: the CUDA kernels are not built")
    if os.environ.get("SKIP_CUDA_BUILD") == "1":
        pytest.skip("SKIP_CUDA_BUILD=1")
    assert state.cuda, f"halodiff._C_cuda is missing although torch has CUDA: {state.cuda_error}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"halodiff::{op}", "CUDA")


def test_cuda_archs_in_binary():
    """The extension carries device code for every arch of TORCH_CUDA_ARCH_LIST (checked with cuobjdump)."""
    state = _require_native()
    if not state.cuda:
        pytest.skip("no CUDA kernels in this build")
    cuobjdump = find_tool("cuobjdump")  # CUDA_HOME/bin, PATH or Triton's bundled binaries
    if not cuobjdump:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled binaries)")
    out = subprocess.run([cuobjdump, "--list-elf", state.cuda_path], capture_output=True, text=True).stdout
    for arch in state.cuda_archs.split(";"):
        sm = "sm_" + arch.replace(".", "").replace("+PTX", "")
        assert sm in out, f"{sm} missing from {state.cuda_path}: {out[:500]}"


@pytest.mark.slow
def test_cmake_build_loads_with_torch_ops(tmp_path):
    """CMakeLists.txt builds the CPU ops into a library that torch.ops.load_library accepts and runs."""
    cmake = shutil.which("cmake", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if cmake is None:
        pytest.skip("cmake not installed (pip install cmake)")
    build = tmp_path / "build"
    env = dict(os.environ)
    if torch.version.cuda and "CUDA_HOME" not in env and torch.utils.cpp_extension.CUDA_HOME:
        env["CUDA_HOME"] = torch.utils.cpp_extension.CUDA_HOME
    # Debug at -O0 without -g: this checks the build and the registration, and compiles in 2/3 of the time.
    cfg = [cmake, "-S", str(ROOT), "-B", str(build), "-DHALODIFF_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Debug",
           "-DCMAKE_CXX_FLAGS_DEBUG=-O0",
           f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython3_EXECUTABLE={sys.executable}"]
    for cmd in (cfg, [cmake, "--build", str(build), "-j", "2"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lib = next(build.glob("libhalodiff_ops*.so"))
    # A fresh interpreter: the setup.py extension must not be loaded there (same op names).
    script = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        x = torch.randn(2, 8, 5, 3)
        s = torch.ops.halodiff.group_stats(x, 4)  # float64 sums for every input dtype
        xd = x.double()
        ref = torch.stack([xd.view(2, 4, -1).sum(-1), (xd * xd).view(2, 4, -1).sum(-1)], -1)
        assert torch.allclose(s, ref, rtol=1e-5, atol=1e-5), (s, ref)
        y = torch.ops.halodiff.group_norm(x, 4, None, None, 1e-5, True, None, 0.0)
        assert torch.allclose(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4)), atol=1e-5)
        q, k, v = torch.randn(2, 3, 6, 40), torch.randn(2, 3, 5, 40), torch.randn(2, 3, 5, 40)
        a = torch.ops.halodiff.segmented_attention(q, [k[:, :, :2], k[:, :, 2:]], [v[:, :, :2], v[:, :, 2:]], None)
        assert torch.allclose(a, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.slow
def test_build_isolation_stops_early_with_one_clear_line(tmp_path):
    """`pip install .` without --no-build-isolation cannot see the installed torch: it must stop at once saying
    what to do, not download another multi-GB torch and build an extension whose ABI mismatches."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    res = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "wheel"), str(ROOT)],
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "torch is not importable while building" in out, out[-2000:]
    assert "--no-build-isolation" in out and "Collecting torch" not in out
