# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Small picklable task functions for testing the executor and fault drills,
and helpers the test modules share.

They live in the package (not in ``tests/``) so that worker processes
started by the executor can import them by name.
"""

import os
import time

__all__ = [
    "die_once",
    "fail_always",
    "fail_once",
    "files_bytes",
    "page_faults_of_reused_blocks",
    "readied",
    "ready",
    "record_concurrency",
    "square",
]

#: What `ready` was called with in this process, in order.
_READIED = []


def square(x):
    """Return ``x * x``.

    Parameters
    ----------
    x : int
        A number.

    Returns
    -------
    y : int
        Its square.
    """
    return x * x


def ready(value):
    """Record ``value`` as readied in this process (see `readied`).

    Parameters
    ----------
    value : object
        Anything picklable.
    """
    _READIED.append(value)


def readied(task):
    """This process's id and what `ready` recorded in it so far.

    Parameters
    ----------
    task : object
        Anything (ignored).

    Returns
    -------
    result : tuple
        ``(pid, values)``.
    """
    return os.getpid(), list(_READIED)


def fail_always(task):
    """Raise `RuntimeError` naming the task.

    Parameters
    ----------
    task : object
        Anything.

    Raises
    ------
    RuntimeError
        Always.
    """
    msg = f"task {task!r} always fails"
    raise RuntimeError(msg)


def _first_time(marker):
    """True the first time ``marker`` is seen (the file is then created)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def fail_once(task):
    """Raise on the first call for ``task = (marker_path, value)``, then return value.

    Parameters
    ----------
    task : tuple
        ``(marker_path, value)``.

    Returns
    -------
    value : object
        The task's value, from the second call on.

    Raises
    ------
    RuntimeError
        On the first call.
    """
    marker, value = task
    if _first_time(marker):
        msg = f"first attempt of {value!r} fails"
        raise RuntimeError(msg)
    return value


def die_once(task):
    """Kill the worker process on the first call for ``(marker_path, value)``.

    Parameters
    ----------
    task : tuple
        ``(marker_path, value)``; with ``marker_path`` `None` the worker is
        killed on every call.

    Returns
    -------
    value : object
        The task's value, from the second call on.
    """
    marker, value = task
    if marker is None or _first_time(marker):
        os._exit(17)
    return value


def record_concurrency(task):
    """Record how many tasks run at once, via files in a folder.

    Parameters
    ----------
    task : tuple
        ``(folder, name, seconds)``: a file ``name`` exists in ``folder``
        while the task runs.

    Returns
    -------
    n : int
        Number of tasks running (files present) when this one started.
    """
    folder, name, seconds = task
    path = os.path.join(folder, name)
    with open(path, "w"):
        pass
    n = len(os.listdir(folder))
    time.sleep(seconds)
    os.remove(path)
    return n


def page_faults_of_reused_blocks(task):
    """Minor page faults while a process allocates and frees a few large blocks.

    Three blocks of ``nbytes`` are allocated, written and freed ``rounds``
    times after one round to warm up, as a worker does with the compressed
    chunks of each task. A process whose ``malloc`` reuses freed memory
    faults (almost) never; one that hands it back to the system faults on
    every page of every round.

    Parameters
    ----------
    task : tuple
        ``(nbytes, rounds)``.

    Returns
    -------
    faults : int
        Minor page faults of the timed rounds (``resource.getrusage``).
    """
    import resource

    nbytes, rounds = task

    def one_round():
        blocks = [bytearray(nbytes) for _ in range(3)]  # zero-filled: written
        del blocks

    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def files_bytes(root):
    """Every file below ``root``, as ``{relative path: bytes}``.

    For comparing two outputs byte for byte.

    Parameters
    ----------
    root : str or path-like
        A folder.

    Returns
    -------
    files : dict
        Relative path to the file's contents.
    """
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out
