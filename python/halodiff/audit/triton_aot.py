"""Triton kernels compiled ahead of time for a target arch (no GPU): `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` from each `halodiff.triton_kernels` module's `audit_configs()`, then the
SASS analysis of the cubin plus `ptxas -v` for spill bytes.

CONTRACT: a module in halodiff.triton_kernels defines `audit_configs() -> list[dict]`, each dict with
  name (str), fn (the @triton.jit function), signature (arg name -> "*fp16" | "i32" | "fp32" | "constexpr" ...),
  constexprs (arg name -> value), attrs (optional: arg name -> "D" for 16-divisible, or a list of
  [attribute, value] pairs, or a list of 16-divisible arg names), num_warps, num_stages, dtype (label),
  head_dim or shape (label), archs (optional: the SM versions, e.g. (80,) or (90,), whose autotune candidates
  hold the config when they differ by arch; absent: every audited arch). A module without it is skipped with
  the reason in the output.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import pkgutil
import re
import tempfile
from pathlib import Path

from .rows import Row, analyse, sd_label
from .sass import ARCH, occupancy, parse_sass, res_usage
from .tools import cache_dir, find_tool, run_tool


def triton_configs(notes: list[str]) -> list[dict]:
    """Every halodiff.triton_kernels module's audit_configs()."""
    import halodiff.triton_kernels as pkg

    configs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if not hasattr(mod, "audit_configs"):
            notes.append(f"triton {info.name}: skipped, the module defines no audit_configs()")
            continue
        configs += [dict(c, module=info.name, config_source="audit_configs()") for c in mod.audit_configs()]
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
    key = cache_dir() / f"spills_{hashlib.sha256(ptx.encode() + bytes([arch])).hexdigest()[:20]}.txt"
    if key.exists():
        return int(key.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.ptx"
        p.write_text(ptx)
        target = f"sm_{arch}a" if arch == 90 and ".target sm_90a" in ptx else f"sm_{arch}"
        txt = run_tool([ptxas, "-v", f"-arch={target}", str(p), "-o", str(Path(tmp) / "k.cubin")])
    m = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    if not m:
        return None
    key.parent.mkdir(parents=True, exist_ok=True)
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
    if not cuobjdump:
        notes.append("triton: skipped, no cuobjdump (CUDA toolkit or Triton's bundled binaries)")
        return []
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
                sass = parse_sass(run_tool([cuobjdump, "-sass", str(cub)]))
                res = res_usage(run_tool([cuobjdump, "-res-usage", str(cub)]))
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

