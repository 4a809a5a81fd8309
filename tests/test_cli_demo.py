"""`halodiff demo` writes every file; the CLI rejects bad arguments with one line and exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "halodiff", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_writes_grid_report_and_plot(tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    res = _cli("demo", "--out", str(out), "--steps", "4", "--per-class", "1", "--ranks", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("grid.png", "speed_quality.png"):
        with Image.open(out / name) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
    report = json.loads((out / "report.json").read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods[0] == "unpatched" and {"sync", "distrifusion", "pcpp (p=0.3)"} <= set(methods)
    assert any("deepcache" in m for m in methods)
    for r in report["results"]:
        assert set(r) >= {"method", "ranks", "wall_s", "speedup", "psnr_db", "accuracy", "mb_received_per_step"}
        assert r["wall_s"] > 0 and 0 <= r["accuracy"] <= 1
    sync = next(r for r in report["results"] if r["method"] == "sync")
    assert sync["ranks"] == 2 and sync["psnr_db"] > 60 and sync["mb_received_per_step"] > 0
    assert "| method |" in (out / "report.md").read_text()
    assert "| sync | 2 |" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["bench", "e2e", "--model", "sd15", "--resolution", "100"], "multiple of 8"),
    (["bench", "e2e", "--model", "sd15", "--resolution", "128", "--ranks", "4"], "use --resolution >= 200"),
    (["bench", "e2e", "--model", "digits", "--resolution", "32", "--ranks", "9"], "fewer ranks"),
    (["bench", "e2e", "--modes", "sync,fast"], "unknown mode(s) fast"),
    (["bench", "e2e", "--ranks", "0"], "--ranks must be >= 1"),
    (["bench", "e2e", "--model", "sd3"], "invalid choice"),
    (["demo", "--ranks", "0"], "--ranks must be >= 1"),
    (["demo", "--steps", "0"], "must be >= 1"),
])
def test_bad_arguments_exit_2_with_one_line(args, message):
    res = _cli(*args, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("halodiff: error:") and message in lines[0], res.stderr
