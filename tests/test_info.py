"""`halodiff info` text and JSON."""
from __future__ import annotations

import json
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "halodiff", *args], capture_output=True, text=True, timeout=300)


def test_info_json_lists_every_op_and_backend():
    res = _run("info", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    for key in ("torch", "triton", "diffusers", "torch_cuda", "native", "ops"):
        assert key in data
    for op in ("group_stats", "group_norm", "halo_pack"):
        assert set(data["ops"][op]) == {"cuda", "triton", "cpu", "reference"}
        assert data["ops"][op]["reference"] == []
    if not data["cuda_available"]:
        assert data["ops"]["group_norm"]["cuda"], "cuda must report why it cannot run without a GPU"


def test_info_text():
    res = _run("info")
    assert res.returncode == 0, res.stderr
    assert "native extension halodiff._C" in res.stdout and "group_norm" in res.stdout


def test_cli_bad_command_exits_2():
    res = _run("frobnicate")
    assert res.returncode == 2 and "invalid choice" in res.stderr
