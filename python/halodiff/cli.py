"""The `halodiff` command line: info | demo | bench."""
from __future__ import annotations

import argparse
import json
import sys


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one clear line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"halodiff: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="halodiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p_info = sub.add_parser("info", help="versions, native build state and per-op backends")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from .info import collect, format_text

        data = collect()
        print(json.dumps(data, indent=2) if args.json else format_text(data))
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
