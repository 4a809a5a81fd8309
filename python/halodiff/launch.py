"""Run a function on N local CPU ranks (gloo), one thread each, and collect every rank's result.

Used by `halodiff demo`, `halodiff bench e2e` and the tests; under `torchrun` on GPUs the user's own
script initialises NCCL instead. `run_ranks` spawns fresh processes per call; `RankPool` keeps N ranks
alive between calls (spawning a rank costs seconds: importing torch and diffusers).
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """A spawned rank raised; the message holds its traceback."""


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, timeout_s: float,
            threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    result: Any
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
    except BaseException as exc:  # reported to the parent
        result = {"__error__": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
    finally:
        if dist.is_initialized():
            try:
                dist.barrier()
                dist.destroy_process_group()
            except Exception:
                pass
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn: Callable, world: int, *args, timeout_s: float = 600.0, threads: int = 1,
              allow_errors: bool = False) -> list:
    """Spawn `world` processes running fn(rank, world, *args) in a gloo group; return their results.

    fn must be importable (a module-level function). A rank that raises makes this raise RankError
    (unless allow_errors); a hung rank is killed after timeout_s + 60 s.
    """
    import torch.multiprocessing as mp

    if world < 1:
        raise ValueError(f"world (number of ranks) must be >= 1, got {world}")
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, out_dir, timeout_s, threads))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s + 60)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"a rank (pid {p.pid}) hung for more than {timeout_s + 60:.0f}s")
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RankError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    errors = [r["__error__"] for r in results if isinstance(r, dict) and "__error__" in r]
    if errors and not allow_errors:
        raise RankError("a rank failed:\n" + "\n".join(errors))
    return results


def _pool_worker(rank: int, world: int, port: int, jobs, results, timeout_s: float, threads: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except BaseException as exc:
        results.put((rank, pickle.dumps({"__error__": f"init failed: {type(exc).__name__}: {exc}"}), False))
        return
    while True:
        job = jobs.get()
        if job is None:
            break
        fn, args = job
        try:
            result = fn(rank, world, *args)
        except BaseException as exc:
            result = {"__error__": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        usable = dist.is_initialized()  # a job may have left the group (e.g. a dead-peer test)
        results.put((rank, pickle.dumps(result), usable))
        if not usable:
            return
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class RankPool:
    """`world` spawned gloo ranks that run one job after another: `pool.run(fn, *args)` runs
    fn(rank, world, *args) on every rank and returns their results (like `run_ranks`). A job that fails
    or hangs on any rank closes the pool (its process group may hold half-done collectives)."""

    def __init__(self, world: int, timeout_s: float = 600.0, threads: int = 1):
        import torch.multiprocessing as mp

        if world < 1:
            raise ValueError(f"world (number of ranks) must be >= 1, got {world}")
        ctx = mp.get_context("spawn")
        self.world, self.timeout_s = world, timeout_s
        self._jobs = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [ctx.Process(target=_pool_worker, args=(r, world, port, self._jobs[r], self._results, timeout_s,
                                                                threads), daemon=True) for r in range(world)]
        for p in self._procs:
            p.start()

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable, *args, timeout_s: float | None = None, allow_errors: bool = False) -> list:
        import queue

        if not self.alive:
            raise RankError("the rank pool is closed (a rank died or a previous job failed)")
        for q in self._jobs:
            q.put((fn, args))
        results: list = [None] * self.world
        deadline = timeout_s if timeout_s is not None else self.timeout_s + 60
        usable = True
        try:
            for _ in range(self.world):
                rank, data, ok = self._results.get(timeout=deadline)
                results[rank] = pickle.loads(data)
                usable = usable and ok
        except queue.Empty:
            self.close()
            raise TimeoutError(f"a rank of the pool hung for more than {deadline:.0f}s") from None
        errors = [r["__error__"] for r in results if isinstance(r, dict) and "__error__" in r]
        if errors or not usable:
            self.close()
            if errors and not allow_errors:
                raise RankError("a rank failed:\n" + "\n".join(errors))
        return results

    def close(self) -> None:
        for q in self._jobs:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        self._procs = []
