# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the executor: backends agree, retries, failures, admission."""

import os

import pytest

import cutana
from cutana import _testing
from cutana.executor import Executor, MemorySampler


def _collect(backend, n_workers, func, tasks, **kw):
    results = {}
    ex = Executor(backend, n_workers, **kw)
    failures = ex.run(func, tasks, on_done=lambda t, r: results.__setitem__(t, r))
    return results, failures


@pytest.mark.parametrize(("backend", "n_workers"), [("serial", 1), ("processes", 2)])
def test_results_identical_across_backends(backend, n_workers):
    """Test that serial and process backends return the same results."""
    results, failures = _collect(backend, n_workers, _testing.square, list(range(20)))
    assert failures == []
    assert results == {i: i * i for i in range(20)}


@pytest.mark.parametrize(("backend", "n_workers"), [("serial", 1), ("processes", 2)])
def test_retry_then_success(tmp_path, backend, n_workers):
    """Test that a task failing once is retried and succeeds."""
    tasks = [(str(tmp_path / f"m{i}"), i) for i in range(4)]
    results, failures = _collect(backend, n_workers, _testing.fail_once, tasks)
    assert failures == []
    assert sorted(results.values()) == [0, 1, 2, 3]


@pytest.mark.parametrize(("backend", "n_workers"), [("serial", 1), ("processes", 2)])
def test_failure_after_retries_is_reported(backend, n_workers):
    """Test that a task failing every time is reported, and the others finish."""
    seen = []
    ex = Executor(backend, n_workers, retries=1)

    failures = ex.run(
        _testing.fail_always, ["a", "b"], on_done=lambda t, r: seen.append(t)
    )
    assert sorted(f.task for f in failures) == ["a", "b"]
    assert seen == []
    assert all(f.attempts == 2 for f in failures)
    assert "always fails" in failures[0].error
    results, failures = _collect(backend, n_workers, _testing.square, [3])
    assert results == {3: 9}


def test_killed_worker_is_retried(tmp_path):
    """Test that workers killed mid-task break nothing: every task is retried."""
    tasks = [(str(tmp_path / f"m{i}"), i) for i in range(6)]
    results, failures = _collect("processes", 2, _testing.die_once, tasks)
    assert failures == []
    assert sorted(results.values()) == list(range(6))


def test_no_worker_outlives_a_run_whose_pools_broke(tmp_path):
    """Workers of pools that broke (a worker killed) and of the last pool are
    all gone once the run returns: none is left waiting for tasks, which
    would make the interpreter's exit wait for it."""
    import time
    from multiprocessing import forkserver

    import psutil

    tasks = [(str(tmp_path / f"m{i}"), i) for i in range(8)]
    results, failures = _collect("processes", 2, _testing.die_once, tasks)
    assert failures == []
    assert sorted(results.values()) == list(range(8))
    server = psutil.Process(forkserver._forkserver._forkserver_pid)
    deadline = time.monotonic() + 10
    while True:
        alive = []
        for proc in server.children():
            try:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert alive == []


def test_task_killing_its_worker_every_time_fails_alone(tmp_path):
    """Test that a task that always kills its worker fails, and bystanders succeed."""
    import os

    tasks = [(str(tmp_path / f"m{i}"), i) for i in range(4)]
    os.close(os.open(tasks[1][0], os.O_CREAT))  # tasks 0, 2, 3 die once; 1 never dies
    ex = Executor("processes", 2, retries=1)
    results = {}
    failures = ex.run(
        _testing.die_once, tasks[:1] + [(None, 99)] + tasks[1:],
        on_done=lambda t, r: results.__setitem__(t[1], r),
    )
    assert [f.task[1] for f in failures] == [99]
    assert failures[0].attempts == 2
    assert "worker process died" in failures[0].error
    assert sorted(results) == [0, 1, 2, 3]


