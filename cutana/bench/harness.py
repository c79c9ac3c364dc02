# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The benchmark harness behind ``cutana bench``: cutana against Astropy and ESA Cutana.

For each named scenario the harness writes a synthetic Euclid-like survey
(`cutana.bench.synthetic.make_survey`: big-endian float32 tiles, TAN WCS at
0.1"/pixel, ``MAGZERO``) and runs the same work with three tools, one after
the other, on the same files:

``astropy``
    The baseline an astronomer writes today (`astropy_baseline`): for each
    source and band, `astropy.nddata.Cutout2D` with ``mode='partial'`` from
    the memory-mapped tile at a `~astropy.coordinates.SkyCoord` through the
    tile's WCS, flux conversion by the ``MAGZERO`` zero point, bilinear
    resampling to the target size with `scipy.ndimage.map_coordinates`
    (``order=1``, pixel centres aligned), a
    `~astropy.visualization.LinearStretch` between the limits of
    `~astropy.visualization.PercentileInterval`, rounding to uint8, and
    writing to a Zarr array in catalogue order. It runs in a fresh Python
    process; when it is slow it is timed on the first catalogue rows only
    and the time is extrapolated per cutout (the table says so).
``cutana``
    ``python -m cutana.cli run`` in a fresh process, once per worker count
    (backend ``serial`` for one worker, ``processes`` for more), with
    ``--normalize linear``.
``esa-cutana``
    ESA Cutana 0.4.0 in its own environment (`cutana.bench.esa`), when an
    interpreter is given, with its plain conversion to uint8 (no stretch).

Every run is a whole run timed from outside, from just before its process
starts until it has exited (interpreter start-up, imports, catalogue
reading, worker start-up and output writing included), while the resident
memory of its whole process tree is sampled every 0.1 s. Throughput is
catalogue sources per second (each with all its bands). Results go to
``results.json``, ``results.md`` (a Markdown table) and PNG plots
(`cutana.bench.plots`).

The scenarios follow the ESA Cutana paper: one tile in four bands with many
sources, eight tiles in four bands with few sources each, four tiles in one
band with many sources, and the paper's workload (50,000 sources of
32-128 pixels on one 8000 x 8000 tile, one band); all resample to 150 x 150
pixels, bilinear, with flux conversion, to uint8 Zarr. ``--quick`` scales
them down to run in a few minutes on a two-core machine.
"""

import argparse
import ast
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._process import ProcessTreeSampler, last_json_record
from ._process import run_timed as _run_timed

__all__ = [
    "SCENARIOS",
    "WORKLOAD",
    "ProcessTreeSampler",
    "Scenario",
    "astropy_baseline",
    "build_parser",
    "compare_outputs",
    "environment",
    "main",
    "results_table",
    "run_astropy",
    "run_benchmark",
    "run_cutana",
]

logger = logging.getLogger(__name__)

#: Version of the layout of ``results.json``.
RESULTS_VERSION = 1

#: Settings shared by every scenario (those of the ESA Cutana paper).
WORKLOAD = {
    "target_size": 150,
    "resample": "bilinear",
    "flux_conversion": True,
    "zeropoint_keyword": "MAGZERO",
    "dtype": "uint8",
    "format": "zarr",
    "cutana_normalize": "linear",
    "astropy_normalize": "linear",
    "esa_normalize": "none",
    "percentile": 99.8,
}

_TOOLS = ("astropy", "cutana", "esa-cutana")
_EUCLID_BANDS = ("VIS", "NIR-Y", "NIR-J", "NIR-H")
_SAMPLE_INTERVAL = 0.1
_CHUNK_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    """A named benchmark workload: a synthetic survey and its catalogue.

    Attributes
    ----------
    name : str
        Name used by ``--scenario``.
    description : str
        One line for the table.
    n_tiles : int
        Number of sky tiles.
    bands : tuple of str
        Band names (one FITS file per tile and band).
    tile_size : int
        Tile side in pixels (full size).
    n_sources : int
        Catalogue rows (full size).
    quick_tile_size : int
        Tile side with ``--quick``.
    quick_n_sources : int
        Catalogue rows with ``--quick``.
    size_range : tuple of int
        Inclusive range of the cutout diameters in pixels.
    edge_fraction : float
        Fraction of sources whose cutout overlaps the mosaic edge.
    astropy_subset : int
        Sources the Astropy baseline is timed on (full size; all if larger
        than the catalogue).
    quick_astropy_subset : int
        The same with ``--quick``.
    seed : int
        Seed of the synthetic survey.

    Examples
    --------
    >>> from cutana.bench.harness import SCENARIOS, Scenario
    >>> list(SCENARIOS)
    ['one-tile-many', 'eight-tiles-few', 'four-tiles-one-band', 'paper-workload']
    >>> s = SCENARIOS["eight-tiles-few"]
    >>> s.n_tiles, len(s.bands), s.size_range
    (8, 4, (32, 128))
    >>> tiny = Scenario(name="tiny", description="1 tile x 1 band", n_tiles=1,
    ...                 bands=("VIS",), tile_size=512, n_sources=40,
    ...                 quick_tile_size=256, quick_n_sources=10)
    >>> tiny.sizes(), tiny.sizes(quick=True)
    ((512, 40, 40), (256, 10, 10))
    """

    name: str
    description: str
    n_tiles: int
    bands: tuple
    tile_size: int
    n_sources: int
    quick_tile_size: int
    quick_n_sources: int
    size_range: tuple = (32, 128)
    edge_fraction: float = 0.02
    astropy_subset: int = 2000
    quick_astropy_subset: int = 300
    seed: int = 0

    def sizes(self, quick=False, *, tile_size=None, n_sources=None):
        """Tile size, number of sources and Astropy subset of one run.

        Parameters
        ----------
        quick : bool, optional
            Use the ``--quick`` sizes.
        tile_size, n_sources : int, optional
            Overrides of the tile side and the number of sources.

        Returns
        -------
        sizes : tuple of int
            ``(tile_size, n_sources, astropy_subset)``; the subset is at
            most ``n_sources``.

        Examples
        --------
        >>> from cutana.bench.harness import SCENARIOS
        >>> SCENARIOS["paper-workload"].sizes()
        (8000, 50000, 2000)
        >>> SCENARIOS["paper-workload"].sizes(quick=True, n_sources=100)
        (4000, 100, 100)
        """
        tile = self.quick_tile_size if quick else self.tile_size
        n = self.quick_n_sources if quick else self.n_sources
        if tile_size is not None:
            tile = int(tile_size)
        if n_sources is not None:
            n = int(n_sources)
        subset = self.quick_astropy_subset if quick else self.astropy_subset
        return tile, n, min(subset, n)


#: The scenarios of ``cutana bench``, by name, in the order they run.
SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            name="one-tile-many",
            description="1 tile x 4 bands x many sources",
            n_tiles=1,
            bands=_EUCLID_BANDS,
            tile_size=8000,
            n_sources=20000,
            quick_tile_size=2500,
            quick_n_sources=1500,
            quick_astropy_subset=150,
            seed=11,
        ),
        Scenario(
            name="eight-tiles-few",
            description="8 tiles x 4 bands x few sources",
            n_tiles=8,
            bands=_EUCLID_BANDS,
            tile_size=4000,
            n_sources=2000,
            quick_tile_size=1000,
            quick_n_sources=320,
            quick_astropy_subset=100,
            seed=12,
        ),
        Scenario(
            name="four-tiles-one-band",
            description="4 tiles x 1 band x many sources",
            n_tiles=4,
            bands=("VIS",),
            tile_size=8000,
            n_sources=50000,
            quick_tile_size=2000,
            quick_n_sources=4000,
            quick_astropy_subset=300,
            seed=13,
        ),
        Scenario(
            name="paper-workload",
            description="ESA Cutana paper: 1 tile x 1 band, 32-128 px",
            n_tiles=1,
            bands=("VIS",),
            tile_size=8000,
            n_sources=50000,
            quick_tile_size=4000,
            quick_n_sources=8000,
            edge_fraction=0.0,
            quick_astropy_subset=300,
            seed=14,
        ),
    )
}


def _child_env():
    """Environment of child processes: this cutana first on the module path.

    Its modules are byte-compiled first, as ``pip install`` does: where
    ``PYTHONDONTWRITEBYTECODE`` is set (as on this project's machines), a
    source tree would otherwise be compiled again by every process of every
    timed run (0.07 s in the main process of a paper-workload run for the
    eight modules changed since their last compilation, and as much in the
    worker server).
    """
    import compileall

    import cutana

    env = dict(os.environ)
    package = Path(cutana.__file__).resolve().parent
    compileall.compile_dir(str(package), quiet=1)  # only what is out of date
    root = str(package.parent)
    parts = [root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


# ----------------------------------------------------------------------------
# the Astropy baseline
# ----------------------------------------------------------------------------


def _read_rows(catalogue):
    """SourceID, RA, Dec, diameter and tile files of an ESA Cutana-style catalogue."""
    from astropy.table import Table

    path = str(catalogue)
    fmt = "ascii.csv" if path.endswith(".csv") else None
    table = Table.read(path, format=fmt) if fmt else Table.read(path)
    for name in ("RA", "Dec", "diameter_pixel", "fits_file_paths"):
        if name not in table.colnames:
            msg = (
                f"catalogue {path!r} has no column {name!r} (columns: "
                f"{', '.join(table.colnames)}); the Astropy baseline reads the "
                "ESA Cutana layout written by make_survey"
            )
            raise ValueError(msg)
    files = []
    for value in table["fits_file_paths"]:
        value = (
            value if isinstance(value, (list, tuple)) else ast.literal_eval(str(value))
        )
        files.append([str(v) for v in value])
    return (
        np.asarray(table["RA"], dtype=np.float64),
        np.asarray(table["Dec"], dtype=np.float64),
        np.asarray(table["diameter_pixel"], dtype=np.float64),
        files,
    )


def astropy_baseline(
    catalogue,
    output,
    *,
    target_size=150,
    percentile=99.8,
    zeropoint_keyword="MAGZERO",
    n_sources=None,
):
    """Cut, convert, resample, stretch and write cutouts with Astropy and SciPy.

    This is the reference workload, written the way an astronomer would with
    the standard tools: for each catalogue row, a scalar
    `~astropy.coordinates.SkyCoord`; for each of its band files (opened once,
    memory-mapped, header WCS and zero point read once)
    ``Cutout2D(data, coord, diameter, wcs=wcs, mode='partial',
    fill_value=nan)``; multiplication by ``3631 * 10**(-0.4 * MAGZERO)``
    (Jansky); bilinear resampling with
    ``scipy.ndimage.map_coordinates(order=1, mode='nearest')`` at the input
    coordinates ``(j + 0.5) * n / m - 0.5`` (pixel centres aligned, as
    ``scipy.ndimage.zoom(grid_mode=True)``); limits from
    ``PercentileInterval(percentile)``, ``LinearStretch`` of the clipped
    values, non-finite pixels set to 0, and ``round(255 * value)`` as uint8.
    Blocks of cutouts are written to a Zarr array of shape
    ``(n, C, H, W)`` in catalogue order (zstd-compressed chunks of about
    2 MiB, as cutana writes).

    Parameters
    ----------
    catalogue : str or path-like
        ESA Cutana-style catalogue with ``RA``, ``Dec`` (deg),
        ``diameter_pixel`` and ``fits_file_paths`` (e.g. from
        `~cutana.bench.synthetic.make_survey`).
    output : str or path-like
        Zarr array to write (replaced if it exists).
    target_size : int, optional
        Output side in pixels.
    percentile : float, optional
        Percentage of the pixels kept between the stretch limits.
    zeropoint_keyword : str, optional
        Header keyword of the AB zero point.
    n_sources : int, optional
        Cut only the first ``n_sources`` catalogue rows (all by default).

    Returns
    -------
    result : dict
        ``n_sources`` (catalogue rows), ``n_cutouts`` (rows cut),
        ``n_bands``, ``setup_seconds`` (reading the catalogue),
        ``loop_seconds`` (cutting and writing, files opened on first use),
        ``seconds_per_cutout`` (per catalogue row, all bands).

    Raises
    ------
    ValueError
        If the catalogue lacks a needed column, or a tile lacks the zero
        point.

    Examples
    --------
    >>> from cutana.bench.harness import astropy_baseline
    >>> result = astropy_baseline(
    ...     "survey/catalogue.csv", "astropy.zarr"
    ... )  # doctest: +SKIP
    >>> result["seconds_per_cutout"]  # doctest: +SKIP
    """
    import zarr
    from astropy.coordinates import SkyCoord
    from astropy.io import fits
    from astropy.nddata import Cutout2D
    from astropy.visualization import LinearStretch, PercentileInterval
    from astropy.wcs import WCS
    from scipy.ndimage import map_coordinates
    from zarr.codecs import BloscCodec

    t0 = time.perf_counter()
    ra, dec, diameter, files = _read_rows(catalogue)
    n_total = len(ra)
    n = n_total if n_sources is None else max(0, min(int(n_sources), n_total))
    n_bands = len(files[0]) if n_total else 0
    setup = time.perf_counter() - t0

    t1 = time.perf_counter()
    m = int(target_size)
    row_bytes = n_bands * m * m
    chunk = max(1, min(max(n, 1), _CHUNK_BYTES // max(row_bytes, 1)))
    array = zarr.create_array(
        store=str(output),
        shape=(n, n_bands, m, m),
        chunks=(chunk, n_bands, m, m),
        dtype="uint8",
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
        fill_value=0,
        overwrite=True,
    )
    interval = PercentileInterval(percentile)
    stretch = LinearStretch()
    opened = {}
    grids = {}
    buffer = np.zeros((chunk, n_bands, m, m), dtype=np.uint8)
    try:
        for i in range(n):
            coord = SkyCoord(ra[i], dec[i], unit="deg")
            size = diameter[i]
            for c, path in enumerate(files[i]):
                if path not in opened:
                    hdul = fits.open(path, memmap=True)
                    header = hdul[0].header
                    if zeropoint_keyword not in header:
                        msg = f"{path} has no {zeropoint_keyword!r} keyword"
                        raise ValueError(msg)
                    factor = 3631.0 * 10.0 ** (-0.4 * float(header[zeropoint_keyword]))
                    opened[path] = (hdul, hdul[0].data, WCS(header), factor)
                _, data, wcs, factor = opened[path]
                cut = Cutout2D(
                    data, coord, size, wcs=wcs, mode="partial", fill_value=np.nan
                )
                image = cut.data.astype(np.float64) * factor
                ny, nx = image.shape
                if (ny, nx) not in grids:
                    yy = (np.arange(m) + 0.5) * ny / m - 0.5
                    xx = (np.arange(m) + 0.5) * nx / m - 0.5
                    grids[(ny, nx)] = np.array(np.meshgrid(yy, xx, indexing="ij"))
                resampled = map_coordinates(
                    image, grids[(ny, nx)], order=1, mode="nearest"
                )
                with np.errstate(invalid="ignore"):
                    value = stretch(interval(resampled, clip=True))
                value[~np.isfinite(value)] = 0.0
                buffer[i % chunk, c] = np.round(value * 255.0).astype(np.uint8)
            if (i + 1) % chunk == 0 or i + 1 == n:
                lo = (i // chunk) * chunk
                array[lo : i + 1] = buffer[: i + 1 - lo]
    finally:
        for hdul, *_ in opened.values():
            hdul.close()
    loop = time.perf_counter() - t1
    return {
        "n_sources": n_total,
        "n_cutouts": n,
        "n_bands": n_bands,
        "setup_seconds": setup,
        "loop_seconds": loop,
        "seconds_per_cutout": loop / n if n else math.nan,
    }


def _astropy_main(argv):
    """Entry point of the Astropy baseline's child process (one JSON argument)."""
    spec = json.loads(argv[0])
    t0 = time.perf_counter()
    result = astropy_baseline(
        spec["catalogue"],
        spec["output"],
        target_size=spec["target_size"],
        percentile=spec["percentile"],
        n_sources=spec["n_sources"],
    )
    result["child_seconds"] = time.perf_counter() - t0
    result["tool"] = "astropy"
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def run_astropy(
    catalogue, output, *, n_sources=None, target_size=150, percentile=99.8, timeout=None
):
    """Run `astropy_baseline` in a fresh Python process, timed from outside.

    When only the first ``n_sources`` rows are cut, the whole-run time is
    extrapolated per cutout: the time outside the cutting loop (start-up,
    imports, reading the catalogue) plus the loop's time per source times
    the number of catalogue rows.

    Parameters
    ----------
    catalogue : str or path-like
        The catalogue (see `astropy_baseline`).
    output : str or path-like
        Zarr array written by the baseline.
    n_sources : int, optional
        Rows to cut (all by default).
    target_size : int, optional
        Output side in pixels.
    percentile : float, optional
        Stretch percentile.
    timeout : float, optional
        Seconds after which the process is killed.

    Returns
    -------
    run : dict
        ``tool``, ``workers`` (1), ``seconds`` (whole run, extrapolated
        when a subset was cut), ``measured_seconds`` (the run as timed),
        ``n_sources``, ``n_cutouts`` (rows cut), ``extrapolated``,
        ``cutouts_per_second``, ``peak_memory``, ``memory_samples``,
        ``returncode``, ``error`` (`None` or the reason it failed) and
        ``detail`` (what the child reported).

    Examples
    --------
    >>> from cutana.bench.harness import run_astropy
    >>> run = run_astropy(
    ...     "survey/catalogue.csv", "astropy.zarr", n_sources=200
    ... )  # doctest: +SKIP
    """
    spec = {
        "catalogue": str(Path(catalogue).resolve()),
        "output": str(Path(output).resolve()),
        "target_size": int(target_size),
        "percentile": float(percentile),
        "n_sources": None if n_sources is None else int(n_sources),
    }
    command = [
        sys.executable,
        "-c",
        "import sys; from cutana.bench.harness import _astropy_main; "
        "sys.exit(_astropy_main(sys.argv[1:]))",
        json.dumps(spec),
    ]
    run = _run_timed(
        command,
        env=_child_env(),
        cwd=str(Path(output).resolve().parent),
        timeout=timeout,
    )
    record = last_json_record(run["stdout"], "astropy")
    out = {
        "tool": "astropy",
        "workers": 1,
        "measured_seconds": run["seconds"],
        "peak_memory": run["peak_memory"],
        "memory_samples": run["memory_samples"],
        "returncode": run["returncode"],
        "error": None,
        "detail": record,
    }
    if run["returncode"] != 0 or record is None:
        out.update(
            seconds=run["seconds"],
            n_sources=None,
            n_cutouts=0,
            extrapolated=False,
            cutouts_per_second=math.nan,
            error=(
                "timed out"
                if run["timed_out"]
                else f"exit code {run['returncode']}: {run['stderr'][-2000:]}"
            ),
        )
        return out
    n_total, n_cut = record["n_sources"], record["n_cutouts"]
    fixed = max(0.0, run["seconds"] - record["loop_seconds"])
    extrapolated = n_cut < n_total
    seconds = (
        fixed + record["seconds_per_cutout"] * n_total if n_cut else run["seconds"]
    )
    out.update(
        seconds=seconds,
        n_sources=n_total,
        n_cutouts=n_cut,
        extrapolated=extrapolated,
        cutouts_per_second=n_total / seconds if seconds > 0 else math.nan,
    )
    return out


# ----------------------------------------------------------------------------
# cutana and ESA Cutana
# ----------------------------------------------------------------------------


def run_cutana(
    catalogue,
    output,
    *,
    workers=1,
    backend=None,
    target_size=150,
    normalize="linear",
    dtype="uint8",
    flux_conversion=True,
    extra_args=(),
    timeout=None,
):
    """Run ``python -m cutana.cli run`` in a fresh process, timed from outside.

    Parameters
    ----------
    catalogue : str or path-like
        The catalogue (tiles from its ``fits_file_paths`` column).
    output : str or path-like
        Output Zarr store. One left by an earlier run is removed before the
        timed run, outside the timing, as the ESA Cutana runner does with
        its output (removing the 837 MB paper-workload store took 0.3 s).
    workers : int, optional
        Worker processes.
    backend : {'serial', 'processes'}, optional
        Default: ``'serial'`` for one worker, ``'processes'`` otherwise.
    target_size : int, optional
        Output side in pixels (bilinear resampling).
    normalize : str, optional
        Stretch (``--normalize``).
    dtype : str, optional
        Output dtype.
    flux_conversion : bool, optional
        Convert to Jansky with ``MAGZERO``.
    extra_args : sequence of str, optional
        Further ``cutana run`` options.
    timeout : float, optional
        Seconds after which the process tree is killed.

    Returns
    -------
    run : dict
        ``tool``, ``workers``, ``backend``, ``seconds`` (whole run from
        outside), ``n_sources``, ``n_cutouts`` (sources cut),
        ``cutouts_per_second``, ``peak_memory``, ``memory_samples``,
        ``returncode``, ``error``, ``report`` (cutana's own run report:
        counts per status, inner time and peak memory) and ``command``.

    Raises
    ------
    ValueError
        If ``workers`` is not a positive integer.

    Examples
    --------
    >>> from cutana.bench.harness import run_cutana
    >>> run = run_cutana(
    ...     "survey/catalogue.csv", "cutana.zarr", workers=2
    ... )  # doctest: +SKIP
    """
    if (
        isinstance(workers, bool)
        or not isinstance(workers, (int, np.integer))
        or workers < 1
    ):
        msg = f"workers must be a positive integer, got {workers!r}"
        raise ValueError(msg)
    backend = backend or ("serial" if workers == 1 else "processes")
    output = Path(output).resolve()
    _remove(output)  # not timed, as for ESA Cutana
    report_path = output.parent / f"{output.name}.report.json"
    command = [
        sys.executable, "-m", "cutana.cli", "run", str(Path(catalogue).resolve()),
        "--output", str(output), "--overwrite", "--no-progress",
        "--target-size", str(int(target_size)), "--resample", "bilinear",
        "--normalize", normalize, "--dtype", dtype,
        "--workers", str(int(workers)), "--backend", backend,
        "--report-json", str(report_path),
    ]  # fmt: skip
    if flux_conversion:
        command.append("--flux-conversion")
    command += [str(a) for a in extra_args]
    run = _run_timed(command, env=_child_env(), cwd=str(output.parent), timeout=timeout)
    report = None
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        report_path.unlink()
        report.pop("memory_samples", None)
        messages = report.pop("messages", {}) or {}
        report["n_messages"] = len(messages)
    n_rows = report["n_rows"] if report else None
    counts = report["counts"] if report else {}
    n_cut = counts.get("OK", 0) + counts.get("PARTIAL_OVERLAP", 0)
    error = None
    if run["timed_out"]:
        error = "timed out"
    elif run["returncode"] != 0 or report is None:
        error = f"exit code {run['returncode']}: {run['stderr'][-2000:]}"
    return {
        "tool": "cutana",
        "workers": int(workers),
        "backend": backend,
        "seconds": run["seconds"],
        "n_sources": n_rows,
        "n_cutouts": n_cut,
        "cutouts_per_second": n_cut / run["seconds"]
        if run["seconds"] > 0
        else math.nan,
        "peak_memory": run["peak_memory"],
        "memory_samples": run["memory_samples"],
        "returncode": run["returncode"],
        "error": error,
        "report": report,
        "command": command,
    }


def _run_esa(python, catalogue, output, workers, bands, timeout):
    """ESA Cutana on the scenario's catalogue, as a result row."""
    from .esa import run_esa_cutana

    result = run_esa_cutana(
        python, catalogue, output, workers=workers,
        target_size=WORKLOAD["target_size"], resample=WORKLOAD["resample"],
        flux_conversion=WORKLOAD["flux_conversion"], dtype=WORKLOAD["dtype"],
        output_format=WORKLOAD["format"], normalize=WORKLOAD["esa_normalize"],
        bands=list(bands), overwrite=True, sample_interval=_SAMPLE_INTERVAL,
        timeout=timeout,
    )  # fmt: skip
    driver = result.get("driver") or {}
    error = None
    if result["timed_out"]:
        error = "timed out"
    elif result["returncode"] != 0:
        error = (
            f"exit code {result['returncode']}: "
            f"{driver.get('error') or result['stderr_tail'][-2000:]}"
        )
    elif result["n_sources"] and result["n_cutouts"] != result["n_sources"]:
        error = f"wrote {result['n_cutouts']} of {result['n_sources']} cutouts"
    return {
        "tool": "esa-cutana",
        "workers": int(workers),
        "seconds": result["seconds"],
        "n_sources": result["n_sources"],
        "n_cutouts": result["n_cutouts"],
        "cutouts_per_second": result["cutouts_per_second"],
        "peak_memory": result["peak_memory"],
        "memory_samples": [(round(t, 3), int(b)) for t, b in result["memory_samples"]],
        "returncode": result["returncode"],
        "error": error,
        "max_worker_processes": result["max_worker_processes"],
        "version": driver.get("version"),
        "driver": {k: v for k, v in driver.items() if k != "archives"},
    }


# ----------------------------------------------------------------------------
# agreement of the values
# ----------------------------------------------------------------------------


def compare_outputs(astropy_output, cutana_output, *, statuses=(0,)):
    """Compare the Astropy baseline's cutouts with cutana's, pixel by pixel.

    Parameters
    ----------
    astropy_output : str or path-like
        Zarr array written by `astropy_baseline` (its ``n`` rows are the
        first ``n`` catalogue rows).
    cutana_output : str or path-like
        The cutana Zarr output of the same catalogue.
    statuses : sequence of int, optional
        Compare only rows with these cutana status codes (default: complete
        cutouts; partial ones differ where NaN fill spreads differently).

    Returns
    -------
    agreement : dict
        ``rows`` compared, ``pixels``, ``n_different`` (pixels that
        differ), ``max_abs_diff``,
        ``fraction_equal`` and ``fraction_within_1`` (of the pixels).

    Examples
    --------
    >>> from cutana.bench.harness import compare_outputs
    >>> compare_outputs("astropy.zarr", "cutana.zarr")  # doctest: +SKIP
    """
    import zarr

    from ..io import open_output

    ref = zarr.open_array(str(astropy_output), mode="r")
    out = open_output(str(cutana_output))
    n = ref.shape[0]
    status = np.asarray(out.status[:n])
    keep = np.isin(status, list(statuses))
    if not keep.any():
        return {
            "rows": 0,
            "pixels": 0,
            "n_different": 0,
            "max_abs_diff": None,
            "fraction_equal": None,
            "fraction_within_1": None,
        }
    a = np.asarray(ref[:n])[keep].astype(np.int16)
    b = np.asarray(out.images[:n])[keep].astype(np.int16)
    diff = np.abs(a - b)
    return {
        "rows": int(keep.sum()),
        "pixels": int(diff.size),
        "n_different": int(np.count_nonzero(diff)),
        "max_abs_diff": int(diff.max()),
        "fraction_equal": float(np.mean(diff == 0)),
        "fraction_within_1": float(np.mean(diff <= 1)),
    }


# ----------------------------------------------------------------------------
# environment, table
# ----------------------------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment():
    """Describe the machine and software the benchmark runs on.

    Returns
    -------
    env : dict
        ``cpu``, ``logical_cpus``, ``physical_cpus``, ``memory_total``
        (bytes), ``load_average`` (1, 5, 15 min, or `None`), ``platform``,
        ``python``, the versions of ``cutana``, ``numpy``, ``astropy``,
        ``scipy``, ``zarr``, ``numcodecs`` and ``blosc`` (python-blosc, or
        `None`), and ``cutana_checkout``: the commit of the git checkout
        cutana was imported from (`checkout_commit`), `None` for an
        installed cutana. (A checkout's version string is the one its last
        build wrote, which may be older.)

    Examples
    --------
    >>> from cutana.bench.harness import environment
    >>> env = environment()
    >>> env["logical_cpus"] >= 1
    True
    """
    import astropy
    import numcodecs
    import psutil
    import scipy
    import zarr

    import cutana

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    try:
        import blosc

        blosc_version = blosc.__version__
    except ImportError:
        blosc_version = None
    return {
        "cpu": _cpu_model(),
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_total": int(psutil.virtual_memory().total),
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cutana": cutana.__version__,
        "cutana_checkout": checkout_commit(cutana.__file__),
        "numpy": np.__version__,
        "astropy": astropy.__version__,
        "scipy": scipy.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "blosc": blosc_version,
    }


def checkout_commit(path):
    """The commit of the git checkout that tracks the file ``path``.

    Parameters
    ----------
    path : str
        A file (the imported package's ``__init__.py``, say).

    Returns
    -------
    commit : str or None
        The abbreviated commit, with ``-dirty`` when tracked files have
        changes; `None` where git does not track the file (an installed
        package, also one installed inside a checkout) or there is no git.
    """
    import subprocess

    folder, name = os.path.split(os.path.abspath(path))

    def git(*args):
        try:
            done = subprocess.run(
                ["git", "-C", folder, *args],
                capture_output=True, text=True, timeout=30, check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "--", name) is None:
        return None
    return git("describe", "--always", "--dirty", "--abbrev=9") or None


def _fmt(value, spec):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def results_table(results):
    """Render the runs of `run_benchmark` as a Markdown table.

    Parameters
    ----------
    results : dict
        What `run_benchmark` returns (or ``results.json`` holds).

    Returns
    -------
    table : str
        One row per run: scenario, tool, workers, sources, wall time,
        cutouts/s, ratio to Astropy, ratio to ESA Cutana at the same number
        of workers, peak memory of the process tree, and a note; followed by
        the notes of each scenario.

    Examples
    --------
    >>> from cutana.bench.harness import results_table
    >>> print(results_table({"scenarios": []}).splitlines()[0][:53])
    | scenario | tool | workers | sources | wall time (s)
    """
    lines = [
        "| scenario | tool | workers | sources | wall time (s) | cutouts/s | × Astropy "
        "| × ESA Cutana | peak memory (MB) | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    notes = []
    for sc in results.get("scenarios", []):
        for run in sc["runs"]:
            note = []
            if run.get("extrapolated"):
                note.append(
                    f"timed on {run['n_cutouts']} of {run['n_sources']} sources, "
                    "extrapolated per cutout"
                )
            if run["tool"] == "esa-cutana":
                note.append(f"normalize={WORKLOAD['esa_normalize']}")
            if len(run.get("repeats") or ()) > 1:
                note.append(f"best of {len(run['repeats'])}")
            if run.get("error"):
                note.append("FAILED: " + run["error"].splitlines()[0][:120])
            peak = run.get("peak_memory")
            lines.append(
                f"| {sc['name']} | {run['tool']} | {run['workers']} "
                f"| {_fmt(run.get('n_sources'), 'd')} "
                f"| {_fmt(run.get('seconds'), '.2f')} "
                f"| {_fmt(run.get('cutouts_per_second'), ',.0f')} "
                f"| {_fmt(run.get('vs_astropy'), '.1f')} "
                f"| {_fmt(run.get('vs_esa'), '.2f')} "
                f"| {_fmt(peak / 1e6 if peak else None, ',.0f')} | {'; '.join(note)} |"
            )
        for text in sc.get("notes", []):
            notes.append(f"- {sc['name']}: {text}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _environment_text(env):
    mem = env["memory_total"] / 2**30
    checkout = env.get("cutana_checkout")
    cutana = env["cutana"] + (f" (checkout {checkout})" if checkout else "")
    return (
        f"CPU: {env['cpu']} ({env['logical_cpus']} logical, {env['physical_cpus']} "
        f"physical), {mem:.1f} GiB, load {env['load_average']}\n"
        f"{env['platform']}; Python {env['python']}; cutana {cutana}, "
        f"numpy {env['numpy']}, astropy {env['astropy']}, scipy {env['scipy']}, "
        f"zarr {env['zarr']}, numcodecs {env.get('numcodecs')}, "
        f"python-blosc {env.get('blosc')}"
    )


# ----------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------


def _survey(scenario, data_dir, tile_size, n_sources):
    """Make (or reuse) the scenario's survey; returns (survey info, seconds, reused)."""
    from .synthetic import make_survey

    spec = {
        "n_tiles": scenario.n_tiles,
        "bands": list(scenario.bands),
        "tile_size": int(tile_size),
        "n_sources": int(n_sources),
        "size_range_pixels": list(scenario.size_range),
        "edge_fraction": scenario.edge_fraction,
        "off_tile_fraction": 0.0,
        "bad_row_fraction": 0.0,
        "seed": scenario.seed,
    }
    spec_path = Path(data_dir) / "survey.json"
    if spec_path.is_file():
        saved = json.loads(spec_path.read_text(encoding="utf-8"))
        if saved.get("spec") == spec and all(
            os.path.isfile(p) for p in [saved["catalogue"], *saved["paths"]]
        ):
            return saved, 0.0, True
    if Path(data_dir).exists():
        shutil.rmtree(data_dir)
    t0 = time.perf_counter()
    survey = make_survey(
        data_dir,
        n_tiles=spec["n_tiles"],
        bands=tuple(spec["bands"]),
        tile_size=spec["tile_size"],
        n_sources=spec["n_sources"],
        size_range_pixels=tuple(spec["size_range_pixels"]),
        edge_fraction=spec["edge_fraction"],
        off_tile_fraction=0.0,
        bad_row_fraction=0.0,
        seed=spec["seed"],
    )
    seconds = time.perf_counter() - t0
    info = {
        "spec": spec,
        "catalogue": survey.catalogue_path,
        "paths": survey.paths,
        "bands": list(survey.bands),
        "bytes": int(sum(os.path.getsize(p) for p in survey.paths)),
    }
    spec_path.write_text(json.dumps(info), encoding="utf-8")
    return info, seconds, False


def _remove(path):
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _check_workers(workers):
    workers = list(workers)
    if not workers or any(
        isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1
        for w in workers
    ):
        msg = f"workers must be a non-empty list of positive integers, got {workers!r}"
        raise ValueError(msg)
    return sorted(set(int(w) for w in workers))


def run_benchmark(
    scenarios=None,
    *,
    workers=(1, 2),
    out_dir="cutana-bench",
    quick=False,
    cutana_python=None,
    keep_data=False,
    tile_size=None,
    n_sources=None,
    astropy_subset=None,
    timeout=None,
    repeat=1,
    plots=True,
    log=None,
):
    """Run benchmark scenarios and write ``results.json``, ``results.md`` and plots.

    Parameters
    ----------
    scenarios : sequence of str, optional
        Names from `SCENARIOS` (default: all, in their order).
    workers : sequence of int, optional
        Worker counts of the cutana and ESA Cutana runs.
    out_dir : str or path-like, optional
        Folder of the results; the surveys go to ``out_dir/data`` and the
        outputs to ``out_dir/runs`` (both removed at the end unless
        ``keep_data``).
    quick : bool, optional
        Use the scaled-down sizes of each scenario.
    cutana_python : str, optional
        Python of an ESA Cutana environment; ``'auto'`` looks for one with
        `cutana.bench.esa.find_esa_python`; `None` skips ESA Cutana.
    keep_data : bool, optional
        Keep the surveys and outputs (a later run with the same sizes then
        reuses the surveys).
    tile_size, n_sources, astropy_subset : int, optional
        Override the scenarios' tile side, number of sources and the
        number of sources the Astropy baseline is timed on (0 for all).
    timeout : float, optional
        Seconds after which one run is killed (default: 600 with ``quick``,
        else 7200).
    repeat : int, optional
        Run every measurement this many times and keep the fastest (the
        machine's other load only ever slows a run down); the times of all
        runs are kept in ``repeats``.
    plots : bool, optional
        Draw the PNG plots (needs matplotlib).
    log : callable, optional
        Called with one line of text per step (default: the module logger
        at INFO level).

    Returns
    -------
    results : dict
        ``version``, ``quick``, ``workload`` (the shared settings),
        ``environment`` (see `environment`), ``scenarios`` (per scenario its
        sizes, ``survey_seconds``, ``runs`` with one dict per tool and
        worker count, ``agreement`` of the Astropy and cutana values, and
        ``notes``), ``files`` written and ``total_seconds``.

    Raises
    ------
    ValueError
        For an unknown scenario name or bad worker counts.

    Examples
    --------
    >>> from cutana.bench.harness import run_benchmark
    >>> results = run_benchmark(["paper-workload"], quick=True)  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    log = log or logger.info
    names = list(SCENARIOS) if not scenarios else list(dict.fromkeys(scenarios))
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        msg = f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}"
        raise ValueError(msg)
    workers = _check_workers(workers)
    if (
        isinstance(repeat, bool)
        or not isinstance(repeat, (int, np.integer))
        or repeat < 1
    ):
        msg = f"repeat must be a positive integer, got {repeat!r}"
        raise ValueError(msg)
    timeout = timeout or (600.0 if quick else 7200.0)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_root = out_dir / "data"
    runs_root = out_dir / "runs"

    env = environment()
    log(_environment_text(env))
    esa_python, esa_note = _resolve_esa(cutana_python)
    if esa_note:
        log(esa_note)
    results = {
        "version": RESULTS_VERSION,
        "quick": bool(quick),
        "workload": dict(WORKLOAD),
        "workers": workers,
        "repeat": int(repeat),
        "environment": env,
        "esa_python": esa_python,
        "notes": [esa_note] if esa_note else [],
        "scenarios": [],
    }
    try:
        for name in names:
            sc = SCENARIOS[name]
            results["scenarios"].append(
                _run_scenario(
                    sc,
                    quick,
                    workers,
                    tile_size,
                    n_sources,
                    astropy_subset,
                    data_root / name,
                    runs_root / name,
                    esa_python,
                    timeout,
                    keep_data,
                    repeat,
                    log,
                )
            )
    finally:
        if not keep_data:
            _remove(data_root)
            _remove(runs_root)
    try:
        results["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        results["load_average_end"] = None
    results["total_seconds"] = time.perf_counter() - t_start
    results["files"] = _write_results(results, out_dir, plots, log)
    return results


def _resolve_esa(cutana_python):
    from .esa import DEFAULT_ESA_VENV, find_esa_python

    if cutana_python is None:
        return None, (
            "ESA Cutana rows skipped: give --cutana-python PATH (or auto) "
            "for a Python where ESA Cutana is installed"
        )
    if str(cutana_python) == "auto":
        python = find_esa_python()
        if python is None:
            return None, (
                f"ESA Cutana rows skipped: no ESA Cutana environment at "
                f"{DEFAULT_ESA_VENV}"
            )
        return python, None
    if not os.path.exists(str(cutana_python)):
        msg = f"--cutana-python {str(cutana_python)!r} does not exist"
        raise ValueError(msg)
    return str(cutana_python), None


def _best_of(repeat, measure):
    """Run ``measure()`` ``repeat`` times; keep the fastest successful run.

    The kept run gets ``repeats``: the wall times of all runs, in order.
    """
    runs = [measure() for _ in range(max(1, int(repeat)))]
    good = [r for r in runs if not r["error"]]
    best = min(good, key=lambda r: r["seconds"]) if good else runs[-1]
    best["repeats"] = [r["seconds"] for r in runs]
    return best


def _same_images(a, b, block=2048):
    """Whether two cutana Zarr outputs hold identical images and statuses."""
    from ..io import open_output

    x, y = open_output(str(a)), open_output(str(b))
    if x.images.shape != y.images.shape:
        return False
    if not np.array_equal(np.asarray(x.status[:]), np.asarray(y.status[:])):
        return False
    n = x.images.shape[0]
    return all(
        np.array_equal(
            np.asarray(x.images[i : i + block]), np.asarray(y.images[i : i + block])
        )
        for i in range(0, n, block)
    )


def _run_scenario(
    sc,
    quick,
    workers,
    tile_size,
    n_sources,
    astropy_subset,
    data_dir,
    runs_dir,
    esa_python,
    timeout,
    keep_data,
    repeat,
    log,
):
    tile, n, subset = sc.sizes(quick, tile_size=tile_size, n_sources=n_sources)
    if astropy_subset is not None:
        subset = n if int(astropy_subset) == 0 else min(int(astropy_subset), n)
    log(
        f"\n== {sc.name}: {sc.n_tiles} tile(s) of {tile}x{tile} px x "
        f"{len(sc.bands)} band(s), {n} sources of {sc.size_range[0]}-"
        f"{sc.size_range[1]} px -> {WORKLOAD['target_size']} px"
    )
    info, survey_seconds, reused = _survey(sc, data_dir, tile, n)
    log(
        f"   survey: {info['bytes'] / 1e6:,.0f} MB of tiles "
        f"{'reused' if reused else f'written in {survey_seconds:.1f} s'}"
    )
    runs_dir.mkdir(parents=True, exist_ok=True)
    catalogue = info["catalogue"]
    record = {
        "name": sc.name,
        "description": sc.description,
        "n_tiles": sc.n_tiles,
        "bands": list(sc.bands),
        "tile_size": tile,
        "n_sources": n,
        "size_range": list(sc.size_range),
        "edge_fraction": sc.edge_fraction,
        "survey_bytes": info["bytes"],
        "survey_seconds": survey_seconds,
        "runs": [],
        "agreement": None,
        "notes": [],
    }
    runs = record["runs"]

    astropy_out = runs_dir / "astropy.zarr"
    run = _best_of(
        repeat,
        lambda: run_astropy(
            catalogue,
            astropy_out,
            n_sources=subset,
            target_size=WORKLOAD["target_size"],
            percentile=WORKLOAD["percentile"],
            timeout=timeout,
        ),
    )
    runs.append(run)
    _log_run(log, run)

    cutana_outs = []
    for w in workers:
        out = runs_dir / f"cutana-w{w}.zarr"
        run = _best_of(
            repeat,
            lambda out=out, w=w: run_cutana(
                catalogue,
                out,
                workers=w,
                target_size=WORKLOAD["target_size"],
                normalize=WORKLOAD["cutana_normalize"],
                dtype=WORKLOAD["dtype"],
                flux_conversion=WORKLOAD["flux_conversion"],
                timeout=timeout,
            ),
        )
        runs.append(run)
        _log_run(log, run)
        if run["error"] is None:
            cutana_outs.append(out)

    if cutana_outs and runs[0]["error"] is None:
        record["agreement"] = agr = compare_outputs(astropy_out, cutana_outs[0])
        if agr["rows"]:
            text = (
                f"values: Astropy baseline vs cutana on {agr['rows']} complete "
                f"cutouts: {agr['n_different']:,} of {agr['pixels']:,} uint8 pixels "
                f"differ, by at most {agr['max_abs_diff']}"
            )
            record["notes"].append(text)
            log("   " + text)
    if len(cutana_outs) > 1:
        same = all(_same_images(cutana_outs[0], o) for o in cutana_outs[1:])
        record["workers_identical"] = same
        text = (
            f"cutana outputs with {', '.join(str(w) for w in workers)} workers are "
            f"{'byte-identical' if same else 'NOT identical'}"
        )
        record["notes"].append(text)
        log("   " + text)
    if not keep_data:
        _remove(astropy_out)
        for out in runs_dir.glob("cutana-w*.zarr"):
            _remove(out)

    if esa_python is not None:
        for w in workers:
            out = runs_dir / f"esa-w{w}"
            run = _best_of(
                repeat,
                lambda out=out, w=w: _run_esa(
                    esa_python, catalogue, out, w, info["bands"], timeout
                ),
            )
            runs.append(run)
            _log_run(log, run)
            if not keep_data:
                _remove(out)
        versions = {r.get("version") for r in runs if r["tool"] == "esa-cutana"} - {
            None
        }
        if versions:
            record["notes"].append(f"ESA Cutana {', '.join(sorted(versions))}")
    _ratios(runs)
    return record


def _ratios(runs):
    """Add ``vs_astropy`` and ``vs_esa`` (same worker count) to each run."""
    base = next((r for r in runs if r["tool"] == "astropy" and not r["error"]), None)
    esa = {
        r["workers"]: r for r in runs if r["tool"] == "esa-cutana" and not r["error"]
    }
    for r in runs:
        cps = r.get("cutouts_per_second")
        ok = not r["error"] and cps is not None and math.isfinite(cps)
        r["vs_astropy"] = (
            cps / base["cutouts_per_second"] if ok and base and r is not base else None
        )
        other = esa.get(r["workers"])
        r["vs_esa"] = (
            cps / other["cutouts_per_second"]
            if ok and other is not None and r["tool"] == "cutana"
            else None
        )


def _log_run(log, run):
    if run["error"]:
        log(f"   {run['tool']:<10s} w={run['workers']}: FAILED ({run['error'][:300]})")
        return
    extra = ""
    if run.get("extrapolated"):
        extra = (
            f" (timed on {run['n_cutouts']} sources in "
            f"{run['measured_seconds']:.1f} s, extrapolated)"
        )
    log(
        f"   {run['tool']:<10s} w={run['workers']}: {run['seconds']:8.2f} s  "
        f"{run['cutouts_per_second']:10,.0f} cutouts/s  peak "
        f"{run['peak_memory'] / 1e6:,.0f} MB{extra}"
    )


def _write_results(results, out_dir, plots, log):
    files = {}
    json_path = out_dir / "results.json"
    md_path = out_dir / "results.md"
    table = results_table(results)
    env_text = _environment_text(results["environment"])
    env_text += f"\nload average at the end: {results.get('load_average_end')}"
    settings = ", ".join(f"{k}={v}" for k, v in results["workload"].items())
    md = [
        "# cutana benchmark" + (" (quick)" if results["quick"] else ""),
        "",
        "```",
        env_text,
        "```",
        "",
        f"Workload: {settings}. Whole runs timed from outside (start-up included); "
        "throughput in catalogue sources per second (all bands); peak memory is the "
        "summed RSS of the process tree, sampled every 0.1 s.",
        "",
        table,
        "",
    ]
    md += [f"- {n}" for n in results.get("notes", [])]
    if plots:
        try:
            from .plots import plot_results

            pngs = plot_results(results, out_dir)
        except ImportError as exc:
            pngs = []
            log(f"plots skipped: {exc}")
        files["plots"] = [str(p) for p in pngs]
        md += ["", *[f"![{Path(p).stem}]({Path(p).name})" for p in pngs]]
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    files["json"] = str(json_path)
    files["markdown"] = str(md_path)
    results["files"] = files
    json_path.write_text(
        json.dumps(results, indent=1, default=_json_default), encoding="utf-8"
    )
    return files


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"expected an integer >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser():
    """Build the argument parser of ``cutana bench``.

    Returns
    -------
    parser : `argparse.ArgumentParser`
        The parser.

    Examples
    --------
    >>> from cutana.bench.harness import build_parser
    >>> build_parser().parse_args(["--quick", "--workers", "1", "2"]).workers
    [1, 2]
    """
    parser = argparse.ArgumentParser(
        prog="cutana bench",
        description="Time cutana against an Astropy Cutout2D baseline and ESA "
        "Cutana on synthetic Euclid-like surveys (target 150 px, bilinear, flux "
        "conversion, uint8 Zarr), and write results.json, results.md and plots.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="scaled-down sizes (a few minutes on two cores)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"scenario to run (repeatable; default: all of {', '.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--workers",
        nargs="+",
        type=_positive_int,
        default=[1, 2],
        metavar="N",
        help="worker counts of cutana and ESA Cutana (default: 1 2)",
    )
    parser.add_argument(
        "--out",
        default="cutana-bench",
        metavar="DIR",
        help="results folder (default: cutana-bench)",
    )
    parser.add_argument(
        "--cutana-python",
        metavar="PATH",
        help="Python of an ESA Cutana environment, or 'auto' to look "
        "in /tmp/esa-cutana-venv (default: skip ESA Cutana)",
    )
    parser.add_argument(
        "--keep-data",
        action="store_true",
        help="keep surveys and outputs in DIR/data and DIR/runs",
    )
    parser.add_argument(
        "--tile-size",
        type=_positive_int,
        metavar="N",
        help="override every scenario's tile side in pixels",
    )
    parser.add_argument(
        "--n-sources",
        type=_positive_int,
        metavar="N",
        help="override every scenario's number of sources",
    )
    parser.add_argument(
        "--astropy-subset",
        type=_non_negative_int,
        metavar="N",
        help="sources the Astropy baseline is timed on, 0 for all "
        "(default: per scenario, 300 or fewer with --quick, 2000)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="kill a run after this long (default 600 quick, 7200)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run each measurement N times and keep the fastest (default: 1)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def main(argv=None):
    """Run ``cutana bench`` with command-line arguments.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    exit_code : int
        0 when every run succeeded, 1 when a run failed, 2 for a usage
        error.

    Examples
    --------
    >>> from cutana.bench.harness import main
    >>> main(["--quick", "--scenario", "paper-workload"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # ``cutana bench -- --quick``: the separator is passed on
        argv = argv[1:]
    ns = parser.parse_args(argv)

    def say(text):
        print(text, flush=True)

    t0 = time.perf_counter()
    try:
        results = run_benchmark(
            ns.scenario,
            workers=ns.workers,
            out_dir=ns.out,
            quick=ns.quick,
            cutana_python=ns.cutana_python,
            keep_data=ns.keep_data,
            tile_size=ns.tile_size,
            n_sources=ns.n_sources,
            astropy_subset=ns.astropy_subset,
            timeout=ns.timeout,
            repeat=ns.repeat,
            plots=not ns.no_plots,
            log=say,
        )
    except ValueError as exc:
        print(f"cutana bench: error: {exc}", file=sys.stderr)
        return 2
    say("")
    say(results_table(results))
    for note in results.get("notes", []):
        say(f"- {note}")
    say("")
    for path in results["files"].values():
        if isinstance(path, list):
            for p in path:
                say(f"wrote {p}")
        else:
            say(f"wrote {path}")
    say(f"load average at the end: {results.get('load_average_end')}")
    say(
        f"total {time.perf_counter() - t0:.0f} s ({results['total_seconds']:.0f} s "
        "measuring, the rest plotting and writing)"
    )
    failed = any(r["error"] for sc in results["scenarios"] for r in sc["runs"])
    return 1 if failed else 0
