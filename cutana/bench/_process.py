# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Timing a command from outside and sampling its process tree's memory.

Shared by the benchmark harness (cutana and Astropy runs) and the ESA Cutana
driver, so that every tool is measured the same way: wall time from process
start to exit, and the summed resident memory of the process and all its
descendants, sampled in a background thread.
"""

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["ProcessTreeSampler", "kill_tree", "run_timed"]

_SAMPLE_INTERVAL = 0.1


class ProcessTreeSampler:
    """Sample the resident memory of a process and all its descendants.

    A background thread sums the resident set size (RSS) of the process
    and of every descendant alive at that moment, every ``interval``
    seconds. Pages shared between processes (a memory-mapped tile read by
    several workers) count once per process, as in ESA Cutana's paper.

    Parameters
    ----------
    interval : float, optional
        Seconds between samples.
    is_worker : callable, optional
        ``is_worker(process) -> bool`` on `psutil.Process` descendants;
        processes it recognises are counted into ``max_workers`` (a
        recognised process stays recognised).

    Attributes
    ----------
    samples : list of tuple
        ``(seconds since start, bytes)``.
    peak : int
        Largest sample, bytes.
    max_workers : int
        Most recognised worker processes alive at one sample.

    Examples
    --------
    >>> import os, time
    >>> from cutana.bench._process import ProcessTreeSampler
    >>> sampler = ProcessTreeSampler(interval=0.01)
    >>> sampler.start(os.getpid())
    >>> time.sleep(0.05)
    >>> sampler.stop()
    >>> sampler.peak > 0
    True
    """

    def __init__(self, interval=_SAMPLE_INTERVAL, is_worker=None):
        if not (isinstance(interval, (int, float)) and interval > 0):
            msg = f"interval must be a positive number of seconds, got {interval!r}"
            raise ValueError(msg)
        self.interval = float(interval)
        self.samples = []
        self.peak = 0
        self.max_workers = 0
        self._is_worker = is_worker
        self._workers = set()
        self._stop = threading.Event()
        self._thread = None

    def start(self, pid, t0=None):
        """Start sampling the tree rooted at ``pid``.

        Parameters
        ----------
        pid : int
            Process id of the root of the tree.
        t0 : float, optional
            `time.perf_counter` value that sample times are relative to
            (default: now).
        """
        t0 = time.perf_counter() if t0 is None else t0
        self._thread = threading.Thread(
            target=self._run,
            args=(int(pid), t0),
            name="cutana-bench-sampler",
            daemon=True,
        )
        self._thread.start()

    def stop(self):
        """Stop sampling and wait for the sampling thread to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @staticmethod
    def tree_rss(root):
        """Summed RSS of a process and its live descendants.

        Parameters
        ----------
        root : `psutil.Process`
            The root of the tree.

        Returns
        -------
        rss : int
            Bytes; 0 when the root has exited.
        """
        import psutil

        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self, pid, t0):
        import psutil

        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while True:  # at least one sample, however soon `stop` is called
            rss = self.tree_rss(root)
            if rss:
                self.samples.append((time.perf_counter() - t0, rss))
                self.peak = max(self.peak, rss)
            if self._is_worker is not None:
                self.max_workers = max(self.max_workers, self._count_workers(root))
            if self._stop.wait(self.interval):
                break

    def _count_workers(self, root):
        import psutil

        try:
            procs = root.children(recursive=True)
        except psutil.Error:
            return 0
        n = 0
        for proc in procs:
            try:
                if proc.pid in self._workers or self._is_worker(proc):
                    self._workers.add(proc.pid)
                    n += 1
            except psutil.Error:
                continue
        return n


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


