#!/usr/bin/env python3
"""Static audit of halodiff's GPU kernels (no GPU needed): the command line of `halodiff.audit` for a source checkout.

    python bench/kernel_audit.py [--out DIR] [--arch 80,90] [--only cuda|triton] [--kernels REGEX]

The same as `halodiff bench audit` / `python -m halodiff.audit` (the library lives in python/halodiff/audit/),
with this checkout's csrc/ as the kernel sources, build/kernel_audit/ as the cache and bench_out/audit/ as the
default output. The module also re-exports `halodiff.audit` for scripts that load this file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HALODIFF_CSRC", str(ROOT / "csrc"))
os.environ.setdefault("HALODIFF_AUDIT_CACHE", str(ROOT / "build" / "kernel_audit"))
try:
    import halodiff  # noqa: F401
except ImportError:  # not installed: this checkout's package
    sys.path.insert(0, str(ROOT / "python"))

from halodiff.audit import *  # noqa: E402,F403
from halodiff.audit import main as _main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv = ["--out", str(ROOT / "bench_out" / "audit"), *argv]
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
