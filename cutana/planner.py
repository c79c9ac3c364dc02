# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The plan of a run: which sources are cut from which tile, in which job.

A `Plan` is an ordered list of `Job` objects. A job is one tile (all its
bands) and a bounded slice of that tile's sources; the slice size comes
from the memory budget, so that a worker never holds more than its job's
output plus a fixed working set. The plan is computed from the catalogue
and the tile index only (no pixel data is read), is deterministic for the
same inputs, and can be saved and loaded, so that a run can be resumed or
shipped to a cluster.
"""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from .status import Status

__all__ = [
    "Job",
    "MemoryModel",
    "Plan",
    "available_memory",
    "make_plan",
    "parse_memory",
    "split_rows",
    "square_boxes",
    "working_dtype",
]

#: Limit, usage and statistics files of the process's memory cgroup, and
#: the statistic of its reclaimable file pages: version 2, then version 1
#: (a container's limit, which ``/proc/meminfo`` does not show).
_CGROUP_FILES = (
    (
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory.current",
        "/sys/fs/cgroup/memory.stat",
        "inactive_file",
    ),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/memory.stat",
        "total_inactive_file",
    ),
)

_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def _read_int(path):
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # e.g. "max": no limit


def _read_stat(path, key):
    try:
        with open(path) as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def available_memory():
    """Bytes of memory this process can still use.

    What the operating system reports as available, or, inside a container
    whose memory cgroup sets a lower limit, that limit less the cgroup's
    working set (its usage without the file pages it can reclaim; the limit
    alone when the cgroup does not say), as the system's figure does not
    know about the container.

    Returns
    -------
    nbytes : int
        Available bytes.

    Examples
    --------
    >>> from cutana.planner import available_memory
    >>> available_memory() > 0
    True
    """
    import psutil

    available = int(psutil.virtual_memory().available)
    for limit_path, usage_path, stat_path, reclaimable in _CGROUP_FILES:
        limit = _read_int(limit_path)
        if limit is None or limit >= 1 << 60:  # none, or version 1's "unlimited"
            continue
        usage = _read_int(usage_path)
        cache = _read_stat(stat_path, reclaimable)
        used = 0 if usage is None or cache is None else max(0, usage - cache)
        return max(0, min(available, limit - used))
    return available


def parse_memory(value):
    """Parse a memory size such as ``'1GB'`` (10⁹ bytes), ``'1GiB'`` (2³⁰) or ``512e6``.

    Parameters
    ----------
    value : str, int or float
        The size. Decimal units (kB, MB, GB, TB) are powers of 1000, binary
        units (KiB, MiB, GiB, TiB) powers of 1024; a bare number is bytes.

    Returns
    -------
    nbytes : int
        The size in bytes.

    Raises
    ------
    ValueError
        If the value cannot be parsed or is not positive.

    Examples
    --------
    >>> parse_memory("1GB"), parse_memory("1GiB"), parse_memory("512MB")
    (1000000000, 1073741824, 512000000)
    """
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    ):
        nbytes = float(value)
    else:
        text = str(value).strip().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
        unit = text[len(number):].upper()
        if unit not in _UNITS or not number:
            msg = (
                f"cannot parse memory size {value!r}: use a number with an optional "
                "unit such as 800MB, 4GB or 2GiB"
            )
            raise ValueError(msg)
        try:
            nbytes = float(number) * _UNITS[unit]
        except ValueError:
            msg = f"cannot parse memory size {value!r}: {number!r} is not a number"
            raise ValueError(msg) from None
    if not math.isfinite(nbytes) or nbytes < 1:
        msg = f"memory size must be at least one byte, got {value!r}"
        raise ValueError(msg)
    return int(nbytes)


@dataclass(frozen=True)
class MemoryModel:
    """How many bytes a run needs, used to size jobs from a memory budget.

    Attributes
    ----------
    parent_bytes : int
        Resident memory of the main process (interpreter, libraries, plan).
    worker_bytes : int
        Resident memory of an idle worker process.
    per_source_bytes : int
        Bytes a job holds per source until it is committed (its output).
    working_bytes : int
        Fixed working set of a job: one sub-batch of float32 intermediates
        and the tile pages it touches.

    Examples
    --------
    >>> from cutana.planner import MemoryModel
    >>> model = MemoryModel(parent_bytes=250_000_000, worker_bytes=160_000_000,
    ...                     per_source_bytes=4_160, working_bytes=2_000_000)
    >>> model.job_bytes(100)
    2416000
    """

    parent_bytes: int
    worker_bytes: int
    per_source_bytes: int
    working_bytes: int

    def job_bytes(self, n_sources):
        """Estimated peak bytes of a job with ``n_sources`` sources.

        Parameters
        ----------
        n_sources : int
            Number of sources in the job.

        Returns
        -------
        nbytes : int
            Estimated bytes.
        """
        return int(self.working_bytes + n_sources * self.per_source_bytes)


#: Sources cut together inside a job (the kernel's sub-batch).
SUB_BATCH = 64


def working_dtype(tile_dtype):
    """The float type a job cuts a band in, before it becomes the output.

    Values are converted as astropy scales FITS images: float64 for tiles
    of 32- or 64-bit integers or float64, whose values float32 would round;
    float32 otherwise (8- and 16-bit integers, float32), so that a stretch
    or a float32 output sees the values astropy would.

    Parameters
    ----------
    tile_dtype : `~numpy.dtype`
        dtype of the tile's pixels.

    Returns
    -------
    dtype : `~numpy.dtype`
        ``float32`` or ``float64``.

    Examples
    --------
    >>> from cutana.planner import working_dtype
    >>> [working_dtype(t).name for t in (">f4", ">i2", ">f8", ">i4", "u1")]
    ['float32', 'float32', 'float64', 'float64', 'float32']
    """
    dtype = np.dtype(tile_dtype)
    if dtype.itemsize >= 8 or (dtype.kind in "iu" and dtype.itemsize >= 4):
        return np.dtype(np.float64)
    return np.dtype(np.float32)

#: Output chunk files a worker holds for its writer thread
#: (`cutana.io._writeback.DEPTH`), each of at most 4 MiB or one row, twice:
#: in an aligned buffer, and as the encoded chunk the thread copies into it.
WRITE_BUFFERS = 2
#: Hard cap on sources per job, so that progress and retries stay fine-grained.
MAX_SOURCES_PER_JOB = 4096
#: Hard cap on sources per band of output chunks (whose jobs, one per tile,
#: one worker cuts together) when no cap is given. Each job of a band maps
#: its tile's files once, so larger bands map them less often: on 8 tiles
#: of 200,000 random sources, bands of 8,192 rather than 4,096 sources took
#: 2 workers 280,000 instead of 460,000 page faults and 7-8 % less time.
#: Where the memory limit leaves no room to keep the tiles mapped between
#: jobs (`cutana.tiles.open_pixels`), mapping a 64 MB band file afresh
#: costs about 6 ms; bands of up to 16,384 rather than 8,192 sources then
#: took that survey 8 % less time with 1 or 2 workers at ``--memory-limit
#: 1GB`` (means of three alternating runs) and 12 % less with 2 workers at
#: 600MB (one run each), and the same without a limit, where the tiles
#: stay mapped; the peak was 60-120 MB higher, within the limit. A single
#: tile's jobs keep the smaller cap: their output buffers are fresh memory,
#: slow to touch first on virtual machines.
MAX_SOURCES_PER_BAND = 4 * MAX_SOURCES_PER_JOB
#: Jobs per worker the planner aims for, so that the last jobs end together.
JOBS_PER_WORKER = 12
#: Bands per worker the planner aims for: fewer than `JOBS_PER_WORKER`, as
#: the last bands are cut smaller (`_taper`) and each band maps every tile
#: it touches once.
BANDS_PER_WORKER = 6
#: Smallest job the planner makes for load balancing (unless a cap asks less).
MIN_SOURCES_PER_JOB = 256
#: Assumed resident size of a worker beside its jobs (Python, numpy,
#: astropy, and what running jobs leaves), bytes. A worker forked from the
#: ``forkserver`` held about 64 MB when it started; assuming 100 MB, a run
#: of the 200,000-source survey at ``--memory-limit 600MB`` had workers
#: peak at 193-197 MB, with their working memory and jobs estimated at
#: 88 MB. Since the server imports only what workers run, a worker starts
#: at 43 MB (62 MB before, both measured); the estimate is kept, with that
#: much more to spare. The parent's measure leaves the workers out.
WORKER_BASE_BYTES = 130 * 10**6
#: Assumed resident size of the main process beyond the catalogue arrays.
PARENT_BASE_BYTES = 250 * 10**6
#: Assumed resident size of the worker server of a ``processes`` run: the
#: ``forkserver``, with the modules it imports for its workers (about
#: 57 MB; 77 MB when it imported the whole pipeline), and multiprocessing's
#: resource tracker (about 14 MB), with room to spare. A run measures them
#: with its main process; `cutana.pipeline.plan_cutouts`, in a process
#: where none has started, adds this instead.
SERVER_BYTES = 100 * 10**6
#: Bytes the main process adds per catalogue row once the catalogue is read
#: (measured then) while a run goes on: the plan's arrays (40), and for a
#: Zarr output each row's job and place in it, the copies the chunk tasks
#: hold, and each row's status and geometry, kept until the store is
#: finished (38); the rest is a margin.
PARENT_ROW_BYTES = 104
#: What a FITS output's main process adds per row beyond `PARENT_ROW_BYTES`:
#: each row's file name (`cutana.io.fits_filenames`, a text array of 4
#: bytes a character, and the set of names it checks for collisions while it
#: derives them), then the name each job records (a pointer and a string).
#: On the 200,000-source survey (names of 15 characters) the main process
#: grew by 9 MB while the run went on; this allows for names of about 25.
FITS_ROW_BYTES = 200


@dataclass
class Job:
    """One unit of work: a tile (all bands) and a slice of its sources.

    Attributes
    ----------
    job_id : int
        Position of the job in the plan.
    tile : int
        Index of the tile in the tile index.
    rows : `~numpy.ndarray` of int64
        Catalogue rows of the sources, ascending.
    x, y : `~numpy.ndarray` of float64
        0-based pixel position of each source in the tile.
    box : `~numpy.ndarray` of int64, shape ``(n, 2)``
        ``(ny, nx)`` of the box cut for each source, before resampling.
    est_bytes : int
        Estimated peak memory of the job in a worker (of its whole band,
        when the plan groups jobs in bands that fill output chunks together).
    band_xy : `~numpy.ndarray` of float64, shape ``(n, C, 2)``, or None
        For a tile with band files on pixel grids of their own
        (`~cutana.tiles.Tile.own_grid`): each source's ``(x, y)`` in each
        such band's file (NaN for the other bands); None otherwise.
    band_box : `~numpy.ndarray` of int64, shape ``(n, C, 2)``, or None
        ``(ny, nx)`` of the box cut for each source in each band, where a
        band on a pixel grid of its own has a box of its own (a size in
        arcseconds at that file's pixel scale, for resampled outputs); None
        when every band is cut with ``box``.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.planner import Job
    >>> job = Job(job_id=0, tile=1, rows=np.array([3, 7]), x=np.array([10.0, 200.5]),
    ...           y=np.array([40.0, 81.5]), box=np.array([[16, 16], [16, 16]]))
    >>> len(job), job.tile, job.rows.tolist()
    (2, 1, [3, 7])
    """

    job_id: int
    tile: int
    rows: np.ndarray
    x: np.ndarray
    y: np.ndarray
    box: np.ndarray
    est_bytes: int = 0
    band_xy: np.ndarray = None
    band_box: np.ndarray = None

    def __len__(self):
        return len(self.rows)

    def band_boxes(self, c):
        """``(n, 2)`` ``(ny, nx)`` of the boxes cut in band ``c``: its own
        (`band_box`) where the job has them, else ``box``."""
        return self.box if self.band_box is None else self.band_box[:, c]

    def subset(self, keep, **changes):
        """Return the job of the sources ``keep`` selects (a mask or indices).

        Parameters
        ----------
        keep : array-like of bool or int
            Which of the job's sources to keep.
        **changes
            Other fields to change (``job_id``, ``est_bytes``).

        Returns
        -------
        job : `Job`
            The job with the selected rows, positions and boxes.

        Examples
        --------
        >>> import numpy as np
        >>> from cutana.planner import Job
        >>> job = Job(job_id=0, tile=1, rows=np.array([3, 7]), x=np.array([1.0, 2.0]),
        ...           y=np.array([4.0, 5.0]), box=np.array([[8, 8], [9, 9]]))
        >>> part = job.subset(np.array([False, True]), job_id=5)
        >>> part.job_id, part.rows.tolist(), part.box.tolist()
        (5, [7], [[9, 9]])
        """
        return dataclasses.replace(
            self,
            rows=self.rows[keep],
            x=self.x[keep],
            y=self.y[keep],
            box=self.box[keep],
            band_xy=None if self.band_xy is None else self.band_xy[keep],
            band_box=None if self.band_box is None else self.band_box[keep],
            **changes,
        )


@dataclass
class Plan:
    """An ordered, serialisable list of jobs, and the status of the other rows.

    Attributes
    ----------
    jobs : list of `Job`
        The jobs, in the order they are submitted.
    n_rows : int
        Number of catalogue rows (the output has exactly this many).
    base_status : `~numpy.ndarray` of int16
        Status of every row before cutting: `cutana.Status.PENDING` for rows in a
        job, otherwise why the row gets no cutout (bad row, no overlap,
        tile error).
    messages : dict
        Row → message for rows that are not in any job.
    out_shape : tuple of int or None
        ``(H, W)`` of every cutout in the output, or `None` when sizes vary
        (FITS output without resampling).
    n_channels : int
        Channels (bands) per cutout.
    out_itemsize : int
        Bytes per output pixel.
    memory_limit : int
        The memory budget of the whole run, bytes.
    n_workers : int
        Worker processes the plan was sized for.
    memory : `MemoryModel`
        The memory model used to size the jobs.
    workers_asked : int or None
        The workers asked for, when the memory limit holds only
        ``n_workers`` of them (see `make_plan`); `None` otherwise.
    beyond_bytes : int
        Bytes the workers of a run may hold beyond `peak_bytes`, within
        their `spare_worker_bytes`: tile files kept mapped between jobs and
        threads on a spare core (set by `cutana.pipeline`, which decides
        both; 0 here).

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.pipeline import plan_cutouts
    >>> from cutana.planner import Plan
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> plan = plan_cutouts(survey.catalogue_path, size=16, memory_limit="2GB")
    >>> plan.n_rows, plan.n_channels, plan.out_shape
    (40, 4, (16, 16))
    >>> counts = plan.status_counts()
    >>> plan.n_sources == counts["PENDING"]
    True

    A plan saved and loaded again is the same plan:

    >>> path = os.path.join(tempfile.mkdtemp(), "plan.npz")
    >>> plan.save(path)
    >>> Plan.load(path).fingerprint() == plan.fingerprint()
    True
    """

    jobs: list
    n_rows: int
    base_status: np.ndarray
    messages: dict
    out_shape: tuple | None
    n_channels: int
    out_itemsize: int
    memory_limit: int
    n_workers: int
    memory: MemoryModel
    meta: dict = field(default_factory=dict)
    #: the workers asked for, when the memory limit holds fewer (`make_plan`
    #: with ``fit_workers``); not saved
    workers_asked: int | None = field(default=None, compare=False)
    #: what the workers may hold beyond the estimate (`cutana.pipeline`);
    #: not saved
    beyond_bytes: int = field(default=0, compare=False)

    @property
    def n_sources(self):
        """Number of sources that are cut (rows in some job)."""
        return sum(len(j) for j in self.jobs)

    @property
    def peak_bytes(self):
        """Estimated peak memory of the run: parent + busiest workers."""
        busiest = sorted(
            (j.est_bytes for j in self.jobs), reverse=True
        )[: self.n_workers]
        workers = self.n_workers * self.memory.worker_bytes + sum(busiest)
        return int(self.memory.parent_bytes + workers)

    @property
    def job_budget(self):
        """Bytes the jobs in flight may hold together (0 if none).

        The memory limit less the main process and the idle workers.
        """
        budget = self.memory_limit - self.memory.parent_bytes
        return max(0, int(budget - self.n_workers * self.memory.worker_bytes))

    @property
    def spare_worker_bytes(self):
        """Bytes each worker may hold beyond its jobs within the memory limit.

        What the limit leaves once the main process, the idle workers and
        ``n_workers`` of the largest jobs are counted, shared equally; 0
        when nothing is left. Workers keep tile files mapped between jobs
        within it (`cutana.tiles.open_pixels`).

        Examples
        --------
        >>> from cutana.planner import Job, MemoryModel, Plan
        >>> import numpy as np
        >>> memory = MemoryModel(parent_bytes=100, worker_bytes=50,
        ...                      per_source_bytes=1, working_bytes=0)
        >>> job = Job(job_id=0, tile=0, rows=np.arange(3), x=np.zeros(3),
        ...           y=np.zeros(3), box=np.ones((3, 2), int), est_bytes=200)
        >>> plan = Plan(jobs=[job], n_rows=3, base_status=np.zeros(3, np.int16),
        ...             messages={}, out_shape=None, n_channels=1, out_itemsize=4,
        ...             memory_limit=1000, n_workers=2, memory=memory)
        >>> plan.spare_worker_bytes  # (1000 - 100 - 2 * 50 - 2 * 200) / 2
        200
        """
        largest = max((j.est_bytes for j in self.jobs), default=0)
        free = self.job_budget - self.n_workers * largest
        return max(0, int(free // max(1, self.n_workers)))

    def status_counts(self):
        """Counts of the rows' status before cutting, by status name.

        Returns
        -------
        counts : dict
            Status name → number of rows.
        """
        values, counts = np.unique(self.base_status, return_counts=True)
        return {
            Status(int(v)).name: int(c) for v, c in zip(values, counts, strict=False)
        }

    def summary(self):
        """A human-readable summary of the plan and its memory estimate.

        The estimate (`peak_bytes`) counts the main process, the idle
        workers and the largest jobs; what the workers may hold beyond it
        within the limit (`beyond_bytes`) is given on a line of its own.

        Returns
        -------
        text : str
            Several lines of text.
        """
        sizes = [len(j) for j in self.jobs]
        tiles = sorted({j.tile for j in self.jobs})
        shape = (
            "varies"
            if self.out_shape is None
            else f"{self.out_shape[0]}x{self.out_shape[1]}"
        )
        lines = [
            f"catalogue rows      {self.n_rows}",
            f"sources to cut      {self.n_sources} on {len(tiles)} tile(s)",
            f"jobs                {len(self.jobs)} "
            f"({min(sizes) if sizes else 0}..{max(sizes) if sizes else 0} "
            "sources each)",
            f"output              {self.n_channels} channel(s), {shape} px, "
            f"{self.out_itemsize} byte(s)/px",
            *(
                [f"bands               {', '.join(map(str, self.meta['bands']))}"]
                if self.meta.get("bands")
                else []
            ),
            *(
                [f"own pixel grid      {', '.join(map(str, self.meta['own_grid']))} "
                 "(cut at each source's position in its own file"
                 + (", sizes in arcsec at its own pixel scale)"
                    if any(j.band_box is not None for j in self.jobs) else ")")]
                if self.meta.get("own_grid")
                else []
            ),
            f"workers             {self.n_workers}"
            + (f" ({self.workers_asked} asked; the memory limit holds "
               f"{self.n_workers})" if self.workers_asked else ""),
            f"memory limit        {_fmt_bytes(self.memory_limit)}",
            f"estimated peak      {_fmt_bytes(self.peak_bytes)} "
            f"(main {_fmt_bytes(self.memory.parent_bytes)}, "
            f"per worker {_fmt_bytes(self.memory.worker_bytes)} + job)",
            *(
                [f"beyond it, up to    {_fmt_bytes(self.beyond_bytes)} within the "
                 "limit (tile files kept mapped between jobs, threads on a "
                 "spare core)"]
                if self.beyond_bytes > 0
                else []
            ),
        ]
        for name, count in self.status_counts().items():
            if name != "PENDING":
                lines.append(f"rows without cutout {count} ({name})")
        return "\n".join(lines)

    def fingerprint(self):
        """A SHA-256 digest of everything that determines the output.

        Returns
        -------
        digest : str
            Hex digest; equal plans have equal digests.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self._header(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.base_status).tobytes())
        for job in self.jobs:
            h.update(np.int64([job.job_id, job.tile]).tobytes())
            for arr in (job.rows, job.x, job.y, job.box):
                h.update(np.ascontiguousarray(arr).tobytes())
            for arr in (job.band_xy, job.band_box):  # (bands on grids of their own)
                if arr is not None:
                    h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def output_fingerprint(self, rows=None):
        """A SHA-256 digest of what the output holds, independent of job sizes.

        Two plans with the same output fingerprint write identical outputs,
        even if they slice the sources into jobs differently (e.g. for
        another memory limit or worker count); a resumed run keeps the
        interrupted run's jobs when the fingerprints agree.

        Parameters
        ----------
        rows : array-like of bool, optional
            Digest only these rows (a mask of ``n_rows``), with the output's
            shape and options; by default all.

        Returns
        -------
        digest : str
            Hex digest.
        """
        h = hashlib.sha256()
        header = {
            "n_rows": self.n_rows,
            "out_shape": None if self.out_shape is None else list(self.out_shape),
            "n_channels": self.n_channels,
            "out_itemsize": self.out_itemsize,
            "meta": self.meta,
        }
        h.update(json.dumps(header, sort_keys=True).encode())
        keep = slice(None) if rows is None else np.asarray(rows, dtype=bool)
        h.update(np.ascontiguousarray(self.base_status[keep]).tobytes())
        tile = np.full(self.n_rows, -1, dtype=np.int64)
        xy = np.full((self.n_rows, 2), np.nan)
        box = np.zeros((self.n_rows, 2), dtype=np.int64)
        for job in self.jobs:
            tile[job.rows] = job.tile
            xy[job.rows, 0] = job.x
            xy[job.rows, 1] = job.y
            box[job.rows] = job.box
        for arr in (tile, xy, box):
            h.update(np.ascontiguousarray(arr[keep]).tobytes())
        return h.hexdigest()

    def _header(self):
        return {
            "n_rows": self.n_rows,
            "out_shape": None if self.out_shape is None else list(self.out_shape),
            "n_channels": self.n_channels,
            "out_itemsize": self.out_itemsize,
            "memory_limit": self.memory_limit,
            "n_workers": self.n_workers,
            "memory": self.memory.__dict__,
            "meta": self.meta,
            "messages": {str(k): v for k, v in sorted(self.messages.items())},
            "job_tiles": [j.tile for j in self.jobs],
            "job_est_bytes": [j.est_bytes for j in self.jobs],
        }

    def save(self, path):
        """Save the plan to a ``.npz`` file.

        Parameters
        ----------
        path : str or path-like
            Destination file.
        """
        counts = np.array([len(j) for j in self.jobs], dtype=np.int64)

        def cat(name, dtype, width=None):
            parts = [getattr(j, name) for j in self.jobs]
            if not parts:
                return np.zeros((0,) if width is None else (0, width), dtype=dtype)
            return np.concatenate(parts).astype(dtype)

        with open(path, "wb") as fh:
            np.savez(
                fh,
                header=np.frombuffer(
                    json.dumps(self._header()).encode(), dtype=np.uint8
                ),
                base_status=self.base_status,
                counts=counts,
                rows=cat("rows", np.int64),
                x=cat("x", np.float64),
                y=cat("y", np.float64),
                box=cat("box", np.int64, 2),
                **self._per_band_arrays("band_xy", np.float64),
                **self._per_band_arrays("band_box", np.int64),
            )

    def _per_band_arrays(self, name, dtype):
        """`Job.band_xy` or `Job.band_box` (``name``) of the jobs that have
        it, for `save`: ``name`` (their rows, concatenated) and
        ``name_jobs`` (which jobs)."""
        which = [j.job_id for j in self.jobs if getattr(j, name) is not None]
        if not which:
            return {}
        parts = [getattr(j, name) for j in self.jobs if getattr(j, name) is not None]
        return {name: np.concatenate(parts).astype(dtype),
                f"{name}_jobs": np.array(which, dtype=np.int64)}

    @classmethod
    def load(cls, path):
        """Load a plan saved with `save`.

        Parameters
        ----------
        path : str or path-like
            The ``.npz`` file.

        Returns
        -------
        plan : `Plan`
            The plan.
        """
        with np.load(path) as npz:
            header = json.loads(npz["header"].tobytes().decode())
            counts = npz["counts"]
            bounds = np.concatenate([[0], np.cumsum(counts)])
            arrays = {k: npz[k] for k in ("rows", "x", "y", "box")}
            base_status = npz["base_status"]
            per_band = {"band_xy": {}, "band_box": {}}
            for name, found in per_band.items():
                if f"{name}_jobs" in npz.files:
                    at = 0
                    for job_id in npz[f"{name}_jobs"].tolist():
                        n = int(counts[job_id])
                        found[job_id] = npz[name][at : at + n]
                        at += n
        jobs = [
            Job(
                job_id=i,
                tile=int(tile),
                rows=arrays["rows"][a:b],
                x=arrays["x"][a:b],
                y=arrays["y"][a:b],
                box=arrays["box"][a:b],
                est_bytes=int(est),
                band_xy=per_band["band_xy"].get(i),
                band_box=per_band["band_box"].get(i),
            )
            for i, (tile, est, a, b) in enumerate(
                zip(header["job_tiles"], header["job_est_bytes"], bounds[:-1],
                    bounds[1:], strict=False)
            )
        ]
        return cls(
            jobs=jobs,
            n_rows=header["n_rows"],
            base_status=base_status,
            messages={int(k): v for k, v in header["messages"].items()},
            out_shape=(
                None if header["out_shape"] is None else tuple(header["out_shape"])
            ),
            n_channels=header["n_channels"],
            out_itemsize=header["out_itemsize"],
            memory_limit=header["memory_limit"],
            n_workers=header["n_workers"],
            memory=MemoryModel(**header["memory"]),
            meta=header["meta"],
        )


