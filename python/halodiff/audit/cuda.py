"""CUDA kernels: the SASS of the built extension `halodiff._C_cuda` per arch (`cuobjdump -xelf/-sass/-res-usage`),
or, for an arch the extension lacks, `nvcc -cubin` of csrc/*.cu (a source checkout, or $HALODIFF_CSRC). Dynamic
shared-memory sizes come from csrc/attention_layout.cuh, compiled by the host C++ compiler into a ctypes shim."""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from .rows import Row, analyse, sd_label
from .sass import ARCH, launch_threads, occupancy, parse_sass, res_usage
from .tools import cache_dir, csrc_dir, find_tool, run_tool

# --------------------------------------------------------------------------------------------
# The host shim of csrc/attention_layout.cuh (tests and the shared-memory sizes of the CUDA kernels)

SHIM_SOURCE = r"""
#include "attention_layout.cuh"
using namespace halodiff::attn;
extern "C" {
int hd_padded_head_dim(int d) { return padded_head_dim(d); }
int hd_swizzle_width(int chunks) { return swizzle_width(chunks); }
int hd_swizzle_chunk(int row, int chunk, int rows, int chunks) { return swizzle_chunk(row, chunk, rows, chunks); }
static void put(RowChunk r, int* out) { out[0] = r.row; out[1] = r.chunk; }
void hd_unit_row_chunk(int u, int rows, int chunks, int* out) { put(unit_row_chunk(u, rows, chunks), out); }
void hd_copy_unit(int t, int kb, int kr, int chunks, int threads, int* out) {
  put(copy_unit(t, kb, kr, chunks, threads), out);
}
int hd_copy_xor(int kr, int chunks, int threads) { return copy_xor(kr, chunks, threads); }
int hd_swizzle_base(int row0, int chunk0, int rows, int chunks) { return swizzle_base(row0, chunk0, rows, chunks); }
int hd_swizzle_lane(int lr, int lc, int chunks) { return swizzle_lane(lr, lc, chunks); }
void hd_ldsm_rows_then_chunks(int lane, int* out) { put(ldsm_rows_then_chunks(lane), out); }
void hd_ldsm_chunks_then_rows(int lane, int* out) { put(ldsm_chunks_then_rows(lane), out); }
int hd_acc_row(int lane, int i) { return acc_row(lane, i); }
int hd_acc_col(int lane, int i) { return acc_col(lane, i); }
int hd_acc_as_a_tile(int reg) { return acc_as_a_tile(reg); }
int hd_acc_as_a_elem(int reg, int half) { return acc_as_a_elem(reg, half); }
int hd_tiles_of(int len, int bn) { return tiles_of(len, bn); }
int hd_split_begin(int total, int splits, int i) { return split_begin(total, splits, i); }
int hd_locate_tile(const int* len, int n, int bn, int t, int* n0) { return locate_tile(len, n, bn, t, n0); }
void hd_block_coords(int block, int m_blocks, int splits, int* out) {
  BlockCoords c = block_coords(block, m_blocks, splits); out[0] = c.bh; out[1] = c.split; out[2] = c.m;
}
void hd_choose_tile(long long bh, long long lq, int dp, int sms, int* out) {
  Tile t = choose_tile(bh, lq, dp, sms); out[0] = t.warps; out[1] = t.mt;
}
int hd_choose_splits(long long blocks, int tiles, int sms) { return choose_splits(blocks, tiles, sms); }
int hd_v2_tile_supported(int dp, int warps, int mt) { return v2_tile_supported(dp, warps, mt); }
int hd_v2_block_m(int warps, int mt) { return v2_block_m(warps, mt); }
int hd_v2_block_n(int dp, int warps) { return v2_block_n(dp, warps); }
int hd_v2_q_in_regs(int dp, int mt) { return v2_q_in_regs(dp, mt); }
int hd_v2_smem_bytes(int dp, int warps, int mt, int elem) { return v2_smem_bytes(dp, warps, mt, elem); }
int hd_v2_k_offset(int dp, int warps, int mt, int stage) { return v2_k_offset(dp, warps, mt, stage); }
int hd_v2_v_offset(int dp, int warps, int mt, int stage) { return v2_v_offset(dp, warps, mt, stage); }
int hd_v1_mma_smem_bytes(int dp, int elem) { return v1_mma_smem_bytes(dp, elem); }
int hd_simt_smem_bytes(int dp) { return simt_smem_bytes(dp); }
int hd_params_bytes(void) { return (int)sizeof(AttnParams); }
int hd_max_segments(void) { return kMaxSegments; }
int hd_max_splits(void) { return kMaxSplits; }
}
"""