def test_on_done_can_add_tasks():
    """Test that tasks returned by on_done are run too."""
    seen = []

    def on_done(task, result):
        seen.append(result)
        return [task + 10] if task < 10 else []

    Executor("serial").run(_testing.square, [1, 2], on_done=on_done)
    assert sorted(seen) == [1, 4, 121, 144]


def test_serial_results_may_be_futures_completed_while_the_next_task_runs():
    """A serial task may return a Future: the next task runs while another
    thread completes it, and the results reach on_done in task order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = {t: threading.Event() for t in range(5)}
    log = []

    def func(task):
        log.append(("run", task))
        if task > 0:
            release[task - 1].set()  # the earlier task completes only now
        else:
            release[4].set()  # (the last one has no next task)

        def complete():
            release[task].wait(10)
            return task * task

        return pool.submit(complete)

    def on_done(task, result):
        log.append(("done", task, result))

    with ThreadPoolExecutor(1) as pool:
        assert Executor("serial").run(func, range(5), on_done=on_done) == []
    done = [entry for entry in log if entry[0] == "done"]
    assert done == [("done", t, t * t) for t in range(5)]
    # task t is handed on only after task t + 1 has run
    for t in range(4):
        assert log.index(("run", t + 1)) < log.index(("done", t, t * t))


@pytest.mark.parametrize("fails", [1, 2])
def test_a_future_that_fails_is_retried_then_reported(fails):
    """An error a serial task's Future raises counts as the task's: it is
    run again (and its new Future waited for), then reported."""
    from concurrent.futures import ThreadPoolExecutor

    attempts = {}

    def func(task):
        attempts[task] = attempts.get(task, 0) + 1
        broken = task == "b" and attempts[task] <= fails

        def complete():
            if broken:
                msg = f"write of {task} failed"
                raise OSError(msg)
            return task.upper()

        return pool.submit(complete)

    results = {}
    with ThreadPoolExecutor(1) as pool:
        failures = Executor("serial", retries=1).run(
            func, ["a", "b", "c"], on_done=results.__setitem__
        )
    assert attempts == {"a": 1, "b": 2, "c": 1}
    if fails == 1:
        assert failures == []
        assert results == {"a": "A", "b": "B", "c": "C"}
    else:
        assert [(f.task, f.attempts) for f in failures] == [("b", 2)]
        assert "OSError: write of b failed" in failures[0].error
        assert results == {"a": "A", "c": "C"}


@pytest.mark.parametrize("where", ["task", "on_done"])
def test_a_stop_waits_for_the_futures_in_flight(where):
    """A Ctrl-C in the next task, or in handing on the earlier result while
    the next one is being completed, leaves the run only once every Future
    in flight is complete; an earlier task completed by then is handed on
    (its output is written: a resumed run need not cut it again), once."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    finished = {1: threading.Event(), 2: threading.Event()}
    seen = []

    def func(task):
        if task == 2 and where == "task":
            raise KeyboardInterrupt

        def complete():
            time.sleep(0.2)
            finished[task].set()
            return task

        return pool.submit(complete)

    def on_done(task, result):
        if where == "on_done":
            raise KeyboardInterrupt
        seen.append(task)

    pool = ThreadPoolExecutor(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            Executor("serial").run(func, [1, 2, 3], on_done=on_done)
        # (checked before the pool is shut down, which would wait for them)
        done = {t: e.is_set() for t, e in finished.items()}
    finally:
        pool.shutdown()
    assert done == {1: True, 2: where == "on_done"}
    assert seen == ([1] if where == "task" else [])


def test_a_stop_while_waiting_for_a_result_hands_it_on_once_complete():
    """A Ctrl-C while the run waits for a serial task's Future (its chunks
    being written by a thread) leaves the run once the Future is complete,
    with its result handed on; a Future that fails is not."""
    import threading
    from concurrent.futures import Future

    class Interrupted(Future):
        """A Future whose first wait for its result is interrupted."""

        waited = False

        def result(self, timeout=None):
            if not self.waited:
                self.waited = True
                raise KeyboardInterrupt
            return super().result(timeout)

    def func(task):
        future = Interrupted()

        def complete():
            if task == "bad":
                future.set_exception(OSError("disk"))
            else:
                future.set_result(task.upper())

        threading.Timer(0.1, complete).start()
        return future

    for task, expect in (("a", [("a", "A")]), ("bad", [])):
        seen = []
        with pytest.raises(KeyboardInterrupt):
            Executor("serial").run(
                func, [task], on_done=lambda t, r, s=seen: s.append((t, r))
            )
        assert seen == expect


def test_memory_budget_limits_tasks_in_flight(tmp_path):
    """Test that admission keeps the summed cost of running tasks within the budget."""
    folder = tmp_path / "running"
    folder.mkdir()
    tasks = [(str(folder), f"t{i}", 0.3) for i in range(4)]
    ex = Executor("processes", 2, memory_budget=100)
    seen = []
    ex.run(
        _testing.record_concurrency,
        tasks,
        cost=lambda t: 80,
        on_done=lambda t, r: seen.append(r),
    )
    assert max(seen) == 1  # two tasks of 80 never fit in 100 together
    ex = Executor("processes", 2, memory_budget=200)
    seen.clear()
    ex.run(_testing.record_concurrency, tasks, cost=lambda t: 80,
           on_done=lambda t, r: seen.append(r))
    assert max(seen) == 2
    # with room for more, a task waits queued in the pool: still only one
    # task runs per worker
    ex = Executor("processes", 2, memory_budget=10_000)
    seen.clear()
    more = [(str(folder), f"u{i}", 0.2) for i in range(8)]
    ex.run(_testing.record_concurrency, more, cost=lambda t: 80,
           on_done=lambda t, r: seen.append(r))
    assert len(seen) == 8 and max(seen) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "threads"}, "backend must be one of"),
        ({"n_workers": 0}, "n_workers must be a positive integer"),
        ({"retries": -1}, "retries must be a non-negative integer"),
    ],
)
def test_invalid_arguments(kwargs, match):
    """Test that invalid executor arguments are rejected with a clear message."""
    with pytest.raises(ValueError, match=match):
        Executor(**kwargs)