def _fmt_bytes(n):
    """Format a byte count with a decimal unit."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"  # pragma: no cover


def _touched_bytes(box, itemsize):
    """Bytes of tile pages a window touches when the tile is memory-mapped."""
    page = 4096
    ny, nx = int(box[0]), int(box[1])
    return ny * (math.ceil(nx * itemsize / page) + 1) * page


def square_boxes(diameters):
    """Whole square boxes of diameters in pixels: ``(..., 2)`` int64
    ``(ny, nx)``, rounded as `astropy.nddata.Cutout2D` rounds sizes
    (``np.round``), 0 where a diameter is not finite.

    Parameters
    ----------
    diameters : array-like of float
        Diameters in pixels, of any shape (per row, or per row and band).

    Returns
    -------
    boxes : `~numpy.ndarray` of int64

    Examples
    --------
    >>> from cutana.planner import square_boxes
    >>> square_boxes([2.5, 3.5, float("nan")]).tolist()
    [[2, 2], [4, 4], [0, 0]]
    """
    d = np.asarray(diameters, dtype=np.float64)
    sides = np.where(np.isfinite(d), np.round(d), 0).astype(np.int64)
    return np.repeat(sides[..., None], 2, axis=-1)


def make_plan(
    tile_index,
    assignment,
    diameters,
    base_status,
    messages,
    *,
    out_shape,
    out_itemsize,
    memory_limit,
    n_workers=1,
    max_sources_per_job=None,
    parent_bytes=None,
    meta=None,
    chunk_rows=None,
    fit_workers=False,
    parent_row_bytes=None,
    band_xy=None,
    band_diameters=None,
):
    """Group sources into jobs sized from a memory budget.

    Parameters
    ----------
    tile_index : `~cutana.tiles.TileIndex`
        The tiles (only headers are used).
    assignment : `~cutana.tiles.Assignment`
        Which tile holds each source and its pixel position there.
    diameters : `~numpy.ndarray` of float64
        Box size in pixels of each source (rounded to whole pixels here,
        as `astropy.nddata.Cutout2D` rounds sizes).
    base_status : `~numpy.ndarray` of int16
        Status of each row from validation; rows that are not `cutana.Status.OK`
        are not cut.
    messages : dict
        Row → message, extended here for rows that cannot be cut.
    out_shape : tuple of int or None
        ``(H, W)`` of the output cutouts, or `None` for the extracted size.
    out_itemsize : int
        Bytes per output pixel.
    memory_limit : int
        Memory budget of the whole run in bytes.
    n_workers : int, optional
        Worker processes that run jobs at the same time.
    max_sources_per_job : int, optional
        Cap on sources per job, and per band of chunks (default
        `MAX_SOURCES_PER_JOB`, and `MAX_SOURCES_PER_BAND` for bands).
    parent_bytes : int, optional
        Resident bytes of the main process, if measured (once the catalogue
        is read: its arrays are part of it). What each row adds after that
        (`PARENT_ROW_BYTES`) is added to it.
    meta : dict, optional
        JSON-serialisable settings recorded in the plan (and fingerprint).
    chunk_rows : int, optional
        Rows per chunk of the output. The rows are then cut into bands of
        whole chunks (within the memory budget, see `split_rows`), with one
        job per tile in each band, each sized in memory for its band: the
        jobs of a band fill its chunks together, so that one worker can cut
        them and write the chunks itself. When that would make the jobs
        small (`MIN_BAND_JOB`), jobs go tile by tile, cut on chunk
        boundaries where a tile's rows allow it.
    fit_workers : bool, optional
        When the memory limit cannot hold ``n_workers`` workers with one
        source each, plan for as many as it holds (``plan.n_workers``; the
        count asked for is ``plan.workers_asked``) instead of raising.
    parent_row_bytes : int, optional
        Bytes the main process adds per row while the run goes on (default
        `PARENT_ROW_BYTES`; a FITS output adds `FITS_ROW_BYTES` to it).
    band_xy : `~numpy.ndarray`, shape ``(N, C, 2)``, optional
        Each row's position in the band files on pixel grids of their own
        (`~cutana.tiles.TileIndex.band_positions`); the jobs of such tiles
        carry their rows' positions (`Job.band_xy`).
    band_diameters : `~numpy.ndarray`, shape ``(N, C)``, optional
        Box size in pixels of each row in each band, where bands on pixel
        grids of their own cut boxes of their own (rounded as
        ``diameters``); the jobs of such tiles carry them (`Job.band_box`),
        and the largest box of any band sizes the memory per source.

    Returns
    -------
    plan : `Plan`
        The plan.

    Raises
    ------
    ValueError
        If the memory limit cannot hold even one source per worker (with
        ``fit_workers``: for one worker).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.catalog import read_catalog
    >>> from cutana.planner import make_plan, parse_memory
    >>> from cutana.tiles import TileIndex
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> cat = read_catalog(survey.catalogue_path, size=16)
    >>> index = TileIndex.from_paths([p for paths in survey.tile_paths for p in paths])
    >>> diameters = np.full(len(cat), 16.0)
    >>> assignment = index.assign(cat.ra, cat.dec, diameters)
    >>> plan = make_plan(index, assignment, diameters, cat.status, cat.messages,
    ...                  out_shape=(16, 16), out_itemsize=4,
    ...                  memory_limit=parse_memory("2GB"), max_sources_per_job=8)
    >>> plan.n_rows, plan.n_channels, len(plan.jobs) >= 1
    (40, 4, True)
    >>> max(len(job) for job in plan.jobs) <= 8
    True
    """
    n = len(base_status)
    status = np.asarray(base_status, dtype=np.int16).copy()
    messages = dict(messages)
    n_channels = max(1, len(tile_index.bands))
    tile = np.asarray(assignment.tile)
    boxes = square_boxes(diameters)

    todo = status == Status.OK
    off = todo & (tile < 0)
    status[off] = Status.NO_OVERLAP
    for r in np.flatnonzero(off):
        messages.setdefault(int(r), "source lies on no tile given")
    todo &= tile >= 0
    status[todo] = Status.PENDING

    band_boxes = None if band_diameters is None else square_boxes(band_diameters)
    # the largest box (of any band) and output decide the per-source memory
    max_box = int(boxes[todo].max()) if todo.any() else 1
    if band_boxes is not None and todo.any():
        max_box = max(max_box, int(band_boxes[todo].max()))
    dtypes = [
        np.dtype(b.dtype) for t in tile_index.tiles for b in t.bands if b is not None
    ]
    tile_item = max((d.itemsize for d in dtypes), default=4)
    work_item = max((working_dtype(d).itemsize for d in dtypes), default=4)
    out_px = (
        (out_shape[0] * out_shape[1]) if out_shape is not None else max_box * max_box
    )
    row_bytes = n_channels * out_px * out_itemsize
    per_source = row_bytes + 64  # + metadata
    sub = SUB_BATCH
    working = n_channels * (
        sub * out_px * work_item  # float intermediate of one sub-batch
        + sub * max_box * max_box * 8  # extracted windows (float64 worst case)
        + sub * _touched_bytes((max_box, max_box), tile_item)  # tile pages touched
    ) + 2 * WRITE_BUFFERS * max(4 * 2**20, row_bytes)  # chunk files being written
    if parent_bytes is None:
        parent_bytes = PARENT_BASE_BYTES
    # per row: the plan's arrays, and the status and geometry of written
    # chunks that the parent keeps until the store is finished (40 bytes)
    if parent_row_bytes is None:
        parent_row_bytes = PARENT_ROW_BYTES
    parent_bytes = int(parent_bytes + n * parent_row_bytes)
    memory = MemoryModel(
        parent_bytes=parent_bytes,
        worker_bytes=WORKER_BASE_BYTES,
        per_source_bytes=int(per_source),
        working_bytes=int(working),
    )
    def room(workers):  # bytes of jobs each worker may hold
        return (
            (memory_limit - parent_bytes) / max(1, workers)
            - WORKER_BASE_BYTES
            - working
        )

    asked = n_workers
    if fit_workers and todo.any():
        while n_workers > 1 and room(n_workers) < per_source:
            n_workers -= 1
    budget = room(n_workers)
    cap = (
        MAX_SOURCES_PER_JOB if max_sources_per_job is None else int(max_sources_per_job)
    )
    if cap < 1:
        msg = (
            "max_sources_per_job must be a positive integer, got "
            f"{max_sources_per_job!r}"
        )
        raise ValueError(msg)
    band_cap = MAX_SOURCES_PER_BAND if max_sources_per_job is None else cap
    per_job = int(min(cap, budget // per_source)) if budget > 0 else 0
    largest = per_job  # what the budget and the cap allow; jobs aim smaller
    per_band = int(min(band_cap, budget // per_source)) if budget > 0 else 0
    largest_band = per_band
    # enough jobs (bands) to keep every worker busy and balanced
    # (JOBS_PER_WORKER, BANDS_PER_WORKER each), but not so small that per-job
    # overhead dominates
    n_todo = int(np.count_nonzero(status == Status.PENDING))
    if n_workers > 1 and n_todo:
        def balanced(size, per_worker):
            if size < 1:
                return size
            share = math.ceil(n_todo / (per_worker * n_workers))
            return min(size, max(MIN_SOURCES_PER_JOB, share))

        per_job = balanced(per_job, JOBS_PER_WORKER)
        per_band = balanced(per_band, BANDS_PER_WORKER)
    if per_job < 1 and todo.any():
        need = parent_bytes + n_workers * (WORKER_BASE_BYTES + working + per_source)
        msg = (
            f"memory limit {_fmt_bytes(memory_limit)} is too small for {n_workers} "
            f"worker(s): at least {_fmt_bytes(need)} is needed; raise --memory-limit"
            + (" or use fewer --workers" if n_workers > 1 else "")
        )
        raise ValueError(msg)

    rows_all = np.flatnonzero(todo)
    parts = None  # (tile, rows, rows its worker holds at once) per job
    if chunk_rows is not None and len(rows_all):
        parts = _band_parts(
            rows_all, tile, (per_band, largest_band), (per_job, largest), chunk_rows,
            n_workers,
        )
    if parts is None:
        parts = _tile_parts(rows_all, tile, per_job, largest, chunk_rows)
    x = np.asarray(assignment.x, dtype=np.float64)
    y = np.asarray(assignment.y, dtype=np.float64)
    own = {k for k, tl in enumerate(tile_index.tiles) if tl.own_grid}
    jobs = [
        Job(
            job_id=i,
            tile=t,
            rows=part.astype(np.int64),
            x=x[part],
            y=y[part],
            box=boxes[part],
            est_bytes=memory.job_bytes(held),
            band_xy=band_xy[part] if band_xy is not None and t in own else None,
            band_box=band_boxes[part] if band_boxes is not None and t in own else None,
        )
        for i, (t, part, held) in enumerate(parts)
    ]
    return Plan(
        jobs=jobs,
        n_rows=n,
        base_status=status,
        messages=messages,
        out_shape=None if out_shape is None else tuple(int(v) for v in out_shape),
        n_channels=n_channels,
        out_itemsize=int(out_itemsize),
        memory_limit=int(memory_limit),
        n_workers=int(n_workers),
        memory=memory,
        meta=dict(meta or {}),
        workers_asked=int(asked) if asked != n_workers else None,
    )


#: Smallest mean job size of a plan in bands; below it jobs go tile by tile.
MIN_BAND_JOB = 64


def _tile_parts(rows_all, tile, per_job, largest, chunk_rows):
    """Jobs tile by tile: each tile's rows in slices of about ``per_job``."""
    order = np.lexsort((rows_all, tile[rows_all]))  # by tile, then row
    rows_sorted = rows_all[order]
    tiles_sorted = tile[rows_sorted]
    starts = np.flatnonzero(np.r_[True, tiles_sorted[1:] != tiles_sorted[:-1]])
    ends = np.r_[starts[1:], len(rows_sorted)]
    if not len(rows_sorted):  # nothing to cut: every row is bad or off-tile
        starts = ends = np.zeros(0, dtype=np.int64)
    parts = []
    for a, b in zip(starts, ends, strict=True):
        group = rows_sorted[a:b]
        n_jobs = math.ceil(len(group) / per_job)
        for part in split_rows(group, n_jobs, largest, chunk_rows):
            parts.append((int(tiles_sorted[a]), part, len(part)))
    return parts


