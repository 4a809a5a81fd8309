"""`halodiff info` text and JSON."""
from __future__ import annotations

import json
import subprocess
import sys

from halodiff import cli


def test_info_json_lists_every_op_and_backend(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("torch", "triton", "diffusers", "torch_cuda", "native", "ops"):
        assert key in data
    for op in ("group_stats", "group_norm", "group_norm_stale"):
        assert set(data["ops"][op]) == {"cuda", "triton", "cpu", "reference"}
        assert data["ops"][op]["reference"] == []
    assert {"unet2d", "sd3", "flux", "pixart", "qwen_image"} <= set(data["model_families"])
    assert data["cache_methods"] == ["deepcache", "first_block"]
    if not data["cuda_available"]:
        assert data["ops"]["group_norm"]["cuda"], "cuda must report why it cannot run without a GPU"


def test_info_text_from_the_entry_point():
    res = subprocess.run([sys.executable, "-m", "halodiff", "info"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "native CPU ops halodiff._C" in res.stdout and "group_norm" in res.stdout
