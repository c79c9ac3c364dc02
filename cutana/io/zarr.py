# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The Zarr output: one store per run, row ``i`` = catalogue row ``i``.

Layout (Zarr format 3)::

    OUT/                       the store (a group)
      images      (N, C, H, W)  cutouts, chunked (chunk_rows, C, H, W)
      status      (N,) int16    `~cutana.Status`; -1 (pending) until written
      geometry    (N, 5) int64  per row: tile (index into the ``tiles``
                                attribute; -1 if none), x0, y0 (the box's
                                first pixel in its tile), ny, nx (the box
                                before resampling)
      source_id   (N,) str      catalogue ids
      ra, dec     (N,) float64  catalogue positions (degrees)
      chunk_crc32c (n_chunks, 4) uint8    written by `ZarrWriter.finalize`:
                                the `chunk_digest` of each chunk (stores of
                                version 1 and 2: ``chunk_sha256``, 32 bytes)
      message     (N,) str      written by `ZarrWriter.finalize`: why a
                                row has no complete cutout (file, row,
                                column and value of a bad row), or ''

Each chunk of ``images`` rows is written by one aligned call, by whichever
process assembles it, with no lock on the store; `ZarrWriter.write_chunks`
hands back the status and geometry of the chunk's rows with its checksum.
The parent keeps those (the ledger records them with the checksum) and
writes ``status`` and ``geometry`` whole when the run ends
(`ZarrWriter.write_rows`), in chunks of 65,536 rows as ``source_id``: one
file per chunk of cutouts rather than three. (In stores of versions 1 to 3
they share the ``images`` row chunking and are written with each chunk.)
Chunk keys are flat (``images/c.12.0.0.0``): every array is a single folder. The group
attributes hold ``cutana_version``, ``bands``, ``out_shape``, ``dtype``,
``config``, ``tiles`` (key, paths and FITS header per tile, from which
`cutana.open` rebuilds each cutout's WCS) and ``status_codes``. Nothing in
the store depends on the time or on the order in which chunks were written,
so two runs of the same plan give byte-identical stores.

While a run is in progress the store also holds its bookkeeping folder
``OUT/.cutana`` (ledger and staged jobs); remove it with
`~cutana.io.remove_run_state` once the run is finalised.
"""

import hashlib
import json
import logging
import math
import os
import pathlib
import re
import shutil
from collections import OrderedDict

import numpy as np

from ..status import Status
from ._writeback import FileSeries
from .staging import _CRC32C, STATE_DIRNAME, load_staged

__all__ = ["ChunksWritten", "ZarrWriter", "chunk_digest", "choose_chunk_rows"]

logger = logging.getLogger(__name__)

#: Version of the store layout written by this module: 2 stores ``tile``,
#: ``origin`` and ``box_shape`` together in ``geometry`` (one file per chunk
#: instead of three); 3 checksums chunks with CRC-32C (``chunk_crc32c``)
#: instead of SHA-256 (``chunk_sha256``), 13 times faster here; 4 writes
#: ``status`` and ``geometry`` once, at the end, in large chunks, instead of
#: one file of each per chunk of cutouts. Stores of versions 1 to 3 are
#: still read, resumed and verified.
FORMAT_VERSION = 4

#: Chunk checksum algorithms: the store's ``chunk_checksum`` attribute
#: (absent before version 3: SHA-256), the array that holds the digests
#: once finalised, and the digest size in bytes.
CHECKSUMS = {"sha256": ("chunk_sha256", 32), "crc32c": ("chunk_crc32c", 4)}

#: Uncompressed bytes per chunk. Creating a file costs 0.2-0.3 ms on ext4
#: right after an earlier output was deleted: larger chunks, fewer files
#: (4 MiB: 186 cutouts of 150 x 150 uint8 per chunk).
_TARGET_CHUNK_BYTES = 4 * 1024 * 1024
_META_CHUNK_ROWS = 1 << 16
_ROW_ARRAYS = ("images", "geometry", "status")  # write order
#: The per-row arrays of a version-1 store, in place of ``geometry``.
_V1_GEOMETRY = ("tile", "origin", "box_shape")
#: What the top folder of a store (of either version) may hold.
_STORE_MEMBERS = frozenset(
    ("zarr.json", *_ROW_ARRAYS, *_V1_GEOMETRY, "source_id", "ra", "dec", "band_box",
     "message", *(name for name, _ in CHECKSUMS.values()))
)
#: Rows assembled at once by `ZarrWriter.write_chunks` (whole chunks, at
#: least one): the block is kept for the next call, so it stays small.
_MAX_RUN_BYTES = 16 * 1024 * 1024

_HELPER = []  # the thread of `_encode_pairs`, made on first use
if hasattr(os, "register_at_fork"):
    # a forked child has none of its parent's threads: it makes its own helper
    os.register_at_fork(after_in_child=_HELPER.clear)


def _encode_pairs(keys, chunk, encode, helper):
    """``(key, encode(chunk(key)))`` for each of ``keys``, in order.

    With ``helper``, a second thread encodes every other chunk while this
    one encodes the one before it: Blosc (`_blosc_encoder`) releases the
    GIL while it compresses, and each chunk is compressed alone, so the
    bytes are those of one thread. (Blosc's own threads would place a
    chunk's compressed blocks in the order they finish: other bytes from
    run to run.) At most two encoded chunks are held at once.
    """
    if not helper:
        for k in keys:
            yield k, encode(chunk(k))
        return
    if not _HELPER:
        from concurrent.futures import ThreadPoolExecutor

        _HELPER.append(ThreadPoolExecutor(1, thread_name_prefix="cutana-encode"))
    keys = list(keys)
    for i in range(0, len(keys), 2):
        pair = keys[i : i + 2]
        later = _HELPER[0].submit(encode, chunk(pair[1])) if len(pair) > 1 else None
        yield pair[0], encode(chunk(pair[0]))
        if later is not None:
            yield pair[1], later.result()


#: Chunk keys ``c.<row chunk>.0...`` in the array's folder: one flat folder
#: per array, so that writing a chunk creates no folders.
_FLAT_KEYS = {"name": "default", "separator": "."}
_JOB_CACHE = 64


def choose_chunk_rows(n_rows, row_bytes, target=_TARGET_CHUNK_BYTES):
    """Choose how many cutouts go into one chunk.

    Parameters
    ----------
    n_rows : int
        Number of rows ``N`` of the output.
    row_bytes : int
        Uncompressed bytes of one row (``C * H * W * itemsize``).
    target : int, optional
        Target uncompressed chunk size in bytes (4 MiB), so that chunks hold
        between 2 and 4 MiB when a row is smaller than 4 MiB.

    Returns
    -------
    chunk_rows : int
        Between 1 and ``max(n_rows, 1)``.

    Examples
    --------
    >>> from cutana.io import choose_chunk_rows
    >>> choose_chunk_rows(100_000, 3 * 64 * 64 * 4)  # 48 KiB rows: 4 MiB chunks
    85
    >>> choose_chunk_rows(10, 1000)  # never more than the rows there are
    10
    >>> choose_chunk_rows(10, 8 * 1024 * 1024)  # at least one row
    1
    """
    rows = max(1, int(target // max(int(row_bytes), 1)))
    return int(min(rows, max(int(n_rows), 1)))


def chunk_digest(images, status, tile, origin, box_shape, algorithm="sha256"):
    """Checksum of one chunk's rows: a digest of the arrays' bytes.

    The arrays are hashed in the order given, in C order and little-endian
    byte order, with the store's dtypes (``status`` int16, ``tile`` int32,
    ``origin`` int64, ``box_shape`` int32).

    Parameters
    ----------
    images : `~numpy.ndarray`
        ``(m, C, H, W)`` block.
    status, tile, origin, box_shape : `~numpy.ndarray`
        The block's per-row arrays.
    algorithm : {'sha256', 'crc32c'}, optional
        SHA-256, or CRC-32C (Castagnoli, as in Zarr's ``crc32c`` codec),
        which stores of format 3 use. A store's algorithm is its
        ``chunk_checksum`` attribute (SHA-256 where it has none).

    Returns
    -------
    checksum : str
        Hexadecimal digest (64 digits for SHA-256, 8 for CRC-32C).

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.io import chunk_digest
    >>> images = np.zeros((2, 1, 4, 4), np.uint8)
    >>> status, tile = np.zeros(2), np.zeros(2)
    >>> origin, box_shape = np.zeros((2, 2)), np.full((2, 2), 4)
    >>> digest = chunk_digest(images, status, tile, origin, box_shape)
    >>> len(digest)
    64
    >>> digest == chunk_digest(images, status.astype("int16"), tile, origin, box_shape)
    True
    >>> digest == chunk_digest(images + 1, status, tile, origin, box_shape)
    False
    >>> len(chunk_digest(images, status, tile, origin, box_shape, "crc32c"))
    8
    """
    if algorithm not in CHECKSUMS:
        msg = f"algorithm must be one of {', '.join(CHECKSUMS)}, got {algorithm!r}"
        raise ValueError(msg)
    hasher = _CRC32C() if algorithm == "crc32c" else hashlib.sha256()
    for arr, dtype in (
        (images, None),
        (status, "<i2"),
        (tile, "<i4"),
        (origin, "<i8"),
        (box_shape, "<i4"),
    ):
        arr = np.asarray(arr)
        dt = arr.dtype.newbyteorder("<") if dtype is None else np.dtype(dtype)
        hasher.update(np.ascontiguousarray(arr, dtype=dt).reshape(-1).view(np.uint8))
    return hasher.hexdigest()


class ChunksWritten(dict):
    """Chunk index to checksum, of the chunks `ZarrWriter.write_chunks` wrote.

    A `dict` of each chunk's `chunk_digest`, to record in the
    `~cutana.io.Ledger`, which also holds in `rows` the status and geometry
    of each chunk's rows: in a store of format 4 the parent keeps those
    until the run ends and `ZarrWriter.write_rows` stores them.

    Attributes
    ----------
    rows : dict
        Chunk index to ``(status, geometry)``: the ``(m,)`` int16 statuses
        and ``(m, 5)`` int64 geometry (`GEOMETRY_FIELDS`) of its ``m`` rows.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.io import ChunksWritten
    >>> a = ChunksWritten({0: "00ff"})
    >>> a.rows[0] = (np.zeros(2, np.int16), np.zeros((2, 5), np.int64))
    >>> b = ChunksWritten()
    >>> b.update(a)
    >>> b, sorted(b.rows)
    ({0: '00ff'}, [0])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = {}
        self.recorded = False  # the records are in the ledger already
        self.unrecorded = False  # (some could not be: no ledger)

    def update(self, other=(), /, **kwargs):
        """Add the checksums of ``other`` (and its `rows` if it has them)."""
        super().update(other, **kwargs)
        self.rows.update(getattr(other, "rows", {}))


class _PyBlosc:
    """A Blosc encoder through python-blosc (the ``blosc`` package), made
    by `_blosc_encoder`.

    Its bytes are those of numcodecs' `~numcodecs.blosc.Blosc` (which zarr
    uses) of the same C-Blosc version, in one thread. It is faster: its
    wheels have C-Blosc's AVX2 shuffles where the CPU has them (numcodecs'
    are built without), and it returns the compressed bytes without a copy
    (paper-workload chunks of bit-shuffled 150 x 150 uint8 cutouts:
    12.9-14.4 us a cutout against 15.5-16.8).
    """

    def __init__(self, compress, cname, clevel, shuffle, typesize):
        self._compress = compress
        self.cname, self.clevel, self.shuffle = cname, clevel, shuffle
        self.typesize = typesize

    def encode(self, buf):
        """``buf`` (a contiguous array) compressed into one Blosc frame."""
        return self._compress(
            buf, typesize=self.typesize, clevel=self.clevel, shuffle=self.shuffle,
            cname=self.cname,
        )


def _blosc_encoder(cname, clevel, shuffle, blocksize, typesize):
    """The faster of the Blosc encoders of these settings at hand.

    That is `_PyBlosc` where python-blosc is installed, has the C-Blosc of
    numcodecs (the same bytes) and ``cname``, and the block size is
    automatic; else numcodecs' `~numcodecs.blosc.Blosc`. python-blosc's
    settings are its module's, and are set here for the process: one thread
    of Blosc's own (one chunk, one call, its blocks in order: see
    `_encode_pairs`) and the GIL released while it compresses (so that
    `_encode_pairs`' helper compresses beside the thread that called it).
    """
    import numcodecs.blosc
    from numcodecs import Blosc

    try:
        import blosc
    except ImportError:
        blosc = None
    if (
        blosc is None
        or blocksize
        or cname not in blosc.cnames
        or blosc.blosclib_version.split()[0] != numcodecs.blosc.VERSION_STRING
    ):
        return Blosc(
            cname=cname, clevel=clevel, shuffle=shuffle, blocksize=blocksize,
            typesize=typesize,
        )
    blosc.set_nthreads(1)
    blosc.set_releasegil(True)
    return _PyBlosc(blosc.compress, cname, clevel, shuffle, typesize)


def _blosc_thread_lock():
    """Give numcodecs' Blosc a thread lock instead of the process-shared
    lock it makes on its first use.

    That lock (a named semaphore under the ``forkserver`` start method) is
    registered with multiprocessing's resource tracker, which prints a
    warning about "leaked semaphore objects" whenever a worker process that
    compressed a chunk is stopped before its own clean-up runs: a run
    stopped by Ctrl-C or SIGTERM while its workers were in the middle of
    jobs longer than `cutana.executor.STOP_GRACE`. Blosc needs the lock only
    between threads of one process (each process has its own Blosc state).
    Nothing changes once numcodecs has made its lock, or in a numcodecs
    without this one.
    """
    import threading

    import numcodecs.blosc

    if getattr(numcodecs.blosc, "_MUTEX_IS_INIT", None) is False:
        numcodecs.blosc._MUTEX = threading.Lock()
        numcodecs.blosc._MUTEX_IS_INIT = True


def _compressor(dtype):
    """Blosc LZ4 for ``images``: bit-shuffled for 8- and 16-bit integers.

    Bit-shuffled cutouts compress as well at level 1 as at 5 (1.280 against
    1.289 for the uint8 cutouts of the benchmark workload) in 17 % less
    time; for shuffled floats the level changes the ratio, not the time.
    """
    from zarr.codecs import BloscCodec

    dtype = np.dtype(dtype)
    if dtype.kind in "iub" and dtype.itemsize <= 2:
        return BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def _jsonable(obj, where="attrs"):
    """Convert ``obj`` to plain JSON types (numpy scalars, tuples, paths)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if not math.isfinite(value):
            msg = f"{where} holds a non-finite number {value!r}; JSON cannot store it"
            raise ValueError(msg)
        return value
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    msg = (
        f"{where} has a value of type {type(obj).__name__} that cannot be stored "
        f"as JSON: {obj!r}"
    )
    raise TypeError(msg)


def _is_store(path):
    return os.path.isfile(os.path.join(path, "zarr.json"))


def _missing_arrays(path):
    """The arrays of the store at ``path`` whose metadata file is missing."""

    def present(name):
        return os.path.isfile(os.path.join(path, name, "zarr.json"))

    names = ("images", "status", "source_id", "ra", "dec")
    missing = [name for name in names if not present(name)]
    if not present("geometry") and not all(map(present, _V1_GEOMETRY)):
        missing.insert(1, "geometry")
    return missing


#: The temporary file zarr writes a group's metadata to before renaming it.
_ZARR_PARTIAL = re.compile(r"zarr\.[0-9a-f]{32}\.partial")


def _is_creation_leftover(name):
    """Whether ``name``, in a store's top folder, is the temporary metadata
    file a write of zarr left when it was killed (``zarr.<uuid>.partial``)."""
    return _ZARR_PARTIAL.fullmatch(name) is not None


def creation_interrupted(path):
    """Whether the folder ``path`` holds only what a `ZarrWriter.create`
    killed before it finished left behind.

    That is: nothing (besides the run's bookkeeping folder and zarr's
    temporary metadata files), or a store of cutana's arrays whose group
    metadata is cut short or has no ``complete`` attribute set.

    Parameters
    ----------
    path : str or path-like
        An existing folder.

    Returns
    -------
    interrupted : bool

    Examples
    --------
    >>> import os, tempfile
    >>> from cutana.io.zarr import creation_interrupted
    >>> folder = tempfile.mkdtemp()
    >>> leftover = "zarr.0123456789abcdef0123456789abcdef.partial"
    >>> open(os.path.join(folder, leftover), "w").close()
    >>> creation_interrupted(folder)
    True
    >>> open(os.path.join(folder, "notes.txt"), "w").close()
    >>> creation_interrupted(folder)
    False
    """
    path = os.fspath(path)
    names = {
        name
        for name in os.listdir(path)
        if name != STATE_DIRNAME and not _is_creation_leftover(name)
    }
    if not names:
        return True
    if "zarr.json" not in names or not names <= _STORE_MEMBERS:
        return False
    try:
        with open(os.path.join(path, "zarr.json"), "rb") as fh:
            attrs = json.load(fh).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return True  # a group file cut short: the creation never finished
    return isinstance(attrs, dict) and not attrs.get("complete", False)


def _remove_output(path):
    """Delete an earlier output at ``path``, refusing anything that is not one."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        msg = (
            f"output {path} exists and is a file, not a Zarr store; not overwriting it"
        )
        raise FileExistsError(msg)
    if not _is_store(path) and any(
        name != STATE_DIRNAME and not _is_creation_leftover(name)
        for name in os.listdir(path)
    ):
        from .fits import _fits_output_others, _remove_fits_output

        others = _fits_output_others(path)
        if others is None or others:
            what = "is not a Zarr store" if others is None else (
                f"holds a cutana FITS output and files cutana did not write "
                f"({', '.join(sorted(others)[:3])})"
            )
            msg = (
                f"output {path} exists and {what}; refusing to delete it with "
                "overwrite=True (choose another output path)"
            )
            raise FileExistsError(msg)
        _remove_fits_output(path)  # (a FITS file it kept is not cutana's)
        if os.listdir(path):
            left = ", ".join(sorted(os.listdir(path))[:3])
            msg = (
                f"output {path} held FITS files cutana did not write beside its "
                f"FITS output, which was removed: {left}"
            )
            raise FileExistsError(msg)
    shutil.rmtree(path)


