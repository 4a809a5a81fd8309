"""Run a function on N local CPU ranks (gloo), one thread each, and collect every rank's result.

Used by `halodiff demo`, `halodiff bench e2e` and the tests; under `torchrun` on GPUs the user's own
script initialises NCCL instead. `run_ranks` spawns fresh processes per call; `RankPool` keeps N ranks
alive between calls (spawning a rank costs seconds: importing torch and diffusers).

Ranks never outlive the process that started them, whatever ends it (an exception, interpreter exit, kill -9):
- each rank installs :func:`die_with_parent` before it unpickles its job or joins the group: on Linux the kernel
  SIGKILLs it when its parent dies (``prctl(PR_SET_PDEATHSIG)``, then a parent-pid check closes the race of a
  parent that died before that); everywhere, a daemon thread waits on multiprocessing's parent sentinel (a pipe
  whose write end only the parent holds) and calls ``os._exit`` at its EOF;
- `run_ranks` kills every rank still running when it returns or raises;
- `RankPool.close()` asks the ranks to stop, waits at most ``timeout_s`` and kills the rest; a pool that is
  garbage-collected or still open at interpreter exit is closed the same way (`shutdown` closes every pool now).
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_WATCHING = False  # this process runs die_with_parent's watch thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """A spawned rank raised; the message holds its traceback."""


def _set_pdeathsig(sig: int) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent thread exits. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_when_parent_exits(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns at EOF of the parent sentinel: the parent is gone
    os._exit(1)


def die_with_parent(pdeathsig: bool = True) -> None:
    """Make this multiprocessing child exit when the process that started it exits, however it ends (kill -9 too).

    Called first thing in every rank (idempotent; a no-op outside a multiprocessing child). `pdeathsig=False` skips
    the Linux parent-death signal, which fires when the parent *thread* that started the child exits: pass False
    when the child was started from a thread that may end before the parent process (the sentinel still works).
    """
    global _WATCHING
    parent = multiprocessing.parent_process()
    if parent is None or _WATCHING:
        return
    if pdeathsig:
        _set_pdeathsig(signal.SIGKILL)
    if os.name == "posix" and os.getppid() != parent.pid:
        os._exit(1)  # the parent died before prctl took effect: we were re-parented already
    threading.Thread(target=_exit_when_parent_exits, args=(parent,), name="halodiff-parent-watch",
                     daemon=True).start()
    _WATCHING = True


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str, timeout_s: float,
            threads: int) -> None:
    die_with_parent()
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


def _run_rank(rank: int, world: int, port: int, job: bytes, out_dir: str, timeout_s: float, threads: int,
              pdeathsig: bool) -> None:
    """run_ranks' process target: the parent watch is installed before the job is unpickled (which imports fn's
    module, e.g. diffusers)."""
    die_with_parent(pdeathsig)
    fn, args = pickle.loads(job)
    _worker(rank, world, port, fn, args, out_dir, timeout_s, threads)


def _starting_thread_is_main() -> bool:
    """Whether children started now may use the Linux parent-death signal (see `die_with_parent`)."""
    return threading.current_thread() is threading.main_thread()


def run_ranks(fn: Callable, world: int, *args, timeout_s: float = 600.0, threads: int = 1,
              allow_errors: bool = False) -> list:
    """Spawn `world` processes running fn(rank, world, *args) in a gloo group; return their results.

    fn must be importable (a module-level function); fn and args are pickled (tensors by value). A rank that
    raises makes this raise RankError (unless allow_errors); a hung rank is killed after timeout_s + 60 s. Every
    rank still running when this returns or raises (also on KeyboardInterrupt) is killed.
    """
    import torch.multiprocessing as mp

    if world < 1:
        raise ValueError(f"world (number of ranks) must be >= 1, got {world}")
    job = pickle.dumps((fn, args))
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        pdeathsig = _starting_thread_is_main()
        procs = [ctx.Process(target=_run_rank, args=(r, world, port, job, out_dir, timeout_s, threads, pdeathsig))
                 for r in range(world)]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout_s + 60
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            hung = [p.pid for p in procs if p.is_alive()]
            if hung:
                raise TimeoutError(f"rank(s) with pid {hung} hung for more than {timeout_s + 60:.0f}s")
        finally:
            _kill(procs)
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


def _kill(procs: Iterable, join_s: float = 5.0) -> None:
    """SIGKILL every process of `procs` still alive and reap it."""
    procs = [p for p in procs if p.pid is not None]
    for p in procs:
        if p.is_alive():
            p.kill()
    deadline = time.monotonic() + join_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def _pool_worker(rank: int, world: int, port: int, jobs, results, timeout_s: float, threads: int,
                 pdeathsig: bool = True) -> None:
    die_with_parent(pdeathsig)
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


def _stop_pool(procs: list, jobs: list, results, timeout_s: float) -> None:
    """Ask the ranks to stop, wait at most timeout_s in all, SIGKILL the rest. Holds no reference to the pool,
    so it can run from the pool's finalizer (garbage collection, interpreter exit)."""
    for q in jobs:
        try:
            q.put(None)
        except Exception:
            pass
    deadline = time.monotonic() + timeout_s
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
    _kill(procs)
    for q in (*jobs, results):
        try:
            q.cancel_join_thread()  # a job a dead rank never read must not block interpreter exit
            q.close()
        except Exception:
            pass
    procs.clear()


