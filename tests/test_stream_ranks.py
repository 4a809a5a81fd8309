"""StreamDiffusion slots across real gloo ranks equal the single-rank stream; n < ranks fails clearly; a dead peer
raises CommTimeoutError; the combinations with halodiff.patch / enable_deepcache."""
from __future__ import annotations

import time

import pytest
import torch

import halodiff
from parallel_utils import run_ranks, tiny_sd_pipeline
from test_stream import images, latents, make_stream, rel

REL = 1e-5
# (t_index_list, cfg_type, frame_buffer_size): 1 slot per rank, 2 + 1 slots, 2 + 2 slots with F = 2
CASES = [([20, 35], "self", 1), ([10, 25, 40], "initialize", 1), ([10, 25, 40], "full", 1),
         ([5, 15, 25, 40], "self", 2), ([5, 15, 25, 40], "none", 1)]
FRAMES = 4


def _static_stretches() -> list[torch.Tensor]:
    fresh = images(3, seed=1)
    return [fresh[i // 2] for i in range(6)]


def _single_rank_outputs(pipe) -> dict:
    out = {}
    for t, cfg, F in CASES:
        stream = make_stream(pipe, t, cfg_type=cfg, frame_buffer_size=F)
        out[(tuple(t), cfg, F)] = [stream.predict_x0(x) for x in latents(FRAMES, F)]
    stream = make_stream(pipe, [10, 25, 40], cfg_type="self")
    stream.enable_similar_image_filter(threshold=0.9, max_skip_frame=0, seed=0)
    out["run"] = list(halodiff.stream.run(stream, _static_stretches(), align=True))
    out["run_skipped"] = stream.stats.skipped
    return out


def _ranks_worker(rank: int, world: int) -> dict:
    from halodiff.stream import StreamDiffusion

    pipe = tiny_sd_pipeline()
    out: dict = {}
    for t, cfg, F in CASES:
        stream = make_stream(pipe, t, cfg_type=cfg, frame_buffer_size=F)
        out[(tuple(t), cfg, F)] = [stream.predict_x0(x if rank == 0 else None) for x in latents(FRAMES, F)]
        out[("slots", tuple(t), cfg, F)] = (stream.slots.start, stream.slots.stop)
        st = stream.comm.stats
        out[("bytes", tuple(t), cfg, F)] = (st.bytes_sent, st.bytes_by_kind["latents"], st.bytes_by_kind["output"])
    stream = make_stream(pipe, [10, 25, 40], cfg_type="self")
    stream.enable_similar_image_filter(threshold=0.9, max_skip_frame=0, seed=0)
    out["run"] = list(halodiff.stream.run(stream, _static_stretches(), align=True))
    out["run_skipped"] = stream.stats.skipped
    for name, kwargs in (("n<ranks", dict(t_index_list=[30])), ("sequential", dict(t_index_list=[10, 30],
                                                                                   use_denoising_batch=False))):
        try:
            StreamDiffusion(pipe, width=64, height=64, **kwargs)
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    out["patch"] = _patched_stream(pipe)
    out["dead"] = _dead_peer(rank)  # last: rank 1 leaves the group
    return out


def _patched_stream(pipe) -> object:
    """halodiff.patch(sync) and the slot pipeline on the same ranks: outputs, or the error raised."""
    patched = False
    try:
        halodiff.patch(pipe, halodiff.ParallelConfig(mode="sync", timeout_s=20))
        patched = True
        stream = make_stream(pipe, [20, 35], size=128)
        return [stream.predict_x0(x) for x in latents(3, shape=(4, 16, 16))]
    except Exception as exc:  # reported to the test
        return f"{type(exc).__name__}: {exc}"
    finally:
        if patched:
            halodiff.unpatch(pipe)


@pytest.fixture(scope="module")
def two_ranks():
    """One spawn of 2 gloo ranks for every check (process group timeout 60 s), and the single-rank references."""
    results = run_ranks(_ranks_worker, 2, timeout_s=60)
    return results, _single_rank_outputs(tiny_sd_pipeline())


def test_slots_across_two_ranks_equal_the_single_rank_stream(two_ranks):
    results, ref = two_ranks
    for t, cfg, F in CASES:
        key = (tuple(t), cfg, F)
        for rank, res in enumerate(results):
            for k, (a, b) in enumerate(zip(res[key], ref[key])):
                assert rel(a, b) <= REL, (key, rank, k, rel(a, b))
        n = len(t)
        assert [r[("slots", *key)] for r in results] == [(0, (n + 1) // 2), ((n + 1) // 2, n)]
        # per frame rank 0 sends one boundary message (latents + stock noise for RCFG) and receives the output
        # (F latents) from rank 1
        out_bytes = F * 4 * 8 * 8 * 4
        boundary = out_bytes * (2 if cfg in ("self", "initialize") else 1)
        assert results[0][("bytes", *key)] == (FRAMES * boundary, 0, FRAMES * out_bytes)
        assert results[1][("bytes", *key)] == (FRAMES * out_bytes, FRAMES * boundary, 0)


def test_runner_and_filter_across_ranks(two_ranks):
    results, ref = two_ranks
    assert ref["run_skipped"] > 0 and len(ref["run"]) == 6
    for res in results:
        assert res["run_skipped"] == ref["run_skipped"] and len(res["run"]) == 6
        for a, b in zip(res["run"], ref["run"]):
            assert rel(a, b) <= REL


def test_fewer_slots_than_ranks_and_sequential_mode_fail_clearly(two_ranks):
    results, _ = two_ranks
    for res in results:
        assert "1 denoising slot(s)" in res["n<ranks"] and "2 ranks" in res["n<ranks"]
        assert "use_denoising_batch=True" in res["sequential"]


def test_patch_with_slots_on_the_same_ranks_works_or_names_the_combination(two_ranks):
    """Without the guard in StreamDiffusion.prepare the outputs were silently wrong (rel error 0.3-1.2)."""
    results, _ = two_ranks
    stream = make_stream(tiny_sd_pipeline(), [20, 35], size=128)
    ref = [stream.predict_x0(x) for x in latents(3, shape=(4, 16, 16))]
    for res in results:
        got = res["patch"]
        if isinstance(got, str):
            assert got.startswith("PatchError: StreamDiffusion") and "halodiff.patch()" in got, got
        else:
            assert all(rel(a, b) <= REL for a, b in zip(got, ref))


def _dead_peer(rank: int) -> tuple | None:
    """Rank 1 leaves (closes its connections as a crashed process does); rank 0's next frame must raise."""
    import torch.distributed as dist

    stream = make_stream(tiny_sd_pipeline(), [20, 35])
    dist.barrier()
    if rank == 1:
        dist.destroy_process_group()
        return None
    t0 = time.time()
    try:
        for x in latents(3):
            stream.predict_x0(x)
    except Exception as exc:
        return (type(exc).__name__, time.time() - t0, str(exc))
    return ("no error", time.time() - t0, "")


def test_dead_peer_raises_comm_timeout_error(two_ranks):
    """gloo: CommTimeoutError naming the step (NCCL: the watchdog aborts after the process group timeout)."""
    results, _ = two_ranks
    kind, waited, msg = results[0]["dead"]
    assert kind == "CommTimeoutError" and waited < 30, (kind, waited, msg)
    assert "init_process_group(timeout=)" in msg and ("output broadcast" in msg or "boundary" in msg), msg


# ------------------------------------------------------------------------------------------ DeepCache
def test_deepcache_in_a_stream_names_the_combination():
    """A stream batch holds every slot at another timestep: DeepCache has no step schedule to follow there, so
    the runtime's clock reports a per-sample step and DeepCache refuses it clearly (never a silent full run)."""
    cached = tiny_sd_pipeline()
    halodiff.enable_deepcache(cached, interval=3)
    stream = make_stream(cached, [10, 25, 40])
    with pytest.raises(halodiff.HalodiffError, match=r"(?s)deepcache.*StreamDiffusion.*disable_deepcache"):
        stream.predict_x0(latents(1)[0])
    halodiff.disable_deepcache(cached)
    plain = make_stream(tiny_sd_pipeline(), [10, 25, 40])
    stream = make_stream(cached, [10, 25, 40])
    for x in latents(3):
        assert rel(stream.predict_x0(x), plain.predict_x0(x)) <= REL  # disabled: the plain stream again
