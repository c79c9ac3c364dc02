# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Running tasks: serially, on worker processes, or on a Dask cluster.

The executor knows nothing about tiles or output formats. It runs one
picklable function over picklable tasks and hands each result (or, after
the allowed retries, each failure) back to callbacks in the main process,
which may answer with new tasks (the pipeline uses this to assemble output
chunks as soon as all their rows are cut).

Backends
--------
``serial``
    In the calling process, one task at a time. A task's result may be a
    `concurrent.futures.Future` that another thread completes (e.g.
    writing what the task computed): the next task then runs meanwhile,
    and the result is handed on once it is there, in order, one task
    behind.
``processes``
    A `concurrent.futures.ProcessPoolExecutor` started with the
    ``forkserver`` method. At most ``n_workers`` tasks run at once (one
    more, `QUEUED_TASKS`, waits in the pool, so that a worker goes on at
    once), and a new task is admitted only while the estimated bytes of the
    tasks in flight, queued ones included, stay within the memory budget.
    A worker killed by the operating system breaks the pool; the executor
    starts a new pool and retries the tasks that were in flight. Workers
    exit by themselves within a second when the main process dies (e.g.
    ``kill -9``), instead of waiting on the task queue for ever. With glibc,
    workers keep freed heap memory for reuse (`keep_freed_memory`) rather
    than handing it back after each task, and they run without numpy's
    huge pages (`WORKER_ENVIRONMENT`).
``dask``
    A `distributed.Client`: an existing scheduler (``scheduler`` address or
    ``client``), or a `distributed.LocalCluster` with ``n_workers``
    single-threaded workers.
