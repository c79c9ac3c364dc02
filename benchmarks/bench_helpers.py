# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Shared helpers of the cutana benchmark scripts.

These are scripts, not tests: they time cutana and the astropy baseline in
the same run, on the same data, and print Markdown tables.
"""

import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

__all__ = [
    "format_rate",
    "make_tile",
    "markdown_table",
    "print_environment",
    "time_best",
]


def time_best(func, *, repeat=5, number=1, setup=None):
    """Return the best wall-clock time of ``func()`` over ``repeat`` runs.

    Parameters
    ----------
    func : callable
        The code to time; its return value is dropped (and garbage
        collected) outside the timed region.
    repeat : int, optional
        Number of timed runs; the minimum is returned, as `timeit` advises,
        because the other runs are slowed down by unrelated activity.
    number : int, optional
        Calls of ``func`` per run; the time returned is per call.
    setup : callable, optional
        Called before each run, outside the timed region.

    Returns
    -------
    best : float
        Seconds per call of the fastest run.
    """
    best = float("inf")
    for _ in range(repeat):
        if setup is not None:
            setup()
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(number):
                result = func()
            elapsed = (time.perf_counter() - t0) / number
        finally:
            gc.enable()
        del result
        best = min(best, elapsed)
    return best


def make_tile(path, size=8000, *, dtype=">f4", seed=0, wcs_header=None):
    """Write a synthetic square FITS tile (if not already there) and return its path.

    Parameters
    ----------
    path : str or `~pathlib.Path`
        Where to write the FITS file.
    size : int, optional
        Number of pixels per side.
    dtype : str, optional
        On-disk dtype; FITS stores big-endian data, so this should be
        big-endian (the default is big-endian float32, ``BITPIX = -32``).
    seed : int, optional
        Seed of the random pixel values.
    wcs_header : `~astropy.io.fits.Header`, optional
        WCS keywords to put in the header.

    Returns
    -------
    path : `~pathlib.Path`
        The path of the tile.
    """
    from astropy.io import fits

    path = Path(path)
    if path.exists():
        with fits.open(path, memmap=True) as hdul:
            if hdul[0].data is not None and hdul[0].data.shape == (size, size):
                return path
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    # the header of an image of this shape (np.empty touches no memory)
    header = fits.PrimaryHDU(
        np.empty((size, size), dtype=dtype.newbyteorder("=")), header=wcs_header
    ).header
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    stream = fits.StreamingHDU(tmp, header)
    step = max(1, (32 << 20) // (size * dtype.itemsize))
    for y in range(0, size, step):
        block = rng.standard_normal((min(step, size - y), size), dtype=np.float32)
        stream.write(block.astype(dtype))
    stream.close()
    os.replace(tmp, path)
    return path


def print_environment(file=None):
    """Print the versions, CPU and memory settings that the timings depend on.

    Parameters
    ----------
    file : file-like, optional
        Where to print (default `sys.stdout`).
    """
    import astropy

    import cutana

    file = sys.stdout if file is None else file
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    thp = "n/a"
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "n/a"
    rows = [
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("cpu", f"{cpu} ({os.cpu_count()} logical cores)"),
        ("load average", load),
        ("transparent huge pages", thp),
        ("numpy", np.__version__),
        ("astropy", astropy.__version__),
        ("cutana", cutana.__version__),
    ]
    print(markdown_table(["item", "value"], rows), file=file)


def format_rate(value, unit):
    """Format a rate with an SI prefix, e.g. ``1.23 M cutouts/s``.

    Parameters
    ----------
    value : float
        The rate.
    unit : str
        The unit after the prefix.

    Returns
    -------
    text : str
        The formatted rate.
    """
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def markdown_table(header, rows):
    """Return a Markdown table.

    Parameters
    ----------
    header : list of str
        Column titles.
    rows : list of sequence
        The rows; cells are converted with `str`.

    Returns
    -------
    table : str
        The table, one line per row.
    """
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)
