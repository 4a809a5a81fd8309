"""The I/O queue: a stream's input, UNet and output stages on three threads joined by bounded queues.

``run(stream, frames)`` overlaps reading / preprocessing / VAE-encoding frame k+1 and VAE-decoding frame k-1 with
the UNet work on frame k (torch releases the GIL inside its ops). It yields exactly what calling
``stream(frame)`` for each frame in turn would return, in order; no frame is dropped or reordered. A stage that
raises (including the ``frames`` iterable) ends the run with a :class:`~halodiff.errors.HalodiffError` naming the
stage, after every output before the failing frame has been yielded.

``align=True`` makes output i belong to input frame i: the n-1 warm-up outputs of Stream Batch (zero buffer) are
dropped and, at the end, the last latent is fed n-1 more times to flush the frames still in the pipeline (the
stream's state then holds those flush frames). Frames the similarity filter skips repeat the output of the last
processed frame before them.

A prompt change can travel in-band: an :class:`UpdatePrompt` item among the frames is applied on the UNet thread
between the frames before and after it (``stream.update_prompt`` from another thread would race the UNet stage,
which runs a few frames behind the input).

With several ranks every rank runs ``run`` on the same frames; all communication happens on the UNet thread.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import HalodiffError
from .io import to_pil, to_uint8

OUTPUT_TYPES = {"pt": lambda x: x, "pil": to_pil, "np": to_uint8}

_POLL_S = 0.05


class UpdatePrompt:
    """An item of ``run``'s frames: ``stream.update_prompt(*args, **kwargs)`` before the next frame (no output)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


class _Done:
    """End of the frames."""


@dataclass
class _Failure:
    stage: str
    exc: BaseException


class _Stopped(Exception):
    """The run was stopped (consumer gone or a failure downstream)."""


class _Pipe:
    """Bounded queues between the stages, with puts/gets that give up once the run is stopped."""

    def __init__(self, queue_size: int) -> None:
        self.stop = threading.Event()
        self.queues = [queue.Queue(maxsize=queue_size) for _ in range(3)]

    def put(self, q: queue.Queue, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue) -> Any:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue


def _stage(pipe: _Pipe, name: str, body: Callable[[], None], out: queue.Queue) -> threading.Thread:
    def target() -> None:
        try:
            body()
        except _Stopped:
            pass
        except BaseException as exc:  # handed downstream in order, raised by the consumer
            try:
                pipe.put(out, _Failure(name, exc))
            except _Stopped:
                pass

    return threading.Thread(target=target, name=f"halodiff-stream-{name}", daemon=True)


def run(stream, frames: Iterable[Any], *, queue_size: int = 2, align: bool = False,
        output_type: str = "pt") -> Iterator:
    """Yield ``stream``'s output for each of ``frames`` (each what ``stream(frame)`` takes), stages on threads.

    output_type: "pt" (``[F, C, H, W]`` tensors in [0, 1], as ``stream(frame)``), "pil" (lists of PIL images) or "np"
    (``[F, H, W, C]`` uint8 arrays); the conversion runs on the output thread.
    """
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"halodiff.stream.run: queue_size must be an int >= 1; got {queue_size!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"halodiff.stream.run: output_type must be one of {', '.join(OUTPUT_TYPES)}; got "
                         f"{output_type!r}")
    stream._require_prepared()
    return _iterate(stream, frames, queue_size, align, OUTPUT_TYPES[output_type])


def _iterate(stream, frames: Iterable[Any], queue_size: int, align: bool, convert: Callable) -> Iterator:
    pipe = _Pipe(queue_size)
    q_in, q_x0, q_out = pipe.queues

    def read() -> None:
        for frame in frames:
            pipe.put(q_in, frame if isinstance(frame, UpdatePrompt) else stream.encode_frame(frame))
        pipe.put(q_in, _Done())

    def denoise() -> None:
        pending: deque[bool] = deque()  # align: frames waiting for their output (True = processed, False = skipped)
        last_latent = None
        lag = stream.config.n if stream.config.use_denoising_batch else 1
        calls = 0  # UNet steps of this run: the first lag-1 outputs come from before it (zero buffer or old frames)

        def emit_ready(x0) -> None:
            pending.popleft()
            pipe.put(q_x0, x0)
            while pending and not pending[0]:
                pending.popleft()
                pipe.put(q_x0, None)

        while True:
            item = pipe.get(q_in)
            if isinstance(item, (_Done, _Failure)):
                while align and isinstance(item, _Done) and any(pending):  # flush the frames still inside the pipeline
                    x0 = stream.predict_x0(last_latent)
                    calls += 1
                    if calls >= lag:
                        emit_ready(x0)
                pipe.put(q_x0, item)
                return
            if isinstance(item, UpdatePrompt):
                stream.update_prompt(*item.args, **item.kwargs)
                continue
            x0 = stream.denoise_frame(item)
            if not align:
                pipe.put(q_x0, x0)
            elif x0 is None:  # skipped: repeats the last processed frame's output once that is out
                if pending:
                    pending.append(False)
                else:
                    pipe.put(q_x0, None)
            else:
                last_latent = item.latent
                pending.append(True)
                calls += 1
                if calls >= lag:
                    emit_ready(x0)

    def write() -> None:
        while True:
            item = pipe.get(q_x0)
            if isinstance(item, (_Done, _Failure)):
                pipe.put(q_out, item)
                return
            pipe.put(q_out, convert(stream.decode_frame(item)))

    threads = [_stage(pipe, "input", read, q_in), _stage(pipe, "unet", denoise, q_x0),
               _stage(pipe, "output", write, q_out)]
    for t in threads:
        t.start()
    try:
        while True:
            item = pipe.get(q_out)
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failure):
                raise HalodiffError(f"halodiff.stream.run: the {item.stage} stage failed: "
                                    f"{type(item.exc).__name__}: {item.exc}") from item.exc
            yield item
    finally:
        pipe.stop.set()
        for t in threads:
            t.join(timeout=10)