def test_memory_sampler_sees_this_process():
    """Test that the memory sampler reports at least this process's resident size."""
    import psutil

    with MemorySampler(interval=0.01) as sampler:
        block = bytearray(50_000_000)
        block[::4096] = b"x" * len(block[::4096])
    assert sampler.peak >= psutil.Process().memory_info().rss * 0.5
    assert sampler.peak >= 50_000_000
    assert len(sampler.samples) >= 1


def test_a_sample_can_leave_processes_out(monkeypatch):
    """Test that ``sample(exclude)`` leaves the given processes' memory out of
    what it returns (the plan estimates the workers' own), while the peak
    counts the whole tree."""
    sampler = MemorySampler()
    sampler.start()
    sampler.stop()
    sampler.peak = 0
    root = os.getpid()
    monkeypatch.setattr(
        MemorySampler, "_tree", staticmethod(lambda r: {root: 100, 7: 10, 8: 20})
    )
    assert sampler.sample() == 130
    assert sampler.sample(exclude={7, 9}) == 120 and sampler.peak == 130


def test_worker_pids_are_the_warmed_up_workers():
    """Test that ``worker_pids`` names the processes ``warm_up`` started: live
    descendants of this process, which then run its tasks."""
    import time

    import psutil

    ex = Executor("processes", 2)
    assert ex.worker_pids() == set()
    ex.warm_up()
    ex._warming.join()
    deadline = time.monotonic() + 60
    while len(ex.worker_pids()) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = ex.worker_pids()
    descendants = {p.pid for p in psutil.Process().children(recursive=True)}
    assert 1 <= len(pids) <= 2 and pids <= descendants
    results = {}
    ex.run(_testing.square, [3], on_done=lambda t, r: results.__setitem__(t, r))
    assert results == {3: 9}
    ex.close()
    assert Executor("serial", 1).worker_pids() == set()

