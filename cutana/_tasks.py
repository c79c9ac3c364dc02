# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The tasks a run hands its workers, and what a worker does with them.

`cutana.pipeline` makes the tasks (`_CutTask`, `_GroupTask`,
`_AssembleTask`, `_PatchTask`) and hands them to the executor with
`_run_task` (or `_run_task_overlapped`); a worker cuts their jobs
(`cutana.processing.cut_job`) and writes them (`cutana.io.zarr.ZarrWriter`,
`cutana.io.fits.FitsWriter`, `cutana.io.staging.stage_job`).

This module is what cutana's worker server imports
(`cutana._worker_server`), so it imports only what a worker runs: not the
catalogue readers (and astropy's tables), astropy's WCS or the Zarr library
(a worker writes its chunk files itself, and `ZarrWriter.open` reads the
store's metadata without zarr); the FITS writer (with astropy's tables and
WCS) only for a FITS output (`cutana.executor.worker_preload`). The server
then imports in 0.28-0.32 s instead of 0.52-0.57 s and holds 57 MB instead
of 78 MB; a worker starts at 43 MB instead of 62 MB.
"""

import dataclasses
import errno
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from .io.staging import JobResult, stage_job
from .io.zarr import ZarrWriter
from .processing import CutSettings, Scratch, cut_job, images_nbytes, ready_scratch


@dataclass(frozen=True)
class _Writes:
    """How a worker writes its chunk files: `ZarrWriter.write_chunks`'s
    ``background`` (files written by a thread,
    `cutana.pipeline._core_to_spare`) and ``helper`` (every other chunk
    compressed by a thread, `cutana.pipeline._helper_fits`)."""

    background: bool = False
    helper: bool = False
    record: bool = False  # the chunks' records appended as written (local workers)


@dataclass
class _CutTask:
    settings: CutSettings
    tile: object
    job: object
    out_dir: str
    format: str
    bands: tuple
    ids: np.ndarray = None
    ra: np.ndarray = None
    dec: np.ndarray = None
    files: np.ndarray = None
    direct_chunks: list = None
    row_to_job: object = None
    base_status: object = None
    writes: _Writes = _Writes()
    stretch_thread: bool = False  # `cut_job`'s (a core to spare, `_stretch_fits`)
    block_bytes: int = 0  # the largest images block of the run (`_reserve_blocks`)


class _Rows:
    """Picklable ``f(r0, r1)`` over a slice of per-row arrays starting at ``lo``."""

    def __init__(self, lo, *arrays):
        self.lo = lo
        self.arrays = arrays

    def __call__(self, r0, r1):
        a, b = r0 - self.lo, r1 - self.lo
        parts = tuple(arr[a:b] for arr in self.arrays)
        return parts if len(parts) > 1 else parts[0]


@dataclass
class _AssembleTask:
    out_dir: str
    chunks: list
    row_to_job: _Rows
    base_status: _Rows
    writes: _Writes = _Writes()


@dataclass
class _PatchTask:
    """Rewrite written chunks of a finished store with rows cut again."""

    out_dir: str
    chunks: list
    row_to_job: _Rows
    status: _Rows
    tile_map: np.ndarray
    clear: _Rows = None
    writes: _Writes = _Writes()


@dataclass
class _GroupTask:
    """Jobs that fill the same chunks, cut one after the other by one worker.

    The worker cuts every member into one block in memory and writes the
    chunks itself: nothing is staged.
    """

    members: list  # _CutTask
    out_dir: str
    chunks: list = None
    row_to_job: _Rows = None
    base_status: _Rows = None
    writes: _Writes = _Writes()
    block_bytes: int = 0  # the largest images block of the run (`_reserve_blocks`)


@dataclass
class _GroupDone:
    """What a group task hands back: one `_CutDone` per member, and the chunks."""

    done: list
    checksums: dict


@dataclass
class _CutDone:
    """What a cut task hands back to the main process (small, picklable)."""

    staged: object  # StagedJob, or None when every row went straight to the store
    status: np.ndarray
    messages: dict
    checksums: dict  # chunks the worker wrote itself
    staged_rows: np.ndarray  # rows in the staged copy, in its order
    files: np.ndarray = None  # FITS file per row


@dataclass
class _OutputFull:
    """What a task returns when the output's file system is full."""

    message: str


def _is_disk_full(exc):
    """Whether an `OSError` says that the file system is full.

    Parameters
    ----------
    exc : BaseException
        The error.

    Returns
    -------
    full : bool
        True for ``ENOSPC`` and ``EDQUOT``, and for astropy's own check
        ("Not enough space on disk") that carries no errno.
    """
    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return exc.errno is None and "not enough space on disk" in str(exc).lower()


#: Buffers reused by the jobs cut in this process (see `Scratch`).
_SCRATCH = Scratch()


def _run_task(task):
    """Run one task in a worker and return a small, picklable summary.

    A full disk is not a failure of the task (a retry cannot help, and the
    tile is fine): it is returned as `_OutputFull`, and the parent stops
    the run so that it can be resumed once there is space.
    """
    return _unless_disk_full(_run_task_inner, task)


def _unless_disk_full(func, *args):
    """``func(*args)``, or `_OutputFull` when it raises that the disk is full."""
    try:
        return func(*args)
    except OSError as exc:
        if not _is_disk_full(exc):
            raise
        return _OutputFull(f"{type(exc).__name__}: {exc}")


def _run_task_inner(task):
    if isinstance(task, _AssembleTask):
        writer = ZarrWriter.open(task.out_dir)
        return writer.write_chunks(
            task.chunks, task.row_to_job, task.base_status,
            **dataclasses.asdict(task.writes),
        )
    if isinstance(task, _PatchTask):
        writer = ZarrWriter.open(task.out_dir)
        return writer.patch_chunks(
            task.chunks, task.row_to_job, task.status, tile_map=task.tile_map,
            clear=task.clear, **dataclasses.asdict(task.writes),
        )
    if _cuts_into_zarr(task):
        return _write_cut(task, _cut(task, _SCRATCH))
    _SCRATCH.reserve("images", task.block_bytes)
    result = cut_job(
        task.settings, task.tile, task.job, scratch=_SCRATCH,
        stretch_thread=task.stretch_thread,
    )
    from .io.fits import FitsWriter  # (here: the workers of a Zarr output need none)

    writer = FitsWriter(task.out_dir, task.bands)
    result.files = writer.write_sources(
        result,
        task.ids,
        task.ra,
        task.dec,
        [None if b is None else b.path for b in task.tile.bands],
        task.tile.wcs(),
        task.files,
        band_wcs=[
            b.wcs() if c in task.tile.own_grid and b is not None else None
            for c, b in enumerate(task.tile.bands)
        ] if task.tile.own_grid else None,
    )
    staged = stage_job(task.out_dir, result, images=False)
    return _CutDone(
        staged, result.status, result.messages, {}, result.rows, result.files
    )


def _ready_worker(rows, n_channels, out_shape, dtype, work_dtype, stretch_thread):
    """`_Runner.ready_workers` in a worker: `~cutana.processing.ready_scratch`
    of the buffers its jobs cut into."""
    ready_scratch(
        _SCRATCH, rows=rows, n_channels=n_channels, out_shape=out_shape,
        dtype=dtype, work_dtype=work_dtype, stretch_thread=stretch_thread,
    )


def _jobs_of(task):
    """The plan jobs a task cuts (none for an assembly task)."""
    if isinstance(task, _GroupTask):
        return [m.job for m in task.members]
    if isinstance(task, _CutTask):
        return [task.job]
    return []


def _cuts_into_zarr(task):
    """Whether a task cuts jobs for a Zarr output (`_cut`, `_write_cut`)."""
    return isinstance(task, _GroupTask) or (
        isinstance(task, _CutTask) and task.format == "zarr"
    )


def _cut(task, scratch):
    """Cut the jobs of a Zarr cut task or a group task into ``scratch``'s
    ``images`` buffer: job id to `~cutana.io.JobResult` (valid until the
    buffer is used again)."""
    scratch.reserve("images", task.block_bytes)
    if isinstance(task, _CutTask):
        result = cut_job(
            task.settings, task.tile, task.job, scratch=scratch,
            stretch_thread=task.stretch_thread,
        )
        return {result.job_id: result}
    first = task.members[0]
    n = sum(len(m.job) for m in task.members)
    shape = (n, len(first.tile.bands), *first.settings.out_shape)
    # the same buffer as single jobs use: a worker holds one block at a time
    block = scratch.get("images", shape, first.settings.dtype)
    results = {}
    a = 0
    for m in task.members:
        b = a + len(m.job)
        results[m.job.job_id] = cut_job(
            m.settings, m.tile, m.job, scratch=scratch, out=block[a:b],
            stretch_thread=m.stretch_thread,
        )
        a = b
    return results


def _write_cut(task, results, helper=None):
    """Write what `_cut` cut for a Zarr cut task or a group task, and return
    its summary (`_CutDone`, `_GroupDone`). ``helper`` overrides the task's
    choice of a compressing helper thread."""
    writes = dataclasses.asdict(task.writes)
    if helper is not None:
        writes["helper"] = helper
    if isinstance(task, _CutTask):
        (result,) = results.values()
        checksums = {}
        rest = np.ones(len(result.rows), dtype=bool)
        if task.direct_chunks:
            # chunks that only this job fills go straight from memory to the store
            writer = ZarrWriter.open(task.out_dir)
            checksums = writer.write_chunks(
                task.direct_chunks, task.row_to_job, task.base_status,
                results=results, **writes,
            )
            rest = ~np.isin(result.rows // writer.chunk_rows, task.direct_chunks)
        staged = None
        if rest.any():
            staged = stage_job(task.out_dir, _subset(result, rest))
        return _CutDone(
            staged, result.status, result.messages, checksums, result.rows[rest]
        )
    writer = ZarrWriter.open(task.out_dir)
    checksums = writer.write_chunks(
        task.chunks, task.row_to_job, task.base_status, results=results, **writes,
    )
    empty = np.zeros(0, dtype=np.int64)
    done = []
    for m in task.members:
        result = results[m.job.job_id]
        done.append(_CutDone(None, result.status, result.messages, {}, empty))
    return _GroupDone(done, checksums)


#: The two buffer sets of `_run_task_overlapped` (a job is cut into one while
#: the other's chunks are written), each with the write that holds it.
_SLOTS = [[_SCRATCH, None], [Scratch(), None]]
_WRITER = []  # the thread of `_run_task_overlapped`'s writes, made on first use
if hasattr(os, "register_at_fork"):
    # a forked child has none of its parent's threads (nor their writes)
    os.register_at_fork(after_in_child=lambda: (_WRITER.clear(), _free_slots()))


def _free_slots():
    """Forget the writes of the buffer sets (a forked child has none)."""
    for slot in _SLOTS:
        slot[1] = None


def _run_task_overlapped(task):
    """`_run_task` for the ``serial`` backend with a core to spare: a Zarr
    cut or group task is cut here, and a `~concurrent.futures.Future` of its
    summary is returned while a thread compresses and writes its chunks,
    so that the executor cuts the next job meanwhile (`Executor.run`).
    The cutting itself stretches each sub-batch in another thread while it
    resamples the next (`cut_job`'s ``stretch_thread``, which the runner
    sets where it overlaps: `_overlap_fits` is `_stretch_fits` with room
    for a second job).

    The job's cutouts stay in one of two buffer sets until written; a third
    job waits for the older write. Other tasks run as in `_run_task`, once
    the writes are done (they may read what those write).
    """
    if not _cuts_into_zarr(task):
        _wait_for_writes()
        return _run_task(task)
    busy = [slot[1] for slot in _SLOTS if slot[1] is not None and not slot[1].done()]
    if len(busy) == len(_SLOTS):
        wait(busy, return_when=FIRST_COMPLETED)
    slot = next(s for s in _SLOTS if s[1] is None or s[1].done())
    results = _unless_disk_full(_cut, task, slot[0])
    if isinstance(results, _OutputFull):
        return results
    if not _WRITER:
        _WRITER.append(ThreadPoolExecutor(1, thread_name_prefix="cutana-write"))
    # (no helper compresses beside it: the stretch thread takes the rest)
    slot[1] = _WRITER[0].submit(_unless_disk_full, _write_cut, task, results, False)
    return slot[1]


def _block_bytes(task):
    """Bytes of the ``images`` block a cut or group task cuts into, or 0
    where its shape depends on the job (no ``out_shape``)."""
    first = task.members[0] if isinstance(task, _GroupTask) else task
    settings = first.settings
    if settings.out_shape is None:
        return 0
    rows = sum(len(job) for job in _jobs_of(task))
    n_channels = len(first.tile.bands)
    return images_nbytes(rows, n_channels, settings.out_shape, settings.dtype)


def _reserve_blocks(tasks):
    """Give every cut and group task the largest block of ``tasks``
    (``block_bytes``), for which a worker makes its buffer at its first
    task (`~cutana.processing.Scratch.reserve`): grown job by job, the
    buffer was made anew and faulted in again at each larger job (on the
    paper workload, 11,500 of a worker's 32,000 page faults)."""
    cuts = [t for t in tasks if isinstance(t, (_CutTask, _GroupTask))]
    largest = max((_block_bytes(t) for t in cuts), default=0)
    for t in cuts:
        t.block_bytes = largest


def _wait_for_writes():
    """Wait until the writes of `_run_task_overlapped` are done."""
    wait([slot[1] for slot in _SLOTS if slot[1] is not None])


def _release_scratch():
    """Release the buffers that jobs cut in this process kept for the next."""
    for scratch, _ in _SLOTS:
        scratch.clear()


def _subset(result, keep):
    """The rows ``keep`` of a job result (same job id)."""
    if keep.all():
        return result
    rows = result.rows[keep]
    wanted = set(rows.tolist())
    return JobResult(
        job_id=result.job_id,
        rows=rows,
        images=result.images[keep],
        status=result.status[keep],
        tile=result.tile,
        origin=result.origin[keep],
        box_shape=result.box_shape[keep],
        messages={r: m for r, m in result.messages.items() if int(r) in wanted},
    )
