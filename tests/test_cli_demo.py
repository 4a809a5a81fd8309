"""`halodiff demo` writes every file; the CLI rejects bad arguments with one line and exit code 2.

One test runs the real entry point (`python -m halodiff ...` in a subprocess); the argument checks run
in-process (each subprocess start costs seconds of imports)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from halodiff import cli


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "halodiff", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_writes_grid_report_and_plot(tmp_path):
    """The entry point end to end, with a subset of the methods (`make demo` runs them all)."""
    from PIL import Image

    out = tmp_path / "demo"
    res = _cli("demo", "--out", str(out), "--steps", "3", "--per-class", "1", "--ranks", "2",
               "--methods", "deepcache,sync,distrifusion")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("grid.png", "speed_quality.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
    report = json.loads((out / "report.json").read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods == ["unpatched", "deepcache (interval 3)", "sync", "distrifusion"]
    for r in report["results"]:
        assert set(r) >= {"method", "ranks", "wall_s", "speedup", "psnr_db", "accuracy", "mb_received_per_step"}
        assert r["wall_s"] > 0 and 0 <= r["accuracy"] <= 1
    sync = next(r for r in report["results"] if r["method"] == "sync")
    assert sync["ranks"] == 2 and sync["psnr_db"] > 60 and sync["mb_received_per_step"] > 0
    assert "| method |" in (out / "report.md").read_text()
    assert "| sync | 2 |" in res.stdout


def test_bad_command_exits_2_from_the_entry_point():
    res = _cli("demo", "--ranks", "0", timeout=120)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "--ranks must be >= 1" in lines[0], res.stderr


@pytest.mark.parametrize("args, message", [
    (["bench", "e2e", "--model", "sd15", "--resolution", "100"], "multiple of 8"),
    (["bench", "e2e", "--model", "sd15", "--resolution", "128", "--ranks", "4"], "use --resolution >= 200"),
    (["bench", "e2e", "--model", "digits", "--resolution", "32", "--ranks", "9"], "fewer ranks"),
    (["bench", "e2e", "--modes", "sync,fast"], "unknown mode(s) fast"),
    (["bench", "e2e", "--ranks", "0"], "--ranks must be >= 1"),
    (["bench", "e2e", "--model", "sd3"], "invalid choice"),
    (["demo", "--ranks", "0"], "--ranks must be >= 1"),
    (["demo", "--steps", "0"], "must be >= 1"),
    (["demo", "--methods", "sync,fast"], "unknown method(s) fast"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys):
    try:
        rc = cli.main(args)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("halodiff: error:") and message in err[0], err