#: Parts into which the planner cuts each of the last bands of a run with
#: several workers (`_taper`).
TAPER = 4


def _taper(n_bands, n_workers, band_chunks):
    """Relative sizes of a run's bands: the last ones cut smaller.

    Workers take bands in order, so that the last ones end at different
    times: a worker that finds no band left waits for the others' last,
    half a band on average. The last ``n_workers`` bands are therefore each
    cut into `TAPER` parts (fewer where a part would hold less than two
    chunks of ``band_chunks`` per band; none with one worker or fewer
    bands than two per worker), so that the wait is a part's.
    On the 200,000-source survey with 2 workers (26 bands of about 7,500
    rows), the last band ended 0.17 to 0.36 s after the one before it
    (three runs); with the last 2 bands cut into 8, 0.04 to 0.09 s.
    """
    parts = min(TAPER, int(band_chunks // 2))
    if n_workers < 2 or parts < 2 or n_bands < 2 * n_workers:
        return [1.0] * n_bands
    return [1.0] * (n_bands - n_workers) + [1.0 / parts] * (n_workers * parts)


def _band_parts(rows_all, tile, band_size, job_size, chunk_rows, n_workers=1):
    """Jobs band by band: whole chunks of rows, then one job per tile in each.

    The rows are cut into bands of whole output chunks holding about
    ``per_job`` sources (at most ``largest``, and one chunk less, so that
    every cut can move to a chunk boundary); a band's jobs (one per tile
    it touches) fill its chunks together, so one worker can cut them one
    after the other and write the chunks itself. Each job is sized in
    memory for its whole band. ``(per_job, largest)`` is ``band_size``
    where bands mix tiles (two jobs or more per band on average: each job
    maps its tile's files, so larger bands map them less often), else
    ``job_size``. `None` when a band cannot hold two chunks, or when jobs
    would be smaller than `MIN_BAND_JOB` sources on average (many tiles
    mixed in every chunk): tile by tile is then cheaper. With several
    workers the last bands are cut smaller (`_taper`).
    """
    for per_job, largest in (band_size, job_size):
        if largest < 2 * chunk_rows:
            return None  # a band could not hold whole chunks
        # room for each cut to move to the nearest chunk boundary
        n_bands = math.ceil(len(rows_all) / min(per_job, largest - chunk_rows))
        weights = _taper(n_bands, n_workers, len(rows_all) / n_bands / chunk_rows)
        bands = split_rows(rows_all, len(weights), largest, chunk_rows, weights)
        parts = []
        for band in bands:
            t = tile[band]
            order = np.argsort(t, kind="stable")  # by tile, then row
            cuts = np.flatnonzero(np.diff(t[order])) + 1
            for idx in np.split(order, cuts):
                parts.append((int(t[idx[0]]), band[idx], len(band)))
        if len(parts) >= 2 * len(bands) or band_size == job_size:
            break
    # the mean job of an untapered band (the taper's small bands aside)
    jobs_per_band = len(parts) / len(bands)
    if len(bands) > 1 and len(rows_all) / n_bands / jobs_per_band < MIN_BAND_JOB:
        return None
    return parts


def split_rows(rows, n_parts, max_part, chunk_rows=None, weights=None):
    """Split sorted rows into consecutive parts, cut on chunk boundaries where possible.

    Each cut is placed where the rows cross a multiple of ``chunk_rows``,
    as near as possible to where `numpy.array_split` would cut (or to the
    shares that ``weights`` ask), as long as no part grows beyond
    ``max_part`` rows; where no such place exists, the cut falls where it
    aims (clipped to the same bound). Without ``chunk_rows`` or
    ``weights`` the parts are those of `numpy.array_split`.

    Parameters
    ----------
    rows : `~numpy.ndarray` of int
        Row numbers, in increasing order.
    n_parts : int
        Number of parts, at least ``ceil(len(rows) / max_part)``.
    max_part : int
        Largest part allowed.
    chunk_rows : int, optional
        Rows per output chunk.
    weights : sequence of float, optional
        Relative sizes of the ``n_parts`` parts (positive): the cuts then
        aim at those shares of the rows instead of equal ones.

    Returns
    -------
    parts : list of `~numpy.ndarray`
        ``n_parts`` consecutive, non-empty slices of ``rows`` (fewer only
        when there are fewer rows than parts).

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.planner import split_rows
    >>> [len(p) for p in split_rows(np.arange(1000), 3, 400)]
    [334, 333, 333]
    >>> [int(p[0]) for p in split_rows(np.arange(1000), 3, 400, chunk_rows=100)]
    [0, 300, 700]
    >>> [len(p) for p in split_rows(np.arange(1000), 3, 360, chunk_rows=100)]
    [300, 360, 340]
    >>> [len(p) for p in split_rows(np.arange(1000), 3, 1000, 100, [2, 1, 1])]
    [500, 200, 300]
    """
    rows = np.asarray(rows)
    n = len(rows)
    if weights is not None and len(weights) != n_parts:
        msg = f"weights must give {n_parts} part sizes, got {len(weights)}"
        raise ValueError(msg)
    if weights is not None and n_parts > n:
        weights = None  # one row per part anyway
    n_parts = max(1, min(int(n_parts), n))
    if weights is not None:
        share = np.cumsum(np.asarray(weights, dtype=np.float64))
        ideals = [int(round(n * share[k - 1] / share[-1])) for k in range(1, n_parts)]
    else:
        q, r = divmod(n, n_parts)
        ideals = [k * q + min(k, r) for k in range(1, n_parts)]  # numpy's cuts
    if chunk_rows is None or chunk_rows <= 1 or n_parts == 1:
        if weights is None:
            return np.array_split(rows, n_parts)
        chunk_rows = 1  # no chunk boundaries to seek: every row starts one
    # positions i where rows[i] starts a new chunk
    starts = np.flatnonzero(rows[1:] // chunk_rows != rows[:-1] // chunk_rows) + 1
    cuts = [0]
    for k, ideal in enumerate(ideals, start=1):
        # every part non-empty, none above max_part, the rest still fits
        lo = max(cuts[-1] + 1, n - (n_parts - k) * max_part)
        hi = min(cuts[-1] + max_part, n - (n_parts - k))
        cut = min(max(ideal, lo), hi)
        j = np.searchsorted(starts, ideal)
        near = [int(starts[i]) for i in (j - 1, j) if 0 <= i < len(starts)]
        near = [c for c in near if lo <= c <= hi]
        if near:
            cut = min(near, key=lambda c: (abs(c - ideal), c))
        cuts.append(cut)
    cuts.append(n)
    return [rows[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
