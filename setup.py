"""Build for halodiff: the Python package, the Triton kernels and two native extensions.

- `halodiff._C`: the op schemas and the CPU kernels (csrc/*.cpp). Always built (unless HALODIFF_SKIP_NATIVE=1).
- `halodiff._C_cuda`: the CUDA kernels (csrc/*.cu), with a CUDA build of torch and a CUDA toolkit >= 12.1
  (CUDA_HOME), for TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"). `SKIP_CUDA_BUILD=1` skips it: a machine
  without a GPU builds only what it can run, in a fraction of the time (`make demo` does this).
Two extensions so the CPU one is reused when the CUDA one is added later (`make test` after `make demo`).
Install with `pip install --no-build-isolation .` so the extensions are built against the installed torch.
"""
from __future__ import annotations

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _check_cuda_toolkit(cuda_home: str) -> None:
    """The segmented-attention kernels take a ~4.7 KB __grid_constant__ parameter block (64 K/V segments, no
    host-to-device copy): kernel parameters above 4 KB need CUDA >= 12.1 (nvcc and driver r530+)."""
    import re
    import subprocess

    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return  # torch's own build step reports a missing nvcc
    m = re.search(r"release (\d+)\.(\d+)", out)
    if m and (int(m.group(1)), int(m.group(2))) < (12, 1):
        raise SystemExit(f"halodiff: the CUDA kernels need CUDA >= 12.1 (kernel parameter blocks > 4 KB), found "
                         f"{m.group(0)} at {cuda_home}; install a newer toolkit or build with SKIP_CUDA_BUILD=1")


def _torch():
    """The installed torch, or stop at once: under pip's build isolation torch is not importable (and would be
    a multi-GB download of another build, whose ABI then mismatches the installed one)."""
    try:
        import torch
    except ImportError:
        raise SystemExit("halodiff: torch is not importable while building (pip's build isolation hides the "
                         "installed torch): install with `pip install --no-build-isolation .`, or set "
                         "HALODIFF_SKIP_NATIVE=1 for a Python-only install") from None
    return torch


def native_extensions() -> tuple[list, dict]:
    if _flag("HALODIFF_SKIP_NATIVE"):
        return [], {}
    torch = _torch()
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))  # schemas, shared checks, CPU kernels, module shell
    # the CUDA extension compiles the shared checks and the module shell again, from its own paths (csrc/cuda/)
    cu_sources = sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and not _flag("SKIP_CUDA_BUILD")
    cxx = ["-O3"]
    # ATen's parallel_for is an OpenMP region compiled into each caller: without -fopenmp the CPU
    # kernels would silently run on one thread (torch itself is built with OpenMP on Linux).
    link = []
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        # +PTX: compute_90 PTX rides along, so newer GPUs (sm_100, sm_120) JIT it instead of failing with
        # "no kernel image is available".
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        _check_cuda_toolkit(cpp_extension.CUDA_HOME)
        # torch's CUDA headers include cuBLAS/cuSPARSE headers shipped in the nvidia-* wheels.
        include_dirs = [
            d for d in glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include"))
        ]
    exts = [cpp_extension.CppExtension(
        "halodiff._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )]
    if with_cuda:
        macros = [("HALODIFF_WITH_CUDA", None), ("HALODIFF_CUDA_ARCHS", f'"{archs}"')]
        exts.append(cpp_extension.CUDAExtension(
            "halodiff._C_cuda",
            cu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + include_dirs,
            define_macros=macros,
            # --threads 2: nvcc compiles the arch passes of a file side by side, so the slowest file (segmented
            # attention, ~2/3 of the CUDA build) does not run alone on one core at the end (-50 s on 2 cores)
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "--threads", "2"]},
            extra_link_args=link,
        ))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="halodiff",
    version="0.1.0",
    description="Patch-parallel, partially conditioned and cached-feature inference kernels for diffusers UNets",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "python", "halodiff.triton_kernels": "triton_kernels"},
    packages=find_packages("python") + ["halodiff.triton_kernels"],
    package_data={"halodiff.models": ["digits_model/**/*", "digits_model/*", "digits_dit_model/**/*",
                                      "digits_dit_model/*"]},
    include_package_data=True,
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "diffusers": ["diffusers>=0.30", "transformers", "safetensors"],
        "demo": ["diffusers>=0.30", "transformers", "safetensors", "matplotlib", "scikit-learn", "pillow"],
        "test": ["pytest", "pytest-benchmark", "cmake", "DeepCache"],
    },
    entry_points={"console_scripts": ["halodiff=halodiff.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