def _chunks_label(run):
    """How errors name a run of consecutive chunks: ``chunk 3`` or
    ``chunks 3-5``."""
    return f"chunk {run[0]}" if len(run) == 1 else f"chunks {run[0]}-{run[-1]}"


def _group_attributes(path):
    """The attributes of the Zarr group at ``path``, read from its
    ``zarr.json``, or `None` when that file is not a version 3 group's."""
    try:
        with open(os.path.join(path, "zarr.json"), "rb") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    if (
        not isinstance(meta, dict)
        or meta.get("zarr_format") != 3
        or meta.get("node_type") != "group"
        or not isinstance(meta.get("attributes", {}), dict)
    ):
        return None
    return meta.get("attributes", {})


#: Blosc's shuffles (numcodecs' ``Blosc.NOSHUFFLE``, ``SHUFFLE``,
#: ``BITSHUFFLE``) by their names in zarr's metadata.
_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _plain_encoder(codecs):
    """`ZarrWriter._encoder` of a ``codecs`` list as ``zarr.json`` holds it,
    for the two chains this writer creates: ``"raw"`` for a little-endian
    (or one-byte) ``bytes`` codec alone, a Blosc encoder for it followed by
    ``blosc``; `None` for anything else (which zarr then reads)."""
    if not isinstance(codecs, list) or not 1 <= len(codecs) <= 2:
        return None
    first = codecs[0]
    if not isinstance(first, dict) or first.get("name") != "bytes":
        return None
    endian = (first.get("configuration") or {}).get("endian", "little")
    if endian not in ("little", None):
        return None
    if len(codecs) == 1:
        return "raw"
    second = codecs[1]
    if not isinstance(second, dict) or second.get("name") != "blosc":
        return None
    config = second.get("configuration") or {}
    keys = ("cname", "clevel", "shuffle", "blocksize", "typesize")
    if (
        set(config) != set(keys)
        or not isinstance(config["cname"], str)
        or config["shuffle"] not in _SHUFFLES
        or not all(type(config[k]) is int for k in ("clevel", "blocksize", "typesize"))
    ):
        return None
    return _blosc_encoder(
        cname=config["cname"],
        clevel=config["clevel"],
        shuffle=_SHUFFLES[config["shuffle"]],
        blocksize=config["blocksize"],
        typesize=config["typesize"],
    )


