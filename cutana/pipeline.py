# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The cutout pipeline: catalogue → tile index → plan → executor → output.

`make_cutouts` composes the layers and is what the ``cutana run`` command
calls; `plan_cutouts` stops after planning (``cutana plan``) and
`iter_cutouts` hands batches of cutouts to the caller in memory instead of
writing them (for machine learning). The logic of each step lives in its own
module; this one only validates the options at the boundary and wires the
steps together. The tasks it hands the executor, and what a worker does with
them, are in `cutana._tasks`.
"""

import contextlib
import dataclasses
import difflib
import errno
import hashlib
import json
import logging
import math
import numbers
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

import numpy as np

from ._choices import DTYPES, FORMATS, RESAMPLE
from ._tasks import (
    _AssembleTask,
    _CutTask,
    _GroupTask,
    _jobs_of,
    _OutputFull,
    _PatchTask,
    _ready_worker,
    _release_scratch,
    _reserve_blocks,
    _Rows,
    _run_task,
    _run_task_overlapped,
    _wait_for_writes,
    _Writes,
)
from ._threads import available_cores
from .catalog import COLUMN_ALIASES, COLUMN_OPTIONS, MAX_SIZE_PIXEL, read_catalog
from .exceptions import ConfigError
from .executor import (
    BACKENDS,
    Executor,
    MemorySampler,
    default_backend,
    stop_worker_server,
    worker_preload,
    worker_server_pid,
)
from .io import (
    ChunksWritten,
    FitsWriter,
    Ledger,
    ZarrArchive,
    ZarrWriter,
    choose_chunk_rows,
    clean_staging,
    cutout_status,
    extension_names,
    fits_filenames,
    list_staged,
    load_staged,
    open_output,
    remove_run_state,
    remove_staged,
    staged_receipt,
    state_dir,
    write_index,
)
from .io._writeback import release_buffers
from .io.staging import REPAIR_MARKER
from .io.zarr import creation_interrupted
from .normalization import NORMALIZATIONS, Normalizer
from .planner import (
    FITS_ROW_BYTES,
    PARENT_ROW_BYTES,
    SERVER_BYTES,
    Plan,
    _fmt_bytes,
    available_memory,
    make_plan,
    parse_memory,
    square_boxes,
    working_dtype,
)
from .processing import CutSettings, cut_job
from .status import STATUS_DESCRIPTIONS, Status
from .tiles import TileIndex, close_kept_maps, missing_band_message

__all__ = [
    "DTYPES",
    "FORMATS",
    "RunOptions",
    "RunReport",
    "iter_cutouts",
    "make_cutouts",
    "plan_cutouts",
]

logger = logging.getLogger(__name__)

_CHUNKS_PER_TASK = 8
_INT32 = np.iinfo(np.int32)
# options that change how a run executes but never what it writes
_EXECUTION_OPTIONS = (
    "workers", "threads", "memory_limit", "backend", "scheduler", "max_sources_per_job",
)


@dataclass
class RunOptions:
    """The validated options of a run (what ``cutana run`` flags map to).

    See `make_cutouts` for the meaning of each field.

    Examples
    --------
    >>> from cutana.pipeline import RunOptions
    >>> options = RunOptions(size=16, memory_limit="2GB").validate()
    >>> options.backend, options.resample, options.memory_limit
    ('serial', 'none', 2000000000)
    >>> "workers" in options.to_config()  # execution options never change the output
    False
    """

    tiles: list | None = None
    bands: list | None = None
    size: float | None = None
    target_size: int | None = None
    resample: str | None = None
    normalize: str = "none"
    dtype: str = "float32"
    percentile: float = 99.8
    stretch_a: float | None = None
    zscale_contrast: float = 0.25
    zscale_samples: int = 1000
    crop: float | None = None
    flux_conversion: bool = False
    zeropoint_keyword: str = "MAGZERO"
    channel_weights: list | None = None
    format: str = "zarr"
    workers: int = 1
    threads: int = 1
    memory_limit: int | str | None = None
    backend: str | None = None
    scheduler: str | None = None
    max_sources_per_job: int | None = None
    id_column: str | None = None
    ra_column: str | None = None
    dec_column: str | None = None

    def validate(self):
        """Check every option and fill defaults that depend on others.

        Returns
        -------
        options : `RunOptions`
            ``self``, validated.

        Raises
        ------
        ConfigError
            Naming the option and the bad value.
        """
        # what the command's parser checks, for values from a config file or
        # keywords: one type per option, so that equal options compare equal
        self.tiles = _path_list("tiles", self.tiles)
        self.bands = _path_list("bands", self.bands)
        for name in COLUMN_OPTIONS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                _bad(name, value, "a column name")
        if not isinstance(self.flux_conversion, bool | np.bool_):
            _bad("flux_conversion", self.flux_conversion, "true or false")
        self.flux_conversion = bool(self.flux_conversion)
        if not isinstance(self.zeropoint_keyword, str) or not self.zeropoint_keyword:
            _bad("zeropoint_keyword", self.zeropoint_keyword, "a header keyword")
        self.percentile = _number("percentile", self.percentile)
        self.zscale_contrast = _number("zscale_contrast", self.zscale_contrast)
        if self.stretch_a is not None:
            self.stretch_a = _number("stretch_a", self.stretch_a)
        self.zscale_samples = _positive_int("zscale_samples", self.zscale_samples)
        if self.max_sources_per_job is not None:
            self.max_sources_per_job = _positive_int(
                "max_sources_per_job", self.max_sources_per_job
            )
        if self.crop is not None and (
            isinstance(self.crop, bool | str)
            or np.asarray(self.crop).dtype.kind not in "iuf"
        ):
            _bad("crop", self.crop, "a fraction in (0, 1] or a number of pixels")
        if _is_int(self.crop) and 0 < self.crop < 3:  # (1.0 is the whole image)
            logger.warning(
                "crop=%d takes the stretch limits from the central %d x %d "
                "pixel(s) of each cutout; give 1.0 for the whole cutout",
                self.crop, self.crop, self.crop,
            )
        if self.target_size is not None:
            self.target_size = _positive_int("target_size", self.target_size)
        if self.resample is None:
            self.resample = "bilinear" if self.target_size is not None else "none"
        if self.resample not in RESAMPLE:
            _bad("resample", self.resample, f"one of {', '.join(RESAMPLE)}")
        if self.resample != "none" and self.target_size is None:
            msg = f"resample={self.resample!r} needs target_size (--target-size N)"
            raise ConfigError(msg)
        if self.resample == "none" and self.target_size is not None:
            msg = (
                "target_size needs a resampling method: use --resample nearest, "
                "bilinear or area"
            )
            raise ConfigError(msg)
        if self.normalize not in NORMALIZATIONS:
            _bad("normalize", self.normalize, f"one of {', '.join(NORMALIZATIONS)}")
        if self.dtype not in DTYPES:
            _bad("dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.normalize == "none" and self.dtype != "float32":
            msg = (
                f"dtype={self.dtype!r} needs a stretch to map values into its range: "
                "use --normalize linear, sqrt, log, asinh or zscale"
            )
            raise ConfigError(msg)
        if self.format not in FORMATS:
            _bad("format", self.format, f"one of {', '.join(FORMATS)}")
        if self.size is not None:
            try:
                if isinstance(self.size, bool | np.bool_):
                    raise TypeError
                size = float(self.size)
            except (TypeError, ValueError):
                size = float("nan")
            if not math.isfinite(size) or size <= 0 or round(size) < 1:
                _bad("size", self.size, "a positive number of pixels")
            self.size = size
        if not (0 <= float(self.percentile) <= 100):
            _bad("percentile", self.percentile, "a number in [0, 100]")
        self.workers = _positive_int("workers", self.workers)
        self.threads = _positive_int("threads", self.threads)
        if self.backend is None:
            self.backend = default_backend(self.workers, self.scheduler)
        if self.backend not in BACKENDS:
            _bad("backend", self.backend, f"one of {', '.join(BACKENDS)}")
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            _bad("scheduler", self.scheduler, "an address such as 'tcp://host:8786'")
        if self.scheduler and self.backend != "dask":
            msg = "scheduler (--scheduler) is only used with backend='dask'"
            raise ConfigError(msg)
        if self.memory_limit is None:
            self.memory_limit = int(0.5 * available_memory())
        else:
            try:
                self.memory_limit = parse_memory(self.memory_limit)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.channel_weights is not None:
            try:
                if any(isinstance(w, bool | np.bool_) for w in self.channel_weights):
                    raise TypeError
                self.channel_weights = [float(w) for w in self.channel_weights]
            except (TypeError, ValueError):
                _bad("channel_weights", self.channel_weights, "a list of numbers")
            if not all(math.isfinite(w) for w in self.channel_weights):
                expected = "a list of finite numbers"
                _bad("channel_weights", self.channel_weights, expected)
        try:  # the stretch's parameters, and a crop that cannot fit the output
            stretch = Normalizer(self.normalize, dtype=self.dtype, **self.norm_kwargs())
            if self.crop is not None:  # without a target size: its form only
                side = self.target_size or 2**31
                stretch.region((side, side))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def norm_kwargs(self):
        """Keyword arguments for `cutana.normalization.normalize`.

        Returns
        -------
        kwargs : dict
            Only the parameters the chosen stretch uses.
        """
        kw = {}
        if self.normalize == "none":
            return kw
        if self.normalize == "zscale":
            kw["contrast"] = float(self.zscale_contrast)
            kw["n_samples"] = int(self.zscale_samples)
        else:
            kw["percentile"] = float(self.percentile)
        if self.normalize in ("log", "asinh") and self.stretch_a is not None:
            kw["a"] = float(self.stretch_a)
        if self.crop is not None:
            kw["crop"] = self.crop
        return kw

    def to_config(self):
        """The options that determine the output, as a JSON-serialisable dict.

        Execution options (workers, threads, memory limit, backend,
        scheduler, job size) are left out: they never change what is
        written, so an output is identical whichever were used.

        Returns
        -------
        config : dict
            Option name → value.
        """
        config = asdict(self)
        for key in _EXECUTION_OPTIONS:
            config.pop(key, None)
        for key in COLUMN_OPTIONS:  # given only when the names are not the usual
            if config[key] is None:
                del config[key]
        return config

    @classmethod
    def from_keywords(cls, options):
        """`RunOptions` from keyword arguments, with a `ConfigError` naming
        an unknown one (and the closest known name).

        Parameters
        ----------
        options : dict
            Option name to value, as `make_cutouts` takes them.

        Returns
        -------
        options : `RunOptions`
            Not validated yet.

        Raises
        ------
        ConfigError
            For a name that is not an option.

        Examples
        --------
        >>> from cutana.pipeline import RunOptions
        >>> RunOptions.from_keywords({"sise": 16})
        Traceback (most recent call last):
        ...
        cutana.exceptions.ConfigError: unknown option 'sise'; did you mean 'size'?
        """
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                msg = f"unknown option {name!r}{hint}"
                raise ConfigError(msg)
        return cls(**options)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(name, value):
    """``value`` as an int >= 1, or a `ConfigError` naming option ``name``."""
    if not _is_int(value) or value < 1:
        _bad(name, value, "a positive integer")
    return int(value)


def _number(name, value):
    """``value`` as a float, or a `ConfigError` naming option ``name``."""
    if isinstance(value, bool | str) or not isinstance(value, numbers.Real):
        _bad(name, value, "a number")
    return float(value)


def _path_list(name, value):
    """A list of str from one path (or name) or a sequence of them, or None."""
    if value is None:
        return None
    if isinstance(value, str | os.PathLike):
        return [str(os.fspath(value))]
    if isinstance(value, list | tuple | np.ndarray) and all(
        isinstance(v, str | os.PathLike) for v in value
    ):
        return [str(os.fspath(v)) for v in value]
    _bad(name, value, "a path or name, or a list of them")
    return None  # pragma: no cover - _bad raises


def _bad(name, value, expected):
    msg = f"invalid {name}: {value!r}; expected {expected}"
    raise ConfigError(msg)


@dataclass
class RunReport:
    """What a run did: counts per status, time, throughput, peak memory.

    Attributes
    ----------
    output : str
        The output location.
    n_rows : int
        Catalogue rows (= output rows).
    counts : dict
        Status name → number of rows.
    seconds : float
        Wall time of the whole run.
    cutouts_per_second : float
        Sources cut per second of wall time.
    peak_memory : int
        Peak resident bytes of the process tree (sampled).
    failures : list of str
        Jobs or tiles that failed, with the reason.
    messages : dict
        Row → message for every row that got no cutout (bad rows, sources
        on no tile, tile errors); rows cut at a tile edge
        (`cutana.Status.PARTIAL_OVERLAP`) have their status only.
    exit_code : int
        0 if every row got its final status, 1 if some sources could not be
        cut because a tile or job failed.

    Examples
    --------
    >>> from cutana.pipeline import RunReport
    >>> report = RunReport(output="out.zarr", n_rows=3, counts={"OK": 2, "BAD_ROW": 1},
    ...                    seconds=0.5, cutouts_per_second=4.0, peak_memory=200_000_000,
    ...                    messages={2: "row 2: dec is NaN"})
    >>> print(report.summary())
    output          out.zarr
    rows            3
      OK                       2  complete cutout
      BAD_ROW                  1  invalid catalogue row
    time            0.50 s
    throughput      4 cutouts/s
    peak memory     200 MB
    row 2: row 2: dec is NaN
    >>> report.exit_code
    0
    """

    output: str
    n_rows: int
    counts: dict
    seconds: float
    cutouts_per_second: float
    peak_memory: int
    failures: list = field(default_factory=list)
    messages: dict = field(default_factory=dict)
    exit_code: int = 0
    memory_samples: list = field(default_factory=list)

    def summary(self, max_messages=10):
        """A human-readable report.

        Parameters
        ----------
        max_messages : int, optional
            How many per-row messages to list.

        Returns
        -------
        text : str
            Several lines.
        """
        lines = [f"output          {self.output}", f"rows            {self.n_rows}"]
        for name, count in sorted(
            self.counts.items(), key=lambda kv: Status[kv[0]].value
        ):
            desc = STATUS_DESCRIPTIONS[Status[name]]
            lines.append(f"  {name:<16s}{count:>10d}  {desc}")
        lines += [
            f"time            {self.seconds:.2f} s",
            f"throughput      {self.cutouts_per_second:.0f} cutouts/s",
            f"peak memory     {self.peak_memory / 1e6:.0f} MB",
        ]
        for failure in self.failures:
            lines.append(f"FAILED          {failure}")
        for row, text in list(sorted(self.messages.items()))[:max_messages]:
            lines.append(f"row {row}: {text}")
        if len(self.messages) > max_messages:
            lines.append(
                f"... and {len(self.messages) - max_messages} more messages (all of "
                f"them: cutana.open({str(self.output)!r}).messages)"
            )
        return "\n".join(lines)

    def to_dict(self):
        """The report as a JSON-serialisable dict.

        Returns
        -------
        report : dict
            All fields, messages keyed by row as strings.
        """
        out = asdict(self)
        out["messages"] = {str(k): v for k, v in sorted(self.messages.items())}
        return out


# ----------------------------------------------------------------------------
# preparation: catalogue, tiles, sizes, plan
# ----------------------------------------------------------------------------


@dataclass
class _Prepared:
    catalog: object
    index: TileIndex
    plan: Plan
    options: RunOptions
    settings: CutSettings
    catalog_path: str | None = None
    chunk_rows: int | None = None  # rows per chunk of a Zarr output
    # (N, C, 2) boxes per band when bands on grids of their own cut their own
    # (`cutana.planner.square_boxes`), for the Zarr store's ``band_box``
    band_box: np.ndarray | None = None


def _prepare(
    catalog, options, *, measure_parent=None, chunked=True, batches=False,
    progress=False,
):
    """Read, validate, index and plan (no pixel data).

    ``measure_parent(in_process)`` gives the bytes the run's processes hold
    once the catalogue is read (the plan's ``parent_bytes``: the catalogue's
    arrays grow with it, and the workers' memory is what the limit leaves);
    with ``in_process``, those of the main process alone. When the memory
    limit holds no worker process of the ``processes`` backend beside the
    main process and the worker server, but holds the run in the main
    process, the plan is made for that, and ``options.backend`` becomes
    ``'serial'`` (with a warning).
    With ``chunked`` (and Zarr output) the plan follows the store's chunks;
    ``batches``: for `iter_cutouts`, whose batches hold one size.
    ``progress``: progress bars while the catalogue and the tile headers
    are read, if slow.
    """
    options.validate()
    # with --tiles a file-list column is not used, so not checked either
    files_column = False if options.tiles else None
    cat = read_catalog(
        catalog, size=options.size, files_column=files_column, progress=progress,
        **{name: getattr(options, name) for name in COLUMN_OPTIONS},
    )
    try:
        if options.tiles:
            index = TileIndex.from_paths(
                options.tiles, bands=options.bands, progress=progress
            )
        elif cat.fits_file_paths is not None:
            index = TileIndex.from_file_lists(
                cat.fits_file_paths, bands=options.bands, progress=progress
            )
        else:
            msg = (
                f"no tiles: give --tiles PATH_OR_GLOB... or a 'fits_file_paths' column "
                f"in {cat.source}"
            )
            raise ConfigError(msg)
    except ConfigError:
        raise
    except ValueError as exc:  # e.g. a band asked for that no tile has
        raise ConfigError(str(exc)) from None
    # tile files that rows name and that cannot be read are those rows'
    # TILE_ERROR (a --resume cuts them once they can be read), even when no
    # file can be read: only tiles matched by --tiles need one to place rows
    named = not options.tiles and cat.fits_file_paths is not None and bool(index.errors)
    if not index.tiles and not named:
        problems = "; ".join(
            m if str(m).startswith(str(p)) else f"{p}: {m}" for p, m in index.errors[:5]
        )
        if problems or options.tiles:
            msg = (
                "none of the tiles given could be indexed"
                f"{': ' + problems if problems else ''}"
            )
        else:  # every file-list cell is empty or not a list of paths
            column = COLUMN_ALIASES["files"][0]
            why = next(
                (f" (row {r}: {m})" for r, m in sorted(cat.messages.items())
                 if column in str(m)),
                "",
            )  # fmt: skip
            msg = (
                f"no tiles: no row of {cat.source} names a tile file in its "
                f"'{column}' cell{why}; give --tiles PATH_OR_GLOB..."
            )
        raise ConfigError(msg)
    if (
        options.channel_weights is not None
        and len(options.channel_weights) != len(index.bands)
    ):
        msg = (
            f"channel_weights has {len(options.channel_weights)} values but there are "
            f"{len(index.bands)} bands ({', '.join(index.bands)})"
        )
        raise ConfigError(msg)

    if options.format == "fits":
        try:
            extension_names(index.bands)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    status = np.asarray(cat.status, dtype=np.int16).copy()
    messages = dict(cat.messages)
    # a size in arcsec becomes pixels in the tile a source lands on, which
    # the tile index weighs with the box the source gets in each tile
    size_pix, size_arcsec = _size_columns(cat, options)
    usable = (np.isfinite(size_pix) & (np.round(size_pix) >= 1)) | (
        np.isfinite(size_arcsec) & (size_arcsec > 0)
    )
    _bad_size(status, messages, (status == Status.OK) & ~usable, cat.source)

    ok = status == Status.OK
    pix, arcsec = np.where(ok, size_pix, 1.0), np.where(ok, size_arcsec, np.nan)
    if options.tiles or cat.fits_file_paths is None:
        assignment = index.assign(cat.ra, cat.dec, pix, arcsec)
        file_error = np.zeros(len(cat), dtype=bool)
        # a source off every tile indexed, on a file that could not be read
        # (truncated), is on a broken tile
        off = np.flatnonzero(ok & (assignment.tile < 0))
        hits = index.on_unreadable(cat.ra[off], cat.dec[off], pix[off], arcsec[off])
        for k, reason in hits.items():
            file_error[off[k]] = True
            messages.setdefault(int(off[k]), reason)
    else:
        assignment, file_error = index.assign_by_files(
            cat.fits_file_paths, cat.ra, cat.dec, pix, arcsec
        )
    tile_err = ok & file_error
    status[tile_err] = Status.TILE_ERROR
    file_messages = getattr(assignment, "messages", None) or {}
    for r in np.flatnonzero(tile_err):
        messages.setdefault(
            int(r),
            file_messages.get(int(r), f"tile files of row {r} could not be read")
        )
    # a file list shorter than the bands need names no file for the last
    # ones: its rows are bad rows (the catalogue's error; no --resume mends it)
    short_tiles, empty = _short_lists(index)
    column = cat.columns.get("files") or COLUMN_ALIASES["files"][0]

    def short(r, n_files, what):
        status[r] = Status.BAD_ROW
        messages[r] = (
            f"{cat.source} row {r} column {column!r}: it lists {n_files} "
            f"file(s), none for {what}"
        )

    if short_tiles:
        bad = ok & ~tile_err & np.isin(assignment.tile, list(short_tiles))
        for r in np.flatnonzero(bad).tolist():
            n_files, name = short_tiles[int(assignment.tile[r])]
            short(r, n_files, f"band {name} (the bands are {', '.join(index.bands)})")
        ok &= ~bad
    if empty and tile_err.any():  # (such a list is no tile: its rows failed)
        for r in np.flatnonzero(tile_err).tolist():
            files = tuple(cat.fits_file_paths[r] or ())
            if files in empty:
                short(r, len(files), f"the bands asked ({', '.join(index.bands)})")
        tile_err &= status == Status.TILE_ERROR
    # a tile without a file for one of the bands cannot cut its sources
    lacking = [t for t, tile in enumerate(index.tiles) if tile.missing_bands]
    if lacking:
        lack = ok & ~tile_err & np.isin(assignment.tile, lacking)
        status[lack] = Status.TILE_ERROR
        for r in np.flatnonzero(lack):
            tile = index.tiles[int(assignment.tile[r])]
            name = index.bands[tile.missing_bands[0]]
            # (a file of that band the index left out: truncated, say)
            why = index.unreadable_reason(tile.key, name)
            text = missing_band_message(tile, name)
            messages.setdefault(int(r), f"tile {tile.key}: {why}" if why else text)
        tile_err |= lack

    # arcsec sizes depend on the pixel scale of the tile each source landed on
    diam = _diameters(size_pix, size_arcsec, index, assignment.tile)
    band_diam = _band_boxes(index, assignment.tile, size_arcsec, diam, options)
    if band_diam is None:
        _warn_angles_on_own_grids(index, assignment.tile, ok & np.isfinite(size_arcsec))
    on_tile = (status == Status.OK) & (np.asarray(assignment.tile) >= 0)
    # the smallest and largest box of each row, over its bands
    low = diam if band_diam is None else np.min(band_diam, axis=1)
    high = diam if band_diam is None else np.max(band_diam, axis=1)
    small = on_tile & ~(np.round(low) >= 1)

    def owner(r, value):
        return _scale_owner(index, assignment.tile, band_diam, r, value)

    for r in np.flatnonzero(small & np.isfinite(size_arcsec)).tolist():
        scale = size_arcsec[r] / low[r] if low[r] > 0 else float("nan")
        messages.setdefault(r, (
            f"{_size_origin(cat, options, r, size_arcsec, value=False)}: a "
            f"diameter of {size_arcsec[r]:g} arcsec is "
            f"{low[r]:.3g} pixels of {owner(r, low[r])} "
            f"({scale:.3g} arcsec/pixel), which rounds to 0"
        ))
    _bad_size(status, messages, small, cat.source)
    # an angle is checked against MAX_SIZE_ARCSEC when read; in pixels of its
    # tile it may still exceed what a size in pixels may be
    huge = on_tile & np.isfinite(size_arcsec) & (np.round(high) > MAX_SIZE_PIXEL)
    for r in np.flatnonzero(huge).tolist():
        messages.setdefault(r, (
            f"{_size_origin(cat, options, r, size_arcsec)}: {high[r]:.0f} pixels "
            f"of {owner(r, high[r])}, more than "
            f"{MAX_SIZE_PIXEL}"
        ))
    _bad_size(status, messages, huge, cat.source)

    if options.target_size is not None:
        out_shape = (options.target_size, options.target_size)
    else:
        cut = (status == Status.OK) & (np.asarray(assignment.tile) >= 0)
        # rows of tiles that cannot be read now count when their size is in
        # pixels: a --resume cuts them into this output once they can be
        waiting = status == Status.TILE_ERROR
        in_pixels = np.isfinite(size_pix) & ~np.isfinite(size_arcsec)
        sized = cut | (waiting & in_pixels)
        sizes = np.unique(np.round(diam[sized])) if sized.any() else np.array([])
        if not len(sizes) and options.size is None and options.format == "zarr" and (
            waiting.any()
        ):
            first = int(np.flatnonzero(waiting)[0])
            msg = (
                "the cutout size is not known: no row can be cut now, and the "
                f"sizes of the rows whose tiles cannot be read (e.g. row {first}: "
                f"{messages.get(first, 'tile error')}) are angles, which need "
                "their tile's pixel scale; give --size N or --target-size N"
            )
            raise ConfigError(msg)
        if len(sizes) <= 1:
            n = int(sizes[0]) if len(sizes) else int(np.round(options.size or 1))
            out_shape = (n, n)
        elif options.format == "fits":
            out_shape = None
        elif batches:
            msg = (
                f"cutout sizes vary ({int(sizes.min())}..{int(sizes.max())} px) but "
                "a batch of iter_cutouts holds one size: give target_size=N (with "
                "resample) or size=N"
            )
            raise ConfigError(msg)
        else:
            msg = (
                f"cutout sizes vary ({int(sizes.min())}..{int(sizes.max())} px) but "
                "the Zarr output holds one size: give --target-size N (with "
                "--resample), --size N, or use --format fits"
            )
            raise ConfigError(msg)
    itemsize = np.dtype(options.dtype).itemsize
    chunk_rows = None
    if chunked and options.format == "zarr":
        # jobs aligned with the store's chunks write them whole, unstaged
        n_channels = max(1, len(index.bands))
        row_bytes = n_channels * out_shape[0] * out_shape[1] * itemsize
        chunk_rows = choose_chunk_rows(len(status), row_bytes)
    processes = options.backend == "processes"
    # measured now, both (a plan that fails leaves memory behind)
    parent = {}
    if measure_parent is not None:
        _release_free_memory()  # what reading the catalogue left behind
        for in_process in (False, True) if processes else (False,):
            measured = measure_parent(in_process)
            if options.format == "zarr" and measured is not None:
                # the run frees them before cutting
                measured = max(0, measured - _freed_bytes(cat))
            parent[in_process] = measured

    band_xy = index.band_positions(assignment.tile, cat.ra, cat.dec)

    def plan_for(n_workers, parent_bytes, fit_workers):
        return make_plan(
            index,
            assignment,
            diam,
            status,
            messages,
            out_shape=out_shape,
            out_itemsize=itemsize,
            memory_limit=options.memory_limit,
            n_workers=n_workers,
            max_sources_per_job=options.max_sources_per_job,
            parent_bytes=parent_bytes,
            meta={"config": options.to_config(), "bands": list(index.bands),
                  **_own_grid_meta(index)},
            chunk_rows=chunk_rows,
            fit_workers=fit_workers,
            parent_row_bytes=PARENT_ROW_BYTES
            + (FITS_ROW_BYTES if options.format == "fits" else 0),
            band_xy=band_xy,
            band_diameters=band_diam,
        )

    try:
        # worker processes are started for the plan: as many as fit
        plan = plan_for(
            options.workers if options.backend != "serial" else 1, parent.get(False),
            fit_workers=processes,
        )
    except ValueError as exc:  # the memory limit cannot hold the largest cutout
        plan = None
        least = exc
        if parent.get(True) is not None:
            # ... beside a worker process and its server: in this process?
            try:
                plan = plan_for(1, parent[True], fit_workers=False)
            except ValueError as alone:
                least = alone  # (the memory the run needs at the least)
        if plan is None:
            hint = _memory_hint(
                str(least), cat, diam, status, assignment, options, size_arcsec
            )
            raise ConfigError(hint) from None
        logger.warning(
            "memory limit %s holds no worker process beside the main process "
            "and the worker server (%s): the main process cuts (backend "
            "'serial', estimated peak %s)", _fmt_bytes(plan.memory_limit),
            str(exc).split(": ", 1)[-1].split(";")[0], _fmt_bytes(plan.peak_bytes),
        )
        options.backend = "serial"
        options.workers = 1
    if plan.workers_asked:
        logger.warning(
            "memory limit %s holds %d of the %d workers asked for (each needs "
            "about %s and its jobs, beside the main process's %s): running %d",
            _fmt_bytes(plan.memory_limit), plan.n_workers, plan.workers_asked,
            _fmt_bytes(plan.memory.worker_bytes + plan.memory.working_bytes),
            _fmt_bytes(plan.memory.parent_bytes), plan.n_workers,
        )
        options.workers = plan.n_workers
    if plan.out_shape is None:
        plan.jobs = _split_by_size(plan.jobs, plan.memory)
    _check_crop(plan, options)
    settings = CutSettings(
        out_shape=plan.out_shape,
        resample=options.resample,
        normalize=options.normalize,
        dtype=options.dtype,
        flux_conversion=bool(options.flux_conversion),
        zeropoint_keyword=options.zeropoint_keyword,
        channel_weights=None
        if options.channel_weights is None
        else tuple(options.channel_weights),
        band_names=tuple(index.bands),
        norm_kwargs=options.norm_kwargs(),
        n_threads=options.threads,
        # a worker keeps its tiles mapped between jobs in half the room the
        # memory limit leaves (the rest is a margin for the estimates); a
        # Dask cluster's workers watch their own memory
        keep_bytes=plan.spare_worker_bytes // 2 if options.backend != "dask" else 0,
    )
    plan.beyond_bytes = _beyond_bytes(plan, index, options, settings.keep_bytes)
    path = None
    if isinstance(catalog, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(catalog))
    band_box = None if band_diam is None else square_boxes(band_diam)
    return _Prepared(cat, index, plan, options, settings, path, chunk_rows, band_box)


#: The catalogue columns a Zarr run frees once its store holds them
#: (`_Runner.drop_catalogue_columns`).
_FREED_COLUMNS = (
    "source_id", "ra", "dec", "size_pixel", "size_arcsec", "fits_file_paths",
)


def _freed_bytes(cat):
    """Bytes of `_FREED_COLUMNS` (a list's pointers; its tuples are shared)."""
    total = 0
    for name in _FREED_COLUMNS:
        value = getattr(cat, name)
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif value is not None:
            total += 8 * len(value)
    return total


def _check_crop(plan, options):
    """A crop (``crop``) larger than the plan's smallest cutouts is a usage
    error, found before anything is cut."""
    if options.crop is None or options.normalize == "none" or not plan.jobs:
        return
    if plan.out_shape is not None:
        height, width = plan.out_shape
    else:
        height, width = np.concatenate([job.box for job in plan.jobs]).min(axis=0)
    try:
        Normalizer(options.normalize, **options.norm_kwargs()).region((height, width))
    except ValueError as exc:
        msg = (
            f"{exc}: the smallest cutouts are {height} x {width} pixels; give the "
            "crop as a fraction (e.g. --crop 0.5) or choose a smaller one"
        )
        raise ConfigError(msg) from None


def _split_by_size(jobs, memory):
    """Split jobs so that every job cuts boxes of one size (FITS of varied sizes).

    A job's result holds one ``(n, C, H, W)`` array; without a target size
    the output size is the box size, so a job must not mix box sizes. Job
    ids are renumbered in order.
    """
    out = []
    for job in jobs:
        sizes = np.unique(job.box, axis=0) if len(job) else job.box[:1]
        for size in sizes:
            keep = np.all(job.box == size, axis=1) if len(sizes) > 1 else slice(None)
            rows = job.rows[keep]
            out.append(
                job.subset(
                    keep,
                    job_id=len(out),
                    est_bytes=memory.job_bytes(len(rows)) if len(sizes) > 1
                    else job.est_bytes,
                )
            )
    return out


def _short_lists(index):
    """The file lists of an index (built from them) that name no file for a
    band, being shorter: ``(tiles, empty)``, the tiles of those that name
    files for some bands, as tile -> (number of files, first band without
    one), and the set of those that name none for any band asked (they
    make no tile, though none of their files failed)."""
    failed = {p for p, _ in index.errors}
    tiles, empty = {}, set()
    for files, t in index.file_lists.items():
        if t < 0:
            if files and not failed.intersection(files):
                empty.add(files)
            continue
        tile = index.tiles[t]
        left_out = {name for name, _ in tile.problems}  # (a WCS not compared)
        names = [index.bands[i] for i in tile.missing_bands]
        names = [name for name in names if name not in left_out]
        if names:
            tiles[t] = (len(files), names[0])
    return tiles, empty


def _memory_hint(text, cat, diam, status, assignment, options, size_arcsec):
    """A planner error, naming the row with the largest cutout (and the
    column and value its size comes from)."""
    cut = (status == Status.OK) & (np.asarray(assignment.tile) >= 0) & np.isfinite(diam)
    if not cut.any():
        return text
    rows = np.flatnonzero(cut)
    r = int(rows[np.argmax(diam[rows])])
    where = _size_origin(cat, options, r, size_arcsec)
    return f"{text} (the largest cutout is {diam[r]:.0f} pixels, from {where})"


def _size_origin(cat, options, r, size_arcsec, *, value=True):
    """Where row ``r``'s size comes from: ``--size``, or its catalogue cell
    (the angle's column where ``size_arcsec`` says the size is an angle),
    with its ``value``."""
    if options.size is not None:
        return "--size"
    angle = np.isfinite(size_arcsec[r])
    column = cat.columns.get("diameter_arcsec" if angle else "diameter_pixel")
    cell = f"{cat.source} row {r} column {column!r}"
    number = size_arcsec[r] if angle else cat.size_pixel[r]
    return f"{cell} (value {float(number):g})" if value else cell


def _bad_size(status, messages, rows, source):
    """Make ``rows`` bad rows for want of a size (in place)."""
    status[rows] = Status.BAD_ROW
    for r in np.flatnonzero(rows):
        messages.setdefault(int(r), f"{source} row {r}: no usable size")


def _size_columns(cat, options):
    """Per row, the box diameter in pixels (``--size``, or the catalogue's;
    NaN where unknown) and, where that is unknown, in arcsec (NaN elsewhere)."""
    n = len(cat)
    if options.size is not None:
        return np.full(n, float(options.size)), np.full(n, np.nan)
    pix = np.asarray(cat.size_pixel, dtype=np.float64)
    arcsec = np.asarray(cat.size_arcsec, dtype=np.float64)
    return pix, np.where(np.isfinite(pix), np.nan, arcsec)


def _warn_angles_on_own_grids(index, tile, angular):
    """Warn once when sources with sizes in arcseconds (``angular``) lie on
    a tile with a band on a pixel grid of its own and the output is not
    resampled: their boxes have the reference band's number of pixels in
    every band, so such a band's cutout covers another part of the sky
    (resampled outputs cut the angle in each band, `_band_boxes`)."""
    tile = np.asarray(tile)
    for k, tl in enumerate(index.tiles):
        if not tl.own_grid or not np.any(angular & (tile == k)):
            continue
        ref = tl.pixel_scale_arcsec()
        c = tl.own_grid[0]
        own = tl.bands[c].pixel_scale_arcsec()
        logger.warning(
            "tile %s: sizes in arcseconds become pixels at the pixel scale of "
            "its band %s (%.3g arcsec/pixel), and band %s (%.3g arcsec/pixel, "
            "a pixel grid of its own) is cut with as many pixels, so its "
            "cutouts span %.3g times the angle; to cut the same angle in every "
            "band (as ESA Cutana does), resample them to one size "
            "(--target-size N), or cut band %s in a run of its own (--bands %s)",
            tl.key, index.bands[next(i for i, b in enumerate(tl.bands) if b)],
            ref, index.bands[c], own, own / ref, index.bands[c], index.bands[c],
        )
        return


def _scale_owner(index, tile, band_diam, r, value):
    """Whose pixels a row's diameter ``value`` counts, for messages: ``its
    tile``, or ``band X of its tile`` for a band on a grid of its own."""
    if band_diam is not None and tile[r] >= 0:
        tl = index.tiles[int(tile[r])]
        for c in tl.own_grid:
            if band_diam[r, c] == value:
                return f"band {index.bands[c]} of its tile"
    return "its tile"


def _band_boxes(index, tile, size_arcsec, diam, options):
    """Box diameters per row and band, ``(N, C)`` float64, or None.

    A size in arcseconds becomes pixels at each band file's own pixel scale
    in the bands on a pixel grid of their own (`~cutana.tiles.Tile.own_grid`),
    as ESA Cutana converts it per file, when the cutouts are resampled to
    one size (``--target-size``): every band's cutout then spans the same
    angle. The other bands, and sizes in pixels, keep ``diam``. None when no
    row needs it.
    """
    if options.target_size is None or options.resample == "none":
        return None
    own = [k for k, t in enumerate(index.tiles) if t.own_grid]
    tile = np.asarray(tile)
    angular = np.isfinite(size_arcsec) & np.isin(tile, own)
    if not angular.any():
        return None
    diam = np.asarray(diam, dtype=np.float64)
    out = np.repeat(diam[:, None], len(index.bands), axis=1)
    for k in own:
        rows = np.flatnonzero(angular & (tile == k))
        tl = index.tiles[k]
        for c in tl.own_grid:
            if len(rows) and tl.bands[c] is not None:
                out[rows, c] = tl.bands[c].angle_in_pixels(size_arcsec[rows])
    return out


def _own_grid_meta(index):
    """``{"own_grid": bands}``: the bands on a pixel grid of their own in
    some tile (`~cutana.tiles.Tile.own_grid`), for the plan's summary; empty
    when there are none."""
    own = {c for t in index.tiles for c in t.own_grid}
    return {"own_grid": [index.bands[c] for c in sorted(own)]} if own else {}


def _diameters(pix, arcsec, index, tile):
    """Box diameter in pixels per row: ``pix``, or where ``arcsec`` is given
    (`_size_columns`) that angle in pixels of the row's tile as astropy's
    Cutout2D converts it (`~cutana.tiles.Tile.angle_in_pixels`; ``tile``:
    per row, -1 for none, which takes the first tile's)."""
    use = np.isfinite(arcsec)
    if not use.any():
        return pix
    if not index.tiles:  # no tile could be read: no pixel scale
        return np.where(use, np.nan, pix)
    tile = np.where(np.asarray(tile) >= 0, tile, 0)
    out = np.array(pix, dtype=np.float64)
    for k in np.unique(tile[use]).tolist():
        rows = np.flatnonzero(use & (tile == k))
        out[rows] = index.tiles[k].angle_in_pixels(arcsec[rows])
    return out


def plan_cutouts(catalog, *, progress=None, **options):
    """Plan a run without cutting anything (what ``cutana plan`` prints).

    Parameters
    ----------
    catalog : str, path-like, `~astropy.table.Table` or `pandas.DataFrame`
        The source catalogue.
    progress : bool, optional
        Show progress bars while a large catalogue or many tile headers are
        read (default: when standard error is a terminal).
    **options
        The options of `make_cutouts` (``output`` is not needed).

    Returns
    -------
    plan : `~cutana.planner.Plan`
        The plan; ``plan.summary()`` describes it with its memory estimate.

    Examples
    --------
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.pipeline import plan_cutouts
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> plan = plan_cutouts(survey.catalogue_path, size=16, memory_limit="2GB")
    >>> plan.n_rows, len(plan.jobs) >= 1, plan.out_shape
    (40, True, (16, 16))
    """
    import psutil

    options = RunOptions.from_keywords(options)

    def sample(exclude=()):
        # the memory this process holds once the catalogue is read stands
        # for a run's main process, as `make_cutouts` measures it at the
        # same point
        rss = MemorySampler.tree_rss(psutil.Process())
        for pid in exclude:
            with contextlib.suppress(psutil.Error):
                rss -= psutil.Process(pid).memory_info().rss
        return rss

    return _prepare(
        catalog, options, measure_parent=_parent_measure(sample, set, options),
        progress=_show_progress(progress),
    ).plan


def _parent_measure(sample, worker_pids, options):
    """`_prepare`'s ``measure_parent(in_process)`` for a run.

    ``sample(exclude)`` of the process tree (`MemorySampler.sample`)
    without the workers (``worker_pids()``); for the ``processes`` backend
    (``options.backend`` when it measures), at least this process alone and
    `SERVER_BYTES` for the worker server and multiprocessing's resource
    tracker, whether or not they run yet (a Python caller's `make_cutouts`
    starts them after planning; the command may start them first, and the
    server may still be importing). With ``in_process``, without the worker
    server: for a run that cuts in this process.
    """

    def measure(in_process=False):
        workers = set(worker_pids())
        server = worker_server_pid()
        if in_process:
            return sample(workers | ({server} if server is not None else set()))
        rss = sample(workers)
        if options.backend == "processes":
            import psutil

            try:
                kids = {p.pid for p in psutil.Process().children(recursive=True)}
            except psutil.Error:
                kids = set()
            rss = max(rss, sample(kids | workers) + SERVER_BYTES)  # (this one alone)
        return rss or None

    return measure


def _show_progress(progress):
    """Whether to show progress bars: ``progress``, by default (None) when
    standard error is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


def _release_free_memory():
    """Hand memory freed by this process back to the OS (glibc only).

    Reading a large catalogue leaves the heap grown; glibc keeps freed heap
    memory for later allocations, so the process would hold that peak for
    the whole run.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# ----------------------------------------------------------------------------
# make_cutouts
# ----------------------------------------------------------------------------


def make_cutouts(
    catalog,
    output,
    *,
    resume=False,
    overwrite=False,
    progress=None,
    client=None,
    **options,
):
    """Cut every catalogue source out of the survey tiles and write one output.

    Parameters
    ----------
    catalog : str, path-like, `~astropy.table.Table` or `pandas.DataFrame`
        The sources: CSV, ECSV, FITS, Parquet or VOTable (anything astropy
        reads), with RA/Dec in degrees, an id column, and a size column
        (``diameter_pixel`` or ``diameter_arcsec``) unless ``size`` is given.
        An ESA Cutana ``fits_file_paths`` column gives each source's tile
        files when ``tiles`` is not given.
    output : str or path-like
        The output. For ``format='zarr'`` this folder *is* the Zarr store;
        for ``'fits'`` it holds one file per source and ``index.ecsv``.
    resume : bool, optional
        Finish an interrupted run into ``output``: what its ledger records
        as complete is kept, the rest is done. The result is identical to an
        uninterrupted run. Staged jobs are kept if their checksums match;
        chunks and FITS files (written whole, under their final names only
        once complete) if they are present: a missing one is cut again.
        `cutana.io.verify_output` (``cutana verify``) also checks every
        chunk's checksum. A finished output whose files were removed since
        cannot be resumed (`~cutana.exceptions.ConfigError`). Resuming a
        finished output cuts its ``TILE_ERROR`` and ``NO_OVERLAP`` rows that
        the tiles as they are now can cut, and keeps every other row.
    overwrite : bool, optional
        Replace an existing output (only a cutana output is ever removed).
        Without ``resume`` or ``overwrite`` an existing output is an error.
    progress : bool, optional
        Show a progress bar (default: when standard error is a terminal).
    client : `distributed.Client`, optional
        A Dask client for ``backend='dask'``.
    **options
        Run options, one per ``cutana run`` flag: ``tiles`` (paths or globs),
        ``bands``, ``size`` (pixels, overrides the catalogue), ``target_size``,
        ``resample`` ('none', 'nearest', 'bilinear', 'area'), ``normalize``
        ('none', 'linear', 'sqrt', 'log', 'asinh', 'zscale'), ``dtype``
        ('float32', 'uint8', 'uint16'), ``percentile``, ``stretch_a``,
        ``zscale_contrast``, ``zscale_samples``, ``crop``,
        ``flux_conversion``, ``zeropoint_keyword``, ``channel_weights``,
        ``format`` ('zarr', 'fits'), ``workers``, ``threads``,
        ``memory_limit`` (e.g. '4GB'), ``backend`` ('serial', 'processes',
        'dask'), ``scheduler``, ``max_sources_per_job``; ``id_column``,
        ``ra_column`` and ``dec_column`` name the catalogue's columns where
        they are not under the usual names (see `cutana.read_catalog`).

    Returns
    -------
    report : `~cutana.pipeline.RunReport`
        Counts per status, time, throughput, peak memory, failures.

    Raises
    ------
    ConfigError
        For invalid options, or an existing output without ``resume`` or
        ``overwrite``.
    cutana.exceptions.CatalogError
        If the catalogue cannot be read.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import cutana
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.pipeline import make_cutouts
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> out = os.path.join(tempfile.mkdtemp(), "out.zarr")
    >>> report = make_cutouts(survey.catalogue_path, out, size=16, memory_limit="2GB",
    ...                       progress=False)
    >>> report.exit_code, report.n_rows
    (0, 40)
    >>> cutana.open(out).images.shape
    (40, 4, 16, 16)
    """
    t0 = time.perf_counter()
    opts = RunOptions.from_keywords(options)
    show = _show_progress(progress)
    for name, value in (("resume", resume), ("overwrite", overwrite)):
        if not isinstance(value, bool | np.bool_):
            _bad(name, value, "true or false")
    if not isinstance(output, str | os.PathLike):
        _bad("output", output, "a path")
    output = os.fspath(output)
    if resume and overwrite:
        msg = "resume and overwrite exclude each other"
        raise ConfigError(msg)
    exists = os.path.isdir(output) and bool(os.listdir(output))
    if os.path.exists(output) and not os.path.isdir(output):
        msg = f"output {output!r} exists and is not a folder"
        raise ConfigError(msg)
    _check_can_make(output)
    if exists and not (resume or overwrite):
        msg = (
            f"output {output!r} already exists: pass --resume to finish it or "
            "--overwrite to replace it"
        )
        raise ConfigError(msg)

    # with a memory limit, worker processes start once the plan knows how
    # many the limit holds; without one, while the catalogue is read
    warm_early = opts.memory_limit is None
    opts.validate()
    # workers in another working folder (a Dask cluster's) write here too
    output = os.path.abspath(output)
    own_client = client is None and opts.backend == "dask" and bool(opts.scheduler)
    if own_client:  # reached now: an unreachable one is a usage error
        client = _connect(opts.scheduler)
    lock = _OutputLock(output)
    try:
        lock.acquire()  # before anything reads or changes the output
        # worker processes start (and import cutana) while the catalogue is read
        executor = Executor(
            opts.backend,
            opts.workers,
            retries=1,
            scheduler=opts.scheduler,
            client=client,
            preload=list(worker_preload(opts.format)),
        )
        try:
            if warm_early:
                executor.warm_up()
            with MemorySampler() as sampler:
                try:
                    # the workers' own memory is the plan's to estimate
                    prepared = _prepare(
                        catalog, opts,
                        measure_parent=_parent_measure(
                            sampler.sample, executor.worker_pids, opts
                        ),
                        progress=show,
                    )
                    if opts.backend == "processes":
                        executor.resize(prepared.plan.n_workers)
                        executor.warm_up()  # (started already without a limit)
                    elif executor.backend == "processes":  # the limit holds none
                        executor.close()
                        stop_worker_server()  # (whose memory it would count)
                        executor = Executor("serial", 1, retries=1)
                    _release_free_memory()  # what planning left behind
                    runner = _Runner(prepared, output, show, client)
                    runner.ready_workers(executor)
                    runner.start(
                        resume=bool(exists and resume),
                        overwrite=bool(exists and overwrite),
                    )
                    lock.acquire()  # the folder just made (or made anew)
                    runner.drop_catalogue_columns()
                    _release_free_memory()  # what creating the store left behind
                    runner.run(executor)
                finally:
                    _release_scratch()
                    release_buffers()  # this process's write buffers (serial)
                    executor.close()
                runner.finish()
        finally:
            executor.close()  # also if stopped before the cutting began
        report = runner.report(time.perf_counter() - t0, sampler)
        runner.close(report)
    finally:
        lock.release()
        if own_client:
            client.close()
    if runner.repair_next:
        # the interrupted run is finished: cut the rows of the tiles that can
        # be read since, as for any finished run resumed
        again = make_cutouts(
            catalog,
            output,
            resume=True,
            progress=progress,
            client=None if own_client else client,
            **options,
        )
        return _joined(report, again)
    return report


def _check_can_make(output):
    """Raise `ConfigError` now, before the catalogue is read, if the folder
    ``output`` does not exist and cannot be made (a file on its path, a
    read-only or virtual file system, no permission): made, then removed
    again, with the folders above it that did not exist."""
    made = []
    path = os.path.abspath(output)
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    try:
        for folder in reversed(made):
            os.mkdir(folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        msg = f"output {output!r} cannot be made: {reason} ({exc.filename!r})"
        raise ConfigError(msg) from None
    finally:
        for folder in made:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _joined(first, then):
    """The report of a run finished (``first``) and then resumed (``then``)."""
    seconds = first.seconds + then.seconds
    cut = first.cutouts_per_second * first.seconds
    cut += then.cutouts_per_second * then.seconds
    later = [(round(t + first.seconds, 3), b) for t, b in then.memory_samples]
    return dataclasses.replace(
        then,
        seconds=seconds,
        cutouts_per_second=cut / seconds if seconds > 0 else 0.0,
        peak_memory=max(first.peak_memory, then.peak_memory),
        memory_samples=first.memory_samples + later,
    )


def _connect(scheduler):
    """A `distributed.Client` of the Dask scheduler at ``scheduler``, or a
    `ConfigError` saying it cannot be reached (before anything is written)."""
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - optional dependency
        msg = "the dask backend needs dask[distributed]: pip install 'cutana[dask]'"
        raise ConfigError(msg) from exc
    try:
        return Client(scheduler)
    except (OSError, TimeoutError, ValueError) as exc:
        msg = f"cannot reach the Dask scheduler {scheduler!r} (--scheduler): {exc}"
        raise ConfigError(msg) from None


class _OutputLock:
    """An exclusive lock on a run's output folder while the run writes it.

    Two runs writing one output at once (a ``--resume`` started while the
    first run still goes on, say) would take each other's staged jobs and
    chunks for their own. The lock is ``flock`` on the folder, which the
    system drops when the process ends, however it ends; a second run that
    finds it taken stops with a usage error. Where the file system has no
    such locks, runs go on without one.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.fd = None

    def acquire(self):
        """Lock the folder if it exists and is not locked by this object yet
        (again if it was removed and made anew since)."""
        if fcntl is None or not os.path.isdir(self.path):
            return
        if self.fd is not None:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                return
            self.release()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                msg = (
                    f"output {self.path!r} is being written by another cutana run "
                    "right now: wait for it to end, or stop it, before running again"
                )
                raise ConfigError(msg) from None
            return  # no locks on this file system
        self.fd = fd

    def release(self):
        """Unlock the folder."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _core_to_spare(options):
    """Whether the workers (times their threads) leave a core to spare for
    writing their chunk files.

    Then a background thread of the worker writes them (``O_DIRECT``) while
    the worker compresses the next; it spends its time waiting for the
    device. When the workers take every core, compressing and writing in
    turn is as fast and leaves the writing to the page cache (paper
    workload, two workers on two cores: 2.84 s against 2.94 s, less CPU
    time but more waiting), and a Dask cluster's workers are not counted.
    """
    if options.backend == "dask":
        return False
    workers = options.workers if options.backend != "serial" else 1
    return workers * options.threads < available_cores()


#: Memory each worker must have to spare beyond its jobs (`Plan.spare_worker_bytes`)
#: for a helper thread to compress chunks beside it (`_helper_fits`).
HELPER_SPARE_BYTES = 128 * 10**6


def _helper_fits(background, plan):
    """Whether a worker with a core to spare (``background``) also compresses
    every other chunk in a helper thread (`cutana.io.zarr._encode_pairs`).

    On the paper workload with one worker on two cores, 4.30 s instead of
    4.61 s (means of four runs taken turn about), with the same store. The
    helper's chunks and heap held 15-40 MB more in the worker: a 200,000-row
    run at ``--memory-limit 450MB`` (1.5 MB to spare) peaked at 440-476 MB
    with it. It is therefore used only where the plan leaves each worker
    `HELPER_SPARE_BYTES` to spare.
    """
    return bool(background) and plan.spare_worker_bytes >= HELPER_SPARE_BYTES


def _stretch_fits(background, plan, extra=0):
    """Whether a worker with a core to spare (``background``) stretches each
    sub-batch in a thread of its own while it resamples the next
    (`cut_job`'s ``stretch_thread``): where the half of the plan's spare
    memory per worker that mapped tiles do not take holds a second
    sub-batch's working memory beside `HELPER_SPARE_BYTES` (the helper that
    compresses chunks may run too), and ``extra`` bytes more.

    One worker on the paper workload (with `_overlap_fits`): 3.75 s instead
    of 4.18 s (means of eight alternating pairs).
    """
    need = HELPER_SPARE_BYTES + plan.memory.working_bytes + extra
    return bool(background) and plan.spare_worker_bytes // 2 >= need


def _overlap_fits(background, plan, options):
    """Whether a ``serial`` Zarr run with a core to spare (``background``)
    writes each job's chunks in a thread while it cuts the next job
    (`_run_task_overlapped`).

    The paper workload with one worker then took 3.72 s instead of 4.24 s
    (means of four alternating pairs), and stretching in a thread of its
    own too, 3.60 s instead of 4.31 s (four pairs, in a slower phase of the
    machine). It holds a second job's cutouts and buffers, a second
    sub-batch and the thread's compressed chunks: used only where
    `_stretch_fits` holds with room for the largest job besides (so that
    the cutting stretches in its thread too).
    """
    if options.backend != "serial" or options.format != "zarr":
        return False
    largest = max((j.est_bytes for j in plan.jobs), default=0)
    return _stretch_fits(background, plan, extra=largest)


def _helpers(plan, options):
    """What a run's workers do in threads of their own on a spare core:
    ``(writes, overlap, stretch)``, the `_Writes` of their chunk files
    (`_core_to_spare`, `_helper_fits`), `_overlap_fits` and `_stretch_fits`.
    The run (`_Runner`) and its plan's summary (`_beyond_bytes`) ask here."""
    background = _core_to_spare(options)
    return (
        # (a Dask cluster's workers may write the ledger over a network
        # file system, where appends can interleave: the parent records)
        _Writes(background, _helper_fits(background, plan),
                record=options.backend != "dask"),
        _overlap_fits(background, plan, options),
        _stretch_fits(background, plan),
    )


#: What the helper thread that compresses chunks (`_helper_fits`) holds at
#: most: its chunks and heap took 15-40 MB in a worker.
HELPER_HELD_BYTES = 40 * 10**6


def _beyond_bytes(plan, index, options, keep_bytes):
    """Bytes a run's workers may hold beyond the plan's estimated peak.

    Per worker: the local, uncompressed tile files it may keep mapped
    between jobs (``keep_bytes`` at most), and with a core to spare what
    its threads hold: a second job (`_overlap_fits`) or a second
    sub-batch (`_stretch_fits`), and the chunks of the helper that
    compresses (`_helper_fits`); never more than the plan's
    `~cutana.planner.Plan.spare_worker_bytes`. The paper workload with
    one worker: estimated peak 413 MB, and up to 482 MB beyond it (the
    256 MB tile, a second job of 186 MB and the helper's 40 MB); the run
    peaked at 588 MB.
    """
    files = {
        (b.path, repr(b.hdu)): int(np.prod(b.shape)) * np.dtype(b.dtype).itemsize
        for t in index.tiles
        for b in t.bands
        if b is not None and not b.compressed and not b.is_remote
    }
    maps = min(keep_bytes, sum(files.values()))
    writes, overlap, stretch = _helpers(plan, options)
    threads = 0
    if overlap:
        threads = max((j.est_bytes for j in plan.jobs), default=0)
    elif stretch:
        threads = plan.memory.working_bytes
    if options.format == "zarr" and writes.helper:
        threads += HELPER_HELD_BYTES
    per_worker = min(plan.spare_worker_bytes, maps + threads)
    return int(plan.n_workers * per_worker)


def _tile_state(tile):
    """What a run records about a tile it numbers: its key, and each band
    file's path and a digest of its header (None for a missing band)."""
    return {
        **_tile_listing(tile),
        "headers": [
            None if b is None else hashlib.sha256(b.header.encode()).hexdigest()
            for b in tile.bands
        ],
    }


def _save_tiles(output, index):
    """Record the tiles a run's plan numbers (``OUT/.cutana/tiles.json``)."""
    path = os.path.join(state_dir(output), "tiles.json")
    with open(path, "w") as fh:
        json.dump({"bands": list(index.bands),
                   "tiles": [_tile_state(t) for t in index.tiles]}, fh)


def _load_tiles(output):
    """The tiles recorded by `_save_tiles`: ``(bands, records)``, or None
    (none, as in a run of an older version, or unreadable)."""
    try:
        with open(os.path.join(state_dir(output), "tiles.json")) as fh:
            saved = json.load(fh)
        bands, records = list(saved["bands"]), list(saved["tiles"])
        for record in records:
            if not {"key", "paths", "headers"} <= set(record):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return bands, records


def _tiles_then(saved, index, used):
    """The tiles of ``index`` in the numbering of an interrupted run, and
    what changed since in the tiles it cut from.

    ``saved`` is what `_load_tiles` read, ``used`` the numbers of the tiles
    of its plan's jobs. Returns ``(tiles, why)``: the list of ``index``'s
    tiles in the saved order (None when one is not in ``index`` any more
    or has another file for a band), and ``''`` or the first change in a
    tile of ``used`` (another file for a band, or a file whose header
    differs: cutting on would mix two versions of a tile in one output). A
    band file new since (put back) is not a change.
    """
    bands, records = saved
    if list(bands) != list(index.bands):
        return None, ""
    by_key = {tile.key: tile for tile in index.tiles}
    tiles = []
    for t, record in enumerate(records):
        tile = by_key.get(record["key"])
        if tile is None:
            if t in used:
                return None, f"tile {record['key']} is not among the tiles now"
            return None, ""
        now = _tile_state(tile)
        then = zip(record["paths"], record["headers"], now["paths"], now["headers"],
                   strict=True)  # fmt: skip
        for path, header, path_now, header_now in then:
            if path is None:
                continue  # a band file new since
            if path != path_now:
                why = (
                    f"{path} cannot be read now" if path_now is None
                    else f"tile {tile.key} has another file for a band: {path_now}"
                )
                return None, why if t in used else ""
            if t in used and header != header_now:
                return None, f"{path} has changed since (its header differs)"
        tiles.append(tile)
    return tiles, ""


def _readable_since(old, new, tiles, index):
    """The rows an interrupted run could not cut that it can now, when
    that is all that differs; or None.

    A tile file put back or mended after a run was interrupted changes the
    plan: the rows the interrupted run's plan ``old`` gave ``TILE_ERROR``
    are planned in jobs now, and the tiles may be numbered otherwise. A tile
    whose files could not be read at all (matched by ``--tiles``), or that
    is new, was not indexed then: the rows the new plan puts on it lay on no
    tile, or on another (at its edge), and are readable since too. When
    every other row is planned as before (same status, tile, position and
    box) and its tiles are as they were (``tiles``, ``index``'s tiles in
    ``old``'s numbering, from `_tiles_then`), the interrupted run is
    finished with ``old`` and its tiles, and those rows are cut afterwards,
    as a finished run's are (`_Repair`).

    Returns ``(readable, index)``: a boolean mask of the rows readable
    since, and a `TileIndex` of ``tiles``. None when nothing is readable
    since or more differs (the run is then refused).
    """
    if old is None or tiles is None or old.n_rows != new.n_rows:
        return None
    readable = (np.asarray(old.base_status) == Status.TILE_ERROR) & (
        np.asarray(new.base_status) != Status.TILE_ERROR
    )
    number = {id(tile): t for t, tile in enumerate(tiles)}
    # the new plan in the old numbering; a tile new to the index gets a
    # number of its own, which differs from every old one
    jobs = [
        dataclasses.replace(
            job, tile=number.get(id(index.tiles[job.tile]), -2 - job.tile)
        )
        for job in new.jobs
    ]
    for job in jobs:
        if job.tile < -1:
            # a tile whose files could not be read then (so that it was not
            # indexed): its rows lay on no tile, or at a neighbour's edge
            readable[job.rows] = True
    if not readable.any():
        return None
    kept = ~readable
    if old.output_fingerprint(kept) != dataclasses.replace(
        new, jobs=jobs
    ).output_fingerprint(kept):
        return None
    return readable, TileIndex(tiles, index.bands, index.errors, index.file_lists)


def _tile_changes(old, new, *, broken_only=False):
    """`` (tiles: ...)`` saying which rows' tiles could be read by one run and
    not the other (a tile repaired or broken since), or ``''``.

    With ``broken_only``, only the rows whose tiles cannot be read now: a
    tile put back is no reason for a refusal given for another (it is
    resumed when it is all that differs, `_readable_since`)."""
    if old is None or old.n_rows != new.n_rows:
        return ""
    was = np.asarray(old.base_status) == Status.TILE_ERROR
    now = np.asarray(new.base_status) == Status.TILE_ERROR
    parts = []
    for rows, text in ((was & ~now, "could not be read then and can now"),
                       (now & ~was, "could be read then and cannot now")):
        if broken_only and text.startswith("could not"):
            continue
        if rows.any():
            first = int(np.flatnonzero(rows)[0])
            parts.append(
                f"the tiles of {int(rows.sum())} rows (row {first}, ...) {text}"
            )
    return f" (tiles: {'; '.join(parts)})" if parts else ""


class _Runner:
    """Bookkeeping of one run in the main process."""

    def __init__(self, prepared, output, progress, client):
        self.p = prepared
        self.plan = prepared.plan
        self.fmt = prepared.options.format
        self.output = output
        self.client = client
        self.status = self.plan.base_status.copy()
        self.geometry = None  # (N, 5) rows of the chunks written (Zarr)
        self.messages = dict(self.plan.messages)
        self.failures = [
            msg if str(msg).startswith(str(path)) else f"{path}: {msg}"
            for path, msg in prepared.index.errors
        ]
        self.progress = progress
        self.n_cut = 0
        self.checksums = {}
        self.done_jobs = set()
        self.trimmed = {}  # job id -> the job's rows still to cut (a resumed run)
        self.file_names = None  # (a FITS output's, once derived)
        self._bar = None
        self.already_complete = False
        self.staged_rows = {}
        # per row, the FITS file name a job recorded ('' for none written),
        # None before: an object array holds them in 8 bytes a row beside
        # the names, where a dict took some 110 bytes more
        self.files = None
        if self.fmt == "fits":
            self.files = np.full(self.plan.n_rows, None, dtype=object)
        self.writes, self.overlap, self.stretch = _helpers(self.plan, prepared.options)
        self.repair = None  # a finished run's failed rows to cut again
        # an interrupted run resumed with a tile readable now that it could
        # not read: its output is resumed again once finished (_readable_since)
        self.repair_next = False
        self.archive = None  # the output, when it is a finished one

    # -- setup ------------------------------------------------------------
    def ready_workers(self, executor):
        """Have the workers make and write the buffers of their first job
        now (`_ready_worker`), while this process creates the output, where
        the plan's cutouts have one shape. The buffers are those of the
        largest job, which the plan's memory estimate already counts in
        every worker (`~cutana.planner.Plan.peak_bytes`)."""
        plan = self.plan
        if plan.out_shape is None or not plan.jobs:
            return
        dtypes = [
            working_dtype(b.dtype)
            for tile in self.p.index.tiles
            for b in tile.bands
            if b is not None
        ]
        executor.ready_workers(
            _ready_worker,
            max(len(job) for job in plan.jobs),
            len(self.p.index.bands),
            tuple(plan.out_shape),
            np.dtype(self.p.options.dtype),
            max(dtypes, key=lambda d: d.itemsize, default=np.dtype(np.float32)),
            self.stretch,
        )

    def start(self, resume, overwrite):
        plan = self.plan
        cat = self.p.catalog
        fingerprint = plan.fingerprint()
        ledger_path = os.path.join(state_dir(self.output), "ledger.jsonl")
        if resume and os.path.exists(ledger_path):
            early = Ledger(self.output).read()
            if not (early.runs or early.jobs or early.chunks):
                # killed between creating the ledger and recording the run's
                # start: nothing was done, so the run starts afresh
                logger.warning(
                    "%s: interrupted before its run was recorded; starting afresh",
                    self.output,
                )
                resume, overwrite = False, True
        if resume and not os.path.exists(ledger_path):
            if self._complete_output():
                # a run killed while removing its bookkeeping (or a repair,
                # below) left some behind
                marker = os.path.join(state_dir(self.output), REPAIR_MARKER)
                stopped = self.fmt == "fits" and os.path.exists(marker)
                remove_run_state(self.output)
                if stopped:  # still unfinished until this repair ends
                    _mark_repair(self.output)
                self.already_complete = True
                # a tile that cannot be read now matters only to rows that
                # still need it, which stay TILE_ERROR (exit 1)
                self.failures = []
                self.repair = _Repair.plan(self, stopped)
                return
            if not self._creation_interrupted():
                if self.fmt == "zarr" and os.path.isfile(
                    os.path.join(self.output, "zarr.json")
                ):
                    self._open_writer()  # says what is damaged, if anything
                msg = (
                    f"cannot resume {self.output!r}: it holds no cutana run state "
                    "(use --overwrite to start again)"
                )
                raise ConfigError(msg)
            # killed while creating the output, before any cutout was recorded:
            # there is nothing to keep, so the run starts afresh
            logger.warning(
                "%s: its creation was interrupted; starting afresh", self.output
            )
            resume, overwrite = False, True
        if resume:
            saved = os.path.join(state_dir(self.output), "plan.npz")
            old = Plan.load(saved) if os.path.exists(saved) else None
            tiles, why = None, ""
            saved_tiles = _load_tiles(self.output)
            if old is not None and saved_tiles is not None:
                used = {job.tile for job in old.jobs}
                tiles, why = _tiles_then(saved_tiles, self.p.index, used)
            # (a tile the interrupted run cut from has changed: refused below)
            if not why and old is not None and (
                old.output_fingerprint() == plan.output_fingerprint()
            ):
                # keep the interrupted run's jobs, whatever the new job sizes
                self.plan = plan = old
                fingerprint = plan.fingerprint()
            elif not why and (
                found := _readable_since(old, plan, tiles, self.p.index)
            ) is not None:
                # a tile put back or mended since: the interrupted run is
                # finished as planned, on its tiles, then the rows of that
                # tile are cut (make_cutouts resumes the finished output once
                # more)
                readable, index = found
                self.p = dataclasses.replace(self.p, index=index)
                logger.warning(
                    "%s: the tiles of %d rows (row %d, ...) that the interrupted "
                    "run could not read (or did not have) can be read now; they "
                    "are cut once the rest of the run is finished",
                    self.output,
                    int(readable.sum()),
                    int(np.flatnonzero(readable)[0]),
                )
                self.plan = plan = old
                self.status = plan.base_status.copy()
                self.messages = dict(plan.messages)
                fingerprint = plan.fingerprint()
                self.repair_next = True
            state = Ledger(self.output).read()
            if why or state.fingerprint != fingerprint:
                try:  # a store records its options from the start
                    differ = self._differing_options(open_output(self.output).config)
                except (OSError, ValueError, KeyError):
                    differ = ""
                msg = (
                    f"cannot resume {self.output!r}: the catalogue, tiles or options "
                    "differ from the interrupted run"
                    + (f" ({why})" if why else "")
                    + (f" (options: {differ})" if differ else "")
                    + _tile_changes(old, plan, broken_only=bool(why))
                    + " (use --overwrite to start again)"
                )
                raise ConfigError(msg)
            clean_staging(self.output)
            if self.fmt == "zarr":
                self.writer = self._open_writer()
                # the same values (same catalogue): none of their chunks is lost
                self.writer.write_catalogue_columns(
                    cat.source_id, cat.ra, cat.dec, self.p.band_box
                )
                verified = self.writer.verified_chunks(
                    state.chunks, rows=state.chunk_rows
                )
                self.checksums = {k: state.chunks[k] for k in verified}
                if not self.writer.rows_in_chunks:
                    self._keep_rows({k: state.chunk_rows[k] for k in verified})
            else:
                self.writer = FitsWriter(self.output, tuple(self.p.index.bands))
            self.ledger = Ledger(self.output)
            needed = self._jobs_needed()
            self.done_jobs = state.verified_jobs(self.output, needed)
            self._keep_unrecorded_jobs(state, needed)
            present = None if self.fmt == "zarr" else set(os.listdir(self.output))
            for job_id in sorted(self.done_jobs):
                done = load_staged(self.output, job_id, mmap=True)
                files = getattr(done, "files", None)
                if present is not None and files is not None and (
                    {str(f) for f in files if f} - present
                ):
                    # a FITS file of the job is gone since: the job is cut again
                    self.done_jobs.discard(job_id)
                    continue
                self._record(done.rows, done.status, done.messages, files)
                self.staged_rows[job_id] = np.asarray(done.rows)
            if present is not None:
                self._keep_present_files(present)
            else:
                self._trim_to_unwritten(needed)
            # jobs whose rows are all in written chunks are done too
            self.done_jobs |= set(range(len(plan.jobs))) - set(needed)
            return
        try:
            self._create_output(plan, cat, overwrite)
        except FileExistsError as exc:  # not a cutana output: never replaced
            raise ConfigError(str(exc)) from None
        os.makedirs(state_dir(self.output), exist_ok=True)
        plan.save(os.path.join(state_dir(self.output), "plan.npz"))
        _save_tiles(self.output, self.p.index)
        self.ledger = Ledger(self.output)
        self.ledger.run_started(fingerprint)

    def _keep_unrecorded_jobs(self, state, needed):
        """Record and keep the jobs that the interrupted run's workers
        staged but that it was stopped before recording (`staged_receipt`):
        their FITS files or staged rows are complete, and cutting them again
        rewrote files already there (a run killed at 2,876 of 2,910 FITS
        files rewrote 984 of them)."""
        recorded = set(state.jobs)
        for job_id in sorted(set(list_staged(self.output)) & set(needed) - recorded):
            receipt = staged_receipt(self.output, job_id)
            if receipt is None:
                continue
            rows = load_staged(self.output, job_id, mmap=True).rows
            if not np.isin(rows, self.plan.jobs[job_id].rows).all():
                continue  # (not this plan's job: cut again)
            self.ledger.job_staged(receipt)
            self.done_jobs.add(job_id)

    def _trim_to_unwritten(self, needed):
        """Cut the jobs still needed for the rows of their unwritten chunks
        only (`trimmed`): the chunks a stopped run's workers wrote and
        recorded as they went (``record`` of `ZarrWriter.write_chunks`)
        are kept, and their rows were cut again with the rest of their band
        (2,910 rows, the whole catalogue in one band, for a run killed at 12
        of its 24 chunks)."""
        cr = self.writer.chunk_rows
        written = np.array(sorted(self.checksums), dtype=np.int64)
        for job_id in needed:
            job = self.plan.jobs[job_id]
            left = ~np.isin(job.rows // cr, written)
            if job_id in self.done_jobs:
                # a job staged when it was cut for some rows only (trimmed by
                # an earlier resume) holds those: if a chunk of its other
                # rows is gone since, it is cut again
                staged = self.staged_rows.get(job_id)
                if staged is None or np.isin(job.rows[left], staged).all():
                    continue
                self.done_jobs.discard(job_id)
                self.staged_rows.pop(job_id)
            if left.any() and not left.all():
                self.trimmed[job_id] = job.subset(left)

    def _keep_present_files(self, present):
        """Keep the FITS files (names in ``present``) of the rows that no
        recorded or staged job accounts for: a file under its final name is
        complete (`FitsWriter.write_sources` renames a job's files into place
        once all are on disk), and one whose header names its row is the
        row's. Its status is read from its header, and its job is cut for
        its other rows only (`trimmed`): a run killed while its workers
        renamed a job's files into place, or before it recorded the job, had
        those files written again (1,017 of 2,910)."""
        self.file_names = fits_filenames(self.p.catalog.source_id)
        for job in self.plan.jobs:
            todo = self.status[job.rows] == Status.PENDING
            for row in job.rows[todo]:
                name = str(self.file_names[row])
                if name in present:
                    status = cutout_status(os.path.join(self.output, name), row)
                    if status is not None:
                        self._record([row], [status], {}, [name])
            left = self.status[job.rows] == Status.PENDING
            if not left.any():
                self.done_jobs.add(job.job_id)
                continue
            self.done_jobs.discard(job.job_id)
            if not left.all():
                self.trimmed[job.job_id] = job.subset(left)

    def drop_catalogue_columns(self):
        """Free the catalogue's per-row columns once a Zarr store holds them.

        After `start` a Zarr run reads them no more (a FITS run names its
        files and fills its headers from them until its index is written),
        and they grow with the catalogue: 90 bytes per row with ids of 12
        characters, which the main process would hold through the run.
        """
        if self.fmt == "zarr":
            self.p.catalog = dataclasses.replace(
                self.p.catalog, **dict.fromkeys(_FREED_COLUMNS)
            )

    def _create_output(self, plan, cat, overwrite):
        if self.fmt == "zarr":
            self.writer = ZarrWriter.create(
                self.output,
                n_rows=plan.n_rows,
                bands=list(self.p.index.bands),
                out_shape=plan.out_shape,
                dtype=self.p.options.dtype,
                source_id=cat.source_id,
                ra=cat.ra,
                dec=cat.dec,
                config=self.p.options.to_config(),
                tiles=[_tile_record(t) for t in self.p.index.tiles],
                attrs={"catalogue": self.p.catalog_path},
                overwrite=overwrite,
                chunk_rows=self.p.chunk_rows,
                band_box=self.p.band_box,
            )
        else:
            self.writer = FitsWriter.create(
                self.output, tuple(self.p.index.bands), overwrite=overwrite
            )

    def _differing_options(self, stored):
        """``'name old (now new), ...'`` for the output options of this run
        that differ from ``stored`` (an output's ``config``), or ``''``."""
        # both as JSON holds them (tuples become lists, etc.)
        ours = json.loads(json.dumps(self.p.options.to_config(), default=str))
        theirs = json.loads(json.dumps(dict(stored), default=str))
        differ = sorted(k for k in ours.keys() | theirs.keys()
                        if ours.get(k) != theirs.get(k))
        return ", ".join(
            f"{k} {theirs.get(k)!r} (now {ours.get(k)!r})" for k in differ[:4]
        )

    def _check_same_options(self, stored):
        """Refuse to resume a finished output made with other options."""
        shown = self._differing_options(stored)
        if shown:
            msg = (
                f"cannot resume {self.output!r}: it was finished with other "
                f"options: {shown} (use --overwrite to start again)"
            )
            raise ConfigError(msg)

    def _check_same_catalogue(self, archive):
        """Refuse to resume a finished output of another catalogue.

        Its ids and positions are compared with the catalogue's, where the
        output still holds them (a removed chunk of them reads as empty).
        """
        cat = self.p.catalog
        ra, dec = np.asarray(archive.ra), np.asarray(archive.dec)
        placed = np.isfinite(ra) & np.isfinite(dec)
        differ = placed & ((ra != cat.ra) | (dec != cat.dec))
        step = 1 << 20  # ids in blocks: text copies of them are large
        def text(ids, a, b):
            return np.char.strip(np.asarray(ids[a:b]).astype(str))

        for a in range(0, len(ra), step):
            stored = text(archive.source_id, a, a + step)
            ids = text(cat.source_id, a, a + step)
            differ[a : a + step] |= (stored != "") & (stored != ids)
        if differ.any():
            r = int(np.flatnonzero(differ)[0])
            stored = str(text(archive.source_id, r, r + 1)[0])
            ids = {r: str(text(cat.source_id, r, r + 1)[0])}
            now = f"{ids[r]!r} at ({float(cat.ra[r])}, {float(cat.dec[r])})"
            was = f"{stored!r} at ({float(ra[r])}, {float(dec[r])})"
            msg = (
                f"cannot resume {self.output!r}: it was finished with another "
                f"catalogue (row {r}: source {now}, was {was}); use --overwrite "
                "to start again"
            )
            raise ConfigError(msg)

    def _open_writer(self):
        """The writer of the Zarr store being resumed, or a `ConfigError`
        saying why it cannot be resumed (it is damaged)."""
        try:
            return ZarrWriter.open(self.output)
        except (OSError, ValueError) as exc:
            msg = f"cannot resume {self.output!r}: {exc} (--overwrite starts again)"
            raise ConfigError(msg) from None

    def _creation_interrupted(self):
        """Whether the output holds only what a run killed before its ledger left."""
        if self.fmt == "zarr":
            return creation_interrupted(self.output)
        state = os.path.basename(state_dir(self.output))
        return not set(os.listdir(self.output)) - {state}

    def _complete_output(self):
        try:
            archive = open_output(self.output)
        except (OSError, ValueError, KeyError):
            return False
        kind = "zarr" if isinstance(archive, ZarrArchive) else "fits"
        if kind != self.fmt:
            msg = (
                f"cannot resume {self.output!r} as {self.fmt.upper()}: it is a "
                f"finished {kind.upper()} output (use --format {kind}, or "
                "--overwrite to start again)"
            )
            raise ConfigError(msg)
        attrs = archive.attrs if self.fmt == "zarr" else {}
        if self.fmt == "zarr" and not (
            attrs.get("complete", False) or attrs.get("repairing", False)
        ):
            return False
        status = np.asarray(archive.status)
        if (status == Status.PENDING).any():
            return False
        if len(status) != self.plan.n_rows:
            msg = (
                f"cannot resume {self.output!r}: it was finished with a catalogue "
                f"of {len(status)} rows, and {self.p.catalog.source} has "
                f"{self.plan.n_rows} (use --overwrite to start again)"
            )
            raise ConfigError(msg)
        self._check_same_options(archive.config)
        self._check_same_catalogue(archive)
        # its run state is gone: what was removed since cannot be redone
        if self.fmt == "zarr":
            writer = self._open_writer()
            gone = (k for k in range(writer.n_chunks) if not writer.chunk_exists(k))
            missing = [f"chunk {k}" for k in gone]
            if not writer.rows_in_chunks:  # status and geometry, written last
                gone = writer.missing_chunks(("status", "geometry"))
                missing += [f"a chunk of {name!r}" for name in gone]
            if not missing:
                # the same values (same catalogue): a removed chunk is back
                cat = self.p.catalog
                writer.write_catalogue_columns(
                    cat.source_id, cat.ra, cat.dec, self.p.band_box
                )
        else:
            present = set(os.listdir(self.output))
            missing = [f for f in archive.files.tolist() if f and f not in present]
        if missing:
            msg = (
                f"cannot resume {self.output!r}: its run finished, but "
                f"{len(missing)} of its files were removed since ({missing[0]}, ...; "
                "`cutana verify` lists them); start again with --overwrite"
            )
            raise ConfigError(msg)
        self.status = status.astype(np.int16)
        self.archive = archive  # the finished output, for a repair
        return True

    def _jobs_needed(self):
        """Jobs with a row in a chunk that is not written yet (all jobs for FITS)."""
        if self.fmt != "zarr":
            return list(range(len(self.plan.jobs)))
        cr = self.writer.chunk_rows
        written = set(self.checksums)
        return [
            job.job_id
            for job in self.plan.jobs
            if set(np.unique(job.rows // cr).tolist()) - written
        ]

    # -- the run -----------------------------------------------------------
    def run(self, executor):
        if self.already_complete:
            if self.repair is not None:
                self.repair.run(executor)
            return
        plan = self.plan
        cat = self.p.catalog
        if self.fmt == "fits" and self.file_names is None:
            self.file_names = fits_filenames(cat.source_id)
        bands = tuple(self.p.index.bands)
        group_of = {}
        if self.fmt == "zarr":
            self._setup_chunks()
            self.owner = self._chunk_owners()
            group_of = {j: i for i, ids in enumerate(self._groups()) for j in ids}
        tasks = []
        groups = {}
        for job in plan.jobs:
            if job.job_id in self.done_jobs:
                continue
            job = self.trimmed.get(job.job_id, job)
            task = _CutTask(
                settings=self.p.settings,
                tile=self.p.index.tiles[job.tile],
                job=job,
                out_dir=self.output,
                format=self.fmt,
                bands=bands,
                writes=self.writes,
                stretch_thread=self.stretch,
            )
            if self.fmt == "fits":
                task.ids = cat.source_id[job.rows]
                task.ra = cat.ra[job.rows]
                task.dec = cat.dec[job.rows]
                task.files = self.file_names[job.rows]
            elif job.job_id in group_of:
                g = group_of[job.job_id]
                if g not in groups:
                    groups[g] = _GroupTask(
                        members=[], out_dir=self.output,
                        writes=self.writes,
                    )
                    tasks.append(groups[g])
                groups[g].members.append(task)
                continue
            else:
                self._add_direct_chunks(task, self.owner)
            tasks.append(task)
        for group in groups.values():
            self._add_group_chunks(group)
        _reserve_blocks(tasks)
        if self.fmt == "zarr":
            tasks = self._ready_assembly_tasks() + tasks
        self._execute(executor, tasks, "cutting", self._on_done, self._on_failed)

    def _execute(self, executor, tasks, desc, on_done, on_failed):
        """Run the tasks within the plan's memory budget, with a progress bar."""
        total = sum(len(j) for t in tasks for j in _jobs_of(t))
        if self.progress and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="src", desc=desc, smoothing=0.1)
        executor.memory_budget = self.plan.job_budget
        try:
            executor.run(
                _run_task_overlapped if self.overlap else _run_task,
                tasks,
                cost=lambda t: max((j.est_bytes for j in _jobs_of(t)), default=0),
                on_done=on_done,
                on_failed=on_failed,
            )
        finally:
            _wait_for_writes()  # (the executor waits for those it was handed)
            close_kept_maps()  # those of jobs run in this process
            if self._bar is not None:
                self._bar.close()

    def finish(self):
        if self.already_complete:
            if self.repair is not None:
                self.repair.finish()
            return
        if self.fmt == "zarr":
            missing = [
                k for k in range(self.writer.n_chunks) if k not in self.checksums
            ]
            if missing:  # assembly failed twice in workers: last try here
                for task in self._assembly_tasks(missing):
                    self._on_done(task, _run_task(task))
            if self.writer.rows_in_chunks:
                # rows finished by an earlier, interrupted run are only in the store
                self.status = self.writer.read_status()
            else:
                self.writer.write_rows(self.status, self._geometry())
            self.writer.finalize(
                self.checksums, report={"counts": self._counts()},
                messages=self.messages,
            )
        else:
            self._write_index()

    def _write_index(self):
        """Write the ``index.ecsv`` of a FITS output.

        Its metadata list the tiles of the run (key and band files), after
        those a repaired output listed already (`_Repair` tells from them
        which tiles are new to the output).
        """
        listed = []
        if self.archive is not None:
            listed = list(self.archive.attrs.get("tiles") or [])
        known = {_tile_identity(t) for t in listed}
        for tile in self.p.index.tiles:
            record = _tile_listing(tile)
            if _tile_identity(record) not in known:
                known.add(_tile_identity(record))
                listed.append(record)
        write_index(
            self.output,
            np.arange(self.plan.n_rows),
            self.p.catalog.source_id,
            self.status,
            ["" if f is None else f for f in self.files.tolist()],
            self.messages,
            ra=self.p.catalog.ra,
            dec=self.p.catalog.dec,
            meta={
                "bands": list(self.p.index.bands),
                "config": self.p.options.to_config(),
                "catalogue": self.p.catalog_path,
                "tiles": listed,
            },
        )

    def close(self, report):
        if self.already_complete:
            if self.repair is not None:
                remove_run_state(self.output)  # the repair's staged jobs
            return
        self.ledger.run_finished(self.plan.fingerprint(), report.to_dict())
        self.ledger.close()
        remove_run_state(self.output)

    # -- zarr chunk bookkeeping ----------------------------------------------
    def _setup_chunks(self):
        plan = self.plan
        n = plan.n_rows
        # int32 (job ids and positions are far below 2**31): these arrays,
        # and their slices each chunk task holds, grow with the catalogue
        self.job_of_row = np.full(n, -1, dtype=np.int32)
        self.pos_in_job = np.full(n, -1, dtype=np.int32)
        for job in plan.jobs:
            job = self.trimmed.get(job.job_id, job)  # (a resumed run's)
            self.job_of_row[job.rows] = job.job_id
            self.pos_in_job[job.rows] = np.arange(len(job))
        for rows in self.staged_rows.values():
            self.pos_in_job[rows] = np.arange(len(rows))
        cr = self.writer.chunk_rows
        pending = self.job_of_row >= 0
        for job_id in self.done_jobs:
            pending[self.trimmed.get(job_id, plan.jobs[job_id]).rows] = False
        self.chunk_pending = np.bincount(
            np.flatnonzero(pending) // cr, minlength=self.writer.n_chunks
        )
        self.chunks_submitted = set(self.checksums)
        written = set(self.checksums)
        self.job_chunks = {
            job.job_id: set(np.unique(job.rows // cr).tolist()) - written
            for job in plan.jobs
        }

    def _chunk_owners(self):
        """Per chunk, the one job that fills all its cut rows (-1 if none or
        several)."""
        cr = self.writer.chunk_rows
        n_chunks = self.writer.n_chunks
        jobs = self.job_of_row
        starts = np.arange(n_chunks) * cr
        big = np.iinfo(np.int64).max
        lo = np.minimum.reduceat(np.where(jobs >= 0, jobs, big), starts)
        hi = np.maximum.reduceat(jobs, starts)
        return np.where((lo == hi) & (hi >= 0), hi, -1)

    def _add_direct_chunks(self, task, owner):
        """Let a cut task write the chunks only its own job fills."""
        job = task.job
        cr = self.writer.chunk_rows
        chunks = np.unique(job.rows // cr)
        direct = [
            int(k) for k in chunks
            if owner[k] == job.job_id and int(k) not in self.checksums
        ]
        if not direct:
            return
        task.direct_chunks = direct
        task.row_to_job, task.base_status = self._take_chunks(direct)

    def _take_chunks(self, chunks):
        """Mark sorted ``chunks`` submitted; the owners and statuses of their rows."""
        lo = self.writer.chunk_range(chunks[0])[0]
        hi = self.writer.chunk_range(chunks[-1])[1]
        self.chunks_submitted.update(chunks)
        return (
            _Rows(lo, self.job_of_row[lo:hi].copy(), self.pos_in_job[lo:hi].copy()),
            _Rows(lo, self.status[lo:hi].copy()),
        )

    def _groups(self):
        """Pending jobs that fill the same chunks, to cut and write together.

        Jobs linked by shared unwritten chunks form a group when the plan
        sized each of them in memory for the whole group (jobs of one band,
        see `cutana.planner.make_plan`) and no other job (e.g. one staged by
        an interrupted run) has rows in those chunks.
        """
        cr = self.writer.chunk_rows
        pending = [
            j.job_id for j in self.plan.jobs
            if j.job_id not in self.done_jobs and self.job_chunks[j.job_id]
        ]
        parent = {j: j for j in pending}

        def find(j):
            while parent[j] != j:
                parent[j] = parent[parent[j]]
                j = parent[j]
            return j

        first = {}
        for j in pending:
            for k in self.job_chunks[j]:
                if k in first:
                    parent[find(j)] = find(first[k])
                else:
                    first[k] = j
        members = {}
        for j in pending:
            members.setdefault(find(j), []).append(j)
        groups = []
        for ids in members.values():
            if len(ids) < 2:
                continue
            jobs = [self.plan.jobs[j] for j in ids]
            n = sum(len(job) for job in jobs)
            if self.plan.memory.job_bytes(n) > min(job.est_bytes for job in jobs):
                continue  # not planned to be held at once
            chunks = sorted(set().union(*(self.job_chunks[j] for j in ids)))
            owners = np.concatenate(
                [self.job_of_row[k * cr : (k + 1) * cr] for k in chunks]
            )
            if np.isin(owners[owners >= 0], ids, invert=True).any():
                continue
            groups.append(sorted(ids))
        return groups

    def _add_group_chunks(self, group):
        """Let a group task write every chunk its jobs fill."""
        chunks = sorted(
            set().union(*(self.job_chunks[m.job.job_id] for m in group.members))
        )
        group.chunks = chunks
        group.row_to_job, group.base_status = self._take_chunks(chunks)

    def _ready_assembly_tasks(self):
        ready = np.flatnonzero(self.chunk_pending == 0)
        return self._assembly_tasks(
            [int(k) for k in ready if k not in self.chunks_submitted]
        )

    def _assembly_tasks(self, chunks):
        tasks = []
        for i in range(0, len(chunks), _CHUNKS_PER_TASK):
            group = sorted(chunks[i : i + _CHUNKS_PER_TASK])
            row_to_job, base_status = self._take_chunks(group)
            tasks.append(
                _AssembleTask(
                    out_dir=self.output,
                    chunks=group,
                    row_to_job=row_to_job,
                    base_status=base_status,
                    writes=self.writes,
                )
            )
        return tasks

    # -- callbacks -------------------------------------------------------------
    def _record(self, rows, status, messages, files=None):
        self.status[rows] = status
        self.messages.update({int(k): v for k, v in messages.items()})
        if files is not None:  # (as many as both hold, as zip pairs them)
            names = [str(f) for f in files][: len(rows)]
            self.files[np.asarray(rows)[: len(names)]] = names

    def _raise_if_full(self, result):
        """Stop the run when a task found the output's file system full."""
        if isinstance(result, _OutputFull):
            msg = (
                f"no space left on the device of {self.output!r} ({result.message}); "
                "free some space, then finish the run with --resume"
            )
            raise OSError(errno.ENOSPC, msg)

    def _on_done(self, task, result):
        self._raise_if_full(result)
        if isinstance(task, _AssembleTask):
            self._chunks_written(result)
            for k in result:
                for job_id in self._jobs_of_chunk(int(k)):
                    chunks = self.job_chunks[job_id]
                    chunks.discard(int(k))
                    if not chunks:
                        remove_staged(self.output, job_id)
                        self.job_chunks.pop(job_id)
            return ()
        if isinstance(task, _GroupTask):
            self._chunks_written(result.checksums)
            follow = []
            for member, done in zip(task.members, result.done, strict=True):
                self.job_chunks[member.job.job_id].difference_update(
                    int(k) for k in result.checksums
                )
                follow += self._on_done(member, done)
            return follow
        job = task.job
        if result.checksums:
            self._chunks_written(result.checksums)
            self.job_chunks[job.job_id].difference_update(
                int(k) for k in result.checksums
            )
        if result.staged is not None:
            self.ledger.job_staged(result.staged)
        self.n_cut += len(job)
        if self._bar is not None:
            self._bar.update(len(job))
        self._record(job.rows, result.status, result.messages, result.files)
        if self.fmt == "fits":
            return ()
        self.pos_in_job[result.staged_rows] = np.arange(len(result.staged_rows))
        return self._release_rows(job.rows)

    def _chunks_written(self, written):
        """Keep and record the checksums (and rows) of chunks a task wrote."""
        self.checksums.update({int(k): v for k, v in written.items()})
        # a store of format 1-3 holds the rows already
        rows = {} if self.writer.rows_in_chunks else getattr(written, "rows", {})
        if getattr(written, "recorded", False):
            self.ledger.sync()  # (the worker appended the records as it wrote)
        else:
            self.ledger.chunks_written(written, rows=rows)
        self._keep_rows(rows)

    def _geometry(self):
        """``(N, 5)`` geometry of every row kept so far (tile -1: none yet).

        Kept as int32 (half the memory of the store's int64) unless a value
        does not fit, which `_keep_rows` sees.
        """
        if self.geometry is None:
            self.geometry = np.zeros((self.plan.n_rows, 5), dtype=np.int32)
            self.geometry[:, 0] = -1
        return self.geometry

    def _keep_rows(self, rows):
        """Keep the status and geometry of written chunks' rows until the end."""
        if not rows:  # none (a store of format 1-3 holds them itself)
            return
        geometry = self._geometry()
        cr = self.writer.chunk_rows
        for k, (status, geo) in rows.items():
            r0 = int(k) * cr
            self.status[r0 : r0 + len(status)] = status
            if geometry.dtype != np.int64 and len(geo) and not (
                _INT32.min <= np.min(geo) and np.max(geo) <= _INT32.max
            ):  # a tile of more than 2**31 pixels a side
                geometry = self.geometry = geometry.astype(np.int64)
            geometry[r0 : r0 + len(status)] = geo

    def _jobs_of_chunk(self, k):
        r0, r1 = self.writer.chunk_range(k)
        ids = np.unique(self.job_of_row[r0:r1])
        return [int(j) for j in ids if j >= 0 and int(j) in self.job_chunks]

    def _release_rows(self, rows):
        """Count rows as settled; assemble the chunks that became complete."""
        chunks, counts = np.unique(rows // self.writer.chunk_rows, return_counts=True)
        self.chunk_pending[chunks] -= counts
        ready = chunks[self.chunk_pending[chunks] == 0]
        return self._assembly_tasks(
            [int(k) for k in ready if int(k) not in self.chunks_submitted]
        )

    def _on_failed(self, failure):
        task = failure.task
        if isinstance(task, _AssembleTask):
            self.failures.append(f"writing chunks {task.chunks}: {failure.error}")
            self.chunks_submitted.difference_update(task.chunks)
            return ()
        if isinstance(task, _GroupTask):
            # run its jobs one by one (staged, each with its own attempts), so
            # that one bad job cannot fail the others
            logger.warning(
                "jobs %s failed together (%s); running them one by one",
                [m.job.job_id for m in task.members], failure.error,
            )
            self.chunks_submitted.difference_update(task.chunks)
            for member in task.members:
                self._add_direct_chunks(member, self.owner)
            return list(task.members)
        job = task.job
        self._job_failed(task, failure)
        if self.fmt == "zarr":
            self.job_of_row[job.rows] = -1
            self.job_chunks.pop(job.job_id, None)
            if task.direct_chunks:
                self.chunks_submitted.difference_update(task.direct_chunks)
            return self._release_rows(job.rows)
        return ()

    def _job_failed(self, task, failure):
        """Record a cut task that failed after its last attempt: its rows are
        TILE_ERROR, with a message naming the tile and the error."""
        job = task.job
        paths = ", ".join(b.path for b in task.tile.bands if b is not None)
        self.failures.append(
            f"job {job.job_id} (tile {task.tile.key}: {paths}): {failure.error}"
        )
        self.status[job.rows] = Status.TILE_ERROR
        for r in job.rows:
            self.messages[int(r)] = (
                f"job failed after {failure.attempts} attempts on tile {task.tile.key} "
                f"({paths}): {failure.error}"
            )
        if self._bar is not None:
            self._bar.update(len(job))

    # -- report ------------------------------------------------------------------
    def _counts(self):
        values, counts = np.unique(self.status, return_counts=True)
        return {
            Status(int(v)).name: int(c) for v, c in zip(values, counts, strict=False)
        }

    def report(self, seconds, sampler):
        counts = self._counts()
        msgs = {
            r: m for r, m in self.messages.items() if self.status[r] != Status.OK
        }
        failed = bool(self.failures) or counts.get("TILE_ERROR", 0) > 0
        return RunReport(
            output=self.output,
            n_rows=self.plan.n_rows,
            counts=counts,
            seconds=seconds,
            cutouts_per_second=self.n_cut / seconds if seconds > 0 else 0.0,
            peak_memory=int(sampler.peak),
            failures=list(self.failures),
            messages=msgs,
            exit_code=1 if failed else 0,
            memory_samples=[(round(t, 3), int(b)) for t, b in sampler.samples],
        )


def _mark_repair(output):
    """Mark a FITS output as being repaired (`_Repair`) until its run state
    is removed."""
    os.makedirs(state_dir(output), exist_ok=True)
    with open(os.path.join(state_dir(output), REPAIR_MARKER), "w") as fh:
        fh.write("a --resume that cuts failed sources again is under way\n")


class _Repair:
    """Cut again the rows a finished run could not cut (``--resume``).

    A finished run keeps its ``TILE_ERROR`` rows (a tile that could not be
    read, a job that failed twice) and its ``NO_OVERLAP`` rows. When it is
    resumed, the tiles are indexed and the catalogue is planned anew, as for
    any run; the rows of those two kinds that the new plan puts in a job are
    cut, and the chunks (or FITS files) that hold them are written again,
    with every other row as it was. Rows that still cannot be cut keep their
    status, unless the new plan gives them another final one than a tile
    error (``NO_OVERLAP`` for a source off a tile that can be read now).

    A row that was cut (``OK`` or ``PARTIAL_OVERLAP``) is cut again when
    the new plan puts it on a tile new to the output, one that could not be
    read then (so the row was cut from a neighbour, maybe at its edge) or
    was added since, as a run that had the tile from the start cuts it;
    while the tile it was cut from can still be read (a row whose tile broke
    since keeps its cutout). If that cut fails, the row keeps its cutout.
    Every other row that was cut is never cut again.

    Until it is finalised, the store says it is being repaired (attributes
    ``complete`` false and ``repairing`` true; a FITS folder has the file
    ``.cutana/repairing``); a repair that is stopped, or whose chunks could
    not all be written, is done again by the next ``--resume``, which then
    checksums every chunk anew (the stopped one may have rewritten some).
    """

    def __init__(self, runner, jobs, status, stopped=False, kept_messages=None):
        self.r = runner
        self.jobs = jobs
        self.stopped = stopped  # a repair of this store was stopped
        self.old = runner.status.copy()  # as stored
        # the rows without a cutout that a repair may cut (and a stopped one
        # may have written); rows cut again from a new tile keep theirs until
        # they are replaced
        self.redo = np.isin(self.old, (Status.TILE_ERROR, Status.NO_OVERLAP))
        self.status = status  # of the rows not cut again
        # stored messages of the rows cut again that keep their cutout if
        # that fails
        self.kept_messages = dict(kept_messages or {})
        self.remaining = len(jobs)
        self.patched = ChunksWritten()
        self.unwritten = []  # chunks of rewriting tasks that failed
        self.writer = None
        self.tile_map = None
        self.stored = None
        self.job_of_row = None
        self.pos = None
        self.names = None  # FITS file names of the catalogue rows

    @classmethod
    def plan(cls, runner, stopped=False):
        """The repair of a finished output, or `None` if nothing changes
        (``stopped``: a FITS output's repair was stopped)."""
        old = runner.status
        base = np.asarray(runner.plan.base_status)
        redo = np.isin(old, (Status.TILE_ERROR, Status.NO_OVERLAP))
        moved = cls._cut_on_a_new_tile(runner)
        redo |= moved
        jobs = []
        for job in runner.plan.jobs:
            keep = redo[job.rows]
            if keep.any():
                jobs.append(job.subset(keep, job_id=len(jobs)))
        in_job = np.zeros(len(old), dtype=bool)
        for job in jobs:
            in_job[job.rows] = True
        # rows in no job get the new plan's status (NO_OVERLAP, say), unless
        # it is a tile error: a final status stays while its tile is unreadable
        status = old.copy()
        new = (base != Status.PENDING) & (base != Status.TILE_ERROR)
        settle = redo & ~in_job & new
        status[settle] = base[settle]
        stored = cls._stored_messages(runner)
        runner.messages = cls._messages(runner, stored, base, ~(in_job | settle))
        kept_messages = {int(i): stored[int(i)] for i in np.flatnonzero(moved)
                         if int(i) in stored}
        failed = np.flatnonzero(old == Status.TILE_ERROR)
        stopped = stopped or runner.fmt == "zarr" and bool(
            runner.archive.attrs.get("repairing", False)
        )
        if not jobs and np.array_equal(status, old) and not stopped:
            if len(failed):
                first = int(failed[0])
                logger.warning(
                    "%s: its run had finished; its %d TILE_ERROR rows still cannot "
                    "be cut (row %d: %s)", runner.output, len(failed), first,
                    runner.messages.get(first, "tile error"),
                )
            return None
        n_jobs = sum(len(job) for job in jobs)
        if stopped:
            logger.warning(
                "%s: finishing its repair, which was stopped (%d rows to cut)",
                runner.output, n_jobs,
            )
        else:
            logger.warning(
                "%s: its run had finished with %d TILE_ERROR rows; cutting the %d "
                "TILE_ERROR or NO_OVERLAP rows that the tiles can cut now, and "
                "rows that a tile new to the output holds",
                runner.output, len(failed), n_jobs,
            )
        return cls(runner, jobs, status, stopped, kept_messages)

    @staticmethod
    def _cut_on_a_new_tile(runner):
        """The rows that were cut (``OK`` or ``PARTIAL_OVERLAP``) and that
        the new plan puts on another tile than the one they were cut from,
        while that one can still be read (boolean mask).

        Tiles are told apart by their key and band files (a tile whose
        header changed since is the same tile). With the same tiles a plan
        puts every row where it was; another tile holds a row better when it
        is new to the output: one that could not be read then, or was added
        since. A row whose tile cannot be read now keeps its cutout,
        whatever the new plan gives it. A Zarr store records each row's
        tile; a FITS file, its ``TILE`` files, which are read for the rows
        the new plan puts on a tile the output does not list (``tiles`` of
        ``index.ecsv``; an output of an older version lists none, and none
        of its rows is cut again).
        """
        old = runner.status
        moved = np.zeros(len(old), dtype=bool)
        now = [_tile_identity(_tile_listing(t)) for t in runner.p.index.tiles]
        readable = set(now)
        listed = None  # FITS: only rows on a tile it does not list are read
        if runner.fmt == "fits":
            records = runner.archive.attrs.get("tiles") or []
            listed = {_tile_identity(t) for t in records}
            if not listed:
                return moved
        planned = np.full(len(old), -1, dtype=np.int64)
        for job in runner.plan.jobs:
            if listed is None or now[job.tile] not in listed:
                planned[job.rows] = job.tile
        cut = np.isin(old, (Status.OK, Status.PARTIAL_OVERLAP))
        rows = np.flatnonzero(cut & (planned >= 0))
        if not len(rows):
            return moved
        if runner.fmt == "zarr":
            # (a repair that was stopped has listed the new tiles already)
            stored = [_tile_identity(t) for t in runner.archive.tiles]
            was = runner.archive.tile_numbers()[rows].astype(np.int64)
            # one decision per (stored tile, planned tile) pair of the rows
            pairs, which = np.unique(
                was * len(now) + planned[rows], return_inverse=True
            )
            decided = np.zeros(len(pairs), dtype=bool)
            for k, pair in enumerate(pairs.tolist()):
                t, n = divmod(pair, len(now))
                other = 0 <= t < len(stored) and stored[t] != now[n]
                decided[k] = other and stored[t] in readable
            moved[rows] = decided[which.ravel()]
            return moved
        paths = {identity[1] for identity in readable}
        for i in rows.tolist():
            try:
                then = tuple(runner.archive.tile_files(i))
            except (OSError, ValueError):  # cannot tell: the file stays
                continue
            # (its tile may be the new one, if a repair that was stopped
            # wrote the file again but not the index: it is cut once more)
            moved[i] = then in paths
        return moved

    @staticmethod
    def _stored_messages(runner):
        """The messages an output stores (a FITS index holds them; a Zarr
        store, none), by row."""
        if runner.fmt != "fits":
            return {}
        return dict(runner.archive.messages)

    @staticmethod
    def _messages(runner, stored, base, keep):
        """The messages of a repaired output's rows: the ``stored`` one of a
        row that keeps its status, unless the new plan gives it the same
        status and a message, and the new plan's for the others (their jobs
        add theirs)."""
        old = runner.status
        messages = {r: m for r, m in stored.items() if keep[r]}
        for r, m in runner.messages.items():
            if not keep[r] or base[r] == old[r]:
                messages[r] = m
        return messages

    def run(self, executor):
        r = self.r
        cat = r.p.catalog
        bands = tuple(r.p.index.bands)
        r.status = self.status.copy()
        if r.fmt == "zarr":
            self.writer = r.writer = r._open_writer()
            self.stored = self.writer.stored_rows()
            self.tile_map = self.writer.start_repair(
                [_tile_record(t) for t in r.p.index.tiles]
            )
            self.job_of_row = np.full(r.plan.n_rows, -1, dtype=np.int32)
            self.pos = np.full(r.plan.n_rows, -1, dtype=np.int32)
        else:
            r.writer = FitsWriter(r.output, bands)
            _mark_repair(r.output)
            stored = r.archive.files.tolist()
            r.files = np.array([f or None for f in stored], dtype=object)
            names = self.names = fits_filenames(cat.source_id)
        clean_staging(r.output)
        tasks = []
        for job in self.jobs:
            task = _CutTask(
                settings=r.p.settings, tile=r.p.index.tiles[job.tile], job=job,
                out_dir=r.output, format=r.fmt, bands=bands,
                writes=r.writes, stretch_thread=r.stretch,
            )
            if r.fmt == "fits":
                task.ids = cat.source_id[job.rows]
                task.ra = cat.ra[job.rows]
                task.dec = cat.dec[job.rows]
                task.files = names[job.rows]
            tasks.append(task)
        _reserve_blocks(tasks)
        if not tasks and r.fmt == "zarr":  # statuses to change only
            tasks = self._patch_tasks()
        r._execute(executor, tasks, "cutting again", self._on_done, self._on_failed)

    def _on_done(self, task, result):
        r = self.r
        r._raise_if_full(result)
        if isinstance(task, _PatchTask):
            self.patched.update(result)
            return ()
        job = task.job
        r.n_cut += len(job)
        if r._bar is not None:
            r._bar.update(len(job))
        r._record(job.rows, result.status, result.messages, result.files)
        if r.fmt == "zarr":
            self.job_of_row[result.staged_rows] = job.job_id
            self.pos[result.staged_rows] = np.arange(len(result.staged_rows))
        return self._job_settled()

    def _on_failed(self, failure):
        r = self.r
        task = failure.task
        if isinstance(task, _PatchTask):
            # some of its chunks may be written: the store stays unfinished
            # for the next --resume, which checksums what they hold
            r.failures.append(f"writing chunks {task.chunks} again: {failure.error}")
            self.unwritten += task.chunks
            return ()
        r._job_failed(task, failure)
        # a row cut again from a tile new to the output keeps its cutout
        rows = task.job.rows
        kept = rows[np.isin(self.old[rows], (Status.OK, Status.PARTIAL_OVERLAP))]
        r.status[kept] = self.old[kept]
        for i in kept.tolist():
            r.messages.pop(i, None)
            if i in self.kept_messages:
                r.messages[i] = self.kept_messages[i]
        return self._job_settled()

    def _warn_of_failed_rows(self):
        r = self.r
        failed = np.flatnonzero(r.status == Status.TILE_ERROR)
        if len(failed):
            first = int(failed[0])
            logger.warning(
                "%s: %d rows are still TILE_ERROR (row %d: %s)", r.output,
                len(failed), first, r.messages.get(first, "tile error"),
            )

    def _job_settled(self):
        """After the last job, the tasks that write the changed chunks."""
        self.remaining -= 1
        if self.remaining or self.r.fmt != "zarr":
            return ()
        return self._patch_tasks()

    def _patch_tasks(self):
        r = self.r
        writer = self.writer
        changed = (r.status != self.old) | (self.job_of_row >= 0)
        clear = None
        if self.stopped:
            # the stopped repair may have written cutouts of rows that are
            # not cut now (their tile broke again): those are dropped
            clear = self.redo & (self.job_of_row < 0)
            changed |= clear
        chunks = np.unique(np.flatnonzero(changed) // writer.chunk_rows).tolist()
        tasks = []
        for i in range(0, len(chunks), _CHUNKS_PER_TASK):
            group = chunks[i : i + _CHUNKS_PER_TASK]
            lo = writer.chunk_range(group[0])[0]
            hi = writer.chunk_range(group[-1])[1]
            tasks.append(_PatchTask(
                out_dir=r.output,
                chunks=group,
                row_to_job=_Rows(lo, self.job_of_row[lo:hi], self.pos[lo:hi]),
                status=_Rows(lo, r.status[lo:hi].copy()),
                tile_map=self.tile_map,
                clear=None if clear is None else _Rows(lo, clear[lo:hi]),
                writes=r.writes,
            ))
        return tasks

    def finish(self):
        r = self.r
        self._warn_of_failed_rows()
        if r.fmt != "zarr":
            r._write_index()
            if self.stopped:  # files the stopped repair wrote of rows not cut now
                for i in np.flatnonzero(self.redo).tolist():
                    path = os.path.join(r.output, str(self.names[i]))
                    if r.files[i] is None and os.path.exists(path):
                        os.remove(path)
            return
        writer = self.writer
        if self.unwritten:
            logger.warning(
                "%s: chunks %s could not be written again; the store stays "
                "unfinished (run again with --resume)", r.output, self.unwritten[:8],
            )
            r.status = self.old.copy()  # what the store still says
            return
        status, geometry = self.stored
        for k, (rows_status, rows_geometry) in self.patched.rows.items():
            a, b = writer.chunk_range(k)
            status[a:b] = rows_status
            geometry[a:b] = rows_geometry
        r.status = status
        if not writer.rows_in_chunks:
            writer.write_rows(status, geometry)
        if self.stopped:  # what the stopped repair rewrote is not known
            checksums = {
                k: writer.chunk_checksum(k)
                for k in range(writer.n_chunks) if k not in self.patched
            }
        else:
            checksums = writer.stored_checksums()
        checksums.update(self.patched)
        writer.finalize(checksums, report={"counts": r._counts()}, messages=r.messages)


def _tile_listing(tile):
    """A tile as outputs list it: its key, and each band file's path (None
    for a missing band)."""
    paths = [None if b is None else b.path for b in tile.bands]
    return {"key": tile.key, "paths": paths}


def _tile_identity(record):
    """A tile as `_Repair` tells tiles apart: its key and band files (a
    tile whose header changed since is the same tile)."""
    return (record.get("key"), tuple(record.get("paths") or ()))


def _tile_record(tile):
    """What the output stores about a tile to rebuild cutout WCS: the first
    band's header, and for a tile with bands on pixel grids of their own
    (`~cutana.tiles.Tile.own_grid`) every band's header and which those are."""
    first = next(b for b in tile.bands if b is not None)
    record = {**_tile_listing(tile), "header": first.header}
    if tile.own_grid:
        record["headers"] = [None if b is None else b.header for b in tile.bands]
        record["own_grid"] = list(tile.own_grid)
    return record


# ----------------------------------------------------------------------------
# in-memory iteration
# ----------------------------------------------------------------------------


@dataclass
class CutoutBatch:
    """A batch of cutouts handed to the caller by `iter_cutouts`.

    Attributes
    ----------
    images : `~numpy.ndarray`, shape ``(n, C, H, W)``
        The cutouts.
    rows : `~numpy.ndarray` of int64
        Catalogue rows.
    source_id, ra, dec : `~numpy.ndarray`
        Per-source catalogue values.
    status : `~numpy.ndarray` of int16
        Per-source status.
    bands : tuple of str
        Channel names.
    """

    images: np.ndarray
    rows: np.ndarray
    source_id: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    status: np.ndarray
    bands: tuple


def iter_cutouts(catalog, *, batch_size=None, **options):
    """Yield batches of cutouts in memory, without writing anything.

    Parameters
    ----------
    catalog : str, path-like, `~astropy.table.Table` or `pandas.DataFrame`
        The sources, as for `make_cutouts`.
    batch_size : int, optional
        Cutouts per batch: every batch but the last then holds exactly this
        many, and a batch may hold cutouts of several jobs (tiles). By
        default a batch is one job of the plan, whose size the memory
        budget sets. Memory holds one job and one batch at most.
    **options
        The options of `make_cutouts` (format, workers and backend are
        ignored: batches are cut in this process, one job at a time).
        The catalogue is read and the plan made by the call, which raises
        what they raise; each batch is cut when it is taken.

    Yields
    ------
    batch : `~cutana.pipeline.CutoutBatch`
        ``(n, C, H, W)`` images with their rows and metadata. Rows that are
        not cut (bad rows, off-tile) are not yielded; nor are the rows of
        tiles that cannot be read, which a `RuntimeWarning` counts, also
        when a tile fails while its batch is cut (its data cannot be read,
        or it lacks the zero-point keyword of ``flux_conversion``).

    Examples
    --------
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.pipeline import iter_cutouts
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> batch = next(iter_cutouts(survey.catalogue_path, size=16, memory_limit="2GB"))
    >>> batch.images.shape[1:], len(batch.rows) == len(batch.images)
    ((4, 16, 16), True)
    >>> batch.bands
    ('VIS', 'NIR-Y', 'NIR-J', 'NIR-H')
    >>> sizes = [len(b.rows) for b in iter_cutouts(survey.catalogue_path, size=16,
    ...                                            batch_size=16)]
    >>> sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16
    True
    """
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        msg = f"batch_size must be a whole number >= 1, got {batch_size!r}"
        raise ConfigError(msg)
    options = {k: v for k, v in options.items() if k not in ("workers", "backend")}
    prepared = _prepare(
        catalog, RunOptions.from_keywords(options), chunked=False, batches=True
    )
    plan = prepared.plan
    failed = np.flatnonzero(np.asarray(plan.base_status) == Status.TILE_ERROR)
    if len(failed):  # not silently: make_cutouts reports them, exit 1
        first = int(failed[0])
        warnings.warn(
            f"{len(failed)} rows are not yielded because their tiles cannot be "
            f"read, e.g. row {first}: {plan.messages.get(first, 'tile error')}",
            RuntimeWarning,
            stacklevel=2,
        )
    if batch_size is not None and plan.out_shape is None:
        msg = (
            "batch_size needs cutouts of one size, and these vary: give "
            "target_size=N (with resample) or size=N"
        )
        raise ConfigError(msg)
    batches = _job_batches(prepared)
    return batches if batch_size is None else _rebatched(batches, int(batch_size))


def _job_batches(prepared):
    """`iter_cutouts`: one batch per job of the plan, cut in this process,
    each sub-batch stretched in a thread of its own where a core and the
    memory of a second sub-batch are spare (`cut_job`'s ``stretch_thread``)."""
    cat = prepared.catalog
    plan = prepared.plan
    stretch_thread = _stretch_fits(prepared.options.threads < available_cores(), plan)
    try:
        for job in plan.jobs:
            result = cut_job(
                prepared.settings, prepared.index.tiles[job.tile], job,
                stretch_thread=stretch_thread,
            )
            cut = result.status != Status.TILE_ERROR
            if not cut.all():  # (zero images: not cutouts to train on)
                first = int(result.rows[np.argmin(cut)])
                warnings.warn(
                    f"{np.count_nonzero(~cut)} rows are not yielded because their "
                    f"tile failed while they were cut, e.g. row {first}: "
                    f"{result.messages.get(first, 'tile error')}",
                    RuntimeWarning,
                    stacklevel=3,
                )
                if not cut.any():
                    continue
            keep = slice(None) if cut.all() else cut  # (whole: views, no copies)
            rows = result.rows[keep]
            yield CutoutBatch(
                images=result.images[keep],
                rows=rows,
                source_id=cat.source_id[rows],
                ra=cat.ra[rows],
                dec=cat.dec[rows],
                status=result.status[keep],
                bands=tuple(prepared.index.bands),
            )
    finally:
        close_kept_maps()


def _rebatched(batches, size):
    """Batches of ``size`` cutouts (the last may hold fewer) made of
    ``batches``, in their order: a job's batch is cut into pieces, and
    pieces of consecutive jobs are joined."""
    names = [f.name for f in fields(CutoutBatch) if f.name != "bands"]
    held, n_held = [], 0
    try:
        for batch in batches:
            start = 0
            while start < len(batch.rows):
                take = min(size - n_held, len(batch.rows) - start)
                held.append(CutoutBatch(
                    **{k: getattr(batch, k)[start : start + take] for k in names},
                    bands=batch.bands,
                ))
                n_held += take
                start += take
                if n_held == size:
                    yield _joined_batch(held, names)
                    held, n_held = [], 0
        if n_held:
            yield _joined_batch(held, names)
    finally:
        batches.close()  # (a caller that stops early: the tiles' maps)


def _joined_batch(parts, names):
    """One `CutoutBatch` of ``parts``, in their order (copies: a batch does
    not keep the job it came from alive)."""
    return CutoutBatch(
        **{k: np.concatenate([getattr(p, k) for p in parts]) for k in names},
        bands=parts[0].bands,
    )
