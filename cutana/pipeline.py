# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The cutout pipeline: catalogue → tile index → plan → executor → output.

`make_cutouts` composes the layers and is what the ``cutana run`` command
calls; `plan_cutouts` stops after planning (``cutana plan``) and
`iter_cutouts` hands batches of cutouts to the caller in memory instead of
writing them (for machine learning). The logic of each step lives in its own
module; this one only validates the options at the boundary and wires the
steps together.
"""

import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import __version__
from .catalog import read_catalog
from .exceptions import ConfigError
from .executor import BACKENDS, Executor, MemorySampler
from .io.ledger import Ledger
from .io.staging import load_staged, stage_job
from .io.zarr import ZarrWriter
from .io.fits import FitsWriter, write_index
from .normalization import NORMALIZATIONS
from .planner import Plan, make_plan, parse_memory
from .processing import CutSettings, cut_job
from .resample import RESAMPLE_METHODS
from .status import STATUS_DESCRIPTIONS, Status
from .tiles import TileIndex

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

FORMATS = ("zarr", "fits")
DTYPES = ("float32", "uint8", "uint16")
RESAMPLE = ("none", *RESAMPLE_METHODS)
_STATE_DIR = ".cutana"
_CHUNKS_PER_TASK = 8


@dataclass
class RunOptions:
    """The validated options of a run (what ``cutana run`` flags map to).

    See `make_cutouts` for the meaning of each field.
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
        if self.target_size is not None:
            if not _is_int(self.target_size) or self.target_size < 1:
                _bad("target_size", self.target_size, "a positive integer")
            self.target_size = int(self.target_size)
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
                size = float(self.size)
            except (TypeError, ValueError):
                size = float("nan")
            if not math.isfinite(size) or size <= 0 or round(size) < 1:
                _bad("size", self.size, "a positive number of pixels")
            self.size = size
        if not (0 < float(self.percentile) <= 100):
            _bad("percentile", self.percentile, "a number in (0, 100]")
        if not _is_int(self.workers) or self.workers < 1:
            _bad("workers", self.workers, "a positive integer")
        if not _is_int(self.threads) or self.threads < 1:
            _bad("threads", self.threads, "a positive integer")
        if self.backend is None:
            self.backend = "serial" if self.workers == 1 and not self.scheduler else (
                "dask" if self.scheduler else "processes"
            )
        if self.backend not in BACKENDS:
            _bad("backend", self.backend, f"one of {', '.join(BACKENDS)}")
        if self.scheduler and self.backend != "dask":
            msg = "scheduler (--scheduler) is only used with backend='dask'"
            raise ConfigError(msg)
        if self.memory_limit is None:
            import psutil

            self.memory_limit = int(0.5 * psutil.virtual_memory().available)
        else:
            try:
                self.memory_limit = parse_memory(self.memory_limit)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.channel_weights is not None:
            try:
                self.channel_weights = [float(w) for w in self.channel_weights]
            except (TypeError, ValueError):
                _bad("channel_weights", self.channel_weights, "a list of numbers")
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
        """The options as a JSON-serialisable dict (stored with the output).

        Returns
        -------
        config : dict
            Option name → value.
        """
        config = asdict(self)
        config.pop("scheduler", None)
        return config


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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
        Row → message for every row that is not `Status.OK`.
    exit_code : int
        0 if every row got its final status, 1 if some sources could not be
        cut because a tile or job failed.
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
        for name, count in sorted(self.counts.items(), key=lambda kv: Status[kv[0]].value):
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
            lines.append(f"... and {len(self.messages) - max_messages} more messages")
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


