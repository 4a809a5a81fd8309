#!/usr/bin/env python3
"""Static audit of halodiff's GPU kernels: what the compiled code does, proven without a GPU.

CUDA kernels: the SASS of the built extension `halodiff._C_cuda` per arch (`cuobjdump -sass/-res-usage/-elf`),
or, for an arch the extension lacks, `nvcc -cubin` of csrc/*.cu (cached under build/kernel_audit/ by source
hash). Triton kernels: compiled ahead of time (`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`) from each `triton_kernels/*.py` module's `audit_configs()` (see TRITON CONTRACT below), then the same
SASS analysis plus `ptxas -v` for spill bytes.

One row per kernel x arch x dtype x head dim (or shape label): registers, local/spill bytes, shared memory,
occupancy, static instruction counts over the whole function and over its hot loop (HMMA, HGMMA = wgmma,
LDSM, LDS, STS, LDGSTS = cp.async, TMA, LDG/STG by width, MUFU, FP32), and a bound estimate of the hot loop
(MODEL below). Writes audit.json + audit.csv.

    python bench/kernel_audit.py [--out DIR] [--arch 80,90] [--only cuda|triton] [--kernels REGEX]
    halodiff bench audit [--out DIR]

TRITON CONTRACT: a module in triton_kernels/ may define `audit_configs() -> list[dict]`, each dict with
  name (str), fn (the @triton.jit function), signature (arg name -> "*fp16" | "i32" | "fp32" | "constexpr" ...),
  constexprs (arg name -> value), attrs (optional: arg name -> "D" for 16-divisible, or a list of
  [attribute, value] pairs, or a list of 16-divisible arg names), num_warps, num_stages, dtype (label),
  head_dim or shape (label), archs (optional: the SM versions, e.g. (80,) or (90,), whose autotune candidates
  hold the config when they differ by arch; absent: every audited arch). A module without it is audited from
  FALLBACK_TRITON (the kernels as of this audit's writing) while those still match its code, else skipped with
  the reason in the output.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CACHE = ROOT / "build" / "kernel_audit"
ARCHS = (80, 90)
# The head dims of the models halodiff serves (UNets, and DiTs' joint text + image attention).
SD_HEAD_DIMS = {40: "SD1.5 level 0", 64: "SD2.x/SDXL, SD3/PixArt", 80: "SD1.5 level 1", 128: "Flux/Qwen-Image",
                160: "SD1.5 levels 2-3"}

MODEL = """Hot-loop bound model (static; one iteration of the innermost loop holding the tensor-core instructions, or
the memory instructions for kernels without them). Four warps run the loop side by side, one per SM
sub-partition. Cycles per iteration on each pipe: tensor = HMMA.16816 x cycles_per_hmma (sm_80: 8, i.e. A100's
256 dense FMA/clk per sub-partition; sm_90: 4 x 1.5 = 6, i.e. H100's 512 FMA/clk with mma.sync ASSUMED to reach
2/3 of the dense wgmma peak, unmeasured) or HGMMA.64xNx16 x N/2 (sm_90 wgmma at peak); shared = bytes through the
shared-memory pipe of the 4 warps / 128 B per clk (LDSM.x4, LDS.128, STS.128, LDGSTS.128 = 512 B per warp,
narrower ones 128 B = one wavefront); MUFU = 8 clk per warp instruction (16/clk/SM); FP32 = 1 (sm_90) or 2
(sm_80) clk per warp FFMA/FMUL/FADD/FMNMX; issue = 1 instruction per clk per scheduler. The largest bounds the
loop; implied fraction of the tensor peak = tensor / largest (x the mma.sync/dense ratio for the dense peak).
It ignores latency, occupancy and memory bandwidth: an upper bound on what the instruction mix allows. Kernels
without tensor work stream memory: their bound is DRAM/L2 bandwidth, and the audit reports the bytes each global
memory access moves per thread in the hot loop (16 = full-width vector accesses)."""


@dataclass(frozen=True)
class Arch:
    sm: int
    gpu: str
    dense_tflops: float  # vendor dense fp16/bf16 tensor peak (sm_90: wgmma)
    dense_hmma_cycles: float  # sub-partition cycles per HMMA.16816.F32 at the dense peak
    hmma_cycles: float  # ... as modelled for mma.sync (see MODEL)
    fp32_cycles: float
    smem_per_sm: int
    smem_per_block: int
    regs: int = 65536
    max_warps: int = 64
    max_blocks: int = 32

    @property
    def mma_sync_fraction(self) -> float:  # mma.sync peak / dense peak
        return self.dense_hmma_cycles / self.hmma_cycles


ARCH = {
    80: Arch(80, "A100 SXM (312 dense fp16 TFLOP/s)", 312.0, 8.0, 8.0, 2.0, 167936, 166912),
    90: Arch(90, "H100 SXM (989 dense fp16 TFLOP/s)", 989.4, 4.0, 6.0, 1.0, 233472, 232448),
}


# --------------------------------------------------------------------------------------------
# Tools


def cuda_home() -> Path | None:
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc:  # the nvcc on PATH may be a wrapper script that execs the real one
        m = re.search(r"exec (/\S+)/bin/nvcc", Path(nvcc).read_text(errors="ignore")[:4096])
        return Path(m.group(1)) if m else Path(os.path.realpath(nvcc)).parents[1]
    return Path("/usr/local/cuda") if Path("/usr/local/cuda").exists() else None


def find_tool(name: str) -> str | None:
    """CUDA_HOME/bin, then PATH, then the binaries bundled with Triton."""
    home = cuda_home()
    if home and (home / "bin" / name).exists():
        return str(home / "bin" / name)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        return str(p) if p.exists() else None
    except ImportError:
        return None


def _run(cmd: list[str], **kw) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout + res.stderr


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


def layout_lib() -> ctypes.CDLL:
    """csrc/attention_layout.cuh compiled by the host C++ compiler into a ctypes library (cached by hash)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no host C++ compiler (c++/g++/clang++) to build the attention layout shim")
    header = (CSRC / "attention_layout.cuh").read_bytes()
    key = hashlib.sha256(header + SHIM_SOURCE.encode() + cxx.encode()).hexdigest()[:16]
    lib = CACHE / f"attention_layout_{key}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "shim.cpp"
            src.write_text(SHIM_SOURCE)
            out = Path(tmp) / lib.name
            _run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{CSRC}", str(src), "-o", str(out)])
            os.replace(out, lib)  # atomic: concurrent builders never see a partial file
    dll = ctypes.CDLL(str(lib))
    i64, i32, out = ctypes.c_longlong, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
    dll.hd_choose_tile.argtypes = [i64, i64, i32, i32, out]
    dll.hd_choose_splits.argtypes = [i64, i32, i32]
    return dll