def test_warm_up_pool_is_taken_over_by_run():
    """Workers started by ``warm_up`` run the tasks; ``close`` then has nothing left."""
    ex = Executor("processes", 2)
    ex.warm_up()
    warming = ex._warming
    ex.warm_up()  # a second call starts nothing more
    assert ex._warming is warming
    results = {}
    failures = ex.run(_testing.square, list(range(8)),
                      on_done=lambda t, r: results.__setitem__(t, r))
    assert failures == []
    assert results == {i: i * i for i in range(8)}
    ex.close()
    assert ex._take_warm_pool() is None


@pytest.mark.parametrize("when", ["while_starting", "once_started"])
def test_ready_workers_runs_before_the_first_task(when):
    """Test that a worker started by ``warm_up`` runs the call of
    ``ready_workers`` before any task, whether it was asked for while the
    pool was being made or once it existed; the serial backend ignores it."""
    ex = Executor("processes", 1)
    ex.warm_up()
    if when == "once_started":
        ex._warming.join()
        assert ex._warm_pool is not None
    ex.ready_workers(_testing.ready, "buffers")
    results = {}
    failures = ex.run(_testing.readied, list(range(4)),
                      on_done=lambda t, r: results.__setitem__(t, r))
    assert failures == []
    pids = {pid for pid, _ in results.values()}
    assert len(pids) == 1 and os.getpid() not in pids
    assert all(seen == ["buffers"] for _, seen in results.values())
    ex.close()
    serial = Executor("serial", 1)
    serial.ready_workers(_testing.ready, "here")
    assert _testing._READIED == []


def test_close_stops_a_pool_that_was_never_used():
    """A warmed-up pool that no run took over is shut down by ``close``."""
    ex = Executor("processes", 2)
    ex.warm_up()
    ex.close()
    assert ex._take_warm_pool() is None
    results, failures = _collect("processes", 2, _testing.square, [4])
    assert results == {4: 16}


_LIBC = (hasattr(os, "confstr") and os.confstr("CS_GNU_LIBC_VERSION")) or ""


@pytest.mark.skipif("glibc" not in _LIBC, reason="the setting is glibc's")
def test_workers_reuse_freed_memory():
    """Pool workers reuse freed blocks of a few MB instead of faulting in new pages.

    Each round allocates and frees 3 x 4 MB (about 3,000 pages); glibc's
    default hands the memory back and faults it in again every round.
    """
    nbytes, rounds = 4_200_000, 10
    results, failures = _collect(
        "processes", 1, _testing.page_faults_of_reused_blocks, [(nbytes, rounds)]
    )
    assert failures == []
    pages = 3 * nbytes // 4096 * rounds
    assert results[(nbytes, rounds)] < pages // 20


_HELD_AFTER_FREEING = """
import sys
import numpy as np
from cutana.executor import keep_freed_memory, return_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
# thresholds as glibc's own rule may have raised them, or the command's
assert (return_freed_memory if sys.argv[1] == "return" else keep_freed_memory)()
before = rss()
blocks, pins = [], []
for _ in range(10):
    blocks.append(np.ones(4_200_000 // 8))
    pins.append(bytearray(200_000))  # a smaller block above each one, kept
del blocks
print(rss() - before)
"""