_LIVE_POOLS: weakref.WeakSet = weakref.WeakSet()


class RankPool:
    """`world` spawned gloo ranks that run one job after another: `pool.run(fn, *args)` runs
    fn(rank, world, *args) on every rank and returns their results (like `run_ranks`). A job that fails,
    hangs or loses a rank closes the pool (its process group may hold half-done collectives).

    `close()` (also on garbage collection and at interpreter exit) stops the ranks within `close_timeout_s`, then
    kills them; a rank also dies with this process however it ends (see the module docstring)."""

    def __init__(self, world: int, timeout_s: float = 600.0, threads: int = 1, close_timeout_s: float = 5.0):
        import torch.multiprocessing as mp

        if world < 1:
            raise ValueError(f"world (number of ranks) must be >= 1, got {world}")
        ctx = mp.get_context("spawn")
        self.world, self.timeout_s, self.close_timeout_s = world, timeout_s, close_timeout_s
        self._jobs = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        port = free_port()
        pdeathsig = _starting_thread_is_main()
        self._procs = [ctx.Process(target=_pool_worker, args=(r, world, port, self._jobs[r], self._results, timeout_s,
                                                                threads, pdeathsig), daemon=True)
                       for r in range(world)]
        self._finalizer = weakref.finalize(self, _stop_pool, self._procs, self._jobs, self._results, close_timeout_s)
        try:
            for p in self._procs:
                p.start()
        except BaseException:
            self._finalizer()
            raise
        _LIVE_POOLS.add(self)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

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
        limit = timeout_s if timeout_s is not None else self.timeout_s + 60
        deadline = time.monotonic() + limit
        usable, pending, dead_since = True, set(range(self.world)), None
        while pending:
            try:
                rank, data, ok = self._results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r in pending if not self._procs[r].is_alive()]
                if dead:  # a rank died: give its last result (if any) a moment to arrive, then stop waiting
                    dead_since = dead_since or time.monotonic()
                    if time.monotonic() - dead_since > 2.0:
                        codes = {r: self._procs[r].exitcode for r in dead}
                        self.close()
                        raise RankError(f"rank(s) {sorted(dead)} of the pool died without a result "
                                        f"(exit codes {codes})") from None
                if time.monotonic() >= deadline:
                    self.close()
                    raise TimeoutError(f"a rank of the pool hung for more than {limit:.0f}s") from None
                continue
            results[rank] = pickle.loads(data)
            pending.discard(rank)
            usable = usable and ok
        errors = [r["__error__"] for r in results if isinstance(r, dict) and "__error__" in r]
        if errors or not usable:
            self.close()
            if errors and not allow_errors:
                raise RankError("a rank failed:\n" + "\n".join(errors))
        return results

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the ranks: wait at most timeout_s (default close_timeout_s) for them to leave, then kill them."""
        if timeout_s is not None and self._finalizer.alive:
            self._finalizer.detach()
            _stop_pool(self._procs, self._jobs, self._results, timeout_s)
        else:
            self._finalizer()
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shutdown(pools: Iterable[RankPool] | None = None, timeout_s: float = 5.0) -> None:
    """Close `pools` (default: every open RankPool of this process) within one shared timeout_s, then kill."""
    pools = list(_LIVE_POOLS if pools is None else pools)
    for pool in pools:  # ask every rank of every pool first, so the waits overlap
        for q in pool._jobs:
            try:
                q.put(None)
            except Exception:
                pass
    deadline = time.monotonic() + timeout_s
    for pool in pools:
        pool.close(max(0.0, deadline - time.monotonic()))