def _prepare(catalog, options, *, parent_bytes=None):
    """Read, validate, index and plan (no pixel data)."""
    options.validate()
    cat = read_catalog(catalog, size=options.size)
    if options.tiles:
        index = TileIndex.from_paths(options.tiles, bands=options.bands)
    elif cat.fits_file_paths is not None:
        index = TileIndex.from_file_lists(cat.fits_file_paths, bands=options.bands)
    else:
        msg = (
            f"no tiles: give --tiles PATH_OR_GLOB... or a 'fits_file_paths' column in "
            f"{cat.source}"
        )
        raise ConfigError(msg)
    if not index.tiles:
        problems = "; ".join(f"{p}: {m}" for p, m in index.errors[:5])
        msg = f"none of the tiles given could be indexed{': ' + problems if problems else ''}"
        raise ConfigError(msg)
    if options.channel_weights is not None and len(options.channel_weights) != len(index.bands):
        msg = (
            f"channel_weights has {len(options.channel_weights)} values but there are "
            f"{len(index.bands)} bands ({', '.join(index.bands)})"
        )
        raise ConfigError(msg)

    status = np.asarray(cat.status, dtype=np.int16).copy()
    messages = dict(cat.messages)
    diam = _diameters(cat, index, options)
    bad_size = (status == Status.OK) & ~(np.isfinite(diam) & (np.round(diam) >= 1))
    status[bad_size] = Status.BAD_ROW
    for r in np.flatnonzero(bad_size):
        messages.setdefault(int(r), f"{cat.source} row {r}: no usable size")

    ok = status == Status.OK
    if options.tiles or cat.fits_file_paths is None:
        assignment = index.assign(cat.ra, cat.dec, np.where(ok, diam, 1.0))
        file_error = np.zeros(len(cat), dtype=bool)
    else:
        assignment, file_error = index.assign_by_files(
            cat.fits_file_paths, cat.ra, cat.dec, np.where(ok, diam, 1.0)
        )
    tile_err = ok & file_error
    status[tile_err] = Status.TILE_ERROR
    for r in np.flatnonzero(tile_err):
        messages.setdefault(int(r), f"tile files of row {r} could not be read")

    # arcsec sizes depend on the pixel scale of the tile each source landed on
    if options.size is None and np.isfinite(cat.size_arcsec).any():
        diam = _diameters(cat, index, options, tile=assignment.tile)

    if options.target_size is not None:
        out_shape = (options.target_size, options.target_size)
    else:
        cut = ok & ~tile_err & (np.asarray(assignment.tile) >= 0)
        sizes = np.unique(np.round(diam[cut])) if cut.any() else np.array([])
        if len(sizes) <= 1:
            n = int(sizes[0]) if len(sizes) else int(np.round(options.size or 1))
            out_shape = (n, n)
        elif options.format == "fits":
            out_shape = None
        else:
            msg = (
                f"cutout sizes vary ({int(sizes.min())}..{int(sizes.max())} px) but the "
                "Zarr output holds one size: give --target-size N (with --resample), "
                "--size N, or use --format fits"
            )
            raise ConfigError(msg)
    itemsize = np.dtype(options.dtype).itemsize
    plan = make_plan(
        index,
        assignment,
        diam,
        status,
        messages,
        out_shape=out_shape,
        out_itemsize=itemsize,
        memory_limit=options.memory_limit,
        n_workers=options.workers if options.backend != "serial" else 1,
        max_sources_per_job=options.max_sources_per_job,
        parent_bytes=parent_bytes,
        meta={"config": options.to_config(), "bands": list(index.bands)},
    )
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
        norm_kwargs=options.norm_kwargs(),
        n_threads=options.threads,
    )
    return _Prepared(cat, index, plan, options, settings)


def _diameters(cat, index, options, tile=None):
    """Box diameter in pixels per row (NaN where unknown)."""
    n = len(cat)
    if options.size is not None:
        return np.full(n, float(options.size))
    diam = np.asarray(cat.size_pixel, dtype=np.float64).copy()
    arcsec = np.asarray(cat.size_arcsec, dtype=np.float64)
    use = ~np.isfinite(diam) & np.isfinite(arcsec)
    if use.any():
        scales = np.array([t.pixel_scale_arcsec() for t in index.tiles])
        if tile is None:
            scale = np.full(n, scales[0])
        else:
            tile = np.asarray(tile)
            scale = np.where(tile >= 0, scales[np.clip(tile, 0, None)], scales[0])
        diam[use] = arcsec[use] / scale[use]
    return diam


def plan_cutouts(catalog, **options):
    """Plan a run without cutting anything (what ``cutana plan`` prints).

    Parameters
    ----------
    catalog : str, path-like, `~astropy.table.Table` or `pandas.DataFrame`
        The source catalogue.
    **options
        The options of `make_cutouts` (``output`` is not needed).

    Returns
    -------
    plan : `~cutana.planner.Plan`
        The plan; ``plan.summary()`` describes it with its memory estimate.
    """
    return _prepare(catalog, RunOptions(**options)).plan


# ----------------------------------------------------------------------------
# tasks run by the executor (module level, so that they pickle)
# ----------------------------------------------------------------------------


@dataclass
class _CutTask:
    settings: CutSettings
    tile: object
    job: object
    out_dir: str
    format: str
    bands: tuple
    ids: np.ndarray
    ra: np.ndarray
    dec: np.ndarray