@pytest.mark.skipif(
    "glibc" not in (getattr(os, "confstr", lambda _: "")("CS_GNU_LIBC_VERSION") or ""),
    reason="glibc's malloc only",
)
def test_return_freed_memory_hands_back_blocks_freed_between_others():
    """After `return_freed_memory`, blocks of a few MB freed between small
    blocks that stay leave the process; with thresholds above their size
    (as glibc raises its own once such a block is freed, and as
    `keep_freed_memory` sets them) they stay in its heap: 42 MB of
    10 x 4.2 MB here, as after reading a catalogue in parts."""
    import subprocess
    import sys

    def held(mode):
        out = subprocess.run(
            [sys.executable, "-c", _HELD_AFTER_FREEING, mode],
            capture_output=True, text=True, check=True,
        )
        return int(out.stdout)

    assert held("keep") > 30_000_000  # what the setting is for
    assert held("return") < 4_000_000  # the 2 MB of small blocks


def test_serial_run_keeps_freed_memory_once_the_command_returned_it(monkeypatch):
    """A ``serial`` run in the ``cutana`` command's process (which called
    `return_freed_memory`) cuts with `keep_freed_memory`, as pool workers
    do; in any other process it leaves ``malloc`` alone."""
    import cutana.executor as ex

    calls = []
    monkeypatch.setattr(ex, "keep_freed_memory", lambda: calls.append(1))
    for returning, expected in ((False, []), (True, [1])):
        monkeypatch.setattr(ex, "_RETURNING", [returning])
        calls.clear()
        results, failures = _collect("serial", 1, _testing.square, [3])
        assert (results, failures, calls) == ({3: 9}, [], expected)


def test_the_command_returns_freed_memory(monkeypatch, tmp_path):
    """The ``cutana`` command sets `return_freed_memory` before its work."""
    import cutana.executor as ex
    from cutana.cli import main

    calls = []
    monkeypatch.setattr(ex, "return_freed_memory", lambda: calls.append(1))
    assert main(["verify", str(tmp_path / "missing.zarr")]) != 0
    assert calls == [1]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux /proc only")