"""

import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from ._stop import behind as _stop_behind
from ._stop import hurried as _stop_hurried
from ._stop import raise_requested as _raise_lost_stop

__all__ = [
    "BACKENDS",
    "WORKER_PRELOAD",
    "Executor",
    "MemorySampler",
    "TaskFailure",
    "default_backend",
    "keep_freed_memory",
    "return_freed_memory",
    "start_forkserver",
    "stop_worker_server",
    "worker_preload",
    "worker_server_pid",
]

logger = logging.getLogger(__name__)

BACKENDS = ("serial", "processes", "dask")

#: Modules cutana's worker server imports before it forks the first worker:
#: `cutana._worker_server` makes it ignore Ctrl-C, imports the code the
#: workers run (`cutana._tasks`) and makes it exit promptly; see
#: `start_forkserver`.
WORKER_PRELOAD = ("cutana._worker_server",)


def worker_preload(output_format="zarr"):
    """The modules the worker server of a run with ``output_format`` imports.

    `WORKER_PRELOAD`, and for a FITS output its writer (`cutana.io.fits`,
    with astropy's tables and WCS) and the cutouts' WCS (`cutana.cutout`,
    with astropy.nddata and scipy: 0.18 s more), which the workers of a
    Zarr output do not import at all, and those of a FITS output would
    otherwise import each at its first job.

    Parameters
    ----------
    output_format : {'zarr', 'fits'}, optional
        The run's output format.

    Returns
    -------
    preload : tuple of str
        For `start_forkserver`.

    Examples
    --------
    >>> from cutana.executor import worker_preload
    >>> worker_preload("zarr")
    ('cutana._worker_server',)
    >>> worker_preload("fits")
    ('cutana._worker_server', 'cutana.io.fits', 'cutana.cutout')
    """
    if output_format == "fits":
        return (*WORKER_PRELOAD, "cutana.io.fits", "cutana.cutout")
    return WORKER_PRELOAD


#: Tasks the ``processes`` backend hands to its pool beyond one per worker,
#: memory budget permitting: a worker that finishes a task starts a queued
#: one at once instead of idling while the parent handles the result and
#: submits the next (5-8 ms per task on the paper workload). At most
#: ``n_workers`` tasks run at once either way.
QUEUED_TASKS = 1


def default_backend(workers, scheduler=None):
    """The backend used when none is given.

    Parameters
    ----------
    workers : int
        Number of workers.
    scheduler : str, optional
        Address of a Dask scheduler.

    Returns
    -------
    backend : str
        ``'dask'`` with a scheduler, else ``'serial'`` for one worker and
        ``'processes'`` for more.

    Examples
    --------
    >>> from cutana.executor import default_backend
    >>> default_backend(1), default_backend(2), default_backend(1, "tcp://h:8786")
    ('serial', 'processes', 'dask')
    """
    if scheduler:
        return "dask"
    return "serial" if workers == 1 else "processes"


#: Environment variables that set the thread count of numpy's BLAS.
_BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

#: Environment of cutana's worker processes (and of the ``cutana run``
#: process), where the user has not set these: single-threaded BLAS, and
#: no transparent huge pages for numpy's large arrays. Workers reuse their
#: buffers from job to job, so huge pages save few page faults, while the
#: first touch of each 2 MiB page costs more than that on virtual machines:
#: on the paper workload here, 4.54 -> 4.29 s with one worker and 3.08 ->
#: 2.91 s with two (means of 5 alternating pairs), less system time.
WORKER_ENVIRONMENT = {
    **{key: "1" for key in _BLAS_THREAD_VARIABLES},
    "NUMPY_MADVISE_HUGEPAGE": "0",
}


def start_forkserver(preload=()):
    """Start the ``forkserver`` of the ``processes`` backend now, without waiting.

    Worker processes are forked from one server process that imports the
    ``preload`` modules once. Starting it takes about a second (mostly
    those imports); the ``cutana`` command calls this first thing, so that
    the server imports while the command itself imports and reads the
    catalogue. Later calls, and calls on systems without ``forkserver``,
    do nothing.

    Parameters
    ----------
    preload : sequence of str, optional
        Modules the server imports before it forks workers.

    Examples
    --------
    >>> from cutana.executor import start_forkserver
    >>> from cutana.executor import WORKER_PRELOAD
    >>> start_forkserver(WORKER_PRELOAD)  # returns at once
    """
    if os.name != "posix":
        return
    from multiprocessing import forkserver, resource_tracker

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    # Workers are single-threaded by design (``--threads`` sets the kernels'
    # threads): keep numpy's BLAS from starting a thread per core in each of
    # them, and numpy from asking for huge pages (WORKER_ENVIRONMENT), unless
    # the user chose otherwise. The server (and every worker) inherits the
    # environment it is started with.
    env = {k: v for k, v in WORKER_ENVIRONMENT.items() if k not in os.environ}
    env.update(_server_import_path())
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # the server starts with SIGINT blocked (as multiprocessing starts its
    # resource tracker): a Ctrl-C while it imports its site packages, before
    # it preloads `cutana._worker_server`, ended it with a traceback of its
    # own beside the run's one line; one here is delivered once unblocked
    # (the resource tracker first: starting it unblocks SIGINT again)
    resource_tracker.ensure_running()
    mask = None
    if hasattr(signal, "pthread_sigmask"):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def worker_server_pid():
    """Process id of the running worker server (multiprocessing's
    ``forkserver``).

    Returns
    -------
    pid : int or None
        `None` when no server runs (none started, or stopped).
    """
    from multiprocessing import forkserver

    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)


def stop_worker_server():
    """Stop the worker server, if one runs, and wait until it has exited
    (`start_forkserver` starts another): for a run that cuts in its own
    process after all, which the server's memory would count against."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)  # (not public: "for unit tests")
    if stop is not None and worker_server_pid() is not None:
        stop()


def _server_import_path():
    """Environment for the forkserver to import cutana from where this
    process did.

    The server runs ``python -c ...``, which puts its working folder first on
    ``sys.path`` (Python 3.11 does not pass this process's ``sys.path`` on).
    A run started in a folder holding another ``cutana/`` (an unbuilt source
    checkout, say) had the server preload that package, which its forked
    workers then kept, and every job failed. The server starts without that
    entry (``PYTHONSAFEPATH``) and with the folder this process imported
    cutana from first (``PYTHONPATH``).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONSAFEPATH": "1",
        "PYTHONPATH": root if not path else root + os.pathsep + path,
    }


@dataclass
class TaskFailure:
    """A task that failed after all its attempts.

    Attributes
    ----------
    task : object
        The task.
    error : str
        ``'ExceptionType: message'`` of the last attempt.
    attempts : int
        How many times the task was run.

    Examples
    --------
    >>> from cutana._testing import fail_always
    >>> from cutana.executor import Executor
    >>> failures = Executor(backend="serial", retries=1).run(fail_always, ["a"])
    >>> failure = failures[0]
    >>> failure.task, failure.attempts
    ('a', 2)
    >>> failure.error
    "RuntimeError: task 'a' always fails"
    """

    task: object
    error: str
    attempts: int


@dataclass
class _Pending:
    task: object
    attempts: int = 0
    errors: list = field(default_factory=list)
    solo: bool = False  # run alone: it was in flight when a worker died
    handed: bool = False  # its result went to ``on_done``


def _record_completed(pending, future, on_done):
    """Hand the result of a serial task completed while the run stopped to
    ``on_done`` (its tasks to follow are not run); a failure is left to the
    resumed run, which cuts the task again."""
    if future.cancelled() or future.exception() is not None:
        return
    pending.handed = True
    try:
        on_done(pending.task, future.result())
    except Exception as exc:  # noqa: BLE001 - the stop goes on; resume cuts it
        logger.debug("recording a task completed while stopping failed: %s", exc)


@dataclass
class _Raised:
    """An exception a serial task raised, to hand on in its turn."""

    error: BaseException


def _describe(exc):
    """``'Type: message'`` of an exception."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _create_time(pid):
    """Start time of process ``pid`` (psutil), or None if it cannot be read."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:  # pragma: no cover - the process vanished
        return None


def _watch_parent(pid, create_time, interval):
    """Exit this worker as soon as the process that started the pool is gone."""
    import psutil

    while True:
        time.sleep(interval)
        try:
            parent = psutil.Process(pid)
            # a parent that has exited but is not reaped yet is a zombie (its
            # own parent may be waiting for the output pipes this worker
            # holds open: waiting for it to go would wait for ever)
            alive = (
                parent.create_time() == create_time
                and parent.status() != psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            alive = False
        except psutil.Error:  # pragma: no cover - e.g. access denied: keep going
            alive = True
        if not alive:
            # the main process was killed (e.g. kill -9): nobody will ever
            # collect this worker's results, and a worker blocked on the task
            # queue would otherwise live forever
            os._exit(1)


#: Freed heap memory a worker process keeps for reuse (`keep_freed_memory`).
WORKER_HEAP_KEEP_BYTES = 16 * 2**20
#: Smallest block the main process of a ``cutana`` command maps on its own,
#: and the free heap it keeps (`return_freed_memory`).
MAIN_HEAP_RETURN_BYTES = 2**20


def _malloc_thresholds(block_bytes):
    """Set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to
    ``block_bytes`` (which also stops glibc raising them as it goes);
    whether the C library took them (`False` except with glibc)."""
    try:
        if "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):  # not glibc, or no confstr name
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    size = int(block_bytes)
    return bool(mallopt(m_mmap_threshold, size) and mallopt(m_trim_threshold, size))


def keep_freed_memory(keep_bytes=WORKER_HEAP_KEEP_BYTES):
    """Make this process's ``malloc`` reuse freed blocks instead of unmapping them.

    glibc serves a large block (from 128 kB, a threshold it raises as it
    goes) with a fresh mapping and unmaps it when freed, and hands the free
    top of its heap back to the system once it exceeds twice that
    threshold. A worker that allocates and frees blocks of a few MB for
    every task, as the compressed chunks of an output are, then faults in
    and zeroes the same amount of fresh memory again and again: about 8 %
    of a worker's time on the paper workload. This sets both thresholds so
    that blocks up to ``keep_bytes`` come from the heap and up to
    ``keep_bytes`` of its free top stay in the process. cutana's own
    worker processes call it, and the ``serial`` backend when it starts
    cutting in the calling process; it changes nothing but where memory
    comes from.

    Parameters
    ----------
    keep_bytes : int, optional
        Largest block served from the heap, and free heap kept (glibc caps
        the first at 32 MiB on 64-bit systems).

    Returns
    -------
    done : bool
        Whether the C library took the setting (`False` except with glibc).

    See Also
    --------
    return_freed_memory : the opposite, for a process that does not cut.

    Notes
    -----
    The test ``test_workers_reuse_freed_memory`` counts the page faults of
    a worker that allocates and frees such blocks.
    """
    return _malloc_thresholds(keep_bytes)


def return_freed_memory(block_bytes=MAIN_HEAP_RETURN_BYTES):
    """Make this process's ``malloc`` hand large freed blocks back at once.

    glibc raises its mapping threshold (up to 32 MiB) each time a mapped
    block is freed, after which blocks of a few MB come from the heap and,
    freed between others, stay in the process. Reading a large catalogue
    allocates and frees many such blocks (astropy's tokenizer and columns,
    part by part): reading an ESA Cutana-style catalogue of 2,000,000 rows
    peaked at 603-608 MB, and at 451-452 MB with both thresholds fixed at
    1 MiB, in about the same time. The ``cutana`` command calls this once,
    before its work; a ``serial`` run then turns to `keep_freed_memory`
    when it starts cutting.

    Parameters
    ----------
    block_bytes : int, optional
        Smallest block mapped on its own (and unmapped when freed), and the
        free top of the heap kept.

    Returns
    -------
    done : bool
        Whether the C library took the setting (`False` except with glibc).
    """
    _RETURNING[0] = _malloc_thresholds(block_bytes)
    return _RETURNING[0]


_RETURNING = [False]  # whether this process called `return_freed_memory`


def _init_worker(parent_pid, parent_create_time, initializer=None, interval=0.5):
    """Initializer of every pool worker: watch the parent, keep freed memory."""
    # Ctrl-C reaches every process of the terminal's group: the parent stops
    # the run and its workers, which would each print a traceback otherwise
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_create_time is not None:
        threading.Thread(
            target=_watch_parent,
            args=(parent_pid, parent_create_time, interval),
            name="cutana-parent-watch",
            daemon=True,
        ).start()
    keep_freed_memory()
    if initializer is not None:
        initializer()
    # the modules the server imported are never freed: keep the collector
    # from walking their objects again and again while the worker cuts
    gc.freeze()


def _proc_tree(pid):
    """Resident bytes of ``pid`` and each live descendant, from Linux's ``/proc``.

    A process's children are read from ``/proc/PID/task/TID/children`` and
    its resident size from ``/proc/PID/statm`` (as psutil reads it): a few
    small files per process of the tree, where psutil's ``children()``
    reads the status of every process on the system, which made sampling
    every 0.1 s cost about 1 % of a run.

    Parameters
    ----------
    pid : int
        The root of the tree.

    Returns
    -------
    rss : dict or None
        Process id to resident bytes (empty if the root has exited), or
        `None` where ``/proc`` has no ``children`` files (not Linux, or a
        kernel without them): then use psutil.
    """
    if not _HAS_PROC_CHILDREN:
        return None
    rss = {}
    todo = [int(pid)]
    while todo:
        p = todo.pop()
        if p in rss:
            continue
        try:
            with open(f"/proc/{p}/statm", "rb") as fh:
                pages = int(fh.read().split()[1])
            tids = os.listdir(f"/proc/{p}/task")
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
        rss[p] = pages * _PAGE_SIZE
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children", "rb") as fh:
                    todo.extend(int(k) for k in fh.read().split())
            except (OSError, ValueError):  # the thread exited meanwhile
                continue
    return rss


_HAS_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if _HAS_PROC_CHILDREN else 4096


def _main_script():
    """The script a worker imports as it starts (``__main__``'s file), or
    None when this process runs the ``cutana`` command or has no script."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    if path is None or (spec is not None and spec.name.split(".")[0] == "cutana"):
        return None
    if os.path.splitext(os.path.basename(path))[0] in ("cutana", "cutana-script"):
        return None  # the installed command
    return path


def _check_workers_start(pool, n):
    """Raise a `ConfigError` if the pool's workers exit as they start.

    A worker started by ``forkserver`` (or ``spawn``) first imports the
    ``__main__`` script of the process that made the pool. A script that
    calls cutana at its top level, not under ``if __name__ == "__main__":``,
    then runs again in every worker, which dies; every job would fail, one
    pool after another. The error says so when a script started cutana;
    otherwise (the ``cutana`` command) it names the other usual cause, a
    worker killed for lack of memory.
    """
    from .exceptions import ConfigError

    probes = [pool.submit(os.getpid) for _ in range(n)]
    try:
        for probe in probes:
            probe.result()
    except BrokenProcessPool:
        script = _main_script()
        msg = (
            "the worker processes exit as they start (their error, if any, is "
            "printed above"
        )
        if script is None:
            msg += (
                "; a worker killed for lack of memory prints none): check the "
                "memory free, or run with fewer --workers or --backend serial"
            )
        else:
            msg += (
                f"). Each one imports the script that started cutana ({script}): "
                "a script must call cutana under `if __name__ == \"__main__\":` "
                "to run it with workers (or use backend='serial')"
            )
        raise ConfigError(msg) from None


def _is_broken(pool):
    """Whether a process pool has been marked broken."""
    return bool(getattr(pool, "_broken", False))


#: Seconds a pool's workers are given to exit once it is shut down.
SHUTDOWN_GRACE = 10.0

#: Seconds the workers of a stopped run (Ctrl-C, SIGTERM, an error) get to
#: end their task and exit before they are terminated.
STOP_GRACE = 1.0


def _log_ready_error(future):
    """Log (at debug level) why a call of `Executor.ready_workers` failed."""
    if not future.cancelled() and future.exception() is not None:
        logger.debug("readying a worker failed: %s", future.exception())


def _shutdown_pool(pool, grace=SHUTDOWN_GRACE):
    """Shut a pool down, give its workers ``grace`` seconds to exit, then
    terminate those still alive.

    A broken pool (a worker died) is shut down with ``grace=0``: it
    terminates its other workers itself from its manager thread, but a
    worker it started while it was breaking can miss that and wait for
    tasks for ever (a test run once hung that way). A worker killed while
    it held the lock of the pool's task queue (a SIGKILL as a run ends,
    before the pool noticed) leaves the others blocked on that lock for
    ever: ``shutdown(wait=True)`` would wait for them for ever, and so would
    the interpreter's exit, which joins every pool's workers.

    A stop asked for again meanwhile (a second Ctrl-C or SIGTERM,
    `cutana._stop.hurried`) ends the grace at once.
    """
    procs = list((getattr(pool, "_processes", None) or {}).values())
    thread = getattr(pool, "_executor_manager_thread", None)  # shutdown forgets it
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            while proc.is_alive() and not _stop_hurried():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                proc.join(min(left, 0.05))
            if proc.is_alive():
                logger.debug("worker %s did not exit; terminating it", proc.pid)
                proc.terminate()
        except (OSError, ValueError, AttributeError):  # already gone or closed
            continue
    # the pool's thread then frees its queues (and their semaphores)
    if thread is not None:
        thread.join(2.0)


class MemorySampler:
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

    Used as a context manager it samples the calling process's own tree,
    with one last sample taken on exit.

    Examples
    --------
    >>> from cutana.executor import MemorySampler
    >>> with MemorySampler(interval=0.01) as sampler:
    ...     buffer = bytearray(10**6)
    >>> sampler.peak > 0, len(sampler.samples) >= 1
    (True, True)
    """

    def __init__(self, interval=0.1, is_worker=None):
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
        self._root = None
        self._t0 = None

    def start(self, pid=None, t0=None):
        """Start sampling the tree rooted at ``pid``.

        Parameters
        ----------
        pid : int, optional
            Process id of the root of the tree (default: this process).
        t0 : float, optional
            `time.perf_counter` value that sample times are relative to
            (default: now).
        """
        import psutil

        t0 = time.perf_counter() if t0 is None else t0
        self._t0 = t0
        try:
            self._root = psutil.Process(os.getpid() if pid is None else int(pid))
        except psutil.Error:
            self._root = None
        self._thread = threading.Thread(
            target=self._run,
            args=(t0,),
            name="cutana-memory",
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
        return sum(MemorySampler._tree(root).values())

    @staticmethod
    def _tree(root):
        """Resident bytes of ``root`` and each live descendant, by pid."""
        fast = _proc_tree(root.pid)
        if fast is not None:
            return fast
        import psutil

        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return {}
        rss = {}
        for proc in procs:
            try:
                rss[proc.pid] = proc.memory_info().rss
            except psutil.Error:
                continue
        return rss

    def sample(self, exclude=()):
        """Take one sample of the tree now (after `start`).

        Parameters
        ----------
        exclude : collection of int, optional
            Process ids whose memory the returned bytes leave out (the
            sample, and ``peak``, still count them).

        Returns
        -------
        rss : int
            Summed resident bytes of the tree, less those of ``exclude``.
        """
        if self._root is None:
            return 0
        tree = self._tree(self._root)
        rss = sum(tree.values())
        self.peak = max(self.peak, rss)
        return rss - sum(tree.get(pid, 0) for pid in exclude)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        rss = self.sample()
        if rss:
            self.samples.append((time.perf_counter() - self._t0, rss))
        return False

    def _run(self, t0):
        root = self._root
        if root is None:
            return
        while True:  # at least one sample, however soon `stop` is called
            tree = self._tree(root)
            rss = sum(tree.values())
            if rss:
                self.samples.append((time.perf_counter() - t0, rss))
                self.peak = max(self.peak, rss)
            if self._is_worker is not None:
                descendants = [pid for pid in tree if pid != root.pid]
                self.max_workers = max(
                    self.max_workers, self._count_workers(descendants)
                )
            if self._stop.wait(self.interval):
                break

    def _count_workers(self, pids):
        """How many of the processes ``pids`` are (or were seen to be) workers."""
        import psutil

        n = 0
        for pid in pids:
            try:
                if pid in self._workers or self._is_worker(psutil.Process(pid)):
                    self._workers.add(pid)
                    n += 1
            except psutil.Error:
                continue
        return n


class Executor:
    """Run tasks on a backend with bounded concurrency and memory.

    Parameters
    ----------
    backend : {'serial', 'processes', 'dask'}, optional
        Where tasks run.
    n_workers : int, optional
        Tasks that may run at once (worker processes).
    memory_budget : int, optional
        Bytes that the tasks in flight may use together (as estimated by
        the ``cost`` callable of `run`); `None` for no limit. A task is
        always admitted when nothing else runs.
    retries : int, optional
        How many times a failed task is run again before it is reported.
    scheduler : str, optional
        Address of a Dask scheduler (``dask`` backend).
    client : `distributed.Client`, optional
        An existing Dask client (``dask`` backend).
    initializer : callable, optional
        Called once in every worker process before its first task.
    preload : list of str, optional
        Modules the ``forkserver`` imports once, so that every worker starts
        with them already loaded (``processes`` backend).

    Raises
    ------
    ValueError
        For an unknown backend or a worker count that is not positive.

    Examples
    --------
    Results come back through the ``on_done`` callback; `run` returns the
    tasks that failed:

    >>> from cutana._testing import square
    >>> from cutana.executor import Executor
    >>> results = {}
    >>> executor = Executor(backend="serial")
    >>> def collect(task, result):
    ...     results[task] = result
    >>> failures = executor.run(square, [1, 2, 3], on_done=collect)
    >>> results, failures
    ({1: 1, 2: 4, 3: 9}, [])
    """

    def __init__(
        self,
        backend="serial",
        n_workers=1,
        *,
        memory_budget=None,
        retries=1,
        scheduler=None,
        client=None,
        initializer=None,
        preload=None,
    ):
        if backend not in BACKENDS:
            msg = f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
            raise ValueError(msg)
        if not isinstance(n_workers, int) or n_workers < 1:
            msg = f"n_workers must be a positive integer, got {n_workers!r}"
            raise ValueError(msg)
        if not isinstance(retries, int) or retries < 0:
            msg = f"retries must be a non-negative integer, got {retries!r}"
            raise ValueError(msg)
        self.backend = backend
        self.n_workers = n_workers
        self.memory_budget = memory_budget
        self.retries = retries
        self.scheduler = scheduler
        self.client = client
        self.initializer = initializer
        self.preload = list(preload or [])
        self._warming = None  # thread creating the pool of `warm_up`
        self._warm_pool = None
        self._ready = None  # (func, args) of `ready_workers`, once asked
        self._ready_lock = threading.Lock()

    # ------------------------------------------------------------------
    def run(self, func, tasks, *, cost=None, on_done=None, on_failed=None):
        """Run ``func`` over ``tasks`` and hand results to the callbacks.

        Parameters
        ----------
        func : callable
            A picklable module-level function ``func(task) -> result``. With
            the ``serial`` backend it may return a `concurrent.futures.Future`
            of the result instead: the next task runs while it completes (an
            error it raises counts as the task's).
        tasks : iterable
            Picklable tasks, submitted in order.
        cost : callable, optional
            ``cost(task) -> bytes`` estimated for the memory budget.
        on_done : callable, optional
            ``on_done(task, result)`` in the main process; may return an
            iterable of new tasks to run.
        on_failed : callable, optional
            ``on_failed(failure: TaskFailure)`` after the last attempt; may
            return new tasks.

        Returns
        -------
        failures : list of `TaskFailure`
            The tasks that failed after all attempts.
        """
        cost = cost or (lambda task: 0)
        on_done = on_done or (lambda task, result: None)
        failures = []

        def failed(pending):
            failure = TaskFailure(pending.task, pending.errors[-1], pending.attempts)
            failures.append(failure)
            logger.warning(
                "task failed after %d attempt(s): %s", failure.attempts, failure.error
            )
            return (on_failed(failure) if on_failed else None) or ()

        queue = deque(_Pending(t) for t in tasks)
        if self.backend == "serial":
            self._run_serial(func, queue, on_done, failed)
        elif self.backend == "processes":
            self._run_processes(func, queue, cost, on_done, failed)
        else:
            self._run_dask(func, queue, on_done, failed)
        return failures

    # ------------------------------------------------------------------
    def _run_serial(self, func, queue, on_done, failed):
        if self.initializer is not None:
            self.initializer()
        if _RETURNING[0]:  # (the ``cutana`` command's main process) now cuts
            keep_freed_memory()
        # objects that exist now (modules, the catalogue) outlive the run:
        # the collector skips them until it ends (nothing is leaked)
        gc.freeze()
        try:
            self._serial_loop(func, queue, on_done, failed)
        finally:
            gc.unfreeze()

    def _serial_loop(self, func, queue, on_done, failed):
        # a result that is a Future is completed (by a thread of func's)
        # while the next task runs here, and handed on after it: in order,
        # one behind
        behind = None  # (pending, future)
        outcome = None
        try:
            while queue or behind is not None:
                _raise_lost_stop()  # a stop whose exception got lost (see cutana._stop)
                if not queue:
                    self._hand_on(func, *behind, queue, on_done, failed)
                    behind = None
                    continue
                pending = queue.popleft()
                pending.attempts += 1
                outcome = None
                try:
                    outcome = func(pending.task)
                except Exception as exc:  # noqa: BLE001 - handed on below, in order
                    outcome = _Raised(exc)
                if behind is not None:
                    self._hand_on(func, *behind, queue, on_done, failed)
                    behind = None
                if isinstance(outcome, Future):
                    behind = (pending, outcome)
                else:
                    self._hand_on(func, pending, outcome, queue, on_done, failed)
        except BaseException:
            # (an error or a stop): what is still being completed ends first,
            # and a task completed behind is recorded, so that a resumed run
            # does not cut it again (its chunks are written by then)
            wait([f for f in (outcome, behind and behind[1]) if isinstance(f, Future)])
            if behind is not None and not behind[0].handed:
                _record_completed(*behind, on_done)
            raise

    def _hand_on(self, func, pending, outcome, queue, on_done, failed):
        """Hand a serial task's result (``outcome``: a value, a `Future` or
        `_Raised`) to ``on_done``; after an error, run it again (waiting for
        its result) or report it."""
        while True:
            try:
                if isinstance(outcome, _Raised):
                    raise outcome.error
                result = outcome.result() if isinstance(outcome, Future) else outcome
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - recorded and retried
                stop = _stop_behind(exc)
                if stop is not None:
                    raise stop from None
                pending.errors.append(_describe(exc))
                if pending.attempts <= self.retries:
                    pending.attempts += 1
                    try:
                        outcome = func(pending.task)
                    except Exception as again:  # noqa: BLE001 - as above
                        outcome = _Raised(again)
                    continue
                queue.extend(_Pending(t) for t in failed(pending))
                return
            pending.handed = True
            queue.extend(_Pending(t) for t in (on_done(pending.task, result) or ()))
            return

    # ------------------------------------------------------------------
    def _new_pool(self):
        ctx = multiprocessing.get_context(
            "forkserver" if os.name == "posix" else "spawn"
        )
        if os.name == "posix":  # (started with cutana's import path; see there)
            start_forkserver(self.preload)
        return ProcessPoolExecutor(
            max_workers=self.n_workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(os.getpid(), _create_time(os.getpid()), self.initializer),
        )

    def warm_up(self):
        """Start the worker processes now, without waiting for them.

        With the ``processes`` backend, starting workers (and importing the
        preloaded modules) takes about a second; calling this before
        preparing the tasks lets that happen while the caller works: the
        pool is created in a background thread (creating it waits until the
        ``forkserver`` has imported its modules), and `run` takes it over.
        Other backends ignore it.
        """
        if self.backend != "processes" or self._warming is not None:
            return
        if self.preload and os.name == "posix":
            start_forkserver(self.preload)  # here: it sets the environment

        def start():
            try:
                pool = self._new_pool()
                for _ in range(self.n_workers):
                    pool.submit(os.getpid)
            except Exception as exc:  # noqa: BLE001 - `run` makes its own pool then
                # (e.g. the worker server killed by a SIGTERM to the group)
                logger.debug("warming up the workers failed: %s", exc)
                return
            with self._ready_lock:
                self._warm_pool = pool
                ready = self._ready
            if ready is not None:  # asked for before the pool was there
                self._submit_ready(pool, ready)

        self._warming = threading.Thread(
            target=start, name="cutana-warm-up", daemon=True
        )
        self._warming.start()

    def ready_workers(self, func, *args):
        """Have each worker `warm_up` starts call ``func(*args)`` before its
        first task, without waiting for it: to make ready what the tasks
        will need (their buffers, say) while the caller prepares them.

        Best effort: other backends, and a run without warmed-up workers,
        ignore it; a call that fails is only logged (the tasks then do
        without). Two calls may reach the same worker, so ``func`` should
        do nothing the second time.

        Parameters
        ----------
        func : callable
            A picklable function, run in the workers.
        *args
            Its picklable arguments.
        """
        if self.backend != "processes":
            return
        with self._ready_lock:
            self._ready = (func, args)
            pool = self._warm_pool
        if pool is not None:  # else the thread of `warm_up` submits it
            self._submit_ready(pool, self._ready)

    def _submit_ready(self, pool, ready):
        func, args = ready
        try:
            for _ in range(self.n_workers):
                pool.submit(func, *args).add_done_callback(_log_ready_error)
        except Exception as exc:  # noqa: BLE001 - best effort (a broken pool)
            logger.debug("readying the workers failed: %s", exc)

    def worker_pids(self):
        """Process ids of the workers `warm_up` has started so far.

        Returns
        -------
        pids : set of int
            Empty for the other backends, or before the workers exist.
        """
        pool = self._warm_pool
        if pool is None:
            return set()
        return set(getattr(pool, "_processes", None) or ())

    def _take_warm_pool(self):
        """The pool started by `warm_up` (once it exists), or `None`."""
        warming = self._warming
        if warming is None:
            return None
        if warming.ident is not None:  # (a Ctrl-C can stop it from starting)
            warming.join()
        self._warming = None
        pool, self._warm_pool = self._warm_pool, None
        return pool

    def resize(self, n_workers):
        """Run with ``n_workers`` workers from now on.

        For a plan that holds fewer workers than were asked for (see
        `cutana.planner.make_plan`): workers `warm_up` started for another
        count are stopped first, and `run` starts its own.

        Parameters
        ----------
        n_workers : int
            A positive number of workers.

        Examples
        --------
        >>> from cutana.executor import Executor
        >>> executor = Executor("processes", 2)
        >>> executor.resize(1)
        >>> executor.n_workers
        1
        """
        if not isinstance(n_workers, int) or n_workers < 1:
            msg = f"n_workers must be a positive integer, got {n_workers!r}"
            raise ValueError(msg)
        if n_workers != self.n_workers:
            self.close()
            self.n_workers = n_workers

    def close(self):
        """Stop worker processes started by `warm_up` and never used."""
        pool = self._take_warm_pool()
        if pool is not None:
            _shutdown_pool(pool)

    def _run_processes(self, func, queue, cost, on_done, failed):
        # When a worker dies, every task in flight fails with BrokenProcessPool
        # and nobody can tell which one killed it. Those tasks are not charged
        # an attempt; they are run again one at a time ("solo"), so that a task
        # that kills its worker again is identified and charged, and innocent
        # bystanders succeed.
        pool = self._take_warm_pool() or self._new_pool()
        in_flight = {}  # future -> _Pending
        used = 0
        stopped = True  # until the loop ends normally
        try:
            _check_workers_start(pool, self.n_workers)
            while queue or in_flight:
                # one task per worker, and QUEUED_TASKS more waiting in the pool
                while queue and len(in_flight) < self.n_workers + QUEUED_TASKS:
                    head = queue[0]
                    if in_flight and (
                        head.solo or any(p.solo for p in in_flight.values())
                    ):
                        break
                    c = cost(head.task)
                    if (
                        in_flight
                        and self.memory_budget is not None
                        and used + c > self.memory_budget
                    ):
                        break
                    try:
                        fut = pool.submit(func, head.task)
                    except BrokenProcessPool:
                        # a worker died while idle; the task never started.
                        # Leave it queued: the check below replaces the pool.
                        break
                    pending = queue.popleft()
                    pending.attempts += 1
                    fut.cutana_cost = c
                    in_flight[fut] = pending
                    used += c
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                _raise_lost_stop()  # a stop whose exception got lost (see cutana._stop)
                broken = []
                for fut in done:
                    pending = in_flight.pop(fut)
                    used -= fut.cutana_cost
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        broken.append(pending)
                        continue
                    except (MemoryError, KeyboardInterrupt):
                        raise
                    except Exception as exc:  # noqa: BLE001 - recorded and retried
                        pending.errors.append(_describe(exc))
                        self._retry_or_fail(pending, queue, failed)
                        continue
                    queue.extend(
                        _Pending(t) for t in (on_done(pending.task, result) or ())
                    )
                if broken or _is_broken(pool):
                    victims = broken + list(in_flight.values())
                    in_flight.clear()
                    used = 0
                    _shutdown_pool(pool, grace=0.0)
                    logger.warning("a worker process died; starting a new pool")
                    pool = self._new_pool()
                    reason = (
                        "worker process died (killed by the operating system "
                        "or crashed)"
                    )
                    if len(victims) == 1:
                        victim = victims[0]
                        victim.errors.append(reason)
                        victim.solo = True
                        self._retry_or_fail(victim, queue, failed)
                    else:
                        for victim in reversed(victims):
                            victim.attempts -= 1  # not charged: culprit unknown
                            victim.solo = True
                            queue.appendleft(victim)
            stopped = False
        finally:
            # A run stopped by an exception (Ctrl-C, SIGTERM, a full disk)
            # does not wait long for the tasks in flight: their work is not
            # recorded, and a worker stopped mid-task leaves nothing that
            # --resume would take for done. A worker that ends its task
            # within STOP_GRACE exits by itself, releasing what it holds.
            if _is_broken(pool):
                grace = 0.0
            else:
                grace = STOP_GRACE if stopped else SHUTDOWN_GRACE
            _shutdown_pool(pool, grace=grace)

    def _retry_or_fail(self, pending, queue, failed):
        if pending.attempts <= self.retries:
            queue.appendleft(pending)
        else:
            queue.extend(_Pending(t) for t in failed(pending))

    # ------------------------------------------------------------------
    def _run_dask(self, func, queue, on_done, failed):
        try:
            from distributed import Client, LocalCluster, as_completed
        except ImportError as exc:  # pragma: no cover - optional dependency
            msg = "the dask backend needs dask[distributed]: pip install 'cutana[dask]'"
            raise ImportError(msg) from exc
        own_client = self.client is None
        cluster = None
        client = self.client
        if client is None:
            if self.scheduler:
                client = Client(self.scheduler)
            else:
                cluster = LocalCluster(
                    n_workers=self.n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                )
                client = Client(cluster)
        if self.initializer is not None:
            client.run(self.initializer)
        try:
            pending_of = {}
            ac = as_completed()
            limit = max(
                self.n_workers, len(client.scheduler_info().get("workers", {})) or 1
            )

            def submit_some():
                while queue and len(pending_of) < 2 * limit:
                    pending = queue.popleft()
                    pending.attempts += 1
                    fut = client.submit(func, pending.task, pure=False)
                    pending_of[fut.key] = pending
                    ac.add(fut)

            submit_some()
            while pending_of:
                fut = next(ac)
                _raise_lost_stop()  # a stop whose exception got lost (see cutana._stop)
                pending = pending_of.pop(fut.key)
                try:
                    result = fut.result()
                except (MemoryError, KeyboardInterrupt):
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded and retried
                    pending.errors.append(_describe(exc))
                    self._retry_or_fail(pending, queue, failed)
                else:
                    queue.extend(
                        _Pending(t) for t in (on_done(pending.task, result) or ())
                    )
                fut.release()
                submit_some()
        finally:
            if own_client:
                client.close()
                if cluster is not None:
                    cluster.close()
