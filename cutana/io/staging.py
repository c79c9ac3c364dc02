# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Atomic staging of job results.

A job covers one tile and a slice of its sources, but row ``i`` of every
output is catalogue row ``i``. Workers therefore *stage* each job's result
under ``OUT/.cutana/staging/job-NNNNNN/`` and the parent assembles output
chunks from staged jobs once every row of a chunk is staged.

A staged job becomes visible all at once: its files are written into a
temporary folder beside the final one, flushed to disk, and the folder is
renamed into place. A folder under the final name is therefore always
complete; temporary folders left by a killed worker are ignored by every
reader and removed by `clean_staging`.

Staged arrays are uncompressed ``.npy`` files, so that the assembler reads
only the rows it needs through a memory map.
"""

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field

import google_crc32c
import numpy as np

__all__ = [
    "JobResult",
    "StagedJob",
    "clean_staging",
    "list_staged",
    "load_staged",
    "remove_run_state",
    "remove_staged",
    "stage_job",
    "staged_receipt",
    "staging_dir",
    "state_dir",
    "verify_staged",
]

logger = logging.getLogger(__name__)

#: Name of the bookkeeping folder inside an output.
STATE_DIRNAME = ".cutana"
#: File in the bookkeeping folder of a FITS output while a ``--resume``
#: cuts the failed sources of its finished run again.
REPAIR_MARKER = "repairing"

# files of a staged job, in checksum order
_ARRAYS = ("rows", "status", "origin", "box_shape", "images")
_META = "meta.json"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_BUFSIZE = 1 << 22


@dataclass(eq=False)
class JobResult:
    """The result of one job, as a worker hands it to the writers.

    Parameters
    ----------
    job_id : int
        Identifier of the job in the plan (non-negative).
    rows : `~numpy.ndarray`
        ``(n,)`` int64 catalogue rows of the job's sources, ascending.
    images : `~numpy.ndarray`
        ``(n, C, H, W)`` cutouts in the output dtype, bands in output order.
    status : `~numpy.ndarray`
        ``(n,)`` int16 `~cutana.Status` codes.
    tile : int
        Index of the job's tile in the tile list stored with the output.
    origin : `~numpy.ndarray`
        ``(n, 2)`` int64 ``(x0, y0)`` of each box's first pixel in the tile,
        including any filled part.
    box_shape : `~numpy.ndarray`
        ``(n, 2)`` int64 ``(ny, nx)`` of each box as extracted, before
        resampling.
    messages : dict, optional
        Catalogue row (int) to message, for rows that need an explanation.
    files : `~numpy.ndarray` or None, optional
        ``(n,)`` str file names written for the rows (FITS output; ``''``
        where no file was written), or `None`.
    band_origin : `~numpy.ndarray` or None, optional
        ``(n, C, 2)`` int64 ``(x0, y0)`` of each box in each band's own
        file, for a tile with bands on pixel grids of their own
        (`~cutana.tiles.Tile.own_grid`; ``origin`` for the other bands), or
        `None`. Not staged: the FITS writer uses it in the worker, and a
        Zarr output rebuilds it from the positions
        (`~cutana.tiles.TileIndex.band_pixels`).
    band_box : `~numpy.ndarray` or None, optional
        ``(n, C, 2)`` int64 ``(ny, nx)`` of each box in each band, for a
        tile whose bands on grids of their own cut boxes of their own
        (`cutana.planner.Job.band_box`), or `None`. Not staged either (a
        Zarr output keeps them in its ``band_box`` array).

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.io import JobResult
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> len(result), result.images.shape
    (3, (3, 1, 4, 4))
    """

    job_id: int
    rows: np.ndarray
    images: np.ndarray
    status: np.ndarray
    tile: int
    origin: np.ndarray
    box_shape: np.ndarray
    messages: dict = field(default_factory=dict)
    files: np.ndarray | None = None
    band_origin: np.ndarray | None = None
    band_box: np.ndarray | None = None

    def __len__(self):
        return len(self.rows)


@dataclass(frozen=True)
class StagedJob:
    """Receipt for a staged job, small enough to send back to the parent.

    Parameters
    ----------
    job_id : int
        Identifier of the job.
    n : int
        Number of rows staged.
    checksum : str
        CRC-32C (hex) of the staged files, in a fixed order.
    path : str
        The staged job's folder.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, stage_job
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> staged = stage_job(tempfile.mkdtemp(), result)
    >>> staged.job_id, staged.n, len(staged.checksum)
    (0, 3, 8)
    """

    job_id: int
    n: int
    checksum: str
    path: str


def state_dir(out_dir):
    """Return the bookkeeping folder ``OUT/.cutana`` of an output.

    Parameters
    ----------
    out_dir : str or path-like
        The output (Zarr store folder or FITS folder).

    Returns
    -------
    path : str
        ``OUT/.cutana`` (not created).

    Examples
    --------
    >>> import os
    >>> from cutana.io import state_dir
    >>> state_dir("out") == os.path.join("out", ".cutana")
    True
    """
    return os.path.join(os.fspath(out_dir), STATE_DIRNAME)


def staging_dir(out_dir):
    """Return the staging folder ``OUT/.cutana/staging`` of an output.

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.

    Returns
    -------
    path : str
        The staging folder (not created).

    Examples
    --------
    >>> import os
    >>> from cutana.io import staging_dir
    >>> staging_dir("out") == os.path.join("out", ".cutana", "staging")
    True
    """
    return os.path.join(state_dir(out_dir), "staging")


def _job_dirname(job_id):
    return f"job-{int(job_id):06d}"


def _check_job_id(job_id):
    if (
        isinstance(job_id, bool)
        or not isinstance(job_id, (int, np.integer))
        or job_id < 0
    ):
        msg = f"job_id must be a non-negative integer, got {job_id!r}"
        raise ValueError(msg)
    return int(job_id)


def _fsync_dir(path):
    """Flush a directory entry to disk (POSIX only; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _CRC32C:
    """CRC-32C (Castagnoli) with the `hashlib` interface (staged files and
    `cutana.io.zarr.chunk_digest`)."""

    def __init__(self):
        self._crc = 0

    def update(self, data):
        if not isinstance(data, bytes):
            data = np.frombuffer(data, dtype=np.uint8)
        self._crc = google_crc32c.extend(self._crc, data)

    def hexdigest(self):
        return f"{self._crc:08x}"


class _HashingFile:
    """A write-only file wrapper that feeds every byte into a hash."""

    def __init__(self, fh, hasher):
        self._fh = fh
        self._hasher = hasher

    def write(self, data):
        self._hasher.update(data)
        return self._fh.write(data)


def _validate(result):
    """Check a `JobResult`'s shapes and dtypes; return normalised arrays."""
    job_id = _check_job_id(result.job_id)
    rows = np.asarray(result.rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        msg = (
            f"job {job_id}: rows must be a 1-D integer array, "
            f"got {rows.dtype} {rows.shape}"
        )
        raise ValueError(msg)
    rows = rows.astype("<i8", copy=False)
    n = len(rows)
    if n > 1 and np.any(np.diff(rows) <= 0):
        msg = f"job {job_id}: rows must be strictly ascending"
        raise ValueError(msg)
    images = np.asarray(result.images)
    if images.ndim != 4 or images.shape[0] != n:
        msg = f"job {job_id}: images must have shape ({n}, C, H, W), got {images.shape}"
        raise ValueError(msg)
    out = {"rows": rows, "images": np.ascontiguousarray(images)}
    for name, width, dtype in (
        ("status", None, "<i2"),
        ("origin", 2, "<i8"),
        ("box_shape", 2, "<i8"),
    ):
        arr = np.asarray(getattr(result, name))
        shape = (n,) if width is None else (n, width)
        if arr.shape != shape:
            msg = f"job {job_id}: {name} must have shape {shape}, got {arr.shape}"
            raise ValueError(msg)
        out[name] = np.ascontiguousarray(arr.astype(dtype, copy=False))
    if result.files is not None:
        files = np.asarray(result.files, dtype=str)
        if files.shape != (n,):
            msg = f"job {job_id}: files must have shape ({n},), got {files.shape}"
            raise ValueError(msg)
        out["files"] = files
    return job_id, out


def _meta(job_id, result, arrays, with_images):
    messages = {
        str(int(k)): str(v)
        for k, v in sorted((int(k), v) for k, v in (result.messages or {}).items())
    }
    meta = {
        "job_id": job_id,
        "n": len(arrays["rows"]),
        "tile": int(result.tile),
        "images": bool(with_images),
        "messages": messages,
    }
    if "files" in arrays:
        meta["files"] = [str(f) for f in arrays["files"]]
    return json.dumps(meta, sort_keys=True, ensure_ascii=True).encode("ascii")


def stage_job(out_dir, result, *, images=True):
    """Stage a job's result atomically under ``OUT/.cutana/staging``.

    Called by workers. The files are written into a temporary folder in the
    staging folder, flushed to disk, and the folder is renamed to
    ``job-NNNNNN``; a folder under that name is always complete. Staging a
    job again (a retry) replaces the earlier copy.

    Parameters
    ----------
    out_dir : str or path-like
        The output folder (the Zarr store or the FITS folder).
    result : `JobResult`
        The job's result.
    images : bool, optional
        Whether to stage the pixel data. FITS output writes its files
        directly and stages only the metadata (``images=False``).

    Returns
    -------
    staged : `StagedJob`
        The receipt to record in the `~cutana.io.Ledger`.

    Raises
    ------
    ValueError
        If the result's arrays are inconsistent.
    OSError
        If writing fails (e.g. a full disk); nothing is left under the final
        name in that case.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, list_staged, stage_job
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> out = tempfile.mkdtemp()
    >>> staged = stage_job(out, result)
    >>> staged.n, list_staged(out)
    (3, [0])
    """
    job_id, arrays = _validate(result)
    sdir = staging_dir(out_dir)
    os.makedirs(sdir, exist_ok=True)
    final = os.path.join(sdir, _job_dirname(job_id))
    tmp = os.path.join(
        sdir,
        f"{_TMP_PREFIX}{_job_dirname(job_id)}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
    )
    os.mkdir(tmp)
    hasher = _CRC32C()
    try:
        for name in _ARRAYS:
            if name == "images" and not images:
                continue
            hasher.update(f"{name}\0".encode())
            path = os.path.join(tmp, f"{name}.npy")
            with open(path, "wb") as fh:
                np.lib.format.write_array(
                    _HashingFile(fh, hasher), arrays[name], allow_pickle=False
                )
                fh.flush()
                os.fsync(fh.fileno())
        meta = _meta(job_id, result, arrays, images)
        hasher.update(f"{_META}\0".encode())
        hasher.update(meta)
        with open(os.path.join(tmp, _META), "wb") as fh:
            fh.write(meta)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(sdir)
    checksum = hasher.hexdigest()
    logger.debug("staged job %d (%d rows) at %s", job_id, len(arrays["rows"]), final)
    return StagedJob(
        job_id=job_id, n=len(arrays["rows"]), checksum=checksum, path=final
    )


def _commit_dir(tmp, final):
    """Rename ``tmp`` to ``final``, replacing an earlier ``final`` if any."""
    try:
        os.replace(tmp, final)
        return
    except OSError:
        if not os.path.isdir(final):
            raise
    # an earlier copy is in place (a retried job): move it aside first, so
    # that the final name never shows a mixture of the two
    old = os.path.join(
        os.path.dirname(final),
        f"{_OLD_PREFIX}{os.path.basename(final)}-{uuid.uuid4().hex[:8]}",
    )
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _staged_path(out_dir, job_id):
    return os.path.join(staging_dir(out_dir), _job_dirname(_check_job_id(job_id)))


def _read_meta(path):
    with open(os.path.join(path, _META), "rb") as fh:
        raw = fh.read()
    return raw, json.loads(raw.decode("ascii"))


def _checksum_of(path, with_images):
    hasher = _CRC32C()
    for name in _ARRAYS:
        if name == "images" and not with_images:
            continue
        hasher.update(f"{name}\0".encode())
        with open(os.path.join(path, f"{name}.npy"), "rb") as fh:
            while block := fh.read(_BUFSIZE):
                hasher.update(block)
    raw, _ = _read_meta(path)
    hasher.update(f"{_META}\0".encode())
    hasher.update(raw)
    return hasher.hexdigest()


def verify_staged(out_dir, job_id, checksum):
    """Check that a staged job exists and matches its recorded checksum.

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.
    job_id : int
        The job.
    checksum : str
        The checksum recorded when the job was staged.

    Returns
    -------
    ok : bool
        `True` if every staged file is present and the checksum matches.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, stage_job, verify_staged
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> out = tempfile.mkdtemp()
    >>> staged = stage_job(out, result)
    >>> verify_staged(out, 0, staged.checksum), verify_staged(out, 0, "0" * 64)
    (True, False)
    >>> verify_staged(out, 1, staged.checksum)  # not staged
    False
    """
    path = _staged_path(out_dir, job_id)
    try:
        _, meta = _read_meta(path)
        return _checksum_of(path, meta.get("images", True)) == checksum
    except (OSError, ValueError, KeyError) as exc:
        logger.info("staged job %s is unusable: %s", job_id, exc)
        return False


def staged_receipt(out_dir, job_id):
    """The receipt of a job staged but maybe never recorded, from its files.

    A worker stages a job before the parent records its receipt in the
    ledger; a run killed in between leaves a staged job that no record
    vouches for. The folder is complete all the same (`stage_job` renames
    it into place once its files are on disk): its checksum is computed
    from what it holds, for the resumed run to record and keep it.

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.
    job_id : int
        The job.

    Returns
    -------
    staged : `StagedJob` or None
        The receipt, or `None` if the job is not staged or its files
        cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, stage_job, staged_receipt
    >>> result = JobResult(
    ...     job_id=2, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> out = tempfile.mkdtemp()
    >>> staged_receipt(out, 2) is None  # not staged
    True
    >>> receipt = stage_job(out, result)  # (and the run killed before recording it)
    >>> staged_receipt(out, 2) == receipt
    True
    """
    path = _staged_path(out_dir, job_id)
    try:
        _, meta = _read_meta(path)
        checksum = _checksum_of(path, meta.get("images", True))
        n = len(np.load(os.path.join(path, "rows.npy"), mmap_mode="r"))
    except (OSError, ValueError, KeyError) as exc:
        logger.info("staged job %s is unusable: %s", job_id, exc)
        return None
    return StagedJob(job_id=int(job_id), n=n, checksum=checksum, path=path)


def load_staged(out_dir, job_id, *, checksum=None, mmap=True):
    """Load a staged job.

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.
    job_id : int
        The job.
    checksum : str, optional
        If given, the staged files are read in full first and compared with
        it.
    mmap : bool, optional
        Memory-map ``images`` (read-only) instead of reading it, so that
        only the rows used are read.

    Returns
    -------
    result : `JobResult`
        The staged result. ``images`` is an empty ``(n, 0, 0, 0)`` array if
        the job was staged without images.

    Raises
    ------
    FileNotFoundError
        If the job has not been staged.
    ValueError
        If ``checksum`` is given and does not match.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, load_staged, stage_job
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> out = tempfile.mkdtemp()
    >>> staged = stage_job(out, result)
    >>> loaded = load_staged(out, 0, checksum=staged.checksum)
    >>> loaded.rows.tolist(), loaded.images.shape, loaded.tile
    ([0, 1, 2], (3, 1, 4, 4), 0)
    """
    path = _staged_path(out_dir, job_id)
    if not os.path.isdir(path):
        msg = f"job {job_id} has not been staged (no folder {path})"
        raise FileNotFoundError(msg)
    _, meta = _read_meta(path)
    if checksum is not None:
        actual = _checksum_of(path, meta.get("images", True))
        if actual != checksum:
            msg = f"staged job {job_id} at {path} does not match its checksum"
            raise ValueError(msg)
    arrays = {}
    for name in _ARRAYS:
        file = os.path.join(path, f"{name}.npy")
        if name == "images":
            if not meta.get("images", True):
                arrays[name] = np.zeros((meta["n"], 0, 0, 0), dtype=np.uint8)
                continue
            # np.memmap cannot map an empty file region
            mode = "r" if mmap and meta["n"] > 0 else None
            arrays[name] = np.load(file, mmap_mode=mode, allow_pickle=False)
        else:
            arrays[name] = np.load(file, allow_pickle=False)
    files = meta.get("files")
    return JobResult(
        job_id=int(meta["job_id"]),
        rows=arrays["rows"],
        images=arrays["images"],
        status=arrays["status"],
        tile=int(meta["tile"]),
        origin=arrays["origin"],
        box_shape=arrays["box_shape"],
        messages={int(k): v for k, v in meta["messages"].items()},
        files=None if files is None else np.array(files, dtype=str),
    )


def list_staged(out_dir):
    """Return the ids of the jobs staged under an output, ascending.

    Temporary folders of unfinished stagings are not listed.

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.

    Returns
    -------
    job_ids : list of int
        The staged jobs (their checksums are not checked).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, list_staged, stage_job
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> out = tempfile.mkdtemp()
    >>> list_staged(out)
    []
    >>> result.job_id = 7
    >>> _ = stage_job(out, result)
    >>> list_staged(out)
    [7]
    """
    sdir = staging_dir(out_dir)
    if not os.path.isdir(sdir):
        return []
    ids = []
    for entry in os.scandir(sdir):
        name = entry.name
        if name.startswith("job-") and name[4:].isdigit() and entry.is_dir():
            ids.append(int(name[4:]))
    return sorted(ids)


def remove_staged(out_dir, job_id):
    """Delete a staged job (once every chunk that needs it is written).

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.
    job_id : int
        The job; nothing happens if it is not staged.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, list_staged, remove_staged, stage_job
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> out = tempfile.mkdtemp()
    >>> _ = stage_job(out, result)
    >>> remove_staged(out, 0)
    >>> list_staged(out)
    []
    """
    path = _staged_path(out_dir, job_id)
    if not os.path.isdir(path):
        return
    # rename first so that a half-deleted job is never seen under its name
    old = os.path.join(
        os.path.dirname(path),
        f"{_OLD_PREFIX}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}",
    )
    os.replace(path, old)
    shutil.rmtree(old, ignore_errors=True)


def clean_staging(out_dir):
    """Remove the temporary folders that killed stagings left behind.

    Call this from the parent only while no worker is staging (at the start
    of a run or a resume).

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.

    Returns
    -------
    n_removed : int
        How many leftover folders were removed.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> from cutana.io import clean_staging, staging_dir
    >>> out = tempfile.mkdtemp()
    >>> clean_staging(out)  # nothing staged yet
    0
    >>> os.makedirs(os.path.join(staging_dir(out), ".tmp-job-000000-1-abcd"))
    >>> clean_staging(out)
    1
    """
    sdir = staging_dir(out_dir)
    if not os.path.isdir(sdir):
        return 0
    n = 0
    for entry in os.scandir(sdir):
        if entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(entry.path, ignore_errors=True)
            n += 1
    if n:
        logger.info("removed %d unfinished staging folders from %s", n, sdir)
    return n


def remove_run_state(out_dir):
    """Delete the bookkeeping folder ``OUT/.cutana`` (ledger and staging).

    Call this after a run has been finalised: a finished output then holds
    nothing but its data (a Zarr store is then a plain store whose members
    every Zarr tool lists without warnings).

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, remove_run_state, stage_job, state_dir
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> import os
    >>> out = tempfile.mkdtemp()
    >>> _ = stage_job(out, result)
    >>> os.path.isdir(state_dir(out))
    True
    >>> remove_run_state(out)
    >>> os.path.isdir(state_dir(out)), os.path.isdir(out)
    (False, True)
    """
    path = state_dir(out_dir)
    if os.path.isdir(path):
        shutil.rmtree(path)
