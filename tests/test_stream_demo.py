"""`halodiff stream`: the demo's streaming of real digits reaches the accuracy goal, writes its files, and the CLI
rejects bad arguments with one line and exit code 2 (in-process: no subprocess start-up)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from halodiff import cli
from halodiff.stream.demo import (METHODS, StreamResult, digit_frames, load_frames, prompt_schedule, stream_methods,
                                  transition_mask, write_outputs)


def test_real_digits_are_redrawn_as_the_prompted_digit():
    """Shipped model, real sklearn digits, prompt switching 3 -> 8 in band: >= 0.8 accuracy once ready (goal)."""
    from halodiff.models.digits import DigitClassifier

    frames = digit_frames(16, hold=4)
    prompts = prompt_schedule([3, 8], len(frames))
    method = next(m for m in METHODS if m.name == "+ similarity filter (initialize)")
    (res,) = stream_methods(0, 1, [method], frames, prompts, warmup=2)
    keep = transition_mask(prompts, 1)
    assert res["outputs"].shape == (16, 32, 32) and keep.sum() == 15 and 0 < res["skipped"] < 16
    acc = DigitClassifier().accuracy(res["outputs"][keep], np.asarray(prompts)[keep])
    assert acc >= 0.8, acc


def test_write_outputs_gif_report_plot(tmp_path):
    from PIL import Image

    frames = digit_frames(6, hold=2)
    prompts = prompt_schedule([3], 6)
    outs = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32)
    results = [StreamResult("sequential (full CFG)", 1, 1.0, 6.0, outputs=outs),
               StreamResult("2 ranks", 2, 0.5, 12.0, speedup=2.0, accuracy=0.9, skipped=0.5, outputs=outs)]
    write_outputs(results, frames, prompts, tmp_path, {"frames": 6, "description": "test"})
    with Image.open(tmp_path / "stream.gif") as gif:
        assert gif.n_frames == 6 and gif.size == (4 * 66, 4 * 32)
    with Image.open(tmp_path / "fps.png") as im:
        assert im.size[0] > 100
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["method"] for r in report["results"]] == ["sequential (full CFG)", "2 ranks"]
    assert "| 2 ranks | 2 | 12.0 | 2.00x | 90% | 50% | inf (identical) |" in (tmp_path / "report.md").read_text()


def test_load_frames_from_gif_and_folder(tmp_path):
    from PIL import Image

    frames = [Image.fromarray(np.full((40, 50), 40 * i, np.uint8), mode="L") for i in range(3)]
    frames[0].save(tmp_path / "in.gif", save_all=True, append_images=frames[1:], duration=50)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        f.convert("RGB").save(folder / f"{i:03d}.png")
    for source in (tmp_path / "in.gif", folder):
        x = load_frames(source)
        assert x.shape == (3, 1, 32, 32) and np.allclose(x[:, 0, 0, 0].numpy(), [0, 40 / 255, 80 / 255], atol=1e-6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_frames(tmp_path / "empty")


@pytest.mark.parametrize("args, message", [
    (["--digits", "3,x"], "--digits must be digits 0-9"),
    (["--digits", "12"], "--digits must be digits 0-9"),
    (["--frames", "0"], "must be >= 1"),
    (["--ranks", "3"], "--ranks must be 1..2"),
    (["--input", "/nonexistent/frames.gif"], "does not exist"),
])
def test_stream_cli_bad_arguments_exit_2_with_one_line(args, message, capsys):
    assert cli.main(["stream", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("halodiff: error:") and message in err[0], err
