"""Python steps of bench/gpu_suite.sh (one GPU). Each writes one JSON file; `merge` joins them.

    python bench/gpu_suite.py checks   OUT.json   # sync-debug 'error' around the ops, odd offsets, Lq < 64, > 16 segs
    python bench/gpu_suite.py sanitize            # a few small op calls, run under compute-sanitizer
    python bench/gpu_suite.py bench    OUT.json   # kernels at per-rank SD1.5/SDXL shapes on 2/4/8 ranks vs torch
    python bench/gpu_suite.py merge    OUT.json  PART.json...

Benchmarks: segmented attention (cuda v1, cuda v2, triton) vs torch.cat + SDPA (flash backend where it runs),
group_norm + SiLU vs F.group_norm + F.silu. TFLOP/s count the two matmuls (4 B H Lq Lk D); GB/s count the
bytes the op must move (attention: q, K, V, out once; GroupNorm: x read twice, y written once). % of peak uses
the table below (dense fp16 tensor TFLOP/s, HBM GB/s; vendor figures) and the copy bandwidth measured here.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

# name fragment -> (dense fp16 TFLOP/s, HBM GB/s), vendor figures
PEAKS = {"H200": (989.4, 4800.0), "H100 PCIe": (756.0, 2000.0), "H100": (989.4, 3350.0), "A100": (312.0, 2039.0),
         "L40S": (362.0, 864.0)}
RANKS = (2, 4, 8)
# (model, level, heads, head dim, latent side at that level, channels) at 512 px (SD1.5) / 1024 px (SDXL), batch 2
ATTN_LEVELS = [("sd15", 0, 8, 40, 64), ("sd15", 1, 8, 80, 32), ("sd15", 2, 8, 160, 16), ("sd15", 3, 8, 160, 8),
               ("sdxl", 1, 10, 64, 64), ("sdxl", 2, 20, 64, 32)]
GN_LEVELS = [("sd15", 320, 64), ("sd15", 640, 32), ("sd15", 1280, 16), ("sdxl", 640, 64), ("sdxl", 1280, 32)]


def peaks() -> dict:
    name = torch.cuda.get_device_name()
    tflops, gbs = next((v for k, v in PEAKS.items() if k in name), (None, None))
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    ms = time_ms(lambda: x.clone(), reps=20)
    return {"device": name, "dense_fp16_tflops": tflops, "hbm_gbs": gbs, "copy_gbs": round(2 * x.numel() / ms / 1e6, 1)}


def time_ms(fn, reps: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _native():
    from halodiff._native import native

    state = native()
    return state.loaded and state.cuda


def attn_inputs(B, H, D, lq, lens, dtype=torch.float16, offset=0):
    """[B, L, H*D] projections viewed as [B, H, L, D]; offset > 0 starts every tensor that many elements into
    its storage (rows not 16-byte aligned)."""
    def proj(L):
        t = torch.randn(B * L * H * D + offset, device="cuda", dtype=dtype)[offset:]
        return t.view(B, L, H, D).transpose(1, 2)

    return proj(lq), [proj(n) for n in lens], [proj(n) for n in lens]


def per_rank(side: int, n: int) -> tuple[int, list[int]]:
    """DistriFusion self-attention of the middle rank: its band's tokens vs every rank's band."""
    rows = [side // n + (r < side % n) for r in range(n)]
    return rows[n // 2] * side, [r * side for r in rows]


# --------------------------------------------------------------------------------------------


def checks() -> dict:
    from halodiff import ops

    out: dict = {}

    def record(name, fn):
        try:
            out[name] = {"ok": True, **(fn() or {})}
        except Exception as exc:  # noqa: BLE001 - every check is reported
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:]}

    def exact(q, ks, vs):
        from halodiff.ops import reference

        return reference.segmented_attention(q.double(), [k.double() for k in ks], [v.double() for v in vs])

    def err_vs_torch(got, q, ks, vs):
        e = exact(q, ks, vs)
        base = F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2)).double()
        err, ref = (got.double() - e).abs().max().item(), (base - e).abs().max().item()
        assert err <= 2 * ref + 1e-6, f"error {err:.3g} > 2 x torch's {ref:.3g}"
        return {"max_err": err, "torch_err": ref}

    def sync_debug():
        q, ks, vs = attn_inputs(2, 8, 40, 256, [256, 512, 256])
        x = torch.randn(2, 320, 16, 64, device="cuda", dtype=torch.float16)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for backend in ("cuda", "triton"):
                with ops.use_backend(backend):
                    ops.segmented_attention(q, ks, vs)
                    ops.group_norm(x, 32, silu=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def odd_offsets():
        res = {}
        for backend in ("cuda", "triton"):
            q, ks, vs = attn_inputs(2, 3, 40, 70, [17, 64, 5], offset=3)
            with ops.use_backend(backend):
                res[backend] = err_vs_torch(ops.segmented_attention(q, ks, vs), q, ks, vs)
            x = torch.randn(2 * 320 * 8 * 8 + 1, device="cuda", dtype=torch.float16)[1:].view(2, 320, 8, 8)
            with ops.use_backend(backend):
                y = ops.group_norm(x, 32, silu=True)
            torch.testing.assert_close(y.float(), F.silu(F.group_norm(x.float(), 32)), rtol=2e-2, atol=2e-2)
        return res

    def short_queries():
        res = {}
        for lq in (1, 16, 17, 63):
            for backend in ("cuda", "triton"):
                q, ks, vs = attn_inputs(2, 8, 160, lq, [16, 16, 16, 16])
                with ops.use_backend(backend):
                    res[f"{backend}_lq{lq}"] = err_vs_torch(ops.segmented_attention(q, ks, vs), q, ks, vs)["max_err"]
        return res

    def many_segments_triton():
        q, ks, vs = attn_inputs(1, 2, 64, 40, [3, 0, 5, 1, 2, 8, 4, 0, 6, 2, 1, 7, 3, 5, 2, 1, 9, 4, 2, 6])
        with ops.use_backend("triton"):
            return err_vs_torch(ops.segmented_attention(q, ks, vs), q, ks, vs)

    def v1_v2_agree():
        if not _native():
            return {"skipped": "no CUDA build of halodiff (halodiff._C_cuda)"}
        q, ks, vs = attn_inputs(2, 8, 64, 300, [300, 77, 300])
        a = torch.ops.halodiff._segmented_attention_cuda(q, ks, vs, None, 1, 0, 0)
        b = torch.ops.halodiff._segmented_attention_cuda(q, ks, vs, None, 2, 0, 0)
        return {"max_abs_diff": (a.float() - b.float()).abs().max().item(), **err_vs_torch(b, q, ks, vs)}

    for name, fn in (("sync_debug_error", sync_debug), ("odd_offset_views", odd_offsets),
                     ("lq_below_64", short_queries), ("triton_more_than_16_segments", many_segments_triton),
                     ("cuda_v1_vs_v2", v1_v2_agree)):
        record(name, fn)
    return out


def sanitize() -> None:
    """Small calls of every CUDA op for compute-sanitizer (memcheck/racecheck): both attention kernels, every v2
    tile, splits, odd offsets, a ragged head dim."""
    from halodiff import ops

    op = torch.ops.halodiff._segmented_attention_cuda
    for D, lens in ((40, [17, 64, 5]), (100, [33]), (160, [16, 16])):
        q, ks, vs = attn_inputs(1, 2, 37, D, lens, offset=1)
        for args in ((1, 0, 0), (2, 16, 1), (2, 64, 3), (2, 128 if D <= 64 else 64, 2)):
            op(q, ks, vs, None, *args)
    x = torch.randn(2, 64, 9, 7, device="cuda", dtype=torch.float16)
    with ops.use_backend("cuda"):
        ops.group_norm(x, 8, silu=True)
    torch.cuda.synchronize()
    print("sanitize: ok")


def bench() -> dict:
    from halodiff import ops
    from halodiff.ops import registry

    pk = peaks()
    rows = []
    flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION

    def add(kind, name, shape, backend, ms, flops=None, nbytes=None):
        row = {"kind": kind, "case": name, "shape": shape, "backend": backend, "ms": round(ms, 4)}
        if flops:
            row["tflops"] = round(flops / ms / 1e9, 2)
            peak = pk["dense_fp16_tflops"]
            row["pct_peak_tflops"] = round(100 * row["tflops"] / peak, 1) if peak else None
        if nbytes:
            row["gbs"] = round(nbytes / ms / 1e6, 1)
            row["pct_peak_gbs"] = round(100 * row["gbs"] / pk["hbm_gbs"], 1) if pk["hbm_gbs"] else None
            row["pct_copy_gbs"] = round(100 * row["gbs"] / pk["copy_gbs"], 1)
        rows.append(row)
        return row

    have_cuda = _native() and not registry.backend_reasons("cuda")
    for model, level, H, D, side in ATTN_LEVELS:
        for n in RANKS:
            if side < n:
                continue
            lq, lens = per_rank(side, n)
            q, ks, vs = attn_inputs(2, H, D, lq, lens)
            flops, nbytes = 4.0 * 2 * H * lq * sum(lens) * D, 2 * 2 * H * D * (2 * lq + 2 * sum(lens))
            name, shape = f"{model}_L{level}_n{n}", [2, H, lq, D, sum(lens), len(lens)]

            def cat_sdpa(backends=(flash,)):
                with torch.nn.attention.sdpa_kernel(list(backends)):
                    return F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2))

            try:
                base = add("attention", name, shape, "torch.cat+sdpa(flash)", time_ms(cat_sdpa), flops, nbytes)
            except RuntimeError:  # no flash kernel for this shape/GPU: torch's own choice
                every = [getattr(torch.nn.attention.SDPBackend, b) for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION",
                                                                              "CUDNN_ATTENTION", "MATH")]
                base = add("attention", name, shape, "torch.cat+sdpa(auto)", time_ms(lambda: cat_sdpa(every)), flops,
                           nbytes)
            fns = {}
            if have_cuda:
                fns["cuda_v1"] = lambda: torch.ops.halodiff._segmented_attention_cuda(q, ks, vs, None, 1, 0, 0)
                fns["cuda_v2"] = lambda: torch.ops.halodiff._segmented_attention_cuda(q, ks, vs, None, 2, 0, 0)
            fns["triton"] = lambda: ops.segmented_attention(q, ks, vs)
            for backend, fn in fns.items():
                try:
                    if backend == "triton":
                        with ops.use_backend("triton"):
                            row = add("attention", name, shape, backend, time_ms(fn), flops, nbytes)
                    else:
                        row = add("attention", name, shape, backend, time_ms(fn), flops, nbytes)
                    row["speedup_vs_torch"] = round(base["ms"] / row["ms"], 3)
                except Exception as exc:  # noqa: BLE001
                    rows.append({"kind": "attention", "case": name, "backend": backend, "error": str(exc)})
    for model, C, side in GN_LEVELS:
        for n in RANKS:
            x = torch.randn(2, C, max(1, side // n), side, device="cuda", dtype=torch.float16)
            w, b = torch.randn(C, device="cuda", dtype=x.dtype), torch.randn(C, device="cuda", dtype=x.dtype)
            nbytes = 3 * x.numel() * x.element_size()
            name, shape = f"{model}_C{C}_n{n}", list(x.shape)
            base = add("group_norm_silu", name, shape, "F.group_norm+F.silu",
                       time_ms(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))), nbytes=nbytes)
            for backend in ("cuda", "triton"):
                if registry.backend_reasons(backend):
                    continue
                try:
                    with ops.use_backend(backend):
                        row = add("group_norm_silu", name, shape, backend,
                                  time_ms(lambda: ops.group_norm(x, 32, w, b, silu=True)), nbytes=nbytes)
                    row["speedup_vs_torch"] = round(base["ms"] / row["ms"], 3)
                except Exception as exc:  # noqa: BLE001
                    rows.append({"kind": "group_norm_silu", "case": name, "backend": backend, "error": str(exc)})
    return {"peaks": pk, "rows": rows}


def merge(out: Path, parts: list[Path]) -> dict:
    doc = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                       "host": platform.node()}}
    if torch.cuda.is_available():
        doc["machine"]["gpu"] = torch.cuda.get_device_name()
    for p in parts:
        key = p.stem
        try:
            doc[key] = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            doc[key] = {"missing": f"{p}: {exc}"}
    out.write_text(json.dumps(doc, indent=1))
    return doc


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("checks", "sanitize", "bench", "merge"):
        print(__doc__)
        return 2
    cmd = argv[0]
    if cmd == "merge":
        merge(Path(argv[1]), [Path(p) for p in argv[2:]])
        return 0
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU", file=sys.stderr)
        return 2
    if cmd == "sanitize":
        sanitize()
        return 0
    result = checks() if cmd == "checks" else bench()
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    failed = [k for k, v in result.items() if isinstance(v, dict) and v.get("ok") is False]
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1)[:4000])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
