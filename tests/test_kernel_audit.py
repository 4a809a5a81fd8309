"""halodiff.audit (the static kernel audit): its SASS model on known snippets, and the audit targets of issue 14 on
the real code.

CUDA targets (sm_90 and sm_80, fp16/bf16 v2 segmented attention, every instantiated head dim and tile), read
from the SASS of the built extension: the hot loop has LDSM, LDGSTS (cp.async) and HMMA, at most 1.0
shared-memory load instruction (LDS + LDSM) per HMMA, and the function uses no local memory (no spills).
Triton targets (attention, fp16, D = 40/64/80, sm_80 and sm_90): 16-byte global loads, cp.async, 0 spill
bytes; compiled in a child process because the tests run Triton in its interpreter. Head dim 128 (Flux,
Qwen-Image): every fp16/bf16 tile of the CUDA v2 kernel and every fp16/bf16 Triton autotune candidate (per arch)
compiles with 0 spill bytes, with the hot loop's HMMA/LDSM/LDGSTS counts that one K/V tile implies.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import halodiff.audit as ka
from kernel_utils import triton_module

ROOT = Path(__file__).resolve().parents[1]

SNIPPET = """
	code for sm_90
		Function : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;                /* 0x0 */
        /*0010*/                   LDGSTS.E.BYPASS.LTC128B.128 [R2], desc[UR4][R4.64] ;  /* 0x0 */
        /*0020*/                   LDSM.16.M88.4 R8, [R3] ;              /* 0x0 */
        /*0030*/                   LDSM.16.MT88.4 R12, [R3+0x800] ;      /* 0x0 */
        /*0040*/                   HMMA.16816.F32 R16, R8, R12, R16 ;   /* 0x0 */
        /*0050*/                   HMMA.16816.F32 R20, R8, R14, R20 ;   /* 0x0 */
        /*0060*/              @!PT LDS RZ, [RZ] ;                        /* 0x0 */
        /*0070*/                   LDS.U16 R5, [R6] ;                    /* 0x0 */
        /*0080*/                   MUFU.EX2 R7, R7 ;                     /* 0x0 */
        /*0090*/               @P0 BRA 0x20 ;                            /* 0x0 */
        /*00a0*/                   STG.E.128 desc[UR4][R2.64], R8 ;      /* 0x0 */
        /*00b0*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;      /* 0x0 */
        /*00c0*/                   STL [R1], R9 ;                        /* 0x0 */
        /*00d0*/                   BRA 0xd0 ;                            /* 0x0 */
		Function : _Z5otherv
        /*0000*/                   EXIT ;                                /* 0x0 */
"""


def test_sass_parser_counts_and_hot_loop():
    funcs = ka.parse_sass(SNIPPET)
    assert list(funcs) == ["_Z6kernelv", "_Z5otherv"]
    ins = funcs["_Z6kernelv"]
    assert len(ins) == 13  # the never-executed @!PT LDS is dropped
    total = ka.counts(ins)
    assert (total["hmma"], total["ldsm"], total["lds"], total["ldgsts"], total["mufu"]) == (2, 2, 1, 1, 1)
    assert (total["stg_16b"], total["ldg_lt4b"], total["stl"]) == (1, 1, 1)
    assert total["shared_bytes"] == 512 + 512 + 512 + 128
    loop = ins[slice(*(lambda r: (r[0], r[1] + 1))(ka.hot_loop(ins)))]
    assert [i.addr for i in loop] == [0x20, 0x30, 0x40, 0x50, 0x70, 0x80, 0x90]  # not the BRA-to-self at 0xd0
    c = ka.counts(loop)
    model = ka.bound(c, ka.ARCH[90])
    assert model["cycles_tensor"] == 2 * 6 and model["cycles_shared"] == 4 * (512 * 2 + 128) / 128
    assert model["bound"] == "shared" and model["tensor_peak_fraction"] == round(12 / 36, 3)
    streaming = ka.bound(ka.counts([ins[0], ins[9], ins[10]]), ka.ARCH[90])  # MOV, STG.128, LDG.U16
    assert streaming["bound"] == "memory" and streaming["global_bytes_per_thread_access"] == 9.0


def test_mem_width_and_occupancy():
    assert [ka.mem_width(op) for op in ("LDG.E.128", "LDG.E.64", "LDG.E", "LDS.U16", "LDG.E.U8",
                                         "LDGSTS.E.BYPASS.LTC128B.128")] == [16, 8, 4, 2, 1, 16]
    # 128 threads, 172 regs (176 allocated: 5,632 per warp, 2 warps per 16K-register sub-partition), 51,200 B
    # shared memory (4 blocks would fit) on sm_90: registers allow 2 blocks of 4 warps
    occ = ka.occupancy(172, 51200, 128, ka.ARCH[90])
    assert occ == {"blocks_per_sm": 2, "occupancy": 0.125, "occupancy_limiter": "registers"}
    assert ka.occupancy(32, 200 * 1024, 128, ka.ARCH[80])["blocks_per_sm"] == 0  # does not fit sm_80


def _cubin(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 with the given sections (enough for elf_sections)."""
    import struct

    names = b"\0" + b"".join(n.encode() + b"\0" for n in sections) + b".shstrtab\0"
    body, offsets, pos = b"", [], 64
    for data in [*sections.values(), names]:
        offsets.append((pos + len(body), len(data)))
        body += data
    shoff = 64 + len(body)
    hdr = bytearray(64)
    hdr[:4] = b"\x7fELF"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, len(sections) + 2, len(sections) + 1)
    shdrs, name_off = bytes(64), 1
    for (off, size), n in zip(offsets, [*sections, ".shstrtab"]):
        shdrs += struct.pack("<IIQQQQIIQQ", name_off, 0, 0, 0, off, size, 0, 0, 1, 0)
        name_off += len(n) + 1
    return bytes(hdr) + body + shdrs


