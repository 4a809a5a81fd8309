"""SASS analysis without a GPU: parse `cuobjdump -sass` / `-res-usage` text and cubin ELF attributes, count
instructions by class, find the hot loop, and bound it with a static pipe model (MODEL)."""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

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

