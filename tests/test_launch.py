"""halodiff.launch: spawned ranks never outlive the process that started them.

Each test runs a small parent script in a subprocess (its ranks are its children, not pytest's), then ends the
parent: kill -9, `close()`, garbage collection, plain interpreter exit. The cost is the ranks' `import torch`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PARENT_HEAD = '''
import gc, json, os, sys, threading, time
from halodiff import launch

def pid(rank, world):
    return os.getpid()

def sleep(rank, world, folder):
    with open(os.path.join(folder, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

def say(*parts):
    print(*parts, flush=True)
'''

KILLED_PARENT = PARENT_HEAD + '''
if __name__ == "__main__":
    pool = launch.RankPool(2, timeout_s=60)
    box = {}
    def in_thread():  # a pool started by a thread that ends: no parent-death signal (it would fire now)
        box["pool"] = launch.RankPool(1, timeout_s=60)
        box["pids"] = box["pool"].run(pid)
    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    say("pids", json.dumps(pool.run(pid) + box["pool"].run(pid)))  # the thread's pool outlived its thread
    launch.run_ranks(sleep, 2, sys.argv[1], timeout_s=600)
'''

EXITING_PARENT = PARENT_HEAD + '''
if __name__ == "__main__":
    pool = launch.RankPool(2, timeout_s=60)
    pids = pool.run(pid)
    pool.close()
    say("closed", json.dumps(pids))
    pool = launch.RankPool(1, timeout_s=60)
    pids = pool.run(pid)
    del pool
    gc.collect()
    say("collected", json.dumps(pids))
    pool = launch.RankPool(1, timeout_s=60)
    say("exiting", json.dumps(pool.run(pid)))  # no close(): interpreter exit must stop it
'''


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _start(tmp_path: Path, source: str, *args: str) -> subprocess.Popen:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)


def _expect(proc: subprocess.Popen, tag: str) -> list[int]:
    line = proc.stdout.readline()
    if not line.startswith(tag + " "):
        proc.kill()
        raise AssertionError(f"parent printed {line!r}, expected {tag!r}; stderr:\n{proc.stderr.read()[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.skipif(sys.platform == "win32", reason="kills with SIGKILL")
def test_ranks_die_with_a_killed_parent(tmp_path):
    """kill -9 of the parent: the pool's ranks, a pool started from an ended thread (parent sentinel only, no
    parent-death signal) and run_ranks' ranks blocked in a job all exit within 5 s."""
    parent = _start(tmp_path, KILLED_PARENT, str(tmp_path))
    pids: list[int] = []
    try:
        pids += _expect(parent, "pids")
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert parent.poll() is None, parent.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "run_ranks' ranks did not start"
            time.sleep(0.1)
        time.sleep(0.2)  # the pid files are written in the job: make sure the writes are complete
        pids += [int(p.read_text()) for p in sorted(tmp_path.glob("*.pid"))]
        assert len(set(pids)) == 5 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone(pids, 5.0) == [], "ranks outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        _kill_left(pids + [int(p.read_text() or 0) for p in tmp_path.glob("*.pid")])


def test_close_gc_and_exit_leave_no_ranks(tmp_path):
    parent = _start(tmp_path, EXITING_PARENT)
    pids: list[int] = []
    try:
        for tag in ("closed", "collected"):
            pids += _expect(parent, tag)
            assert _wait_gone(pids, 1.0) == [], f"ranks alive after the pool was {tag}"
        pids += _expect(parent, "exiting")
        assert parent.wait(30) == 0, parent.stderr.read()[-3000:]
        assert _wait_gone(pids, 1.0) == [], "ranks alive after the parent exited without close()"
    finally:
        if parent.poll() is None:
            parent.kill()
        _kill_left(pids)


def _kill_left(pids: list[int]) -> None:
    """A failing test must not leave its ranks behind either."""
    for pid in pids:
        if pid and _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