def test_elf_threads_and_res_usage():
    import struct

    max_threads = bytes([4, 0x05]) + struct.pack("<HIII", 12, 128, 1, 1)
    other = bytes([3, 0x1B, 0xFF, 0])  # an attribute without a size field
    reqntid = bytes([4, 0x10]) + struct.pack("<HIII", 12, 32, 2, 1)
    cubin = _cubin({".nv.info._Z1kv": other + max_threads, ".nv.info._Z1jv": reqntid, ".text._Z1kv": b"\0" * 16})
    assert ka.launch_threads(cubin) == {"_Z1kv": 128, "_Z1jv": 64}
    res = " Function _Z1kv:\n  REG:154 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:4712 TEXTURE:0\n"
    assert ka.res_usage(res) == {"_Z1kv": {"REG": 154, "STACK": 0, "SHARED": 0, "LOCAL": 8}}


@pytest.fixture(scope="module")
def cuda_audit():
    from halodiff._native import native

    state = native()
    if not state.loaded or not state.cuda:
        pytest.skip(f"no CUDA build of halodiff._C ({state.error or 'built without CUDA'})")
    if not ka.find_tool("cuobjdump"):
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled binaries)")
    notes: list[str] = []
    rows = ka.cuda_rows((80, 90), r"seg_attn_(v2|merge|mma)", notes, elf_filter="segmented_attention")
    return rows, notes


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_cuda_attention_v2_meets_the_audit_targets(cuda_audit, arch):
    rows, notes = cuda_audit
    lib = ka.layout_lib()
    v2 = [r for r in rows if r.kernel == "seg_attn_v2_kernel" and r.arch == arch]
    # every instantiated (dtype, head dim, tile) is there: the targets cannot pass on an empty audit
    want = {(dt, str(dp), f"v2 {16 * w * mt}-row tile") for dt in ("fp16", "bf16")
            for dp in (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
            for w, mt in ((4, 1), (4, 2), (1, 1)) if lib.hd_v2_tile_supported(dp, w, mt)}
    assert {(r.dtype, r.head_dim, r.variant) for r in v2} == want, notes
    failures = []
    for r in v2:
        loop = r.loop
        what = f"{r.dtype} D={r.head_dim} {r.variant}"
        if not (loop.get("hmma", 0) > 0 and loop.get("ldsm", 0) > 0):
            failures.append(f"{what}: hot loop without HMMA/LDSM ({loop})")
        if loop.get("ldgsts", 0) + loop.get("tma", 0) == 0:
            failures.append(f"{what}: hot loop without cp.async (LDGSTS) or TMA")
        if r.shared_loads_per_mma is None or r.shared_loads_per_mma > 1.0:
            failures.append(f"{what}: {r.shared_loads_per_mma} shared-memory loads per HMMA (target <= 1.0)")
        if r.local_bytes or r.total.get("stl", 0) or r.total.get("ldl", 0):
            failures.append(f"{what}: local memory {r.local_bytes} B, STL {r.total['stl']}, LDL {r.total['ldl']}")
        if loop.get("ldg_lt4b", 0) or loop.get("lds", 0):
            failures.append(f"{what}: scalar global or shared loads in the hot loop ({loop})")
        if r.total.get("stg_16b", 0) == 0:
            failures.append(f"{what}: no 16-byte output stores")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("head_dim", ["64", "128"])
def test_cuda_attention_v2_dit_head_dims(cuda_audit, arch, head_dim):
    """DiT head dims (SD3/PixArt 64, Flux/Qwen-Image 128), fp16 and bf16, every v2 tile: no spills, and a hot loop
    that is exactly one K/V tile of BN keys per warp: MT * BN * DP / 64 HMMA (Q.K^T and P.V), DP * BN / 128
    ldmatrix.x4 (K and V; Q stays in registers), 2 * BN * DP / 8 / threads 16-byte cp.async (the next K/V tile)."""
    rows, notes = cuda_audit
    lib = ka.layout_lib()
    dp = int(head_dim)
    tiles = [(w, mt) for w, mt in ((4, 1), (4, 2), (1, 1)) if lib.hd_v2_tile_supported(dp, w, mt)]
    for dtype in ("fp16", "bf16"):
        for w, mt in tiles:
            variant = f"v2 {16 * w * mt}-row tile"
            mine = [r for r in rows if r.kernel == "seg_attn_v2_kernel" and r.arch == arch and r.dtype == dtype
                    and r.head_dim == head_dim and r.variant == variant]
            assert len(mine) == 1, (dtype, variant, notes)
            r, bn = mine[0], lib.hd_v2_block_n(dp, w)
            what = f"{arch} {dtype} D={head_dim} {variant}"
            assert r.local_bytes == 0 and r.total["stl"] == 0 and r.total["ldl"] == 0, f"{what}: spills"
            assert 0 < r.regs <= 255 and r.threads == 32 * w, what
            assert lib.hd_v2_q_in_regs(dp, mt), what
            assert r.loop["hmma"] == mt * bn * dp // 64, f"{what}: {r.loop}"
            assert r.loop["ldsm"] == dp * bn // 128 and r.loop["lds"] == 0, f"{what}: {r.loop}"
            assert r.loop["ldgsts"] == 2 * bn * dp // 8 // (32 * w), f"{what}: {r.loop}"
            assert r.total["stg_16b"] > 0, what


def test_cuda_v1_kept_and_merge_kernel_present(cuda_audit):
    rows, _ = cuda_audit
    names = {(r.kernel, r.arch) for r in rows}
    for arch in ("sm_80", "sm_90"):
        assert ("seg_attn_mma_kernel", arch) in names  # HALODIFF_ATTENTION_KERNEL=v1 stays selectable
        assert ("seg_attn_merge_kernel", arch) in names



TRITON_TARGETS = """
import json
import halodiff.audit as ka
seen = set()
def pick(cfg):  # the first config (autotune candidate) of each fp16 head dim: a representative subset; at head
    d = str(cfg.get("head_dim"))  # dim 128 (Flux, Qwen-Image) every fp16/bf16 candidate (on its archs)
    if d == "128":
        return cfg.get("dtype") in ("fp16", "bf16")
    if cfg.get("dtype") != "fp16" or d not in ("40", "64", "80") or d in seen:
        return False
    seen.add(d)
    return True
notes = []
rows = ka.triton_rows((80, 90), "attention", notes, select=pick)
print(json.dumps({"rows": [r.flat() for r in rows], "notes": notes}))
"""


@pytest.fixture(scope="module")
def triton_audit():
    """In a child process: the tests run Triton in its interpreter (TRITON_INTERPRET=1, conftest.py), whose
    kernels cannot be compiled ahead of time."""
    import os
    import subprocess

    pytest.importorskip("triton")
    if not ka.find_tool("cuobjdump"):
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled binaries)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", TRITON_TARGETS], env=env, capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return out["rows"], out["notes"]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", ["40", "64", "80", "128"])
def test_triton_attention_meets_the_audit_targets(triton_audit, arch, head_dim):
    rows, notes = triton_audit
    mine = [r for r in rows if r["arch"] == arch and r["head_dim"] == head_dim]
    assert mine, f"no Triton attention row for fp16 D={head_dim} {arch}: {notes}"
    for r in mine:
        assert r["fn_ldg_16b"] > 0, f"{r['kernel']}: no 16-byte global loads"
        assert r["fn_ldgsts"] + r["fn_tma"] > 0, f"{r['kernel']}: no cp.async/TMA"
        assert r["spill_bytes"] == 0 and r["local_bytes"] == 0, f"{r['kernel']}: spills {r['spill_bytes']} B"


