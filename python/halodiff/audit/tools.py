"""Where the audit finds its inputs: the CUDA binary tools, the kernel sources (optional) and its cache.

`find_tool` is the one lookup of the CUDA binary tools (cuobjdump, nvdisasm, ptxas, nvcc) in halodiff: the
audit and the build tests use it. Triton wheels bundle cuobjdump, nvdisasm and ptxas, so a machine without a
CUDA toolkit still reads SASS.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path


def cuda_home() -> Path | None:
    """$CUDA_HOME, else the toolkit the `nvcc` on PATH runs from, else /usr/local/cuda (if present)."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc:  # the nvcc on PATH may be a wrapper script that execs the real one
        m = re.search(r"exec (/\S+)/bin/nvcc", Path(nvcc).read_text(errors="ignore")[:4096])
        return Path(m.group(1)) if m else Path(os.path.realpath(nvcc)).parents[1]
    return Path("/usr/local/cuda") if Path("/usr/local/cuda").exists() else None


def triton_bin() -> Path | None:
    """Triton's bundled CUDA binaries (`triton/backends/nvidia/bin`), located without importing triton."""
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "backends" / "nvidia" / "bin"
        if p.is_dir():
            return p
    return None


def find_tool(name: str) -> str | None:
    """A CUDA binary tool by name: CUDA_HOME/bin, then PATH, then the binaries bundled with Triton."""
    home = cuda_home()
    if home and (home / "bin" / name).is_file():
        return str(home / "bin" / name)
    if shutil.which(name):
        return shutil.which(name)
    bundled = triton_bin()
    if bundled and (bundled / name).is_file():
        return str(bundled / name)
    return None


def run_tool(cmd: list[str], **kw) -> str:
    """Run a tool; its stdout + stderr, or RuntimeError with the end of stderr."""
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout + res.stderr


def source_checkout() -> Path | None:
    """The source checkout this package is imported from (an editable install: <root>/python/halodiff), if any.
    An installed wheel has none: the audit then reads only what is installed."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "setup.py").is_file() and (root / "csrc" / "ops.cpp").is_file() else None


def csrc_dir() -> Path | None:
    """The CUDA/C++ sources (csrc/): $HALODIFF_CSRC, else the source checkout's. They are optional: the
    attention layout shim (dynamic shared-memory sizes) and `nvcc -cubin` of an arch the built extension lacks
    need them; the SASS of the built extension and the Triton kernels do not."""
    if os.environ.get("HALODIFF_CSRC"):
        return Path(os.environ["HALODIFF_CSRC"])
    root = source_checkout()
    return root / "csrc" if root else None


def cache_dir() -> Path:
    """$HALODIFF_AUDIT_CACHE, else build/kernel_audit of the source checkout, else ~/.cache/halodiff/kernel_audit."""
    if os.environ.get("HALODIFF_AUDIT_CACHE"):
        return Path(os.environ["HALODIFF_AUDIT_CACHE"])
    root = source_checkout()
    if root:
        return root / "build" / "kernel_audit"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "halodiff" / "kernel_audit"