# --------------------------------------------------------------------------------------------
# SASS

_SASS = re.compile(r"Function\s*:\s*(\S+)|/\*([0-9a-f]{4,})\*/[ \t]+([^;\n]*?)[ \t]*;")
_TARGET = re.compile(r"0x([0-9a-f]+)")


@dataclass(frozen=True)
class Instr:
    addr: int
    pred: str
    op: str
    args: str


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """cuobjdump -sass text -> {function: instructions}. `@!PT` instructions (never executed) are dropped."""
    funcs: dict[str, list[Instr]] = {}
    cur: list[Instr] | None = None
    for m in _SASS.finditer(text):
        if m.group(1):
            cur = funcs[m.group(1)] = []
            continue
        if cur is None:
            continue
        body = m.group(3)
        pred = ""
        if body.startswith("@"):
            pred, _, body = body.partition(" ")
            if pred == "@!PT":
                continue
        op, _, args = body.strip().partition(" ")
        cur.append(Instr(int(m.group(2), 16), pred, op, args.strip()))
    return funcs


def mem_width(op: str) -> int:
    """Bytes per thread of a load/store opcode (LDG.E.128 -> 16, LDS.U16 -> 2, LDS -> 4)."""
    tokens = op.split(".")[1:]
    for tok, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if tok in tokens:
            return width
    return 4


