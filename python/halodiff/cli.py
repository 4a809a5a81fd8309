"""The `halodiff` command line (also `python -m halodiff`):

    halodiff info [--json]
    halodiff demo [--out DIR] [--ranks N] [--steps S] [--methods M,...]
    halodiff bench e2e --model sd15|sdxl|digits --resolution R --steps S --ranks N --modes sync,distrifusion,...
    halodiff bench kernels [--out DIR]
    halodiff bench audit [--out DIR] [--arch 80,90] [--only cuda|triton] [--kernels REGEX]
    halodiff stream [--input DIR|GIF] [--out DIR] [--digits 3,8] [--frames N] [--ranks N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

E2E_MODES = ("sync", "distrifusion", "pcpp", "deepcache")
VAE_FACTOR = {"sd15": 8, "sd21": 8, "sdxl": 8, "digits": 1}
DOWNSAMPLES = {"sd15": 3, "sd21": 3, "sdxl": 2, "digits": None}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one clear line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"halodiff: error: {message}\n")


def _fail(message: str) -> int:
    print(f"halodiff: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="halodiff", description="halodiff: faster diffusers UNet pipelines (see README.md)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p_info = sub.add_parser("info", help="versions, native build state and per-op backends")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")

    p_demo = sub.add_parser("demo", help="generate digits with every method; write grid, report and plots")
    p_demo.add_argument("--out", type=Path, default=Path("demo_out"))
    p_demo.add_argument("--ranks", type=int, default=2)
    p_demo.add_argument("--steps", type=int, default=20)
    p_demo.add_argument("--per-class", type=int, default=3, help="images per digit")
    p_demo.add_argument("--methods", default="all",
                        help="comma-separated: unpatched, deepcache, sync, distrifusion, pcpp, deepcache+distrifusion "
                             "(default all; unpatched always runs as the baseline)")

    p_stream = sub.add_parser("stream", help="StreamDiffusion: redraw a stream of real handwritten digits with the "
                              "digits model; write GIF, report and plot")
    p_stream.add_argument("--input", type=Path, help="a GIF or a folder of images (default: sklearn's digits)")
    p_stream.add_argument("--out", type=Path, default=Path("demo_out/stream"))
    p_stream.add_argument("--digits", default="3,8", help="prompted digit(s); the prompt switches in equal segments")
    p_stream.add_argument("--frames", type=int, default=48, help="frames of sklearn digits (without --input)")
    p_stream.add_argument("--hold", type=int, default=4, help="frames each sklearn digit is held")
    p_stream.add_argument("--ranks", type=int, default=2, help="ranks of the multi-rank method (1: none)")

    p_bench = sub.add_parser("bench", help="benchmarks")
    bsub = p_bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    e2e = bsub.add_parser("e2e", help="end-to-end patch-parallel benchmark on CPU gloo ranks")
    e2e.add_argument("--model", choices=sorted(VAE_FACTOR), default="sd15")
    e2e.add_argument("--resolution", type=int, default=512, help="image size in pixels (square)")
    e2e.add_argument("--steps", type=int, default=3, help="timed UNet steps per run")
    e2e.add_argument("--warmup", type=int, default=1, help="untimed sync steps before them")
    e2e.add_argument("--ranks", type=int, default=2)
    e2e.add_argument("--modes", default="sync,distrifusion")
    e2e.add_argument("--split-cfg", action="store_true")
    e2e.add_argument("--threads", type=int, default=1, help="threads per rank")
    e2e.add_argument("--json", type=Path)
    kern = bsub.add_parser("kernels", help="kernel microbenchmarks (pytest-benchmark)")
    kern.add_argument("--out", type=Path, default=Path("bench_out"))
    audit = bsub.add_parser("audit", help="static SASS audit of the CUDA and Triton kernels for sm_80/sm_90 (no GPU)")
    audit.add_argument("--out", type=Path, default=Path("bench_out/audit"))
    audit.add_argument("--arch", default="80,90", help="comma-separated SM versions")
    audit.add_argument("--only", choices=("cuda", "triton"))
    audit.add_argument("--kernels", help="regex on kernel names")
    return parser


def _check_e2e(args) -> str | None:
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in E2E_MODES]
    if unknown or not modes:
        return f"unknown mode(s) {','.join(unknown) or '(none)'}; choose from {','.join(E2E_MODES)}"
    if args.ranks < 1:
        return f"--ranks must be >= 1, got {args.ranks}"
    if args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    factor = VAE_FACTOR[args.model]
    if args.resolution <= 0 or args.resolution % factor:
        return f"--resolution {args.resolution} must be a positive multiple of {factor} for {args.model}"
    latent = args.resolution // factor
    downs = DOWNSAMPLES[args.model]
    if downs is None:
        from .models.digits import digits_unet_config

        downs = sum(1 for t in digits_unet_config()["down_block_types"]) - 1
    deep = latent
    for _ in range(downs):
        deep = -(-deep // 2)
    if deep < args.ranks:
        need = (args.ranks - 1) * (1 << downs) + 1
        return (f"--resolution {args.resolution} gives {deep} rows at the deepest UNet level, fewer than "
                f"--ranks {args.ranks}: use --resolution >= {need * factor} or fewer ranks")
    return None


def _bench_e2e(args) -> int:
    error = _check_e2e(args)
    if error:
        return _fail(error)
    from . import bench_e2e

    modes = tuple(m for m in args.modes.split(",") if m)
    res = bench_e2e.run(args.model, args.resolution // VAE_FACTOR[args.model], args.ranks, modes, args.split_cfg,
                        args.warmup, args.steps, args.threads)
    print(bench_e2e.table(res))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(bench_e2e.as_dicts(res), indent=2))
    return 0


def _bench_kernels(args) -> int:
    bench_dir = Path(__file__).resolve().parents[2] / "bench"
    if not (bench_dir / "test_kernels.py").exists():
        return _fail(f"kernel benchmarks not found at {bench_dir} (run from a source checkout of halodiff)")
    files = sorted(str(p) for p in bench_dir.glob("test_*.py"))
    env = dict(os.environ, HALODIFF_BENCH_OUT=str(args.out.resolve()))
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--benchmark-columns=median", *files], env=env, cwd=bench_dir.parent)
    csv = args.out / "kernels.csv"
    if csv.exists():
        print(f"\nresults: {csv} and {csv.with_suffix('.json')}")
    return rc


def _bench_audit(args) -> int:
    from .audit import main as audit_main  # the installed package's audit (kernel sources optional)

    argv = ["--out", str(args.out), "--arch", args.arch]
    argv += ["--only", args.only] if args.only else []
    argv += ["--kernels", args.kernels] if args.kernels else []
    return audit_main(argv)


def _stream(args) -> int:
    digits = [d.strip() for d in args.digits.split(",") if d.strip()]
    if not digits or any(not d.isdigit() or int(d) > 9 for d in digits):
        return _fail(f"--digits must be digits 0-9 separated by commas, got {args.digits!r}")
    if args.frames < 1 or args.hold < 1:
        return _fail(f"--frames and --hold must be >= 1, got {args.frames} and {args.hold}")
    from .stream.demo import T_INDEX_LIST, run_stream_demo

    if not 1 <= args.ranks <= len(T_INDEX_LIST):
        return _fail(f"--ranks must be 1..{len(T_INDEX_LIST)} (one denoising slot per rank at least), got {args.ranks}")
    if args.input is not None and not args.input.exists():
        return _fail(f"--input {args.input} does not exist")
    return run_stream_demo(args.out, args.frames, tuple(int(d) for d in digits), args.input, args.hold, args.ranks)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import collect, format_text

        data = collect()
        print(json.dumps(data, indent=2) if args.json else format_text(data))
        return 0
    if args.command == "demo":
        if args.ranks < 1:
            return _fail(f"--ranks must be >= 1, got {args.ranks}")
        if args.steps < 1 or args.per_class < 1:
            return _fail(f"--steps and --per-class must be >= 1, got {args.steps} and {args.per_class}")
        if args.ranks > 8:
            return _fail(f"--ranks {args.ranks}: the 32x32 digits model has 8 rows at its deepest level, "
                         "so at most 8 ranks")
        from .demo import METHODS, run_demo, select

        try:
            methods = METHODS if args.methods == "all" else select([m for m in args.methods.split(",") if m])
        except ValueError as exc:
            return _fail(str(exc))
        return run_demo(args.out, ranks=args.ranks, steps=args.steps, per_class=args.per_class, methods=methods)
    if args.command == "stream":
        return _stream(args)
    if args.command == "bench":
        return {"e2e": _bench_e2e, "kernels": _bench_kernels, "audit": _bench_audit}[args.bench](args)
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