def test_proc_tree_equals_psutil_on_a_process_tree():
    """The /proc reading of a process tree gives psutil's processes and sizes."""
    import subprocess
    import sys

    import psutil

    from cutana.executor import MemorySampler, _proc_tree

    hold = "import sys, time; b = bytearray({n}); sys.stdout.write('x\\n'); "
    hold += "sys.stdout.flush(); time.sleep(60)"
    child = (
        "import subprocess, sys, time; b = bytearray(30_000_000); "
        f"q = subprocess.Popen([sys.executable, '-c', {hold.format(n=20_000_000)!r}], "
        "stdout=subprocess.PIPE); q.stdout.readline(); "
        "sys.stdout.write('x\\n'); sys.stdout.flush(); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # both processes hold their memory now
        tree = _proc_tree(proc.pid)
        root = psutil.Process(proc.pid)
        expected = {p.pid: p.memory_info().rss for p in [root, *root.children(True)]}
        if tree is None:
            pytest.skip("this kernel has no /proc/PID/task/TID/children")
        assert sorted(tree) == sorted(expected) and len(tree) == 2
        for pid, rss in expected.items():
            assert abs(tree[pid] - rss) <= 1 << 20  # the same statm, read apart
        assert tree[proc.pid] > 30_000_000
        total = sum(tree.values())
        assert MemorySampler.tree_rss(root) == pytest.approx(total, rel=0.05)
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert _proc_tree(proc.pid) == {}


def test_workers_get_the_worker_environment():
    """Test that worker processes run with `WORKER_ENVIRONMENT` (one BLAS
    thread, no numpy huge pages) where the user set nothing, and with the
    user's value where they did; checked in a fresh process, whose
    forkserver starts with this environment."""
    import subprocess
    import sys

    from cutana.executor import WORKER_ENVIRONMENT

    code = (
        "import os\n"
        "from cutana.executor import Executor\n"
        "got = []\n"
        "Executor('processes', 1, preload=['cutana.executor']).run(\n"
        "    os.getenv,\n"
        "    ['NUMPY_MADVISE_HUGEPAGE', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'],\n"
        "    on_done=lambda t, r: got.append((t, r)))\n"
        "print(sorted(got))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENVIRONMENT}
    env["OMP_NUM_THREADS"] = "3"  # the user's choice
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True,
        check=True, timeout=120,
    ).stdout
    assert out.strip() == str(
        [("MKL_NUM_THREADS", "1"), ("NUMPY_MADVISE_HUGEPAGE", "0"),
         ("OMP_NUM_THREADS", "3")]
    )
    assert WORKER_ENVIRONMENT["NUMPY_MADVISE_HUGEPAGE"] == "0"


def test_workers_import_cutana_from_where_the_main_process_did(tmp_path):
    """Test that workers import the cutana the main process imported, also
    when the working folder holds another ``cutana/`` (an unbuilt source
    checkout, say): the forkserver's ``python -c`` put that folder first on
    its path, and every task failed. Checked in a fresh process, whose
    forkserver starts in that folder."""
    import subprocess
    import sys

    work = tmp_path / "work"
    (work / "cutana").mkdir(parents=True)
    # a package without the modules the tasks need
    (work / "cutana" / "__init__.py").write_text("# not the cutana being run\n")
    script = tmp_path / "run.py"
    script.write_text(
        "import os\n"
        "from cutana import _testing\n"
        "from cutana.executor import Executor\n"
        "if __name__ == '__main__':\n"
        f"    os.chdir({str(work)!r})\n"
        "    got = []\n"
        "    failures = Executor('processes', 2, preload=['cutana.executor']).run(\n"
        "        _testing.square, [2, 3], on_done=lambda t, r: got.append(r))\n"
        "    print(sorted(got), len(failures))\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True,
        check=False, timeout=120, cwd=str(tmp_path),
    )
    assert proc.stdout.strip() == "[4, 9] 0", proc.stderr[-2000:]


def test_a_script_without_a_main_guard_is_told_why_its_workers_die(tmp_path):
    """Test that a script that calls cutana with workers at its top level
    (not under ``if __name__ == "__main__":``, so that every worker runs it
    again as it starts, and dies) stops with a usage error that says so,
    instead of every job failing in one new pool after another."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "from cutana import _testing\n"
        "from cutana.executor import Executor\n"
        "Executor('processes', 2, preload=['cutana.executor']).run(\n"
        "    _testing.square, [2, 3, 4])\n"
        "print('finished')\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True,
        check=False, timeout=120, cwd=str(tmp_path),
    )
    assert proc.returncode == 1
    assert "finished" not in proc.stdout
    assert "ConfigError: the worker processes exit as they start" in proc.stderr
    assert 'under `if __name__ == "__main__":`' in proc.stderr


@pytest.mark.parametrize("script", [None, "/home/me/run.py"])
def test_workers_that_exit_as_they_start_are_explained(monkeypatch, script):
    """Test that workers dying as they start (here: at once) stop the run
    with a usage error that blames a missing ``__main__`` guard only when a
    script started cutana; under the ``cutana`` command (no script) it
    names a worker killed for lack of memory, the usual cause there."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cutana import executor
    from cutana.exceptions import ConfigError

    monkeypatch.setattr(executor, "_main_script", lambda: script)
    ctx = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=os._exit, initargs=(3,))
    try:
        with pytest.raises(ConfigError) as exc:
            executor._check_workers_start(pool, 1)
    finally:
        pool.shutdown(wait=True)
    text = str(exc.value)
    assert text.startswith("the worker processes exit as they start")
    if script is None:
        assert "lack of memory" in text and "__main__" not in text
    else:
        assert f"({script})" in text and 'if __name__ == "__main__":' in text


def test_main_script_is_none_under_the_cutana_command(monkeypatch):
    """Test that `_main_script` names a user's script, and no script for the
    installed ``cutana`` command or ``python -m cutana.cli``."""
    import sys
    import types

    from cutana.executor import _main_script

    def main(path, spec=None):
        module = types.ModuleType("__main__")
        module.__file__ = path
        module.__spec__ = spec and types.SimpleNamespace(name=spec)
        monkeypatch.setitem(sys.modules, "__main__", module)

    main("/home/me/run.py")
    assert _main_script() == "/home/me/run.py"
    main("/usr/local/bin/cutana")
    assert _main_script() is None
    main("/site-packages/cutana/cli.py", "cutana.cli")
    assert _main_script() is None