def _plain_fill(value):
    """A ``fill_value`` of ``zarr.json`` that is a number (or NaN or an
    infinity, by name), else `None` (which zarr then reads)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        named = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        return named.get(value)
    return None


def _plain_chunk_key(encoding, coords):
    """The key of chunk ``coords`` under a ``chunk_key_encoding`` of
    ``zarr.json`` (zarr's ``default`` or ``v2``), else `None` (which zarr
    then encodes)."""
    if not isinstance(encoding, dict):
        return None
    name = encoding.get("name")
    separator = (encoding.get("configuration") or {}).get(
        "separator", {"default": "/", "v2": "."}.get(name)
    )
    if separator not in ("/", "."):
        return None
    if name == "default":
        return separator.join(map(str, ("c", *coords)))
    if name == "v2":
        return separator.join(map(str, coords)) or "0"
    return None


def _write_catalogue_columns(group, n_rows, source_id, ra, dec, band_box=None):
    """Write the ``source_id``, ``ra`` and ``dec`` arrays of a store, whole
    (and ``band_box``, when given and the store has it)."""
    if n_rows:
        group["source_id"][:] = np.asarray(source_id, dtype=str)
        group["ra"][:] = np.asarray(ra, dtype=np.float64)
        group["dec"][:] = np.asarray(dec, dtype=np.float64)
        if band_box is not None and "band_box" in group:
            group["band_box"][:] = np.asarray(band_box, dtype=np.int32)


class ZarrWriter:
    """Create, fill and finalise the Zarr store of a run.

    Use `ZarrWriter.create` (parent, once) or `ZarrWriter.open` (workers and
    resumed runs) rather than the constructor. A writer pickles as its path,
    so it can be sent to worker processes.

    Parameters
    ----------
    path : str or path-like
        The store folder.
    group : `zarr.Group`, optional
        The store's root group, opened for writing; by default opened when
        first needed (`ZarrWriter.open`).
    attrs : dict, optional
        The group's attributes, read from its metadata (by default the
        group's).

    Attributes
    ----------
    path : str
        The store folder.
    n_rows : int
        Number of rows ``N``.
    bands : list of str
        Band (channel) names in output order.
    out_shape : tuple of int
        ``(H, W)`` of every cutout.
    dtype : `~numpy.dtype`
        Dtype of ``images``.
    chunk_rows : int
        Rows per chunk.
    n_chunks : int
        Number of row chunks.

    Examples
    --------
    A run of three 4x4 ``uint8`` cutouts in one band, staged as one job and
    written in chunks of two rows:

    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, ZarrWriter, stage_job
    >>> out = os.path.join(tempfile.mkdtemp(), "cutouts.zarr")
    >>> writer = ZarrWriter.create(
    ...     out, n_rows=3, bands=["r"], out_shape=(4, 4), dtype="uint8",
    ...     source_id=["a", "b", "c"], ra=[1.0, 2.0, 3.0], dec=[0.0, 0.0, 0.0],
    ...     tiles=[{"key": "t0", "paths": ["t0.fits"], "header": ""}],
    ...     chunk_rows=2)
    >>> writer.n_rows, writer.chunk_rows, writer.n_chunks
    (3, 2, 2)
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> _ = stage_job(out, result)
    >>> row_to_job = (np.zeros(3, int), np.arange(3))  # job 0, positions 0..2
    >>> checksums = writer.write_chunks([0, 1], row_to_job, np.full(3, -1))
    >>> sorted(checksums)
    [0, 1]
    >>> writer.finalize(checksums)["OK"]
    3
    >>> images, status, tile, origin, box_shape = writer.read_chunk(1)
    >>> images.shape, status.tolist()
    ((1, 1, 4, 4), [0])
    """

    def __init__(self, path, group=None, attrs=None):
        _blosc_thread_lock()  # before the first chunk is read or written
        self.path = os.fspath(path)
        self._opened = group
        if attrs is None:
            attrs = self._group.attrs.asdict()
        if attrs.get("cutana_format") is None:
            msg = (
                f"{self.path} is not a complete cutana Zarr store (its creation was "
                "interrupted or it was made by another program); rerun with overwrite"
            )
            raise ValueError(msg)
        missing = _missing_arrays(self.path)
        if missing:
            names = ", ".join(f"{name}/zarr.json" for name in missing)
            msg = f"{self.path} is damaged: the metadata of arrays ({names}) is gone"
            raise ValueError(msg)
        self.attrs = attrs
        self.n_rows = int(attrs["n_rows"])
        self.bands = list(attrs["bands"])
        self.out_shape = tuple(int(v) for v in attrs["out_shape"])
        self.dtype = np.dtype(attrs["dtype"])
        self.chunk_rows = int(attrs["chunk_rows"])
        self.n_chunks = -(-self.n_rows // self.chunk_rows)
        self.checksum = attrs.get("chunk_checksum", "sha256")
        if self.checksum not in CHECKSUMS:
            msg = f"{self.path}: unknown chunk checksum {self.checksum!r}"
            raise ValueError(msg)
        self._arrays = {}

    def __reduce__(self):
        return (ZarrWriter.open, (self.path,))

    def __repr__(self):
        return (
            f"<ZarrWriter {self.path!r}: {self.n_rows} rows, bands {self.bands}, "
            f"{self.out_shape}, {self.dtype}, "
            f"{self.n_chunks} chunks of {self.chunk_rows}>"
        )

    @property
    def _group(self):
        """The store's `zarr.Group`, opened on first use: a worker that
        writes its chunk files itself (`_write_direct`) needs no zarr."""
        if self._opened is None:
            import zarr

            self._opened = zarr.open_group(self.path, mode="r+", zarr_format=3)
        return self._opened

    def _metadata(self, name):
        """The metadata of array ``name`` as its ``zarr.json`` holds it
        (cached)."""
        cache = self.__dict__.setdefault("_metadata_of", {})
        meta = cache.get(name)
        if meta is None:
            with open(os.path.join(self.path, name, "zarr.json"), "rb") as fh:
                meta = cache[name] = json.load(fh)
        return meta

    def _array(self, name):
        arr = self._arrays.get(name)
        if arr is None:
            # every chunk written gets a file, also one equal to the fill
            # value: a chunk's files then show that it was written
            arr = self._group[name].with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        return arr

    # -- creation ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path,
        *,
        n_rows,
        bands,
        out_shape,
        dtype,
        source_id,
        ra,
        dec,
        config=None,
        tiles=(),
        attrs=None,
        chunk_rows=None,
        overwrite=False,
        band_box=None,
    ):
        """Create the store of a new run (parent process only).

        Parameters
        ----------
        path : str or path-like
            The store folder; it must not exist (or be an empty folder)
            unless ``overwrite``.
        n_rows : int
            Number of catalogue rows ``N``.
        bands : list of str
            Band names, in channel order.
        out_shape : tuple of int
            ``(H, W)`` of every cutout.
        dtype : str or `~numpy.dtype`
            Output dtype of ``images`` (e.g. ``'float32'``, ``'uint8'``).
        source_id, ra, dec : array-like
            ``(N,)`` catalogue ids and positions (degrees).
        config : dict, optional
            The run's configuration (JSON-serialisable), stored as ``config``.
        tiles : list of dict, optional
            Per tile: ``key`` (str), ``paths`` (list of str, one per band,
            `None` for a missing band) and ``header`` (FITS header string of
            the first band; optionally ``headers``, one per band). Row
            ``tile`` values index this list.
        attrs : dict, optional
            Further JSON-serialisable group attributes. Must not hold times
            if runs are to be byte-identical.
        chunk_rows : int, optional
            Rows per chunk; by default chosen by `choose_chunk_rows`.
        overwrite : bool, optional
            Replace an existing store at ``path``. A path that exists but is
            not a Zarr store is never deleted.
        band_box : array-like, shape ``(N, C, 2)``, optional
            ``(ny, nx)`` of each row's box in each band, for runs whose
            bands on pixel grids of their own cut boxes of their own
            (`cutana.planner.Job.band_box`); stored as ``band_box``, from
            which `cutana.open` rebuilds those bands' WCS.

        Returns
        -------
        writer : `ZarrWriter`
            A writer of the new, empty store.

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is false, or it is not a
            Zarr store.
        ValueError
            If an argument is inconsistent (lengths, shapes, dtype).
        """
        from .. import __version__

        path = os.fspath(path)
        n_rows = int(n_rows)
        if n_rows < 0:
            msg = f"n_rows must be non-negative, got {n_rows}"
            raise ValueError(msg)
        bands = [str(b) for b in bands]
        if not bands:
            msg = "bands must name at least one band"
            raise ValueError(msg)
        out_shape = tuple(int(v) for v in out_shape)
        if len(out_shape) != 2 or min(out_shape) < 1:
            msg = f"out_shape must be (H, W) with positive sizes, got {out_shape!r}"
            raise ValueError(msg)
        dtype = np.dtype(dtype)
        if dtype.kind not in "iuf":
            msg = f"dtype must be a numeric dtype, got {dtype}"
            raise ValueError(msg)
        dtype = dtype.newbyteorder("=")
        source_id = np.asarray(source_id, dtype=str)
        ra = np.asarray(ra, dtype=np.float64)
        dec = np.asarray(dec, dtype=np.float64)
        for name, arr in (("source_id", source_id), ("ra", ra), ("dec", dec)):
            if arr.shape != (n_rows,):
                msg = f"{name} must have shape ({n_rows},), got {arr.shape}"
                raise ValueError(msg)
        if band_box is not None:
            band_box = np.asarray(band_box, dtype=np.int32)
            if band_box.shape != (n_rows, len(bands), 2):
                msg = (
                    f"band_box must have shape ({n_rows}, {len(bands)}, 2), "
                    f"got {band_box.shape}"
                )
                raise ValueError(msg)
        row_bytes = len(bands) * out_shape[0] * out_shape[1] * dtype.itemsize
        if chunk_rows is None:
            chunk_rows = choose_chunk_rows(n_rows, row_bytes)
        chunk_rows = int(chunk_rows)
        if chunk_rows < 1:
            msg = f"chunk_rows must be a positive integer, got {chunk_rows}"
            raise ValueError(msg)
        group_attrs = {
            "cutana_format": FORMAT_VERSION,
            "chunk_checksum": "crc32c",
            "cutana_version": str(__version__),
            "n_rows": n_rows,
            "bands": bands,
            "out_shape": list(out_shape),
            "dtype": dtype.str,
            "chunk_rows": chunk_rows,
            "status_codes": {s.name: int(s.value) for s in Status},
            "config": _jsonable(config or {}, "config"),
            "tiles": _jsonable(list(tiles), "tiles"),
            "complete": False,
        }
        extra = _jsonable(attrs or {}, "attrs")
        clash = sorted(set(extra) & set(group_attrs))
        if clash:
            msg = f"attrs may not redefine the reserved attributes {clash}"
            raise ValueError(msg)
        group_attrs.update(extra)

        if overwrite:
            _remove_output(path)
        elif os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            msg = (
                f"output {path} already exists; pass overwrite=True (--overwrite) to "
                "replace it, or resume the run that made it (--resume)"
            )
            raise FileExistsError(msg)

        # the group gets its attributes last: a store whose creation was
        # interrupted has none and is refused by `open`
        import zarr

        group = zarr.open_group(path, mode="w", zarr_format=3)
        meta_rows = max(1, min(n_rows, _META_CHUNK_ROWS))
        full = {"write_empty_chunks": True}
        group.create_array(
            "images",
            shape=(n_rows, len(bands), *out_shape),
            chunks=(chunk_rows, len(bands), *out_shape),
            dtype=dtype,
            fill_value=0,
            compressors=_compressor(dtype),
            config=full,
            dimension_names=("source", "band", "y", "x"),
            chunk_key_encoding=_FLAT_KEYS,
        )
        # per-row metadata: written whole when the run ends (write_rows)
        group.create_array(
            "status",
            shape=(n_rows,),
            chunks=(meta_rows,),
            dtype="int16",
            fill_value=-1,
            config=full,
            dimension_names=("source",),
            chunk_key_encoding=_FLAT_KEYS,
        )
        group.create_array(
            "geometry",
            shape=(n_rows, 5),
            chunks=(meta_rows, 5),
            dtype="int64",
            fill_value=-1,
            config=full,
            dimension_names=("source", "field"),
            chunk_key_encoding=_FLAT_KEYS,
            attributes={"fields": list(GEOMETRY_FIELDS)},
        )
        group.create_array(
            "source_id",
            shape=(n_rows,),
            chunks=(meta_rows,),
            dtype=str,
            config=full,
            dimension_names=("source",),
            chunk_key_encoding=_FLAT_KEYS,
        )
        for name in ("ra", "dec"):
            group.create_array(
                name,
                shape=(n_rows,),
                chunks=(meta_rows,),
                dtype="float64",
                fill_value=np.nan,
                config=full,
                dimension_names=("source",),
                chunk_key_encoding=_FLAT_KEYS,
                attributes={"unit": "deg"},
            )
        if band_box is not None:
            group.create_array(
                "band_box",
                shape=band_box.shape,
                chunks=(meta_rows, len(bands), 2),
                dtype="int32",
                fill_value=0,
                config=full,
                dimension_names=("source", "band", "axis"),
                chunk_key_encoding=_FLAT_KEYS,
            )
        _write_catalogue_columns(group, n_rows, source_id, ra, dec, band_box)
        group.update_attributes(group_attrs)
        logger.info(
            "created Zarr store %s: %d rows x %d bands x %s %s, %d rows per chunk",
            path,
            n_rows,
            len(bands),
            out_shape,
            dtype,
            chunk_rows,
        )
        return cls(path, group)

    def write_catalogue_columns(self, source_id, ra, dec, band_box=None):
        """Write the ``source_id``, ``ra`` and ``dec`` arrays, whole.

        `ZarrWriter.create` writes them; a resumed run writes them again
        (the same values: its catalogue is checked to be the same), so that
        none of their chunks can be missing from the finished store.

        Parameters
        ----------
        source_id, ra, dec : array-like, shape ``(n_rows,)``
            Catalogue ids and coordinates (deg).
        band_box : array-like, shape ``(n_rows, C, 2)``, optional
            The boxes per band (see `create`), written if the store has them.
        """
        _write_catalogue_columns(
            self._group, self.n_rows, source_id, ra, dec, band_box
        )

    def missing_chunks(self, names):
        """Count the chunks of arrays ``names`` that have no file.

        Every chunk written gets a file; a removed one reads as the array's
        fill value (NaN positions, empty ids), so its absence is the only
        trace of the loss.

        Parameters
        ----------
        names : iterable of str
            Array names, e.g. ``("source_id", "ra", "dec")``; names of
            arrays the store does not have are skipped.

        Returns
        -------
        missing : dict
            ``{name: number of chunks without a file}``, for the arrays
            with at least one.
        """
        missing = {}
        for name in names:
            if name in self._group:
                arr = self._group[name]
                gone = arr.nchunks - arr.nchunks_initialized
                if gone > 0:
                    missing[name] = int(gone)
        return missing

    @classmethod
    def open(cls, path):
        """Open an existing store for writing (workers, resumed runs).

        Parameters
        ----------
        path : str or path-like
            The store folder made by `ZarrWriter.create`.

        Returns
        -------
        writer : `ZarrWriter`
            A writer of the store.

        Raises
        ------
        FileNotFoundError
            If there is no store at ``path``.
        ValueError
            If the store was not made (completely) by cutana.
        """
        path = os.fspath(path)
        if not _is_store(path):
            msg = f"no Zarr store at {path}"
            raise FileNotFoundError(msg)
        attrs = _group_attributes(path)
        if attrs is None:  # not a plain group's metadata: as zarr reads it
            return cls(path)
        return cls(path, attrs=attrs)

    # -- chunk geometry ------------------------------------------------------

    def chunk_of_row(self, rows):
        """Return the chunk index of each row.

        Parameters
        ----------
        rows : int or array-like of int
            Catalogue rows.

        Returns
        -------
        chunks : int or `~numpy.ndarray`
            ``rows // chunk_rows``.
        """
        return np.asarray(rows, dtype=np.int64) // self.chunk_rows

    def chunk_range(self, chunk):
        """Return the rows ``(r0, r1)`` (``r1`` exclusive) of one chunk.

        Parameters
        ----------
        chunk : int
            Chunk index.

        Returns
        -------
        r0, r1 : int
            First row and one past the last row of the chunk.
        """
        chunk = self._check_chunk(chunk)
        r0 = chunk * self.chunk_rows
        return r0, min(self.n_rows, r0 + self.chunk_rows)

    def _check_chunk(self, chunk):
        if (
            isinstance(chunk, bool)
            or not isinstance(chunk, (int, np.integer))
            or not 0 <= chunk < self.n_chunks
        ):
            msg = f"chunk must be an integer in [0, {self.n_chunks}), got {chunk!r}"
            raise ValueError(msg)
        return int(chunk)

    # -- writing ---------------------------------------------------------------

    def write_chunks(
        self, chunk_indices, row_to_job, base_status, out_dir=None, *, results=None,
        background=False, helper=False, record=False,
    ):
        """Assemble chunks of rows from staged jobs and write them.

        Each chunk is written with one aligned write per array; consecutive
        chunks are written together. Several processes may call this at once
        for disjoint sets of chunks.

        Parameters
        ----------
        chunk_indices : iterable of int
            The chunks to write; every row they hold must be staged or have
            a final ``base_status``.
        row_to_job : tuple of two arrays, or callable
            Where each row's cutout is staged: either ``(job_id, position)``,
            two ``(N,)`` integer arrays (``job_id`` -1 for rows that belong
            to no job), or a callable ``f(r0, r1)`` returning those two arrays
            for rows ``r0:r1``.
        base_status : array-like or callable
            ``(N,)`` int16 status of rows that belong to no job (e.g.
            ``BAD_ROW`` or ``NO_OVERLAP``), or a callable ``f(r0, r1)``
            returning it for rows ``r0:r1``. Ignored for rows with a job.
            Such rows get zero images, tile -1 and zero origin and shape.
        out_dir : str or path-like, optional
            The output holding the staging folder; by default the store
            itself.
        results : dict, optional
            Job id to an in-memory `~cutana.io.JobResult`, used instead of
            that job's staged copy (a worker writes the chunks that only its
            own job fills straight from memory, without staging them).
        background : bool, optional
            Hand the chunk files to a background thread that writes them
            with ``O_DIRECT`` while this one compresses the next (see
            `cutana.io._writeback.FileSeries`): faster where a core is
            spare for it. Either way, every file is written when this
            returns, with the same bytes.
        helper : bool, optional
            Compress every other chunk in a second thread meanwhile, with
            the same bytes (for a core to spare, and memory for two more
            chunks and that thread's heap).
        record : bool, optional
            Append each run of chunks' records to the run's
            `~cutana.io.Ledger` just before the run is written
            (`Ledger.chunks_written` with ``sync=False``; the caller flushes
            them), so that a run killed while this call goes on keeps what it
            wrote: a record whose chunk file is missing is not trusted
            (`verified_chunks`), as chunk files appear whole. For processes
            of one machine (appends of one write each do not interleave);
            ``checksums.recorded`` is then true.

        Returns
        -------
        checksums : `ChunksWritten`
            Chunk index to the hexadecimal `chunk_digest` of the rows written,
            to record in the `~cutana.io.Ledger`, with the status and
            geometry of the chunks' rows (in a store of format 4 only the
            images are written; `write_rows` stores those at the end).

        Raises
        ------
        ValueError
            If a row has neither a staged cutout nor a final status, a staged
            job does not hold the row the mapping names, or its images have
            the wrong shape or dtype.
        FileNotFoundError
            If a job named by the mapping is not staged.
        """
        out_dir = self.path if out_dir is None else os.fspath(out_dir)
        chunks = sorted({self._check_chunk(k) for k in chunk_indices})
        checksums = ChunksWritten()
        if not chunks:
            return checksums
        cache = OrderedDict()
        pinned = {int(k): v for k, v in (results or {}).items()}
        row_bytes = (
            self.dtype.itemsize
            * len(self.bands)
            * self.out_shape[0]
            * self.out_shape[1]
        )
        per_run = max(1, _MAX_RUN_BYTES // max(1, row_bytes * self.chunk_rows))
        # the files are written by a background thread with O_DIRECT, or here
        # with each file's writeback started at once and its pages dropped a
        # few files later, for the next files to reuse (see FileSeries). One
        # series takes all the image chunks: its thread goes on with a run's
        # last files while the next run is compressed, and is waited for once
        with FileSeries(direct=background) as images:
            for run in _runs(chunks, per_run):
                r0 = self.chunk_range(run[0])[0]
                r1 = self.chunk_range(run[-1])[1]
                block = self._view_of(r0, r1, row_to_job, pinned)
                if block is None:
                    # the run's rows at once: a chunk that jobs of several
                    # tiles fill costs a few array operations per job
                    block = self._empty_block(r1 - r0)
                    self._assemble(
                        (r0, r1), _chunks_label(run), row_to_job, base_status,
                        out_dir, cache, block, pinned,
                    )
                self._write_block(
                    run, r0, block, images, checksums, background, helper, record
                )
        checksums.recorded = record and not checksums.unrecorded
        logger.debug("wrote %d chunks of %s", len(chunks), self.path)
        return checksums

    def _record(self, run, checksums):
        """Append the records of the chunks ``run`` to the ledger, unflushed
        (without a ledger, the caller records them: ``checksums.unrecorded``)."""
        from .ledger import Ledger

        rows = {} if self.rows_in_chunks else {k: checksums.rows[k] for k in run}
        try:
            with Ledger(self.path, worker=True) as ledger:
                ledger.chunks_written(
                    {k: checksums[k] for k in run}, rows=rows, sync=False
                )
        except FileNotFoundError:  # (no run state: nothing to resume)
            checksums.unrecorded = True

    def _write_block(
        self, run, r0, block, images, checksums, background, helper, record=False
    ):
        """Write a run of consecutive chunks from ``block`` (its rows from
        ``r0``), and add their checksums and rows to ``checksums``; with
        ``record``, append their records to the ledger first (a record
        whose chunk file is missing is not trusted; a file without one
        would be written again)."""
        r1 = self.chunk_range(run[-1])[1]
        geometry = _join_geometry(*block[2:])
        for k in run:
            a, b = (r - r0 for r in self.chunk_range(k))
            checksums[k] = chunk_digest(*(arr[a:b] for arr in block), self.checksum)
            checksums.rows[k] = (block[1][a:b].copy(), geometry[a:b].copy())
        if record:
            self._record(run, checksums)
        # images straight to their chunk files (in stores of format 1-3
        # also the per-row arrays, status last, each after the run's
        # images are written: a row that shows a status has everything
        # else written)
        for name, data in self._stored(block, geometry):
            if name == "images":
                written = self._write_direct(name, run, r0, data, images, helper)
            else:
                images.close()
                with FileSeries(direct=background) as files:
                    written = self._write_direct(name, run, r0, data, files, helper)
            if not written:
                self._array(name)[r0:r1] = data

    def patch_chunks(
        self, chunk_indices, row_to_job, status, out_dir=None, *, tile_map=None,
        clear=None, background=False, helper=False, record=False,
    ):
        """Rewrite written chunks with some of their rows replaced.

        The rows that belong to a staged job get that job's cutout, status
        and geometry; the others keep their stored cutout and geometry, and
        get ``status``. This is how a finished run's failed rows are cut
        again (``cutana run --resume``). Several processes may call this at
        once for disjoint sets of chunks. Each file is replaced atomically,
        but a chunk spans several files in stores of format 1 to 3, and a
        call writes chunk after chunk: until every call has returned, the
        caller keeps the store unfinished (`start_repair`).

        Parameters
        ----------
        chunk_indices : iterable of int
            The chunks to rewrite, all written before.
        row_to_job : tuple of two arrays, or callable
            As for `write_chunks`: ``(job_id, position)`` of each row, job
            -1 for the rows that keep their cutout.
        status : array-like or callable
            ``(N,)`` int16 status of the rows that keep their cutout (their
            stored one, or a new final status such as ``NO_OVERLAP``), or a
            callable ``f(r0, r1)`` returning it.
        out_dir : str or path-like, optional
            The output holding the staging folder; by default the store.
        tile_map : array-like of int, optional
            The store's tile number of each tile number of the staged jobs
            (when the jobs were planned with another tile index); by default
            the same numbers.
        clear : array-like of bool or callable, optional
            ``(N,)`` rows without a job whose stored cutout is dropped (zero
            images, tile -1, zero origin and shape), or ``f(r0, r1)``.
        background, helper : bool, optional
            As for `write_chunks`.
        record : bool, optional
            Ignored: the parent records a repair's chunks itself.

        Returns
        -------
        checksums : `ChunksWritten`
            As for `write_chunks`.

        Raises
        ------
        ValueError
            If a staged job does not hold the row the mapping names, or a row
            without a job would show a cutout it does not have (``OK`` or
            ``PARTIAL_OVERLAP`` for a row whose stored tile is -1).
        """
        out_dir = self.path if out_dir is None else os.fspath(out_dir)
        chunks = sorted({self._check_chunk(k) for k in chunk_indices})
        checksums = ChunksWritten()
        if not chunks:
            return checksums
        cache = OrderedDict()
        with FileSeries(direct=background) as images:
            for k in chunks:
                r0, r1 = self.chunk_range(k)
                stored = self.read_chunk(k)
                block = tuple(np.array(a) for a in stored)  # writable copies
                if clear is not None:
                    drop = np.asarray(
                        clear(r0, r1) if callable(clear) else np.asarray(clear)[r0:r1],
                        dtype=bool,
                    )
                    block[0][drop] = 0
                    block[2][drop] = -1
                    block[3][drop] = 0
                    block[4][drop] = 0
                self._assemble(
                    (r0, r1), _chunks_label([k]), row_to_job, status, out_dir, cache,
                    block, tile_map=tile_map,
                )
                self._write_block(
                    [k], r0, block, images, checksums, background, helper
                )
        logger.debug("rewrote %d chunks of %s", len(chunks), self.path)
        return checksums

    def start_repair(self, tiles):
        """Open a finished store for `patch_chunks` (parent only).

        Marks the store unfinished (``complete`` false, ``repairing`` true)
        until `finalize`, and adds the tiles the store does not list yet.

        Parameters
        ----------
        tiles : list of dict
            The records (``key``, ``paths``, ``header``) of the tiles the
            jobs were planned with; one that differs from every stored
            record (also in its header: the file was replaced) is added.

        Returns
        -------
        tile_map : `~numpy.ndarray` of int64
            The store's tile number of each of ``tiles``.
        """
        def identity(t):  # a tile whose header changed is another tile
            return (t.get("key"), tuple(t.get("paths") or ()), t.get("header"))

        stored = list(self.attrs.get("tiles", []))
        where = {identity(t): i for i, t in enumerate(stored)}
        tile_map = np.empty(len(tiles), dtype=np.int64)
        for i, record in enumerate(tiles):
            record = _jsonable(record, "tiles")
            key = identity(record)
            if key not in where:
                where[key] = len(stored)
                stored.append(record)
            tile_map[i] = where[key]
        self._group.update_attributes(
            {"complete": False, "repairing": True, "tiles": stored}
        )
        self.attrs = self._group.attrs.asdict()
        return tile_map

    def chunk_checksum(self, chunk):
        """The checksum of one chunk as it is stored now (read back whole).

        Parameters
        ----------
        chunk : int
            Chunk index.

        Returns
        -------
        checksum : str
            Hexadecimal `chunk_digest` of the chunk's rows.
        """
        return chunk_digest(*self.read_chunk(chunk), self.checksum)

    def stored_checksums(self):
        """The checksum of every chunk of a finalised store.

        Returns
        -------
        checksums : dict
            Chunk index to hexadecimal checksum, as `finalize` stored them
            (empty when the store has not been finalised).
        """
        name, _ = CHECKSUMS[self.checksum]
        if name not in self._group:
            return {}
        digests = self._group[name][:]
        return {k: bytes(digests[k]).hex() for k in range(len(digests))}

    def stored_rows(self):
        """The stored status and geometry of every row (finalised store).

        Returns
        -------
        status : `~numpy.ndarray` of int16
            ``(N,)`` statuses.
        geometry : `~numpy.ndarray` of int64
            ``(N, 5)`` `GEOMETRY_FIELDS` of every row.
        """
        status = self.read_status()
        if self._v1:
            parts = [np.asarray(self._array(n)[:]) for n in _V1_GEOMETRY]
            return status, _join_geometry(*parts)
        return status, np.asarray(self._array("geometry")[:], dtype=np.int64)

    @property
    def _v1(self):
        """Whether the store keeps tile, origin and box_shape apart (version 1)."""
        v1 = self.__dict__.get("_is_v1")
        if v1 is None:
            v1 = self.__dict__["_is_v1"] = not os.path.isfile(
                os.path.join(self.path, "geometry", "zarr.json")
            )
        return v1

    @property
    def rows_in_chunks(self):
        """Whether ``status`` and geometry are written with each chunk.

        True for stores of format 1 to 3, which share the ``images`` row
        chunking; a store of format 4 gets them from `write_rows` at the end.
        """
        return int(self.attrs["cutana_format"]) < 4

    def _stored(self, block, geometry):
        """``(name, values)`` of the arrays to write for a block, status last."""
        images, status, tile, origin, box = block
        if not self.rows_in_chunks:
            return [("images", images)]
        if self._v1:
            return [("images", images), ("origin", origin), ("box_shape", box),
                    ("tile", tile), ("status", status)]
        return [("images", images), ("geometry", geometry), ("status", status)]

    def _row_arrays(self):
        if not self.rows_in_chunks:
            return ("images",)
        return ("images", *_V1_GEOMETRY, "status") if self._v1 else _ROW_ARRAYS

    def write_rows(self, status, geometry):
        """Store the status and geometry of every row (format 4, parent only).

        Called once, when every chunk is written, with what `write_chunks`
        handed back (`ChunksWritten.rows`); `finalize` does it itself when
        given those.

        Parameters
        ----------
        status : array-like
            ``(N,)`` final `~cutana.Status` of every row.
        geometry : array-like
            ``(N, 5)`` ``(tile, x0, y0, ny, nx)`` of every row
            (`GEOMETRY_FIELDS`).

        Raises
        ------
        ValueError
            If the store keeps them in its row chunks (format 1 to 3), the
            shapes are wrong or a status is not a final one.
        """
        if self.rows_in_chunks:
            msg = (
                f"{self.path} (format {self.attrs['cutana_format']}) stores status "
                "and geometry with each chunk; write_chunks wrote them"
            )
            raise ValueError(msg)
        status = np.asarray(status)
        geometry = np.asarray(geometry)
        if status.shape != (self.n_rows,) or geometry.shape != (self.n_rows, 5):
            msg = (
                f"status and geometry must have shapes ({self.n_rows},) and "
                f"({self.n_rows}, 5), got {status.shape} and {geometry.shape}"
            )
            raise ValueError(msg)
        pending = np.flatnonzero(status == Status.PENDING)
        if len(pending):
            msg = (
                f"{len(pending)} rows are still pending (first: row {pending[0]}); "
                "every chunk's rows need their final status"
            )
            raise ValueError(msg)
        _check_statuses(status, 0, "status")
        self.__dict__.pop("_row_blocks", None)
        if self.n_rows:
            self._array("geometry")[:] = geometry.astype(np.int64, copy=False)
            self._array("status")[:] = status.astype(np.int16, copy=False)

    def _empty_block(self, m):
        """Zeroed ``(images, status, tile, origin, box_shape)`` for ``m`` rows."""
        # the images block is reused between calls in a process: fresh memory
        # costs a page fault per page, which is slower than the copy itself
        shape = (m, len(self.bands), *self.out_shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        buf = _BLOCK_BUFFER.get("images")
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(nbytes, 1), dtype=np.uint8)
            _BLOCK_BUFFER["images"] = buf
        images = buf[:nbytes].view(self.dtype).reshape(shape)
        images.fill(0)
        return (
            images,
            np.zeros(m, dtype=np.int16),
            np.full(m, -1, dtype=np.int32),
            np.zeros((m, 2), dtype=np.int64),
            np.zeros((m, 2), dtype=np.int32),
        )

    def _view_of(self, r0, r1, row_to_job, pinned):
        """Rows ``r0:r1`` as views of one in-memory job, or `None`.

        When every row of the range is a consecutive row of the same job
        result in ``pinned`` (a worker writing the chunks only its own job
        fills, the usual case), the chunks are encoded straight from the
        job's arrays instead of being copied into a block first.
        """
        if not pinned:
            return None
        if callable(row_to_job):
            jobs, pos = row_to_job(r0, r1)
        else:
            jobs, pos = (np.asarray(a)[r0:r1] for a in row_to_job)
        jobs = np.asarray(jobs)
        pos = np.asarray(pos)
        m = r1 - r0
        if jobs.shape != (m,) or pos.shape != (m,) or not m:
            return None  # _assemble explains
        res = pinned.get(int(jobs[0]))
        if res is None or np.any(jobs != jobs[0]):
            return None
        p0 = int(pos[0])
        if not 0 <= p0 <= len(res.rows) - m or np.any(pos != p0 + np.arange(m)):
            return None
        p = slice(p0, p0 + m)
        if (
            np.any(res.rows[p] != np.arange(r0, r1))
            or res.images.dtype != self.dtype
            or res.images.shape[1:] != (len(self.bands), *self.out_shape)
        ):
            return None
        status = np.asarray(res.status[p], dtype=np.int16)
        _check_statuses(status, r0, f"rows {r0}:{r1}")
        return (
            res.images[p],
            status,
            np.full(m, res.tile, dtype=np.int32),
            np.asarray(res.origin[p], dtype=np.int64),
            np.asarray(res.box_shape[p], dtype=np.int32),
        )

    def _assemble(
        self, rows, label, row_to_job, base_status, out_dir, cache, block,
        pinned=None, tile_map=None,
    ):
        """Fill ``block`` (rows ``rows[0]:rows[1]`` of whole chunks, named
        ``label`` in errors: zeroed, or as stored for `patch_chunks`) from
        staged jobs; the other rows get ``base_status`` and keep what
        ``block`` holds. ``tile_map`` maps the jobs' tile numbers to the
        store's."""
        images, status, tile, origin, box = block
        r0, r1 = rows
        m = r1 - r0
        if callable(row_to_job):
            jobs, pos = row_to_job(r0, r1)
        else:
            jobs, pos = row_to_job
            jobs, pos = jobs[r0:r1], pos[r0:r1]
        jobs = np.asarray(jobs, dtype=np.int64)
        pos = np.asarray(pos, dtype=np.int64)
        base = (
            base_status(r0, r1)
            if callable(base_status)
            else np.asarray(base_status)[r0:r1]
        )
        base = np.asarray(base)
        if jobs.shape != (m,) or pos.shape != (m,) or base.shape != (m,):
            msg = (
                f"{label}: the row mapping must give {m} rows for rows "
                f"{r0}:{r1}, got job_id {jobs.shape}, position {pos.shape}, "
                f"base_status {base.shape}"
            )
            raise ValueError(msg)
        status[:] = base
        has_job = jobs >= 0
        for job_id in np.unique(jobs[has_job]):
            sel = np.flatnonzero(jobs == job_id)
            res = (pinned or {}).get(int(job_id))
            if res is None:
                res = _cached_job(cache, out_dir, int(job_id))
            p = pos[sel]
            n = len(res.rows)
            if p.min() < 0 or p.max() >= n or np.any(res.rows[p] != r0 + sel):
                bad = int(r0 + sel[0])
                msg = (
                    f"{label}: staged job {job_id} ({n} rows) does not hold the "
                    f"rows the mapping assigns to it (e.g. row {bad})"
                )
                raise ValueError(msg)
            if (
                res.images.shape[1:] != images.shape[1:]
                or res.images.dtype != self.dtype
            ):
                msg = (
                    f"staged job {job_id} has images {res.images.shape[1:]} "
                    f"{res.images.dtype}; the store expects {images.shape[1:]} "
                    f"{self.dtype}"
                )
                raise ValueError(msg)
            # consecutive rows as plain slices, of the block and of the job
            # apart: a job's rows in chunks it shares with other tiles' jobs
            # are still consecutive rows of the job, which are then copied
            # straight into their rows instead of gathered first
            if sel[-1] - sel[0] == len(sel) - 1:
                sel = slice(int(sel[0]), int(sel[-1]) + 1)
            if p[-1] - p[0] == len(p) - 1 and np.all(np.diff(p) == 1):
                p = slice(int(p[0]), int(p[-1]) + 1)
            images[sel] = res.images[p]
            status[sel] = res.status[p]
            tile[sel] = res.tile if tile_map is None else tile_map[int(res.tile)]
            origin[sel] = res.origin[p]
            box[sel] = res.box_shape[p]
        # a row of no job may show a cutout only if the block holds one
        cut = (status == Status.OK) | (status == Status.PARTIAL_OVERLAP)
        bad = ~has_job & ((status < 0) | (cut & (tile < 0)))
        if np.any(bad):
            row = int(r0 + np.flatnonzero(bad)[0])
            msg = (
                f"{label}: row {row} belongs to no staged job and its base "
                "status "
                f"{int(status[row - r0])} is not a final status without a cutout"
            )
            raise ValueError(msg)
        _check_statuses(status, r0, label)

    def _encoder(self, name):
        """How to encode chunks of array ``name`` directly, or `None`.

        Returns ``"raw"`` for a plain bytes codec chain, a numcodecs Blosc
        equal to a bytes + Blosc chain, or `None` for anything else (then
        zarr writes the chunk). Encoding chunks here and writing the files
        ourselves gives the very bytes zarr writes, without zarr's
        per-chunk asynchronous overhead, which costs more than compression
        for cutout-sized chunks.
        """
        cache = self.__dict__.setdefault("_encoders", {})
        if name in cache:
            return cache[name]
        enc = _plain_encoder(self._metadata(name).get("codecs"))
        if enc is None:
            enc = self._zarr_encoder(name)
        cache[name] = enc
        return enc

    def _zarr_encoder(self, name):
        """`_encoder` of codecs as zarr reads them (metadata of another form
        than `_plain_encoder` reads)."""
        from zarr.codecs import BloscCodec, BytesCodec

        codecs = self._array(name).metadata.codecs
        enc = None
        if len(codecs) == 1 and isinstance(codecs[0], BytesCodec):
            enc = "raw"
        elif (
            len(codecs) == 2
            and isinstance(codecs[0], BytesCodec)
            and isinstance(codecs[1], BloscCodec)
        ):
            blosc = codecs[1]
            enc = _blosc_encoder(
                cname=blosc.cname.value,
                clevel=blosc.clevel,
                shuffle=_SHUFFLES[blosc.shuffle.value],
                blocksize=blosc.blocksize,
                typesize=blosc.typesize,
            )
        return enc

    def _write_direct(self, name, run, r0, values, files, helper=False):
        """Encode the chunks of a run of chunks of array ``name`` and write
        them through ``files``, a `~cutana.io._writeback.FileSeries` (which
        may write them after this returns, until it is closed). With
        ``helper``, a second thread encodes every other chunk
        (`_encode_pairs`).

        Returns `False` (nothing written) when the array's codec chain is not
        one this writer creates; the caller then writes through zarr.
        """
        encoder = self._encoder(name)
        if encoder is None:
            return False
        import numcodecs.blosc

        cr = self.chunk_rows
        le = values.dtype.newbyteorder("<")
        fill = _plain_fill(self._metadata(name).get("fill_value"))
        if fill is None:
            fill = self._array(name).metadata.fill_value
        made = self.__dict__.setdefault("_folders", set())
        saved = numcodecs.blosc.use_threads
        # no threads of Blosc's own (see `_encode_pairs`)
        numcodecs.blosc.use_threads = False

        def chunk(k):
            a, b = (r - r0 for r in self.chunk_range(k))
            part = values[a:b]
            if b - a < cr:  # the last chunk is stored whole, padded with fill
                full = np.full((cr, *values.shape[1:]), fill, dtype=values.dtype)
                full[: b - a] = part
                part = full
            return np.ascontiguousarray(part, dtype=le)

        raw = encoder == "raw"
        encode = (lambda part: part.tobytes()) if raw else encoder.encode
        # (a copy of raw bytes holds the GIL: no helper for it)
        helper = helper and not raw and len(run) > 1
        try:
            for k, data in _encode_pairs(run, chunk, encode, helper):
                path = self._chunk_file(name, k)
                folder = os.path.dirname(path)
                if folder not in made:  # folders only with '/' keys
                    os.makedirs(folder, exist_ok=True)
                    made.add(folder)
                files.write(f"{path}.{os.getpid()}.partial", path, data)
        finally:
            numcodecs.blosc.use_threads = saved
        return True

    def read_status(self):
        """The ``status`` of every row, as stored now.

        Read straight from the chunk files (a missing chunk gives -1,
        pending), which is much faster than through zarr for many chunks.

        Returns
        -------
        status : `~numpy.ndarray` of int16
            ``(N,)`` statuses.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from cutana.io.zarr import ZarrWriter
        >>> writer = ZarrWriter.create(
        ...     tempfile.mkdtemp() + "/out.zarr", n_rows=3, bands=["VIS"],
        ...     out_shape=(2, 2), dtype="uint8", source_id=["a", "b", "c"],
        ...     ra=np.zeros(3), dec=np.zeros(3), chunk_rows=2)
        >>> writer.read_status().tolist()
        [-1, -1, -1]
        """
        parts = [np.asarray(p, dtype=np.int16) for p in self._read_rows("status")]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)

    def _read_rows(self, name):
        """Yield the values of per-row array ``name`` in blocks of rows.

        Uncompressed chunks are read straight from their files (zarr's
        per-chunk overhead would cost more than the reading); a missing
        chunk file gives the fill value, as in zarr.
        """
        arr = self._array(name)
        if self._encoder(name) != "raw":
            for r0 in range(0, self.n_rows, 1 << 22):
                yield arr[r0 : r0 + (1 << 22)]
            return
        dtype = arr.dtype.newbyteorder("<")
        fill = arr.metadata.fill_value
        for k in range(self.n_chunks):
            r0, r1 = self.chunk_range(k)
            try:
                with open(self._chunk_file(name, k), "rb") as fh:
                    raw = fh.read()
            except FileNotFoundError:
                yield np.full(r1 - r0, fill, dtype=dtype)
                continue
            values = np.frombuffer(raw, dtype=dtype)
            if values.size < r1 - r0:
                msg = (
                    f"{self._chunk_file(name, k)} holds {values.size} values; "
                    f"chunk {k} has {r1 - r0} rows"
                )
                raise ValueError(msg)
            yield values[: r1 - r0]

    def _chunk_file(self, name, chunk):
        meta = self._metadata(name)
        coords = (chunk,) + (0,) * (len(meta["shape"]) - 1)
        key = _plain_chunk_key(meta.get("chunk_key_encoding"), coords)
        if key is None:
            key = self._array(name).metadata.encode_chunk_key(coords)
        return os.path.join(self.path, name, *key.split("/"))

    # -- reading back and finishing ---------------------------------------------

    def read_chunk(self, chunk):
        """Read one chunk's rows back.

        Parameters
        ----------
        chunk : int
            Chunk index.

        Returns
        -------
        images, status, tile, origin, box_shape : `~numpy.ndarray`
            The stored rows of the chunk.
        """
        r0, r1 = self.chunk_range(chunk)
        images = self._array("images")[r0:r1]
        if not self.rows_in_chunks:  # large chunks: decode each once
            status = self._rows_block("status", r0, r1)
            tile, origin, box = split_geometry(self._rows_block("geometry", r0, r1))
            return images, status, tile, origin, box
        status = self._array("status")[r0:r1]
        if self._v1:
            return (images, status, *(self._array(n)[r0:r1] for n in _V1_GEOMETRY))
        tile, origin, box = split_geometry(self._array("geometry")[r0:r1])
        return images, status, tile, origin, box

    def _rows_block(self, name, r0, r1):
        """Rows ``r0:r1`` of per-row array ``name`` (format 4), through the
        last of its chunks read, kept: consecutive chunks of cutouts lie in
        the same chunk of rows."""
        arr = self._array(name)
        step = arr.chunks[0]
        cached = self.__dict__.setdefault("_row_blocks", {}).get(name)
        if cached is None or not cached[0] <= r0 < r1 <= cached[0] + len(cached[1]):
            b0 = (r0 // step) * step
            b1 = min(self.n_rows, max(r1, b0 + step))
            cached = self._row_blocks[name] = (b0, arr[b0:b1])
        return cached[1][r0 - cached[0] : r1 - cached[0]]

    def chunk_exists(self, chunk):
        """Whether every file of one chunk is present in the store.

        Parameters
        ----------
        chunk : int
            Chunk index.

        Returns
        -------
        exists : bool
            Whether the files of every per-row array of the chunk exist.
        """
        chunk = self._check_chunk(chunk)
        return all(
            os.path.isfile(self._chunk_file(n, chunk)) for n in self._row_arrays()
        )

    def verified_chunks(self, checksums, *, deep=False, rows=None):
        """Return the recorded chunks that can be trusted on resume.

        Parameters
        ----------
        checksums : dict
            Chunk index to recorded checksum (``LedgerState.chunks``).
        deep : bool, optional
            Also read each chunk back and compare its checksum (reads the
            whole recorded part of the store). By default only the presence
            of every chunk file is checked: chunk files are replaced
            atomically, so a present file is a complete one.
        rows : dict, optional
            Chunk index to the recorded ``(status, geometry)`` of its rows
            (``LedgerState.chunk_rows``). In a store of format 4 these are
            not in the store until it is finalised, so a chunk without them
            is not trusted.

        Returns
        -------
        chunks : set of int
            Chunks that need not be written again.
        """
        rows = rows or {}
        ok = set()
        for chunk, checksum in checksums.items():
            chunk = int(chunk)
            if not 0 <= chunk < self.n_chunks or not self.chunk_exists(chunk):
                continue
            if not self.rows_in_chunks:
                meta = rows.get(chunk)
                r0, r1 = self.chunk_range(chunk)
                if meta is None or len(meta[0]) != r1 - r0:
                    continue
            if deep:
                parts = self.read_chunk(chunk)
                if not self.rows_in_chunks:
                    parts = (parts[0], meta[0], *split_geometry(meta[1]))
                digest = chunk_digest(*parts, self.checksum)
                if digest != checksum:
                    logger.warning(
                        "chunk %d of %s does not match its recorded checksum",
                        chunk,
                        self.path,
                    )
                    continue
            ok.add(chunk)
        return ok

    def finalize(self, checksums, report=None, *, rows=None, messages=None):
        """Finish the store once every chunk is written (parent only).

        Stores the chunk checksums in ``chunk_crc32c`` (``chunk_sha256`` in
        stores of format 1 and 2), so that the store verifies itself
        without the ledger; and the counts per status, the
        given report and ``complete = True`` in the attributes, and removes
        temporary files that killed writers left behind.

        Parameters
        ----------
        checksums : dict
            Chunk index to checksum for every chunk (``LedgerState.chunks``
            or the merged results of `write_chunks`).
        report : dict, optional
            JSON-serialisable summary to store as the ``report`` attribute.
            It must not hold times, rates or memory figures if two runs are
            to give byte-identical stores; record those in the ledger
            (`~cutana.io.Ledger.run_finished`) instead.
        rows : dict, optional
            Chunk index to the ``(status, geometry)`` of its rows, for every
            chunk (`ChunksWritten.rows`, ``LedgerState.chunk_rows``): stored
            first with `write_rows`, in a store of format 4 (ignored in
            older ones). By default the ``rows`` of ``checksums`` if it is a
            `ChunksWritten`; without any, `write_rows` must have stored them.
        messages : dict, optional
            Row to the text saying why it has no (complete) cutout, stored
            in the ``message`` array (``''`` for the other rows; only its
            chunks that hold a message are written).

        Returns
        -------
        status_counts : dict
            Status name to number of rows.

        Raises
        ------
        ValueError
            If a chunk has no checksum or a row is still pending.
        """
        _BLOCK_BUFFER.clear()
        self._require_every_chunk(checksums, "checksum", "write them before finalising")
        meta = getattr(checksums, "rows", None) if rows is None else rows
        if meta and not self.rows_in_chunks:
            self._require_every_chunk(
                meta, "row status and geometry", "pass every chunk's rows"
            )
            order = range(self.n_chunks)
            self.write_rows(
                np.concatenate([meta[k][0] for k in order] or [np.zeros(0, np.int16)]),
                np.concatenate(
                    [meta[k][1] for k in order] or [np.zeros((0, 5), np.int64)]
                ),
            )
        name, size = CHECKSUMS[self.checksum]
        digests = np.zeros((self.n_chunks, size), dtype=np.uint8)
        for k in range(self.n_chunks):
            digests[k] = np.frombuffer(bytes.fromhex(checksums[k]), dtype=np.uint8)
        counts = {s.name: 0 for s in Status}
        for status in self._read_rows("status"):
            values, n = np.unique(status, return_counts=True)
            for v, c in zip(values, n, strict=True):
                counts[Status(int(v)).name] += int(c)
        if counts["PENDING"]:
            msg = f"{counts['PENDING']} rows are still pending; write every chunk first"
            raise ValueError(msg)
        if name in self._group:
            del self._group[name]
        arr = self._group.create_array(
            name,
            shape=(self.n_chunks, size),
            chunks=(max(1, min(self.n_chunks, _META_CHUNK_ROWS)), size),
            dtype="uint8",
            fill_value=0,
            config={"write_empty_chunks": True},
            dimension_names=("chunk", "byte"),
            chunk_key_encoding=_FLAT_KEYS,
            attributes={
                "description": f"{self.checksum.upper()} of each row chunk "
                "(cutana.io.chunk_digest)"
            },
        )
        if self.n_chunks:
            arr[:] = digests
        self._write_messages(messages or {})
        self._sweep_all()
        new = {"complete": True, "status_counts": counts}
        if report is not None:
            new["report"] = _jsonable(report, "report")
        self._group.update_attributes(new)
        if "repairing" in self._group.attrs:
            del self._group.attrs["repairing"]
        self.attrs = self._group.attrs.asdict()
        logger.info("finalised %s: %s", self.path, counts)
        return counts

    def _write_messages(self, messages):
        """Store each row's message in the ``message`` array (made anew):
        only the chunks of rows that have one are written, the rest read as
        ``''``."""
        if "message" in self._group:
            del self._group["message"]
        block = _META_CHUNK_ROWS
        arr = self._group.create_array(
            "message",
            shape=(self.n_rows,),
            chunks=(max(1, min(self.n_rows, block)),),
            dtype=str,
            fill_value="",
            dimension_names=("source",),
            chunk_key_encoding=_FLAT_KEYS,
            attributes={"description": "why a row has no complete cutout, or ''"},
        )
        text_of = {int(r): str(text) for r, text in messages.items()}
        rows = np.array(sorted(text_of), dtype=np.int64)
        for lo in np.unique(rows // block) * block:
            hi = min(lo + block, self.n_rows)
            a, b = np.searchsorted(rows, [lo, hi])  # the chunk's rows (sorted)
            texts = np.full(hi - lo, "", dtype=object)
            for r in rows[a:b].tolist():
                texts[r - lo] = text_of[r]
            arr[lo:hi] = texts

    def _require_every_chunk(self, mapping, what, hint):
        """Raise if a chunk index is missing from ``mapping``."""
        missing = [k for k in range(self.n_chunks) if k not in mapping]
        if missing:
            msg = (
                f"{len(missing)} of {self.n_chunks} chunks have no {what} "
                f"(first: {missing[:5]}); {hint}"
            )
            raise ValueError(msg)

    def _sweep_all(self):
        """Remove temporary ``*.partial`` files (of zarr, or of killed chunk
        writes) from the store's folders."""
        _sweep(self.path)
        for entry in os.scandir(self.path):
            if entry.is_dir() and entry.name != STATE_DIRNAME:
                for folder, _, _ in os.walk(entry.path):
                    _sweep(folder)


#: One reusable images block per process (see ``ZarrWriter._empty_block``).
_BLOCK_BUFFER = {}


#: Columns of the ``geometry`` array.
GEOMETRY_FIELDS = ("tile", "x0", "y0", "ny", "nx")


def _join_geometry(tile, origin, box_shape):
    """``(m, 5)`` int64 geometry rows from tile, origin and box shape."""
    geometry = np.empty((len(tile), 5), dtype=np.int64)
    geometry[:, 0] = tile
    geometry[:, 1:3] = origin
    geometry[:, 3:5] = box_shape
    return geometry


def split_geometry(geometry):
    """Split ``geometry`` rows into tile, origin and box shape.

    Parameters
    ----------
    geometry : `~numpy.ndarray`
        ``(n, 5)`` int64 rows ``(tile, x0, y0, ny, nx)``.

    Returns
    -------
    tile : `~numpy.ndarray`
        ``(n,)`` int32 tile index (-1: none).
    origin : `~numpy.ndarray`
        ``(n, 2)`` int64 ``(x0, y0)``.
    box_shape : `~numpy.ndarray`
        ``(n, 2)`` int32 ``(ny, nx)``.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.io.zarr import split_geometry
    >>> tile, origin, box = split_geometry(np.array([[1, -3, 40, 64, 64]]))
    >>> tile.tolist(), origin.tolist(), box.tolist()
    ([1], [[-3, 40]], [[64, 64]])
    """
    geometry = np.asarray(geometry, dtype=np.int64).reshape(-1, 5)
    return (
        geometry[:, 0].astype(np.int32),
        np.ascontiguousarray(geometry[:, 1:3]),
        geometry[:, 3:5].astype(np.int32),
    )


def _check_statuses(status, r0, where):
    """Raise if a status of rows ``r0, r0 + 1, ...`` is not a final status."""
    known = np.isin(status, [int(s) for s in Status if s != Status.PENDING])
    if not np.all(known):
        row = int(r0 + np.flatnonzero(~known)[0])
        msg = f"{where}: row {row} has unknown status {int(status[row - r0])}"
        raise ValueError(msg)


def _sweep(folder):
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.endswith(".partial") and entry.is_file():
            logger.debug("removing leftover %s", entry.path)
            pathlib.Path(entry.path).unlink(missing_ok=True)


def _runs(chunks, max_len):
    """Split sorted chunk indices into runs of consecutive indices."""
    run = [chunks[0]]
    for k in chunks[1:]:
        if k == run[-1] + 1 and len(run) < max_len:
            run.append(k)
        else:
            yield run
            run = [k]
    yield run


def _cached_job(cache, out_dir, job_id):
    res = cache.get(job_id)
    if res is None:
        res = load_staged(out_dir, job_id, mmap=True)
        cache[job_id] = res
        if len(cache) > _JOB_CACHE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(job_id)
    return res