@dataclass
class _AssembleTask:
    out_dir: str
    chunks: list
    job_of_row: np.ndarray  # job id per row of these chunks (-1 none)
    pos_in_job: np.ndarray
    base_status: np.ndarray
    row_start: int


def _run_task(task):
    """Run one task in a worker and return a small summary."""
    if isinstance(task, _CutTask):
        result = cut_job(task.settings, task.tile, task.job)
        if task.format == "zarr":
            return stage_job(task.out_dir, result)
        writer = FitsWriter(task.out_dir, task.bands)
        files = writer.write_sources(
            result,
            source_id=task.ids,
            ra=task.ra,
            dec=task.dec,
            tile=task.tile,
            out_shape=task.settings.out_shape,
        )
        return {"status": result.status, "messages": result.messages, "files": files}
    writer = ZarrWriter.open(os.path.join(task.out_dir, "cutouts.zarr"))
    return writer.write_chunks(
        task.chunks,
        out_dir=task.out_dir,
        job_of_row=task.job_of_row,
        pos_in_job=task.pos_in_job,
        base_status=task.base_status,
        row_start=task.row_start,
    )


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
        The output folder. For ``format='zarr'`` it holds the store
        ``cutouts.zarr``; for ``'fits'`` one file per source and ``index.ecsv``.
    resume : bool, optional
        Finish an interrupted run into ``output``: jobs and chunks recorded
        as complete in the ledger are kept, the rest is done.
    overwrite : bool, optional
        Replace an existing output. Without ``resume`` or ``overwrite`` an
        existing output is an error.
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
        'dask'), ``scheduler``, ``max_sources_per_job``.

    Returns
    -------
    report : `RunReport`
        Counts per status, time, throughput, peak memory, failures.

    Raises
    ------
    ConfigError
        For invalid options or an existing output without ``resume`` or
        ``overwrite``.
    cutana.exceptions.CatalogError
        If the catalogue cannot be read.
    """
    t0 = time.perf_counter()
    opts = RunOptions(**options)
    output = os.fspath(output)
    state = os.path.join(output, _STATE_DIR)
    exists = os.path.exists(output) and os.listdir(output)
    if exists and not (resume or overwrite):
        msg = (
            f"output {output!r} already exists: pass --resume to finish it or "
            "--overwrite to replace it"
        )
        raise ConfigError(msg)
    if resume and overwrite:
        msg = "resume and overwrite exclude each other"
        raise ConfigError(msg)

    with MemorySampler() as sampler:
        prepared = _prepare(catalog, opts, parent_bytes=sampler.sample())
        plan = prepared.plan
        if exists and overwrite:
            shutil.rmtree(output)
        resuming = bool(exists and resume)
        os.makedirs(state, exist_ok=True)
        plan_path = os.path.join(state, "plan.npz")
        if resuming:
            if not os.path.exists(plan_path):
                msg = f"cannot resume {output!r}: it has no saved plan ({plan_path})"
                raise ConfigError(msg)
            old = Plan.load(plan_path)
            if old.fingerprint() != plan.fingerprint():
                msg = (
                    f"cannot resume {output!r}: the catalogue, tiles or options differ "
                    "from the interrupted run (use --overwrite to start again)"
                )
                raise ConfigError(msg)
        else:
            plan.save(plan_path)
        ledger = Ledger(output)
        if not resuming:
            ledger.start(plan.fingerprint())
        runner = _Runner(prepared, output, ledger, resuming, progress, client)
        runner.run()
    seconds = time.perf_counter() - t0
    report = runner.report(seconds, sampler)
    ledger.finish(report.counts)
    _write_json(os.path.join(state, "report.json"), report.to_dict())
    return report


def _write_json(path, data):
    import json

    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


class _Runner:
    """Bookkeeping of one run in the main process."""

    def __init__(self, prepared, output, ledger, resuming, progress, client):
        self.p = prepared
        self.plan = prepared.plan
        self.output = output
        self.ledger = ledger
        self.resuming = resuming
        self.client = client
        self.status = self.plan.base_status.copy()
        self.messages = dict(self.plan.messages)
        self.failures = [f"{path}: {msg}" for path, msg in prepared.index.errors]
        self.files = {}
        if progress is None:
            progress = sys.stderr.isatty()
        self.progress = progress
        self.n_cut = 0

    # -- setup ------------------------------------------------------------
    def _open_zarr(self):
        cat = self.p.catalog
        path = os.path.join(self.output, "cutouts.zarr")
        if self.resuming and os.path.exists(path):
            return ZarrWriter.open(path)
        return ZarrWriter.create(
            path,
            n_rows=self.plan.n_rows,
            bands=list(self.p.index.bands),
            out_shape=self.plan.out_shape,
            dtype=self.p.options.dtype,
            source_id=cat.source_id,
            ra=cat.ra,
            dec=cat.dec,
            attrs={"config": self.p.options.to_config(), "plan": self.plan.fingerprint()},
            tiles=[_tile_record(t) for t in self.p.index.tiles],
            overwrite=True,
        )

    def run(self):
        opts = self.p.options
        fmt = opts.format
        done_jobs, done_chunks = self.ledger.read()
        plan = self.plan
        jobs = plan.jobs
        self.zarr = self._open_zarr() if fmt == "zarr" else None
        if fmt == "zarr":
            self._setup_chunks(done_jobs, done_chunks)
        cat = self.p.catalog
        tasks = []
        for job in jobs:
            if job.job_id in done_jobs:
                self.status[job.rows] = done_jobs[job.job_id].get("status_rows", self.status[job.rows])
                continue
            tasks.append(
                _CutTask(
                    settings=self.p.settings,
                    tile=self.p.index.tiles[job.tile],
                    job=job,
                    out_dir=self.output,
                    format=fmt,
                    bands=tuple(self.p.index.bands),
                    ids=cat.source_id[job.rows],
                    ra=cat.ra[job.rows],
                    dec=cat.dec[job.rows],
                )
            )
        if fmt == "zarr":
            tasks = self._ready_assembly_tasks() + tasks
        total = sum(len(t.job) for t in tasks if isinstance(t, _CutTask))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="src", desc="cutting", smoothing=0.1)
        self._bar = bar
        executor = Executor(
            opts.backend,
            opts.workers,
            memory_budget=max(0, plan.memory_limit - plan.memory.parent_bytes
                              - opts.workers * plan.memory.worker_bytes),
            retries=1,
            scheduler=opts.scheduler,
            client=self.client,
        )
        failures = executor.run(
            _run_task,
            tasks,
            cost=lambda t: t.job.est_bytes if isinstance(t, _CutTask) else 0,
            on_done=self._on_done,
            on_failed=self._on_failed,
        )
        if bar is not None:
            bar.close()
        self.failures += [f.error for f in failures if isinstance(f.task, _AssembleTask)]
        if fmt == "zarr":
            leftover = [k for k in range(self.zarr.n_chunks) if k not in self.chunks_written]
            if leftover:
                # chunks whose assembly failed twice: retry once more in-process
                for task in self._assembly_tasks(leftover):
                    self._on_done(task, _run_task(task))
            self.zarr.finalize({"counts": self._counts()})
            self._cleanup_staging()
        else:
            write_index(
                self.output,
                rows=np.arange(plan.n_rows),
                source_id=cat.source_id,
                status=self.status,
                files=[self.files.get(r, "") for r in range(plan.n_rows)],
                messages=self.messages,
            )

    # -- zarr chunk bookkeeping ----------------------------------------------
    def _setup_chunks(self, done_jobs, done_chunks):
        plan = self.plan
        n = plan.n_rows
        self.job_of_row = np.full(n, -1, dtype=np.int64)
        self.pos_in_job = np.full(n, -1, dtype=np.int64)
        for job in plan.jobs:
            self.job_of_row[job.rows] = job.job_id
            self.pos_in_job[job.rows] = np.arange(len(job))
        chunk_rows = self.zarr.chunk_rows
        n_chunks = self.zarr.n_chunks
        pending_rows = self.job_of_row >= 0
        for job_id in done_jobs:
            pending_rows[plan.jobs[job_id].rows] = False
        self.chunk_pending = np.bincount(
            np.flatnonzero(pending_rows) // chunk_rows, minlength=n_chunks
        )
        self.chunks_written = set(done_chunks)
        self.chunks_submitted = set(done_chunks)
        self.job_chunks_left = {}
        for job in plan.jobs:
            chunks = set((job.rows // chunk_rows).tolist()) - self.chunks_written
            self.job_chunks_left[job.job_id] = chunks

    def _ready_assembly_tasks(self):
        ready = [
            k
            for k in range(self.zarr.n_chunks)
            if self.chunk_pending[k] == 0 and k not in self.chunks_submitted
        ]
        return self._assembly_tasks(ready)

    def _assembly_tasks(self, chunks):
        tasks = []
        cr = self.zarr.chunk_rows
        for i in range(0, len(chunks), _CHUNKS_PER_TASK):
            group = sorted(chunks[i : i + _CHUNKS_PER_TASK])
            lo = group[0] * cr
            hi = min(self.plan.n_rows, (group[-1] + 1) * cr)
            self.chunks_submitted.update(group)
            tasks.append(
                _AssembleTask(
                    out_dir=self.output,
                    chunks=group,
                    job_of_row=self.job_of_row[lo:hi].copy(),
                    pos_in_job=self.pos_in_job[lo:hi].copy(),
                    base_status=self.status[lo:hi].copy(),
                    row_start=lo,
                )
            )
        return tasks

    # -- callbacks -------------------------------------------------------------
    def _on_done(self, task, result):
        if isinstance(task, _AssembleTask):
            for k, checksum in result.items():
                self.ledger.chunk_written(int(k), checksum)
                self.chunks_written.add(int(k))
            return ()
        job = task.job
        if self._bar is not None:
            self._bar.update(len(job))
        self.n_cut += len(job)
        if task.format == "fits":
            self.status[job.rows] = result["status"]
            self.messages.update(result["messages"])
            self.files.update(result["files"])
            self.ledger.job_staged(job.job_id, "", len(job))
            return ()
        staged = result
        self.status[job.rows] = staged.status
        self.messages.update(staged.messages)
        self.ledger.job_staged(job.job_id, staged.checksum, len(job))
        return self._release_rows(job.rows)

    def _release_rows(self, rows):
        cr = self.zarr.chunk_rows
        chunks, counts = np.unique(rows // cr, return_counts=True)
        self.chunk_pending[chunks] -= counts
        return self._ready_assembly_tasks()

    def _on_failed(self, failure):
        task = failure.task
        if isinstance(task, _AssembleTask):
            self.chunks_submitted.difference_update(task.chunks)
            return ()
        job = task.job
        self.failures.append(f"job {job.job_id} (tile {task.tile.key}): {failure.error}")
        self.status[job.rows] = Status.TILE_ERROR
        for r in job.rows:
            self.messages[int(r)] = f"job failed after {failure.attempts} attempts: {failure.error}"
        if self._bar is not None:
            self._bar.update(len(job))
        if task.format == "zarr":
            self.job_of_row[job.rows] = -1
            return self._release_rows(job.rows)
        return ()

    def _cleanup_staging(self):
        staging = os.path.join(self.output, _STATE_DIR, "staging")
        if os.path.isdir(staging) and len(self.chunks_written) == self.zarr.n_chunks:
            shutil.rmtree(staging, ignore_errors=True)

    # -- report ------------------------------------------------------------------
    def _counts(self):
        values, counts = np.unique(self.status, return_counts=True)
        return {Status(int(v)).name: int(c) for v, c in zip(values, counts)}

    def report(self, seconds, sampler):
        counts = self._counts()
        msgs = {r: m for r, m in self.messages.items() if self.status[r] != Status.OK}
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


def _tile_record(tile):
    """What the output stores about a tile to rebuild cutout WCS."""
    first = next(b for b in tile.bands if b is not None)
    return {
        "key": tile.key,
        "paths": [None if b is None else b.path for b in tile.bands],
        "header": first.header,
    }


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


def iter_cutouts(catalog, **options):
    """Yield batches of cutouts in memory, without writing anything.

    Parameters
    ----------
    catalog : str, path-like, `~astropy.table.Table` or `pandas.DataFrame`
        The sources, as for `make_cutouts`.
    **options
        The options of `make_cutouts` (format, workers and backend are
        ignored: batches are cut in this process, one job at a time).

    Yields
    ------
    batch : `CutoutBatch`
        ``(n, C, H, W)`` images with their rows and metadata; rows that are
        not cut (bad rows, off-tile) are not yielded.
    """
    options = {k: v for k, v in options.items() if k not in ("workers", "backend")}
    prepared = _prepare(catalog, RunOptions(**options))
    cat = prepared.catalog
    for job in prepared.plan.jobs:
        result = cut_job(prepared.settings, prepared.index.tiles[job.tile], job)
        yield CutoutBatch(
            images=result.images,
            rows=result.rows,
            source_id=cat.source_id[result.rows],
            ra=cat.ra[result.rows],
            dec=cat.dec[result.rows],
            status=result.status,
            bands=tuple(prepared.index.bands),
        )
