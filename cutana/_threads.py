# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Thread counts, chunked thread runs and output arrays for the nogil kernels.

One place for the rules every batch function follows: ``n_threads`` is a
positive integer, or `None` for "one thread for small batches, every
available core above `THREADS_ABOVE_BYTES`"; work is split into contiguous,
nearly equal chunks, one per thread, and results never depend on the split;
an ``out`` array given by the caller is C-contiguous, of the output's shape
and dtype.
"""

import numbers
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = [
    "THREADS_ABOVE_BYTES",
    "available_cores",
    "output_array",
    "resolve_n_threads",
    "run_chunks",
]

#: Output size above which `None` threads means every available core.
THREADS_ABOVE_BYTES = 64 * 10**6


def available_cores():
    """Number of cores this process may run on.

    Returns
    -------
    n : int
        At least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_n_threads(n_threads, nbytes=None):
    """Validate ``n_threads``, choosing a count when it is `None`.

    Parameters
    ----------
    n_threads : int or None
        Requested threads.
    nbytes : int, optional
        Size of the work's output, for the `None` rule; without it `None`
        is not accepted (for functions whose thread count is explicit).

    Returns
    -------
    n_threads : int
        A positive thread count.

    Raises
    ------
    ValueError
        If ``n_threads`` is not a positive integer (or `None` with ``nbytes``).
    """
    if n_threads is None and nbytes is not None:
        return available_cores() if nbytes > THREADS_ABOVE_BYTES else 1
    if (
        isinstance(n_threads, bool)
        or not isinstance(n_threads, numbers.Integral)
        or n_threads < 1
    ):
        msg = f"n_threads must be a positive integer, got {n_threads!r}"
        raise ValueError(msg)
    return int(n_threads)


def run_chunks(func, n, n_threads):
    """Run ``func(lo, hi)`` over contiguous chunks of ``range(n)``, one per thread.

    With one chunk, ``func`` runs in the calling thread.

    Parameters
    ----------
    func : callable
        ``func(lo, hi)``; may release the GIL.
    n : int
        Number of items.
    n_threads : int
        Threads (at most ``n`` are used).

    Returns
    -------
    results : list
        ``func``'s results, in chunk order.
    """
    n_chunks = max(1, min(int(n_threads), n))
    if n_chunks == 1:
        return [func(0, n)]
    bounds = [n * k // n_chunks for k in range(n_chunks + 1)]
    with ThreadPoolExecutor(n_chunks) as pool:
        return list(pool.map(func, bounds[:-1], bounds[1:]))


def output_array(out, shape, dtype):
    """The caller's ``out`` array, checked, or a new one.

    Parameters
    ----------
    out : `~numpy.ndarray` or None
        The caller's output array, if any.
    shape : tuple of int
        The output's shape.
    dtype : `~numpy.dtype`
        The output's (native) dtype.

    Returns
    -------
    out : `~numpy.ndarray`
        ``out``, or a new uninitialised array.

    Raises
    ------
    ValueError
        If ``out`` is not a C-contiguous array of that shape and dtype.
    """
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        msg = (
            f"out must be a C-contiguous {dtype.name} array of shape {shape}, "
            f"got {out.dtype} {out.shape}"
        )
        raise ValueError(msg)
    return out