def test_triton_audit_runs_the_compiler_not_the_interpreter(triton_audit):
    """The Triton part of the audit compiled real cubins (the interpreter cannot: a silent skip would pass)."""
    rows, notes = triton_audit
    want = {(a, d) for a in ("sm_80", "sm_90") for d in ("40", "64", "80", "128")}
    assert {(r["arch"], r["head_dim"]) for r in rows} == want, notes
    assert all(r["fn_instrs"] > 0 and r["regs"] > 0 for r in rows)


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_attention_head_dim_128_every_candidate(triton_audit, arch):
    """Every fp16/bf16 autotune candidate at head dim 128 on this arch compiled, without spills, with tensor-core
    instructions in its hot loop (sm_90: wgmma for tiles of >= 64 rows, mma.sync for the 32-row one)."""
    rows, notes = triton_audit
    sa = triton_module("segmented_attention")
    for dtype in ("fp16", "bf16"):
        mine = [r for r in rows if r["arch"] == f"sm_{arch}" and r["head_dim"] == "128" and r["dtype"] == dtype]
        want = {f"{bm}x{bn} warps={w} stages={st}" for bm, bn, w, st in sa.configs_for(128, 2, arch)}
        assert {r["variant"].split(" (")[0] for r in mine} == want, notes
        for r in mine:
            what = f"sm_{arch} {dtype} D=128 {r['variant']}"
            assert r["spill_bytes"] == 0 and r["local_bytes"] == 0, f"{what}: spills {r['spill_bytes']} B"
            assert r["loop_hmma"] + r["loop_wgmma"] > 0, f"{what}: no tensor-core instructions in the hot loop"
            assert r["fn_ldg_16b"] > 0 and r["fn_ldgsts"] > 0, what