def _busy_pool():
    """A pool of one worker busy for a minute: ``(pool, task, process)``."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
    assert pool.submit(os.getpid).result(timeout=60) > 0
    busy = pool.submit(time.sleep, 60)
    time.sleep(0.2)  # the worker has taken the task
    (proc,) = pool._processes.values()
    return pool, busy, proc


def test_pool_shutdown_does_not_wait_for_ever_for_a_stuck_worker():
    """A worker that never exits (here: busy for a minute; at the end of a
    run: blocked on the task queue's lock that a killed worker held) is
    given the grace period, then terminated, instead of being waited for."""
    import time

    from cutana.executor import _shutdown_pool

    pool, busy, proc = _busy_pool()
    start = time.monotonic()
    _shutdown_pool(pool, grace=0.5)
    assert time.monotonic() - start < 10
    proc.join(10)
    assert not proc.is_alive()
    assert not busy.done() or busy.exception() is not None  # never finished


def test_a_stop_asked_for_again_ends_the_shutdowns_grace(monkeypatch):
    """A second Ctrl-C or SIGTERM while a stopped run's pool shuts down
    (`cutana._stop.hurried`) terminates its workers at once, instead of
    giving them the grace, and the pool's thread ends: raised there, the
    second stop had left both, with the queues' semaphores, to the end of
    the process."""
    import time

    from cutana import _stop
    from cutana.executor import _shutdown_pool

    monkeypatch.setattr(_stop, "_REQUESTED", [KeyboardInterrupt, KeyboardInterrupt])
    pool, busy, proc = _busy_pool()
    thread = pool._executor_manager_thread
    start = time.monotonic()
    _shutdown_pool(pool, grace=60)
    assert time.monotonic() - start < 10  # not the 60 s of grace
    proc.join(10)
    assert not proc.is_alive()
    thread.join(10)
    assert not thread.is_alive()
    assert not busy.done() or busy.exception() is not None


def test_error_while_stopping_is_not_taken_for_a_task_error():
    """An error raised while a task handles a Ctrl-C (a clean-up failing half
    way) stops a serial run with the Ctrl-C: it is not retried as a task
    error, which would swallow the interrupt."""
    calls = []

    def task(x):
        calls.append(x)
        try:
            raise KeyboardInterrupt
        finally:
            msg = "cannot join thread before it is started"
            raise RuntimeError(msg)

    with pytest.raises(KeyboardInterrupt):
        Executor("serial", retries=1).run(task, [1, 2])
    assert calls == [1]


def test_close_after_a_warm_up_stopped_before_its_thread_started():
    """`close` after a Ctrl-C that came between making the warm-up thread
    and starting it returns without a pool (it used to raise)."""
    import threading

    ex = Executor("processes", 2)
    ex._warming = threading.Thread(target=lambda: None)  # made, never started
    ex.close()
    assert ex._take_warm_pool() is None


def test_workers_leave_when_their_parent_is_a_zombie():
    """A worker's parent watch ends the worker when the parent has exited
    but is not reaped yet (its own parent may wait for the pipes the worker
    holds open, which would wait for ever)."""
    import subprocess
    import sys
    import time

    import psutil

    parent = subprocess.Popen([sys.executable, "-c", "pass"])
    create_time = psutil.Process(parent.pid).create_time()
    deadline = time.monotonic() + 30
    while psutil.Process(parent.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    code = (
        "from cutana.executor import _watch_parent; "
        f"_watch_parent({parent.pid}, {create_time!r}, 0.05)"
    )
    env = dict(os.environ)
    # the folder of the cutana imported here (a source tree, or site-packages)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cutana.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        watcher = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
        assert watcher.returncode == 1
    finally:
        parent.wait()


_SERVER_SIGNALS = """
import signal
from multiprocessing import forkserver
from cutana.executor import start_forkserver
start_forkserver(())
with open(f"/proc/{forkserver._forkserver._forkserver_pid}/status") as f:
    blocked = int(f.read().split("SigBlk:")[1].split()[0], 16)
mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
print(bool(blocked & 1 << (signal.SIGINT - 1)), sorted(mask))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_the_worker_server_starts_with_sigint_blocked():
    """Test that `start_forkserver` starts the worker server with SIGINT
    blocked (a Ctrl-C while it imported its site packages ended it with a
    traceback), after the resource tracker (whose start unblocks it), and
    leaves the caller's signal mask as it was."""
    import subprocess
    import sys

    env = dict(os.environ)
    # the folder of the cutana imported here (a source tree, or site-packages)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cutana.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _SERVER_SIGNALS], env=env,
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["True", "[]"]


_SERVER_MODULE = """
import gc, signal, sys

class Noisy:
    def __del__(self):  # runs when the interpreter tears __main__ down
        sys.stdout.write("torn down\\n")
        sys.stdout.flush()

keep = Noisy()
# (a background job starts with SIGINT ignored: the server must do it itself)
signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.argv[1] == "server":
    import cutana._worker_server
print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
      "cutana._tasks" in sys.modules, gc.isenabled())
# what a worker does not run: the main process's layers and their libraries
print(*[name for name in ("cutana.pipeline", "cutana.catalog", "cutana.io.archive",
                          "cutana.io.fits", "astropy.table", "astropy.wcs", "zarr")
        if name in sys.modules])
frozen = gc.get_freeze_count()
import cutana._tasks
print(frozen > 0, any(o is cutana._tasks._run_task for o in gc.get_objects()))
"""


def test_the_worker_server_module_ignores_sigint_freezes_and_exits_at_once(tmp_path):
    """Test what the worker server preloads (`WORKER_PRELOAD`), in a fresh
    interpreter: SIGINT ignored, the workers' code (`cutana._tasks`)
    imported, without the main process's layers (catalogue, archive, FITS
    writer) and the libraries only they use (astropy's tables and WCS,
    zarr), and its objects frozen (out of the collector's reach,
    for the server and its workers), and an exit that does not tear the
    interpreter down (which took the server 0.2 s after a run, while a
    caller reading the run's output waited). The same script without it
    (the control) tears down and collects."""
    import subprocess
    import sys

    from cutana.executor import WORKER_PRELOAD

    assert WORKER_PRELOAD == ("cutana._worker_server",)
    env = dict(os.environ)
    # the folder of the cutana imported here (a source tree, or site-packages)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cutana.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    lines = {}
    for mode in ("server", "control"):
        # (in a folder of no cutana: ``-c`` puts the working folder first)
        out = subprocess.run([sys.executable, "-c", _SERVER_MODULE, mode], env=env,
                             capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        lines[mode] = out.stdout.splitlines()
    assert lines["server"] == ["True True True", "", "True False"]
    assert lines["control"] == ["False False True", "", "False True", "torn down"]


def test_failed_warm_up_is_quiet_and_leaves_no_pool(monkeypatch):
    """A warm-up whose pool cannot be made (its worker server killed by a
    SIGTERM to the group, say) prints no thread traceback; `run` makes its
    own pool and `close` has nothing to stop."""
    import threading

    hooked = []
    monkeypatch.setattr(threading, "excepthook", hooked.append)
    ex = Executor("processes", 2)

    def broken():
        msg = "unexpected EOF"
        raise EOFError(msg)

    monkeypatch.setattr(ex, "_new_pool", broken)
    ex.warm_up()
    assert ex._take_warm_pool() is None
    assert hooked == []