def ldsm_bytes(op: str) -> int:
    return {"4": 512, "2": 256}.get(op.split(".")[-1], 128)


_FP32 = {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP"}


def counts(instrs: list[Instr]) -> dict[str, int]:
    """Static instruction counts by class; shared_bytes = bytes through the shared-memory pipe per warp."""
    c = dict.fromkeys(("instrs", "hmma", "wgmma", "ldsm", "lds", "sts", "ldgsts", "tma", "ldg", "ldg_16b", "ldg_lt4b",
                       "stg", "stg_16b", "stg_lt4b", "ldl", "stl", "mufu", "fp32", "bar", "shared_bytes",
                       "global_bytes", "wgmma_n_sum"), 0)
    for ins in instrs:
        base = ins.op.split(".")[0]
        c["instrs"] += 1
        if base == "HMMA":
            c["hmma"] += 1
        elif base in ("HGMMA", "WGMMA"):
            c["wgmma"] += 1
            m = re.search(r"64x(\d+)x", ins.op)
            c["wgmma_n_sum"] += int(m.group(1)) if m else 64
        elif base == "LDSM":
            c["ldsm"] += 1
            c["shared_bytes"] += ldsm_bytes(ins.op)
        elif base in ("LDS", "STS", "LDGSTS"):
            key = {"LDS": "lds", "STS": "sts", "LDGSTS": "ldgsts"}[base]
            c[key] += 1
            c["shared_bytes"] += max(128, 32 * mem_width(ins.op))
            c["global_bytes"] += 32 * mem_width(ins.op) if base == "LDGSTS" else 0
        elif base in ("UTMALDG", "UBLKCP", "UTMAPF"):
            c["tma"] += 1
        elif base in ("LDG", "STG"):
            key = base.lower()
            w = mem_width(ins.op)
            c[key] += 1
            c[f"{key}_16b"] += w == 16
            c[f"{key}_lt4b"] += w < 4
            c["global_bytes"] += 32 * w
        elif base in ("LDL", "STL"):
            c[base.lower()] += 1
        elif base == "MUFU":
            c["mufu"] += 1
        elif base in _FP32:
            c["fp32"] += 1
        elif base == "BAR":
            c["bar"] += 1
    return c


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every backward branch's region."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    out = []
    for i, ins in enumerate(instrs):
        if ins.op.startswith("BRA"):
            m = _TARGET.search(ins.args)
            if m and int(m.group(1), 16) <= ins.addr and int(m.group(1), 16) in index:
                out.append((index[int(m.group(1), 16)], i))
    return out


def hot_loop(instrs: list[Instr]) -> tuple[int, int] | None:
    """The innermost loop with the most tensor-core instructions (else with the most global memory ops)."""
    regions = loops(instrs)
    if not regions:
        return None
    mma, mem = [0], [0]  # prefix sums
    for ins in instrs:
        base = ins.op.split(".")[0]
        mma.append(mma[-1] + (base in ("HMMA", "HGMMA", "WGMMA")))
        mem.append(mem[-1] + (base in ("LDG", "STG", "LDGSTS")))

    def weight(r: tuple[int, int]) -> tuple[int, int]:
        return mma[r[1] + 1] - mma[r[0]], mem[r[1] + 1] - mem[r[0]]

    best = max(weight(r) for r in regions)
    if best == (0, 0):
        return None
    key = 0 if best[0] else 1
    cands = [r for r in regions if weight(r)[key] == best[key]]
    return min(cands, key=lambda r: r[1] - r[0])


def res_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage -> {function: {REG, STACK, SHARED, LOCAL}}."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = m.group(1)
            continue
        if cur and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            cur = None
    return out


def elf_sections(data: bytes) -> dict[str, bytes]:
    """Sections of an ELF64 little-endian file (a cubin) by name."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = hdrs[shstrndx][4]
    out = {}
    for h in hdrs:
        start = names + h[0]
        out[data[start : data.index(b"\0", start)].decode()] = data[h[4] : h[4] + h[5]]
    return out


EIATTR_MAX_THREADS, EIATTR_REQNTID = 0x05, 0x10  # .nv.info attribute ids (as cuobjdump -elf names them)


def launch_threads(cubin: bytes) -> dict[str, int]:
    """{function: threads per block} from the EIATTR_REQNTID / EIATTR_MAX_THREADS attributes of a cubin's
    .nv.info.<function> sections (records: u8 format, u8 attribute, then u16 size + payload for format 4)."""
    out = {}
    for name, sec in elf_sections(cubin).items():
        if not name.startswith(".nv.info."):
            continue
        i = 0
        while i + 4 <= len(sec):
            fmt, attr = sec[i], sec[i + 1]
            size = struct.unpack_from("<H", sec, i + 2)[0] if fmt == 4 else 0
            if attr in (EIATTR_MAX_THREADS, EIATTR_REQNTID) and fmt == 4 and size == 12:
                out[name[len(".nv.info."):]] = math.prod(struct.unpack_from("<III", sec, i + 4))
            i += 4 + size
    return out


def occupancy(regs: int, smem: int, threads: int, arch: Arch) -> dict:
    """Resident blocks per SM and warp occupancy from registers, shared memory and threads."""
    warps = max(1, -(-threads // 32))
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = {
        "registers": 4 * (arch.regs // 4 // regs_per_warp) // warps,  # 4 sub-partitions, each its register file
        "shared_memory": arch.smem_per_sm // (smem + 1024) if smem <= arch.smem_per_block else 0,
        "threads": arch.max_warps // warps,
        "blocks": arch.max_blocks,
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    return {"blocks_per_sm": blocks, "occupancy": round(blocks * warps / arch.max_warps, 3),
            "occupancy_limiter": limiter}


def bound(c: dict[str, int], arch: Arch) -> dict:
    """MODEL: cycles per hot-loop iteration on each pipe, the limiting pipe and the implied tensor fraction."""
    tensor = c["hmma"] * arch.hmma_cycles + c["wgmma_n_sum"] / 2
    pipes = {
        "tensor": tensor,
        "shared": 4 * c["shared_bytes"] / 128,
        "mufu": 8 * c["mufu"],
        "fp32": arch.fp32_cycles * c["fp32"],
        "issue": float(c["instrs"]),
    }
    limit = max(pipes, key=lambda k: pipes[k])
    out = {f"cycles_{k}": round(v, 1) for k, v in pipes.items()}
    out["bound"] = limit
    if tensor > 0:
        frac = tensor / pipes[limit]
        peak = arch.mma_sync_fraction if c["hmma"] else 1.0
        out["tensor_peak_fraction"] = round(frac, 3)
        out["dense_peak_fraction"] = round(frac * peak, 3)
    else:
        # No tensor work: a streaming kernel, bound by DRAM/L2 bandwidth, which a static count cannot time. What
        # the code decides is how many bytes each global memory instruction moves (16 per thread = full width).
        n = c["ldg"] + c["stg"] + c["ldgsts"]
        out["bound"] = "memory"
        out["global_bytes_per_thread_access"] = round(c["global_bytes"] / 32 / n, 1) if n else None
    return out


# --------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    backend: str
    kernel: str
    arch: str
    dtype: str
    head_dim: str
    variant: str
    function: str
    threads: int | None
    regs: int
    local_bytes: int
    spill_bytes: int | None
    smem_bytes: int | None
    smem_source: str
    sd_config: str = ""
    occupancy: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    loop: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    @property
    def shared_loads_per_mma(self) -> float | None:
        mma = self.loop.get("hmma", 0) + self.loop.get("wgmma", 0)
        return round((self.loop.get("lds", 0) + self.loop.get("ldsm", 0)) / mma, 3) if mma else None

    def flat(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("occupancy", "total", "loop", "model")}
        d.update(self.occupancy)
        d.update({f"fn_{k}": v for k, v in self.total.items()})
        d.update({f"loop_{k}": v for k, v in self.loop.items()})
        d["loop_shared_loads_per_mma"] = self.shared_loads_per_mma
        d.update(self.model)
        return d


def analyse(name: str, instrs: list[Instr], arch: int) -> tuple[dict, dict, dict]:
    total = counts(instrs)
    region = hot_loop(instrs)
    loop = counts(instrs[region[0] : region[1] + 1]) if region else {}
    model = bound(loop, ARCH[arch]) if loop else {"bound": "no loop"}
    return total, loop, model


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


def sd_label(head_dim: str) -> str:
    """Which model head dims (SD UNets, DiTs) a (padded) head dim serves."""
    if not head_dim.isdigit():
        return ""
    dp = int(head_dim)
    pad = lambda d: (d + 15) // 16 * 16 if d <= 128 else (d + 31) // 32 * 32  # noqa: E731
    return "; ".join(f"D={d} {what}" for d, what in SD_HEAD_DIMS.items() if pad(d) == dp or d == dp)


# --------------------------------------------------------------------------------------------
# CUDA kernels


def extension_path() -> Path | None:
    """The built CUDA extension (halodiff._C_cuda)."""
    for p in sorted((ROOT / "python" / "halodiff").glob("_C_cuda*.so")):
        return p
    try:
        sys.path.insert(0, str(ROOT / "python"))
        from halodiff._native import native

        return Path(native().cuda_path) if native().cuda_path else None
    except Exception:  # noqa: BLE001 - no extension is a reason, not an error
        return None


def _compile_cubin(arch: int, nvcc: str) -> Path:
    """nvcc -cubin of every csrc/*.cu for one arch (cached by the hash of csrc/ and the flags)."""
    import torch.utils.cpp_extension as ce

    incs = ce.include_paths("cuda") + [sysconfig.get_paths()["include"], str(CSRC)]
    incs += [str(p) for p in Path(sysconfig.get_paths()["purelib"]).glob("nvidia/*/include")]
    flags = ["-std=c++20", "-O3", "-DHALODIFF_WITH_CUDA", f"-arch=sm_{arch}", "--expt-relaxed-constexpr",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    srcs = sorted(CSRC.glob("*.cu"))
    h = hashlib.sha256(" ".join(flags).encode())
    for p in sorted(CSRC.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    out = CACHE / f"csrc_sm{arch}_{h.hexdigest()[:16]}"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for src in srcs:
            _run([nvcc, *flags, *[f"-I{i}" for i in incs], "-cubin", str(src), "-o", str(tmp / f"{src.stem}.cubin")])
        os.replace(tmp, out)
    return out


def extension_cubins(so: Path, cuobjdump: str) -> list[Path]:
    """The extension's cubins (cuobjdump -xelf all), cached by the extension's size and mtime."""
    st = so.stat()
    out = CACHE / f"cubins_{so.stem}_{st.st_size}_{int(st.st_mtime)}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        _run([cuobjdump, "-xelf", "all", str(so.resolve())], cwd=tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process extracted it first
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out.glob("*.cubin"))


def _dump(cuobjdump: str, what: str, cubin: Path) -> str:
    """cuobjdump `what` of an extracted cubin, cached beside it."""
    cached = cubin.with_suffix(cubin.suffix + what)
    if not cached.exists():
        cached.write_text(_run([cuobjdump, what, str(cubin)]))
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
            files, source = sorted(_compile_cubin(arch, nvcc).glob("*.cubin")), "nvcc -cubin of csrc/*.cu"
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


# --------------------------------------------------------------------------------------------
# Triton kernels


def _fallback_attention(mod) -> list[dict]:
    """The pre-audit_configs segmented-attention kernel (16 K/V pointer pairs, a stride table)."""
    fn = mod._segmented_attention_fwd
    out = []
    for dtype, tt in (("fp16", "*fp16"), ("bf16", "*bf16")):
        for d in (40, 64, 80, 128, 160):
            block_d = max(16, 1 << (d - 1).bit_length())
            bm, bn, warps, stages = mod._config(block_d, 2)
            sig = {}
            for a in fn.arg_names:
                if a in ("NSEG", "FIRST", "LAST", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PRECISION"):
                    sig[a] = "constexpr"
                elif a == "Table":
                    sig[a] = "*i64"
                elif a in ("Acc", "Mx", "Sm"):
                    sig[a] = "*fp32"
                elif a == "qk_scale":
                    sig[a] = "fp32"
                elif a[0] in "QOKV" and not a.startswith(("q_s", "o_s")):
                    sig[a] = tt
                else:
                    sig[a] = "i32"
            out.append(dict(name="segmented_attention", fn=fn, signature=sig, num_warps=warps, num_stages=stages,
                            constexprs=dict(NSEG=4, FIRST=True, LAST=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
                                            PRECISION="tf32"),
                            attrs=[a for a, t in sig.items() if t.startswith("*")], dtype=dtype, head_dim=d))
    return out


def _fallback_group_norm(mod) -> list[dict]:
    import triton.language as tl

    out = []
    for dtype, tt in (("fp16", "*fp16"), ("fp32", "*fp32")):
        out.append(dict(name="group_norm_partial_sums", fn=mod._partial_sums, num_warps=4, num_stages=2,
                        signature={"x_ptr": tt, "part_ptr": "*fp32", "group_numel": "i32", "chunk": "i32",
                                   "n_splits": "i32", "BLOCK": "constexpr", "ACC": "constexpr"},
                        constexprs={"BLOCK": mod.STATS_BLOCK, "ACC": tl.float32}, attrs=["x_ptr", "part_ptr"],
                        dtype=dtype, shape="SD1.5 2x320x64x64, 32 groups"))
        out.append(dict(name="group_norm_apply", fn=mod._apply, num_warps=4, num_stages=2,
                        signature={"x_ptr": tt, "y_ptr": tt, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "HW": "i32",
                                   "SILU": "constexpr", "BLOCK": "constexpr", "ACC": "constexpr"},
                        constexprs={"SILU": True, "BLOCK": mod.APPLY_BLOCK, "ACC": tl.float32},
                        attrs=["x_ptr", "y_ptr", "scale_ptr", "shift_ptr", "HW"], dtype=dtype,
                        shape="SD1.5 2x320x64x64, 32 groups"))
    return out


def _fallback_halo_pack(mod) -> list[dict]:
    return [dict(name="halo_pack", fn=mod._pack, num_warps=4, num_stages=2,
                 signature={"meta_ptr": "*i64", "out_ptr": tt, "NF": "constexpr", "BLOCK": "constexpr"},
                 constexprs={"NF": mod._FIELDS, "BLOCK": mod.ROW_BLOCK}, attrs=["meta_ptr", "out_ptr"], dtype=dtype,
                 shape="rows of SD1.5 convs") for dtype, tt in (("fp16", "*fp16"), ("fp32", "*fp32"))]


FALLBACK_TRITON = {
    "segmented_attention": (("_segmented_attention_fwd", "_config"), _fallback_attention),
    "group_norm": (("_partial_sums", "_apply", "STATS_BLOCK", "APPLY_BLOCK"), _fallback_group_norm),
    "halo_pack": (("_pack", "_FIELDS", "ROW_BLOCK"), _fallback_halo_pack),
}


def triton_configs(notes: list[str]) -> list[dict]:
    """Every Triton module's audit_configs() (or the fallback while it matches the module)."""
    sys.path.insert(0, str(ROOT))
    configs = []
    for path in sorted((ROOT / "triton_kernels").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        mod = importlib.import_module(f"triton_kernels.{path.stem}")
        if hasattr(mod, "audit_configs"):
            configs += [dict(c, module=path.stem, config_source="audit_configs()") for c in mod.audit_configs()]
            continue
        needs, make = FALLBACK_TRITON.get(path.stem, ((), None))
        missing = [n for n in needs if not hasattr(mod, n)]
        if make is None or missing:
            notes.append(f"triton {path.stem}: skipped, no audit_configs() (and no matching fallback: missing "
                         f"{', '.join(missing) or 'fallback'})")
            continue
        try:
            cfgs = make(mod)
        except Exception as exc:  # noqa: BLE001 - a stale fallback is a note, not a crash
            notes.append(f"triton {path.stem}: fallback configs no longer match the module ({exc}); skipped")
            continue
        configs += [dict(c, module=path.stem, config_source="fallback in kernel_audit.py") for c in cfgs]
    return configs


def _attrs(cfg: dict) -> dict:
    names = cfg["fn"].arg_names
    raw = cfg.get("attrs") or {}
    if isinstance(raw, (list, tuple)):
        raw = {a: "D" for a in raw}
    out = {}
    for a, v in raw.items():
        out[(names.index(a),)] = [["tt.divisibility", 16]] if v == "D" else [list(p) for p in v]
    return out


def compile_triton(cfg: dict, arch: int) -> dict:
    """AOT compile -> {cubin, ptx, shared}; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(cfg["fn"], cfg["signature"], constexprs=cfg.get("constexprs"), attrs=_attrs(cfg))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)})
    return {"cubin": k.asm["cubin"], "ptx": k.asm["ptx"], "shared": int(k.metadata.shared)}


def ptxas_spills(ptx: str, arch: int) -> int | None:
    """Spill bytes (stores + loads) that ptxas -v reports for a PTX module (cached by the PTX hash)."""
    ptxas = find_tool("ptxas")
    if not ptxas:
        return None
    key = CACHE / f"spills_{hashlib.sha256(ptx.encode() + bytes([arch])).hexdigest()[:20]}.txt"
    if key.exists():
        return int(key.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.ptx"
        p.write_text(ptx)
        target = f"sm_{arch}a" if arch == 90 and ".target sm_90a" in ptx else f"sm_{arch}"
        txt = _run([ptxas, "-v", f"-arch={target}", str(p), "-o", str(Path(tmp) / "k.cubin")])
    m = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    if not m:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    key.write_text(str(sum(int(a) + int(b) for a, b in m)))
    return int(key.read_text())


def triton_rows(archs: tuple[int, ...], pattern: str | None, notes: list[str],
                select=None) -> list[Row]:
    try:
        import triton  # noqa: F401
    except ImportError:
        notes.append("triton: skipped, triton is not installed")
        return []
    cuobjdump = find_tool("cuobjdump")
    rows = []
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # @triton.jit then makes interpreter functions
        notes.append("triton: skipped, TRITON_INTERPRET=1 (interpreted kernels cannot be compiled; run without it)")
        return []
    for cfg in triton_configs(notes):
        label = str(cfg.get("head_dim", cfg.get("shape", "")))
        if pattern and not re.search(pattern, cfg["name"]):
            continue
        if select and not select(cfg):
            continue
        for arch in archs:
            if cfg.get("archs") and arch not in cfg["archs"]:
                continue  # not an autotune candidate on this arch
            try:
                k = compile_triton(cfg, arch)
            except Exception as exc:  # noqa: BLE001 - one failed config must not hide the others
                notes.append(f"triton {cfg['name']} {cfg.get('dtype')} {label} sm_{arch}: compile failed: {exc}")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                cub = Path(tmp) / "k.cubin"
                cub.write_bytes(k["cubin"])
                sass = parse_sass(_run([cuobjdump, "-sass", str(cub)]))
                res = res_usage(_run([cuobjdump, "-res-usage", str(cub)]))
            name, instrs = next(iter(sass.items()))
            r = res.get(name, {})
            total, loop, model = analyse(name, instrs, arch)
            threads = 32 * cfg.get("num_warps", 4)
            consts = cfg.get("constexprs") or {}
            tile = f"{consts['BLOCK_M']}x{consts['BLOCK_N']} " if "BLOCK_M" in consts and "BLOCK_N" in consts else ""
            variant = f"{tile}warps={cfg.get('num_warps', 4)} stages={cfg.get('num_stages', 2)}"
            row = Row("triton", cfg["name"], f"sm_{arch}", str(cfg.get("dtype", "")), label,
                      f"{variant} ({cfg['config_source']})",
                      name, threads, r.get("REG", 0), r.get("LOCAL", 0), ptxas_spills(k["ptx"], arch), k["shared"],
                      "triton metadata", sd_label(label) if "attention" in cfg["name"] else "",
                      total=total, loop=loop, model=model)
            row.occupancy = occupancy(row.regs, k["shared"], threads, ARCH[arch])
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Output


def write(rows: list[Row], notes: list[str], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    flat = [r.flat() for r in rows]
    tools = {t: find_tool(t) for t in ("cuobjdump", "nvdisasm", "ptxas", "nvcc")}
    doc = {"model": MODEL, "archs": {f"sm_{k}": asdict(v) for k, v in ARCH.items()}, "tools": tools, "notes": notes,
           "rows": flat}
    jpath, cpath = out / "audit.json", out / "audit.csv"
    jpath.write_text(json.dumps(doc, indent=1))
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    with cpath.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)
    return jpath, cpath


def summary(rows: list[Row]) -> str:
    """One line per SD-config row: what bounds its hot loop and the implied fraction of peak."""
    lines = [f"{'backend':7} {'kernel':28} {'arch':5} {'dtype':5} {'D':>4} {'variant':24} {'regs':>4} {'spill':>5} "
             f"{'smem':>6} {'occ':>5} {'HMMA':>4} {'LDSM':>4} {'LDS':>4} {'LDGSTS':>6} {'ld/mma':>6} bound"]
    for r in rows:
        if r.kernel.startswith("seg_attn") and r.head_dim and not r.sd_config or r.dtype not in ("fp16", "bf16", ""):
            continue  # the table shows the model head dims and the 16-bit kernels; the files have every row
        frac = r.model.get("dense_peak_fraction")
        spill = r.spill_bytes if r.spill_bytes is not None else r.local_bytes
        lines.append(
            f"{r.backend:7} {r.kernel[:28]:28} {r.arch:5} {r.dtype:5} {r.head_dim[:4]:>4} {r.variant[:24]:24} "
            f"{r.regs:>4} {spill:>5} {r.smem_bytes or 0:>6} {r.occupancy.get('occupancy', ''):>5} "
            f"{r.loop.get('hmma', 0) + r.loop.get('wgmma', 0):>4} {r.loop.get('ldsm', 0):>4} {r.loop.get('lds', 0):>4} "
            f"{r.loop.get('ldgsts', 0):>6} {r.shared_loads_per_mma if r.shared_loads_per_mma is not None else '':>6} "
            f"{r.model.get('bound', '')[:10]}{f' {frac:.0%} of dense peak' if frac is not None else ''}"
            f"{f' {bpa} B/thread/access' if (bpa := r.model.get('global_bytes_per_thread_access')) else ''}")
    return "\n".join(lines)


def run(out: Path, archs: tuple[int, ...] = ARCHS, only: str | None = None, pattern: str | None = None) -> list[Row]:
    notes: list[str] = []
    rows: list[Row] = []
    if only in (None, "cuda"):
        rows += cuda_rows(archs, pattern, notes)
    if only in (None, "triton"):
        rows += triton_rows(archs, pattern, notes)
    jpath, cpath = write(rows, notes, out)
    print(summary(rows))
    print("\n".join(notes))
    print(f"\n{len(rows)} rows: {jpath} and {cpath}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "audit")
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated SM versions (80, 90)")
    ap.add_argument("--only", choices=("cuda", "triton"))
    ap.add_argument("--kernels", help="regex on kernel names")
    args = ap.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        ap.error(f"--arch must be comma-separated integers like 80,90, got {args.arch!r}")
    bad = [a for a in archs if a not in ARCH]
    if bad:
        ap.error(f"--arch {bad}: the audit models sm_80 and sm_90 only")
    run(args.out, archs, args.only, args.kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