def test_cli_writes_json_and_csv(cuda_audit, tmp_path, capsys):
    from halodiff import cli

    assert cli.main(["bench", "audit", "--out", str(tmp_path), "--only", "cuda", "--arch", "90",
                     "--kernels", "seg_attn_merge"]) == 0
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["rows"] and all(r["kernel"] == "seg_attn_merge_kernel" and r["arch"] == "sm_90" for r in doc["rows"])
    assert "Hot-loop bound model" in doc["model"]
    header = (tmp_path / "audit.csv").read_text().splitlines()[0].split(",")
    assert {"regs", "local_bytes", "smem_bytes", "occupancy", "loop_hmma", "loop_ldsm", "bound"} <= set(header)
    assert "rows:" in capsys.readouterr().out


def test_audit_without_the_kernel_sources(cuda_audit, tmp_path, monkeypatch, capsys):
    """As from an installed wheel (no csrc/, no bench/): the SASS of the installed extension is still audited; what
    needs the sources (the layout shim's shared-memory sizes, nvcc of a missing arch) becomes a note."""
    from halodiff.audit import tools

    monkeypatch.delenv("HALODIFF_CSRC", raising=False)
    monkeypatch.setenv("HALODIFF_AUDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tools, "source_checkout", lambda: None)
    assert tools.csrc_dir() is None
    argv = ["--out", str(tmp_path / "out"), "--only", "cuda", "--arch", "90", "--kernels", "seg_attn_merge"]
    assert ka.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert doc["rows"] and all(r["kernel"] == "seg_attn_merge_kernel" for r in doc["rows"])
    assert any("dynamic shared memory unknown" in n and "csrc/" in n for n in doc["notes"]), doc["notes"]
    assert list((tmp_path / "cache").glob("cubins_*")), "the cache goes where HALODIFF_AUDIT_CACHE says"
    capsys.readouterr()


def test_bench_wrapper_is_the_package_audit():
    """bench/kernel_audit.py (what bench/gpu_suite.sh runs) is a thin command line over halodiff.audit."""
    import subprocess

    spec = importlib.util.spec_from_file_location("kernel_audit_wrapper", ROOT / "bench" / "kernel_audit.py")
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    assert wrapper.parse_sass is ka.parse_sass and wrapper.find_tool is ka.find_tool
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_audit.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--only" in res.stdout, res.stderr[-2000:]


def test_gpu_suite_parses_and_its_python_imports(tmp_path):
    """bench/gpu_suite.sh cannot run here (no GPU): its bash must parse, its Python steps import and merge."""
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash:
        res = subprocess.run([bash, "-n", str(ROOT / "bench" / "gpu_suite.sh")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    assert suite.per_rank(64, 4) == (16 * 64, [16 * 64] * 4)
    assert suite.per_rank(8, 3) == (3 * 8, [3 * 8, 3 * 8, 2 * 8])
    part = tmp_path / "checks.json"
    part.write_text(json.dumps({"sync_debug_error": {"ok": True}}))
    doc = suite.merge(tmp_path / "gpu_suite.json", [part, tmp_path / "absent.json"])
    assert doc["checks"]["sync_debug_error"]["ok"] and "missing" in doc["absent"]
    assert suite.main(["bogus"]) == 2
