# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Timing a command from outside and sampling its process tree's memory.

Shared by the benchmark harness (cutana and Astropy runs) and the ESA Cutana
driver, so that every tool is measured the same way: wall time from process
start to exit, and the summed resident memory of the process and all its
descendants, sampled in a background thread.
"""

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from ..executor import MemorySampler as ProcessTreeSampler

__all__ = ["ProcessTreeSampler", "kill_tree", "last_json_record", "run_timed"]

_SAMPLE_INTERVAL = 0.1


def kill_tree(pid):
    """Kill a process tree, children first.

    Parameters
    ----------
    pid : int
        Process id of the root; it is reaped by whoever started it.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        children = root.children(recursive=True)
    except psutil.Error:
        return
    for proc in [*children, root]:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(children, timeout=10)


def run_timed(
    command, *, env=None, cwd=None, timeout=None, interval=_SAMPLE_INTERVAL,
    is_worker=None,
):
    """Run a command, timed from outside, sampling its tree's memory.

    Dirty pages are flushed to disk (``os.sync``) before the command starts,
    outside the timing, so that no run pays for an earlier run's writes.

    Parameters
    ----------
    command : list of str
        The command.
    env : dict, optional
        Its environment.
    cwd : str, optional
        Its working folder.
    timeout : float, optional
        Seconds after which the tree is killed.
    interval : float, optional
        Seconds between memory samples.
    is_worker : callable, optional
        Recognises worker processes, counted into ``max_workers``.

    Returns
    -------
    run : dict
        ``seconds``, ``returncode``, ``timed_out``, ``stdout``, ``stderr``,
        ``peak_memory``, ``memory_samples`` and ``max_workers``.
    """
    # every tool starts with no dirty pages left over from earlier runs: the
    # kernel would otherwise throttle its writes for the others' output
    if hasattr(os, "sync"):
        os.sync()
    with tempfile.TemporaryDirectory(prefix="cutana-bench-") as tmp:
        out_path = os.path.join(tmp, "stdout")
        err_path = os.path.join(tmp, "stderr")
        sampler = ProcessTreeSampler(interval, is_worker=is_worker)
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd)
            sampler.start(proc.pid, t0)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_tree(proc.pid)
                returncode = proc.wait()
            seconds = time.perf_counter() - t0
            sampler.stop()
        stdout = Path(out_path).read_text(encoding="utf-8", errors="replace")
        stderr = Path(err_path).read_text(encoding="utf-8", errors="replace")
    return {
        "seconds": seconds,
        "returncode": returncode,
        "timed_out": timed_out,
        "stdout": stdout,
        "stderr": stderr,
        "peak_memory": int(sampler.peak),
        "memory_samples": [(round(t, 3), int(b)) for t, b in sampler.samples],
        "max_workers": sampler.max_workers,
    }


def last_json_record(text, tool):
    """Find a driver's JSON record in its standard output.

    Parameters
    ----------
    text : str
        Standard output of the driver.
    tool : str
        The record's ``"tool"`` value.

    Returns
    -------
    record : dict or None
        The last line that is a JSON object with that ``"tool"``, or `None`
        if there is none.

    Examples
    --------
    >>> from cutana.bench._process import last_json_record
    >>> last_json_record('log\n{"tool": "astropy", "n": 3}\n{"x"', "astropy")
    {'tool': 'astropy', 'n': 3}
    """
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("tool") == tool:
                return record
    return None