def _csrc(what: str) -> Path:
    csrc = csrc_dir()
    if csrc is None or not (csrc / "attention_layout.cuh").is_file():
        raise RuntimeError(f"{what} needs halodiff's csrc/ (a source checkout, or HALODIFF_CSRC=DIR); "
                           f"{'none found' if csrc is None else f'{csrc} has no attention_layout.cuh'}")
    return csrc


def layout_lib() -> ctypes.CDLL:
    """csrc/attention_layout.cuh compiled by the host C++ compiler into a ctypes library (cached by hash)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no host C++ compiler (c++/g++/clang++) to build the attention layout shim")
    csrc = _csrc("the attention layout shim")
    header = (csrc / "attention_layout.cuh").read_bytes()
    key = hashlib.sha256(header + SHIM_SOURCE.encode() + cxx.encode()).hexdigest()[:16]
    lib = cache_dir() / f"attention_layout_{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "shim.cpp"
            src.write_text(SHIM_SOURCE)
            out = Path(tmp) / lib.name
            run_tool([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{csrc}", str(src), "-o", str(out)])
            os.replace(out, lib)  # atomic: concurrent builders never see a partial file
    dll = ctypes.CDLL(str(lib))
    i64, i32, out = ctypes.c_longlong, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
    dll.hd_choose_tile.argtypes = [i64, i64, i32, i32, out]
    dll.hd_choose_splits.argtypes = [i64, i32, i32]
    return dll



def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


_DTYPES = {"__half": "fp16", "__nv_bfloat16": "bf16", "c10::Half": "fp16", "c10::BFloat16": "bf16", "float": "fp32",
           "double": "fp64"}


def cuda_labels(pretty: str, lib: ctypes.CDLL | None) -> dict:
    """kernel family, dtype, padded head dim, variant and dynamic shared memory from a demangled name."""
    pretty = pretty.replace("(anonymous namespace)::", "")
    m = re.search(r"(\w+)<([^()]*)>\(", pretty)
    kernel = m.group(1) if m else re.sub(r"\(.*", "", pretty).split("::")[-1]
    targs = [a.strip() for a in m.group(2).split(",")] if m else []
    dtype = next((_DTYPES[a] for a in targs if a in _DTYPES), "")
    ints = [int(a) for a in targs if re.fullmatch(r"\d+", a)]
    out = {"kernel": kernel, "dtype": dtype, "head_dim": "", "variant": ",".join(targs), "smem": None,
           "smem_source": "static (cuobjdump)"}
    if kernel.startswith("seg_attn") and kernel != "seg_attn_merge_kernel" and ints:
        dp = ints[0]
        out["head_dim"] = str(dp)
        if kernel == "seg_attn_v2_kernel":
            warps, mt = ints[1], ints[2]
            out["variant"] = f"v2 {16 * warps * mt}-row tile"
            out["smem"] = lib.hd_v2_smem_bytes(dp, warps, mt, 2) if lib else None
        elif kernel == "seg_attn_mma_kernel":
            out["variant"] = "v1"
            out["smem"] = lib.hd_v1_mma_smem_bytes(dp, 2) if lib else None
        else:
            out["variant"] = "fp32 SIMT (v1 and v2)"
            out["smem"] = lib.hd_simt_smem_bytes(dp) if lib else None
        out["smem_source"] = "dynamic (attention_layout.cuh)"
    return out



# --------------------------------------------------------------------------------------------
# CUDA kernels


def extension_path() -> Path | None:
    """The built CUDA extension (halodiff._C_cuda), found without importing it."""
    try:
        spec = importlib.util.find_spec("halodiff._C_cuda")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin else None


def _compile_cubin(arch: int, nvcc: str) -> Path:
    """nvcc -cubin of every csrc/*.cu for one arch (cached by the hash of csrc/ and the flags)."""
    import torch.utils.cpp_extension as ce

    csrc = _csrc(f"nvcc -cubin for sm_{arch}")
    incs = ce.include_paths("cuda") + [sysconfig.get_paths()["include"], str(csrc)]
    incs += [str(p) for p in Path(sysconfig.get_paths()["purelib"]).glob("nvidia/*/include")]
    flags = ["-std=c++20", "-O3", "-DHALODIFF_WITH_CUDA", f"-arch=sm_{arch}", "--expt-relaxed-constexpr",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    srcs = sorted(csrc.glob("*.cu"))
    h = hashlib.sha256(" ".join(flags).encode())
    for p in sorted(csrc.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    out = cache_dir() / f"csrc_sm{arch}_{h.hexdigest()[:16]}"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for src in srcs:
            run_tool([nvcc, *flags, *[f"-I{i}" for i in incs], "-cubin", str(src),
                      "-o", str(tmp / f"{src.stem}.cubin")])
        os.replace(tmp, out)
    return out


def extension_cubins(so: Path, cuobjdump: str) -> list[Path]:
    """The extension's cubins (cuobjdump -xelf all), cached by the extension's size and mtime."""
    st = so.stat()
    out = cache_dir() / f"cubins_{so.stem}_{st.st_size}_{int(st.st_mtime)}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent))
        run_tool([cuobjdump, "-xelf", "all", str(so.resolve())], cwd=tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process extracted it first
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out.glob("*.cubin"))


def _dump(cuobjdump: str, what: str, cubin: Path) -> str:
    """cuobjdump `what` of an extracted cubin, cached beside it."""
    cached = cubin.with_suffix(cubin.suffix + what)
    if not cached.exists():
        cached.write_text(run_tool([cuobjdump, what, str(cubin)]))
    return cached.read_text()


def cuda_rows(archs: tuple[int, ...], pattern: str | None, notes: list[str],
              elf_filter: str | None = None) -> list[Row]:
    """Rows of every CUDA kernel whose demangled name matches `pattern`, from the cubins whose file name
    contains `elf_filter` (e.g. "segmented_attention")."""
    cuobjdump = find_tool("cuobjdump")
    if not cuobjdump:
        notes.append("cuda: skipped, no cuobjdump (CUDA toolkit or Triton's bundled binaries)")
        return []
    so = extension_path()
    cubins = extension_cubins(so, cuobjdump) if so else []
    try:
        lib = layout_lib()
    except RuntimeError as exc:
        lib = None
        notes.append(f"cuda: dynamic shared memory unknown ({exc})")
    rows = []
    for arch in archs:
        files = [f for f in cubins if f.name.endswith(f".sm_{arch}.cubin")]
        source = f"built extension {so.name}" if files else ""
        if not files:
            nvcc = find_tool("nvcc")
            if not nvcc:
                notes.append(f"cuda sm_{arch}: skipped, not in the built extension and no nvcc to compile it")
                continue
            try:
                files, source = sorted(_compile_cubin(arch, nvcc).glob("*.cubin")), "nvcc -cubin of csrc/*.cu"
            except RuntimeError as exc:  # no sources (an installed package) or a failed compile: a note
                notes.append(f"cuda sm_{arch}: skipped, not in the built extension and {exc}")
                continue
        notes.append(f"cuda sm_{arch}: SASS from {source}")
        for f in files:
            if elf_filter and elf_filter not in f.name:
                continue
            sass = parse_sass(_dump(cuobjdump, "-sass", f))
            res = res_usage(_dump(cuobjdump, "-res-usage", f))
            threads = launch_threads(f.read_bytes())
            pretty = demangle(list(sass))
            for name, instrs in sass.items():
                if pattern and not re.search(pattern, pretty[name]):
                    continue
                lab = cuda_labels(pretty[name], lib)
                r = res.get(name, {})
                total, loop, model = analyse(name, instrs, arch)
                smem = (lab["smem"] or 0) + r.get("SHARED", 0)
                row = Row("cuda", lab["kernel"], f"sm_{arch}", lab["dtype"], lab["head_dim"], lab["variant"], name,
                          threads.get(name), r.get("REG", 0), r.get("LOCAL", 0), None, smem, lab["smem_source"],
                          sd_label(lab["head_dim"]), total=total, loop=loop, model=model)
                if row.threads:
                    row.occupancy = occupancy(row.regs, smem, row.threads, ARCH[arch])
                rows.append(row)
    return rows

