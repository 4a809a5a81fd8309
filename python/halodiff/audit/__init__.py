"""Static audit of halodiff's GPU kernels: what the compiled code does, proven without a GPU.

CUDA kernels (`cuda`): the SASS of the built extension `halodiff._C_cuda` per arch (`cuobjdump -sass/-res-usage/
-elf`), or, for an arch the extension lacks, `nvcc -cubin` of csrc/*.cu (a source checkout only). Triton kernels
(`triton_aot`): compiled ahead of time (`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`)
from each `halodiff.triton_kernels` module's `audit_configs()`, then the same SASS analysis plus `ptxas -v` for
spill bytes. The tools come from `tools.find_tool` (CUDA_HOME/bin, PATH, Triton's bundled binaries).

One row per kernel x arch x dtype x head dim (or shape label): registers, local/spill bytes, shared memory,
occupancy, static instruction counts over the whole function and over its hot loop (HMMA, HGMMA = wgmma,
LDSM, LDS, STS, LDGSTS = cp.async, TMA, LDG/STG by width, MUFU, FP32), and a bound estimate of the hot loop
(`sass.MODEL`). Writes audit.json + audit.csv.

    halodiff bench audit [--out DIR] [--arch 80,90] [--only cuda|triton] [--kernels REGEX]
    python -m halodiff.audit ...            (the same; bench/kernel_audit.py is a wrapper for source checkouts)

Works from an installed package: the extension and the Triton kernels are installed. The kernel sources are
optional (`tools.csrc_dir`: $HALODIFF_CSRC or the source checkout): without them the dynamic shared memory of
the CUDA attention kernels is reported unknown and an arch missing from the extension is skipped, each with a
note. Caches (extracted cubins, compiled shims, spill counts) go to `tools.cache_dir()`.
"""
from .cuda import cuda_labels, cuda_rows, extension_cubins, extension_path, layout_lib
from .report import ARCHS, main, run, summary, write
from .rows import SD_HEAD_DIMS, Row, analyse, sd_label
from .sass import (ARCH, MODEL, Arch, Instr, bound, counts, elf_sections, hot_loop, launch_threads, ldsm_bytes, loops,
                   mem_width, occupancy, parse_sass, res_usage)
from .tools import cache_dir, csrc_dir, cuda_home, find_tool, run_tool, source_checkout
from .triton_aot import compile_triton, ptxas_spills, triton_configs, triton_rows

__all__ = ["ARCH", "ARCHS", "MODEL", "SD_HEAD_DIMS", "Arch", "Instr", "Row", "analyse", "bound", "cache_dir",
           "compile_triton", "counts", "csrc_dir", "cuda_home", "cuda_labels", "cuda_rows", "elf_sections",
           "extension_cubins", "extension_path", "find_tool", "hot_loop", "launch_threads", "layout_lib", "ldsm_bytes",
           "loops", "main", "mem_width", "occupancy", "parse_sass", "ptxas_spills", "res_usage", "run", "run_tool",
           "sd_label", "source_checkout", "summary", "triton_configs", "triton_rows", "write"]
