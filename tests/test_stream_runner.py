"""halodiff.stream.run: the I/O queue yields what the serial loop yields (no frame lost or reordered), aligns
outputs with inputs on request, stays bounded, stops cleanly and names the stage that failed."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from halodiff.errors import HalodiffError
from halodiff.stream import run, to_uint8
from parallel_utils import tiny_sd_pipeline
from test_stream import images, make_stream, rel

REL = 1e-5


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def _with_static_stretches(count: int) -> list[torch.Tensor]:
    """Frames where every new picture is held for 3 frames (the filter skips some repeats)."""
    fresh = images(-(-count // 3), seed=1)
    return [fresh[i // 3] for i in range(count)]


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("halodiff-stream")]


@pytest.mark.parametrize("use_filter", [False, True])
def test_run_yields_what_the_serial_loop_yields(pipe, use_filter):
    frames = _with_static_stretches(8)
    streams = [make_stream(pipe, [20, 35]) for _ in range(2)]
    if use_filter:
        for s in streams:
            s.enable_similar_image_filter(threshold=0.9, max_skip_frame=1, seed=0)
    serial = [streams[0](f) for f in frames]
    queued = list(run(streams[1], iter(frames), queue_size=1, output_type="np"))
    assert len(queued) == len(serial)
    for a, b in zip(queued, serial):
        assert a.dtype == np.uint8 and np.array_equal(a, to_uint8(b))
    assert streams[0].stats == streams[1].stats
    assert (streams[1].stats.skipped > 0) == use_filter
    assert not _threads()


def test_align_gives_output_i_for_frame_i(pipe):
    """align=True: warm-up outputs dropped, pipeline flushed; frame i's output equals sequential mode's (no lag)."""
    frames = _with_static_stretches(5)
    seq = make_stream(pipe, [10, 25, 40], use_denoising_batch=False)
    batch = make_stream(pipe, [10, 25, 40])
    for s in (seq, batch):
        s.enable_similar_image_filter(threshold=0.9, max_skip_frame=0, seed=0)
    want = [seq(f) for f in frames]
    got = list(run(batch, frames, align=True))
    assert len(got) == len(frames) and seq.stats.skipped > 0
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel(a, b) <= REL, i
    assert batch.stats.frames == len(frames) + 2  # 2 flush frames
    again = list(run(batch, frames[:2], align=True))  # a used stream: its old frames are not taken for new ones
    want = [seq(f) for f in frames[:2]]
    assert len(again) == 2 and all(rel(a, b) <= REL for a, b in zip(again, want))


def test_run_is_bounded_and_stops_when_the_consumer_stops(pipe):
    stream = make_stream(pipe, [20, 35])
    read = []

    def frames():
        for i, f in enumerate(images(40)):
            read.append(i)
            yield f

    it = run(stream, frames(), queue_size=1)
    for k, _ in enumerate(it):
        if k == 3:
            break
    # in flight at most: 1 per queue (3), 1 per stage (3), the frame being read (1)
    assert len(read) <= 4 + 7
    it.close()
    assert not _threads()


def test_worker_failure_names_the_stage(pipe):
    stream = make_stream(pipe, [20, 35])
    good = images(3)

    def broken():
        yield from good
        raise OSError("camera unplugged")

    outs = []
    with pytest.raises(HalodiffError, match="input stage failed: OSError: camera unplugged"):
        for out in run(stream, broken()):
            outs.append(out)
    assert len(outs) == 3  # everything before the failure was delivered
    with pytest.raises(HalodiffError, match="input stage failed: ValueError: .*resize them first"):
        list(run(stream, [good[0], torch.rand(1, 3, 32, 32)]))

    def failing_decode(x0):
        raise RuntimeError("decoder out of memory")

    stream.decode_image = failing_decode
    with pytest.raises(HalodiffError, match="output stage failed: RuntimeError: decoder out of memory"):
        list(run(stream, good))
    assert not _threads()
    with pytest.raises(ValueError, match="queue_size"):
        run(stream, good, queue_size=0)
    with pytest.raises(ValueError, match="output_type"):
        run(stream, good, output_type="latent")
