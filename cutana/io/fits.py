# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The FITS output: one file per source, and an index of every catalogue row.

Each file holds an empty primary HDU with the source's keywords and one
image HDU per band, in band order (``EXTNAME`` = band name, upper-cased as
astropy writes it), with the cutout's WCS and the
keywords ``SRCID`` (source id, in printable ASCII: ``codecs.decode(value,
"unicode_escape")`` gives it back), ``RA``, ``DEC`` (degrees), ``ROW``
(catalogue row), ``STATUS`` (`~cutana.Status` code) and ``TILE`` (file name
of that band's tile). Files are written to a temporary name and renamed into
place, so a file under its final name is always complete.

``index.ecsv`` at the folder's root lists row, source id, status, file and
message for every catalogue row, including rows without a cutout (empty
``file``).

File names come from source ids through `fits_filenames`: characters other
than ``[A-Za-z0-9._-]`` become ``_``, a name never starts with ``.`` or
``-``, long ids are cut, and a short hash of the original id is appended
whenever the id had to be changed or its name would collide (also ignoring
case) with another row's, so no id can name a file outside the folder or
overwrite another source's file.
"""

import gc
import hashlib
import io
import logging
import os
import posixpath
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, WCSHDO_P14, WCSHDO_all

from .._astropy_log import astropy_log_kept
from ..status import Status
from .staging import state_dir

__all__ = [
    "FitsWriter",
    "INDEX_NAME",
    "IndexColumns",
    "cutout_status",
    "extension_names",
    "fits_filenames",
    "read_index",
    "write_index",
]

logger = logging.getLogger(__name__)

#: Name of the index file at the root of a FITS output.
INDEX_NAME = "index.ecsv"
#: Rows of ``index.ecsv`` that astropy formats at once: its writer holds
#: about 1.3 kB per row while it formats them (1.26 GB for 1,000,000 rows
#: written at once), so that a large catalogue's index is written in parts.
#: Its reader holds about 1.2 kB per row: the index is read in parts too.
INDEX_PART_ROWS = 50_000

#: Threads that remove the files of an earlier output (``--overwrite``): one
#: ``unlink`` waits on the file system, so that several at once go faster
#: even on two cores (20,000 files of an ext4 folder: 152 µs a file with
#: one thread, 104 with 2, 67 with 4, 51 with 8).
REMOVE_THREADS = 8
_REMOVE_BATCH = 4096  # (paths held at once)

#: The header flags astropy's ``WCS.to_header(relax=True)`` gives wcslib.
_WCSHDO = WCSHDO_P14 | WCSHDO_all

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_STEM = 80
_HASH_LEN = 16
_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    "clock$",
    "conin$",
    "conout$",
    *(f"com{i}" for i in range(10)),
    *(f"lpt{i}" for i in range(10)),
}
_WRITTEN = (int(Status.OK), int(Status.PARTIAL_OVERLAP))


def _id_hash(source_id):
    data = str(source_id).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:_HASH_LEN]


def _sanitize(source_id):
    """Return ``(stem, changed)`` for one id (before collision handling)."""
    source_id = str(source_id)
    stem = _UNSAFE.sub("_", source_id)
    if stem[:1] in (".", "-"):
        stem = "_" + stem[1:]
    if len(stem) > _MAX_STEM:
        stem = stem[:_MAX_STEM]
    if not stem:
        stem = "_"
    if stem.split(".", 1)[0].lower() in _RESERVED:
        stem = "_" + stem
    return stem, stem != source_id


def fits_filenames(source_id):
    """Derive a safe, unique file name for every catalogue row.

    The result depends only on the ids and their order, so every process of
    a run (and a resumed run) derives the same names.

    Parameters
    ----------
    source_id : array-like of str
        ``(N,)`` source ids of the whole catalogue.

    Returns
    -------
    names : `~numpy.ndarray`
        ``(N,)`` str file names (``*.fits``), unique even when compared
        without regard to case, each a plain name inside the output folder.
        Ids made only of ``[A-Za-z0-9._-]`` (not starting with ``.`` or
        ``-``, at most 80 characters) keep their name unless it collides.

    Examples
    --------
    >>> from cutana.io import fits_filenames
    >>> fits_filenames(["a_b", "a/b", "../x"]).tolist()  # doctest: +ELLIPSIS
    ['a_b.fits', 'a_b_....fits', '_._x_....fits']
    """
    ids = np.asarray(source_id, dtype=str).ravel()
    used = set()
    names = []
    for source in ids.tolist():
        stem, changed = _sanitize(source)
        name = f"{stem}_{_id_hash(source)}" if changed else stem
        if name.lower() in used:
            name = f"{stem}_{_id_hash(source)}"
            extra = 1
            while name.lower() in used:  # repeated ids, or a crafted id
                name = f"{stem}_{_id_hash(source)}_{extra}"
                extra += 1
        used.add(name.lower())
        names.append(name + ".fits")
    return np.array(names, dtype=str)


def _check_name(name):
    """Refuse any file name that is not a plain name inside the folder."""
    name = str(name)
    if (
        not name
        or name in (".", "..")
        or name.startswith(".")
        or posixpath.basename(name) != name
        or "\\" in name
        or "\0" in name
        or _UNSAFE.search(name)
    ):
        msg = f"unsafe output file name {name!r}; derive names with fits_filenames()"
        raise ValueError(msg)
    return name


def _text_card(text, comment):
    """``(text, comment)`` for a string keyword, or ``(text,)`` when the
    comment would not fit on the value's one 80-character card.

    astropy truncates such a comment with a ``VerifyWarning`` (values from
    about 65 characters less the comment's length up to 68, file paths
    say); a longer value is continued over ``CONTINUE`` cards, with room for
    the comment.

    Examples
    --------
    >>> from cutana.io.fits import _text_card
    >>> _text_card("t.fits", "tile file")
    ('t.fits', 'tile file')
    >>> _text_card("/data/" + "x" * 50 + ".fits", "tile file")[1:]
    ()
    """
    quoted = max(len(text.replace("'", "''")) + 2, 20)  # as astropy pads it
    if quoted <= 70 and 10 + quoted + 3 + len(comment) > 80:
        return (text,)
    return (text, comment)


def _fits_text(value):
    r"""Make a string safe for a FITS header value (printable ASCII), reversibly.

    Backslashes are doubled; characters outside printable ASCII, and blanks
    at the end (which FITS does not keep), become Python escapes (``\xe9``,
    ``\u65e5``, ``\x20``), so that ``codecs.decode(text, "unicode_escape")``
    gives the string back.

    Examples
    --------
    >>> import codecs
    >>> from cutana.io.fits import _fits_text
    >>> [_fits_text(v) for v in ("é", "\\xe9", "a\tb", "trail ")]
    ['\\xe9', '\\\\xe9', 'a\\x09b', 'trail\\x20']
    >>> codecs.decode(_fits_text("a\\b é "), "unicode_escape")
    'a\\b é '
    """
    value = str(value)
    kept = value.rstrip(" ")
    text = kept.replace("\\", "\\\\").encode("ascii", "backslashreplace")
    text = text.decode("ascii")
    text = "".join(c if 32 <= ord(c) < 127 else f"\\x{ord(c):02x}" for c in text)
    return text + "\\x20" * (len(value) - len(kept))


def extension_names(bands):
    """The ``EXTNAME`` of each band's image HDU in a FITS output.

    FITS extension names are upper-cased (as astropy writes them), so two
    bands that differ only in case would share one; that is an error.

    Parameters
    ----------
    bands : sequence of str
        Band names, in channel order.

    Returns
    -------
    names : list of str
        The extension names (printable ASCII, upper case).

    Raises
    ------
    ValueError
        If two bands would get the same extension name.

    Examples
    --------
    >>> from cutana.io.fits import extension_names
    >>> extension_names(["VIS", "nir-h"])
    ['VIS', 'NIR-H']
    >>> extension_names(["r", "R"])
    Traceback (most recent call last):
    ...
    ValueError: bands 'r' and 'R' would both be the FITS extension 'R' ...
    """
    names = [_fits_text(b).upper() for b in bands]
    first = {}
    for band, name in zip(bands, names, strict=True):
        if name in first:
            msg = (
                f"bands {first[name]!r} and {band!r} would both be the FITS extension "
                f"{name!r} (extension names are upper-cased): keep one of them with "
                "--bands, or write Zarr"
            )
            raise ValueError(msg)
        first[name] = band
    return names


def _wcs_text(w):
    """``(card images, upper-case keywords)`` of `_wcs_header` ``(w)``, for
    `_Layout.file`."""
    header = _wcs_header(w)
    keys = frozenset(key.upper() for key in header.keys())
    return header.tostring(endcard=False, padding=False), keys


def _wcs_header(w):
    if w is None:
        return fits.Header()
    if isinstance(w, fits.Header):
        return w.copy()
    if isinstance(w, WCS):
        # a tile's SIP coefficients under a CTYPE without "-SIP": astropy
        # adds the suffix (the header is then consistent), and says so for
        # every file, which indexing has reported once
        with astropy_log_kept():
            return w.to_header(relax=True)
    msg = (
        "wcs entries must be astropy WCS objects, FITS headers or None, "
        f"got {type(w).__name__}"
    )
    raise TypeError(msg)


class _FileBatch:
    """Files written under temporary names and renamed to their own once
    all are on disk, so that a file under its final name is complete.

    On Linux one ``syncfs`` flushes them all (a ``fsync`` per file took
    about 0.7 s of the 7 s that 2,000 paper-workload cutout files took);
    elsewhere each file is synced. If anything fails (or the batch is left
    by an exception), the temporary files are removed and no file is
    renamed.
    """

    def __init__(self, tmp_dir):
        self.tmp_dir = tmp_dir
        self.pending = []  # (temporary, final)

    def write(self, content, final):
        """Write ``content`` (an `~astropy.io.fits.HDUList`, or the bytes
        of a FITS file) to a temporary file renamed to ``final`` on exit."""
        tmp = os.path.join(
            self.tmp_dir,
            f"{os.path.basename(final)}.{os.getpid()}-{uuid.uuid4().hex[:8]}",
        )
        self.pending.append((tmp, final))
        with open(tmp, "wb") as fh:
            if isinstance(content, bytes | bytearray | memoryview):
                fh.write(content)
            else:
                content.writeto(fh, output_verify="ignore")

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        try:
            if kind is None and self.pending:
                _sync_files([tmp for tmp, _ in self.pending], self.tmp_dir)
                for tmp, final in self.pending:
                    os.replace(tmp, final)
                self.pending = []
        finally:
            for tmp, _ in self.pending:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return False


def _sync_files(paths, folder):
    """Flush files to disk: one ``syncfs`` of their file system on Linux, or
    a ``fsync`` of each."""
    syncfs = _syncfs()
    if syncfs is not None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _syncfs():
    """libc's ``syncfs``, or `None` where there is none."""
    if not hasattr(_syncfs, "fn"):
        _syncfs.fn = None
        if os.name == "posix":
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).syncfs
                fn.argtypes = [ctypes.c_int]
                _syncfs.fn = fn
            except (OSError, AttributeError):
                pass
    return _syncfs.fn


#: Keywords astropy places or removes itself in an image HDU's header: a
#: cutout WCS header holding one of them is written by astropy
#: (`_Layout.file`).
_HDU_KEYWORDS = frozenset(
    ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "EXTEND", "PCOUNT", "GCOUNT",
     "GROUPS", "BSCALE", "BZERO", "BLANK", "EXTNAME", "EXTVER", "EXTLEVEL",
     "CHECKSUM", "DATASUM", "END", "")
)  # fmt: skip
_BLOCK = 2880  # bytes of a FITS block
#: Big-endian storage of the cutout dtypes in FITS (uint16 with BZERO).
_STORED = {
    np.dtype(np.float32): ">f4",
    np.dtype(np.float64): ">f8",
    np.dtype(np.uint8): "u1",
    np.dtype(np.int16): ">i2",
    np.dtype(np.int32): ">i4",
}


def _padded(data, fill):
    """``data`` padded with ``fill`` to whole FITS blocks."""
    return data + fill * (-len(data) % _BLOCK)


class _Layout:
    """The bytes of a job's FITS files, put together from card images.

    ``FitsWriter._source_hdul`` builds each file with astropy, whose header
    keeps and checks every card as an object: some 3 ms per file, most of a
    FITS run's time. The cards that do not change from file to file
    (primary and extension keywords, ``TILE``, extra keywords, ``EXTNAME``)
    are taken once per job from an HDU list astropy builds the same way;
    each file then adds its WCS header's text and its own keywords (made by
    astropy's `~astropy.io.fits.Card`) at the places astropy puts them, and
    its data as astropy stores it. The bytes are those astropy writes
    (``test_fits_files_are_the_bytes_astropy_writes``).
    """

    def __init__(self, primary, head, tail, stored, shape, dtype, reserved):
        self.primary = primary  # the primary header's first cards
        self.head = head  # per band: the extension cards before the WCS
        self.tail = tail  # per band: the cards after the source's keywords
        self.stored = stored
        self.shape = shape
        self.dtype = dtype
        self.reserved = reserved  # keywords the WCS header must not hold

    @classmethod
    def make(cls, writer, shape, dtype, tile_names, extra):
        """The layout of ``writer``'s files of cutouts of ``shape`` and
        ``dtype``, or None for a dtype it does not store (astropy writes)."""
        dtype = np.dtype(dtype)
        stored = "uint16" if dtype == np.uint16 else _STORED.get(dtype)
        if stored is None or dtype.byteorder not in "=|":
            return None
        blank = np.zeros((len(writer.bands), *shape), dtype=dtype)
        hdul = writer._source_hdul(blank, fits.Header(), {}, tile_names, extra)
        images = [[c.image for c in hdu.header.cards] for hdu in hdul]
        plain = [c.image for c in fits.ImageHDU(data=blank[0]).header.cards]
        n_head = len(plain)
        if any(band[:n_head] != plain for band in images[1:]):
            return None  # extra keywords astropy placed among its own
        reserved = set(_HDU_KEYWORDS)
        for hdu in hdul:
            reserved.update(hdu.header.keys())
        return cls(
            "".join(images[0]),
            ["".join(band[:n_head]) for band in images[1:]],
            ["".join(band[n_head:]) for band in images[1:]],
            stored,
            tuple(shape),
            dtype,
            frozenset(reserved),
        )

    def file(self, images, wcs_text, keys, cards):
        """The bytes of one source's file, or None when the WCS header (its
        card images ``wcs_text``, or a list of them per band, and its
        ``keys``, upper case) holds a keyword that astropy would merge with
        another card (then ``FitsWriter._source_hdul`` builds the file)."""
        if (
            images.shape[1:] != self.shape
            or images.dtype != self.dtype
            or not keys.isdisjoint(self.reserved)
            or not keys.isdisjoint(cards)
            or any(key.startswith("NAXIS") for key in keys)
        ):
            return None
        own = "".join(
            fits.Card(key, *(value if isinstance(value, tuple) else (value,))).image
            for key, value in cards.items()
        )
        end = "END".ljust(80)
        parts = [_padded((self.primary + own + end).encode("ascii"), b" ")]
        texts = [wcs_text] * len(self.head) if isinstance(wcs_text, str) else wcs_text
        for c, (head, tail) in enumerate(zip(self.head, self.tail, strict=True)):
            text = head + texts[c] + own + tail + end
            parts.append(_padded(text.encode("ascii"), b" "))
            parts.append(_padded(self._data(images[c]), b"\0"))
        return b"".join(parts)

    def _data(self, image):
        """An image's data as astropy stores it (uint16: minus BZERO 32768)."""
        if self.stored == "uint16":
            return (image ^ np.uint16(0x8000)).astype(">u2").tobytes()
        return np.ascontiguousarray(image, dtype=self.stored).tobytes()


class _CutoutHeaders:
    """The WCS header texts of a tile's cutouts, for `_Layout.file`.

    A cutout's WCS (`cutana.cutout.cutout_wcs`) and its header, made by
    astropy, take about 0.35 ms, most of what a FITS file costs beyond
    writing it. Cutouts of one shape (extracted and written) have the same
    header but for their reference pixel: astropy makes the header of the
    first cutout of each shape, and the next ones take its text with their
    own ``CRPIX1`` and ``CRPIX2`` cards, which wcslib writes from that
    cutout's WCS given their reference pixel (computed as
    `cutana.cutout.cutout_wcs` computes it), as it wrote the first one's
    for astropy. The second cutout of each shape is made both ways: if the
    texts differ (another astropy, say), astropy makes every header of
    that shape.
    """

    _CARDS = ("CRPIX1  ", "CRPIX2  ")

    def __init__(self, tile_wcs):
        self.tile_wcs = tile_wcs
        # (shape, out shape) -> [WCS, card images, keys, CRPIX card indices,
        # checked]; None where astropy makes every header
        self._shapes = {}

    def text(self, origin, shape, out_shape):
        """``(card images, upper-case keywords)`` of a cutout's WCS header."""
        from ..cutout import _cutout_crpix, cutout_wcs

        shape, out_shape = tuple(int(v) for v in shape), tuple(out_shape)
        key = (shape, out_shape)
        known = self._shapes.get(key, False)
        if known:
            w, cards, keys, where, checked = known
            crpix = self.tile_wcs.wcs.crpix
            w.wcs.crpix = _cutout_crpix(crpix, origin, shape, out_shape)
            text = self._with_crpix(w, cards, where)
            if text is not None and checked:
                return text, keys
        w = cutout_wcs(self.tile_wcs, origin, shape, out_shape)
        made, keys = _wcs_text(w)
        if known is False:  # the first of its shape
            cards = [made[i : i + 80] for i in range(0, len(made), 80)]
            where = [i for i, c in enumerate(cards) if c[:8] in self._CARDS]
            good = len(where) == 2
            self._shapes[key] = [w, cards, keys, where, False] if good else None
        elif known:  # the second: both ways alike, or astropy from now on
            self._shapes[key] = None if text != made else [*known[:4], True]
        return made, keys

    @staticmethod
    def _with_crpix(w, cards, where):
        """``cards`` with the CRPIX cards wcslib writes for ``w``, or None."""
        raw = w.wcs.to_header(_WCSHDO)
        found = {raw[i : i + 8]: raw[i : i + 80] for i in range(0, len(raw), 80)}
        cards = list(cards)
        for i in where:
            card = found.get(cards[i][:8])
            if card is None:
                return None
            cards[i] = card
        return "".join(cards)


class FitsWriter:
    """Write one FITS file per source into an output folder.

    Workers construct it cheaply (it only makes sure the folder exists); the
    parent uses `FitsWriter.create` once at the start of a fresh run.

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.
    bands : list of str
        Band names, in channel order; they become the ``EXTNAME`` values
        (upper-cased by astropy).

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import FitsWriter, JobResult, fits_filenames
    >>> out = tempfile.mkdtemp()
    >>> writer = FitsWriter.create(out, ["r"])
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.array([0, 0, 2], np.int16), tile=0,
    ...     origin=np.zeros((3, 2), int), box_shape=np.full((3, 2), 4))
    >>> ids = ["a", "b", "c"]
    >>> written = writer.write_sources(
    ...     result, ids, [1.0, 2.0, 3.0], [0.0, 0.0, 0.0], ["t0.fits"], None,
    ...     fits_filenames(ids))
    >>> written.tolist()  # row 2 (NO_OVERLAP) gets no file
    ['a.fits', 'b.fits', '']
    >>> sorted(name for name in os.listdir(out) if name.endswith(".fits"))
    ['a.fits', 'b.fits']
    """

    def __init__(self, out_dir, bands):
        self.out_dir = os.fspath(out_dir)
        self.bands = [str(b) for b in bands]
        if not self.bands:
            msg = "bands must name at least one band"
            raise ValueError(msg)
        self._extnames = extension_names(self.bands)
        self._tmp_dir = os.path.join(state_dir(self.out_dir), "tmp")
        os.makedirs(self._tmp_dir, exist_ok=True)

    def __repr__(self):
        return f"<FitsWriter {self.out_dir!r}: bands {self.bands}>"

    @classmethod
    def create(cls, out_dir, bands, *, overwrite=False):
        """Prepare the folder of a fresh run (parent process only).

        Parameters
        ----------
        out_dir : str or path-like
            The output folder; it must be new or empty, or hold an earlier
            cutana FITS output and ``overwrite`` be true.
        bands : list of str
            Band names.
        overwrite : bool, optional
            Remove an earlier cutana output in the folder: its index, its
            bookkeeping and the FITS files cutana wrote (listed in the index
            or carrying the ``CUTANAV`` keyword). Other files are kept.

        Returns
        -------
        writer : `FitsWriter`
            A writer of the folder.

        Raises
        ------
        FileExistsError
            If the folder holds an earlier output and ``overwrite`` is false,
            or holds files cutana did not write.
        """
        out_dir = os.fspath(out_dir)
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            msg = f"output {out_dir} exists and is a file, not a folder"
            raise FileExistsError(msg)
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            previous = os.path.exists(
                os.path.join(out_dir, INDEX_NAME)
            ) or os.path.isdir(state_dir(out_dir))
            from .zarr import _is_store, _remove_output

            store = not previous and _is_store(out_dir)  # a Zarr output's
            if not (previous or store):
                msg = (
                    f"output folder {out_dir} is not empty and holds no cutana output; "
                    "choose a new or empty folder"
                )
                raise FileExistsError(msg)
            if not overwrite:
                msg = (
                    f"output {out_dir} already exists; pass overwrite=True "
                    "(--overwrite) "
                    "to replace it, or resume the run that made it (--resume)"
                )
                raise FileExistsError(msg)
            if store:
                _remove_output(out_dir)
            else:
                _remove_fits_output(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        return cls(out_dir, bands)

    def clean_temporary(self):
        """Remove temporary files of writes that were killed (parent only).

        Returns
        -------
        n_removed : int
            Number of files removed.
        """
        n = 0
        for entry in os.scandir(self._tmp_dir):
            if entry.is_file():
                os.remove(entry.path)
                n += 1
        return n

    def write_sources(
        self, result, source_id, ra, dec, tile_paths, wcs, files, *, header=None,
        band_wcs=None,
    ):
        """Write the files of one job's sources.

        Only rows with status ``OK`` or ``PARTIAL_OVERLAP`` get a file; an
        existing file of the same name (from an interrupted attempt) is
        replaced atomically.

        Parameters
        ----------
        result : `~cutana.io.JobResult`
            The job's result (``images`` ``(n, C, H, W)``).
        source_id : array-like of str
            ``(n,)`` ids of the job's rows.
        ra, dec : array-like of float
            ``(n,)`` positions (degrees) of the job's rows.
        tile_paths : sequence of str
            Path or URL of the tile's file for each band (`None` for a
            missing band); the ``TILE`` keyword holds its file name.
        wcs : `~astropy.wcs.WCS` or sequence
            Either the tile's WCS, from which each cutout's WCS is derived
            with `cutana.cutout.cutout_wcs` (``result.origin``,
            ``result.box_shape`` and the image shape), or ``n`` per-source
            WCS objects or FITS headers (`None` for no WCS).
        files : array-like of str
            ``(n,)`` file names of the job's rows, from `fits_filenames`.
        header : dict, optional
            Further keywords for every band HDU (e.g. ``{"BUNIT": "Jy"}``).
        band_wcs : sequence, optional
            Per band, the WCS of a band file on a pixel grid of its own
            (`~cutana.tiles.Tile.own_grid`), or `None` for a band on the
            tile's grid (``wcs``). Such a band's cutout WCS is derived from
            its own file's WCS at ``result.band_origin`` (with the box of
            ``result.band_box`` when given).

        Returns
        -------
        written : `~numpy.ndarray`
            ``(n,)`` str file names written, ``''`` for rows without a file.

        Raises
        ------
        ValueError
            If lengths disagree or a file name is unsafe.
        """
        from ..cutout import cutout_wcs

        n = len(result.rows)
        images = np.asarray(result.images)
        if (
            images.ndim != 4
            or images.shape[0] != n
            or images.shape[1] != len(self.bands)
        ):
            msg = (
                f"job {result.job_id}: images must have shape "
                f"({n}, {len(self.bands)}, H, W), "
                f"got {images.shape}"
            )
            raise ValueError(msg)
        source_id = np.asarray(source_id, dtype=str)
        ra = np.asarray(ra, dtype=np.float64)
        dec = np.asarray(dec, dtype=np.float64)
        files = np.asarray(files, dtype=str)
        for name, arr in (
            ("source_id", source_id),
            ("ra", ra),
            ("dec", dec),
            ("files", files),
        ):
            if arr.shape != (n,):
                msg = (
                    f"job {result.job_id}: {name} must have shape ({n},), "
                    f"got {arr.shape}"
                )
                raise ValueError(msg)
        tile_paths = list(tile_paths)
        if len(tile_paths) != len(self.bands):
            msg = (
                f"tile_paths must give one path per band ({len(self.bands)}), "
                f"got {len(tile_paths)}"
            )
            raise ValueError(msg)
        # the whole path (tiles of different folders may share a file name;
        # a long one takes CONTINUE cards)
        tile_names = [_fits_text(p) if p is not None else "" for p in tile_paths]
        per_source = not isinstance(wcs, (WCS, fits.Header)) and wcs is not None
        if per_source:
            wcs = list(wcs)
            if len(wcs) != n:
                msg = f"wcs must be one WCS or {n} per-source entries, got {len(wcs)}"
                raise ValueError(msg)
        tile_wcs = wcs if isinstance(wcs, WCS) else None
        extra = dict(header or {})
        written = np.full(n, "", dtype=object)
        status = np.asarray(result.status)
        layout = _Layout.make(self, images.shape[2:], images.dtype, tile_names, extra)
        headers = _CutoutHeaders(tile_wcs) if layout is not None else None
        own = []  # (band, its WCS, its `_CutoutHeaders`) of bands on own grids
        if band_wcs is not None and tile_wcs is not None:
            own = [(c, w, _CutoutHeaders(w)) for c, w in enumerate(band_wcs)
                   if w is not None]
            if own and result.band_origin is None:
                msg = f"job {result.job_id}: band_wcs needs result.band_origin"
                raise ValueError(msg)
        # (renamed to their names once all are on disk)
        with _FileBatch(self._tmp_dir) as batch:
            for k in range(n):
                if int(status[k]) not in _WRITTEN:
                    continue
                name = _check_name(files[k])
                cards = {
                    "SRCID": _text_card(_fits_text(source_id[k]), "source id"),
                    "RA": (float(ra[k]), "[deg] source right ascension"),
                    "DEC": (float(dec[k]), "[deg] source declination"),
                    "ROW": (int(result.rows[k]), "row in the catalogue (0-based)"),
                    "STATUS": (int(status[k]), Status(int(status[k])).name),
                }
                if per_source:
                    w = wcs[k]
                elif tile_wcs is not None:
                    w = (result.origin[k], result.box_shape[k], images.shape[2:])
                else:
                    w = wcs
                content = None
                if layout is not None:
                    if isinstance(w, tuple):  # a cutout of the tile
                        text, keys = headers.text(*w)
                    else:
                        text, keys = _wcs_text(w)
                    if own:  # bands on grids of their own: their own WCS
                        text, keys = [text] * len(self.bands), set(keys)
                        for c, _, band_headers in own:
                            text[c], more = band_headers.text(
                                *_band_geometry(result, k, c, w)
                            )
                            keys |= more
                    content = layout.file(images[k], text, keys, cards)
                if content is None:  # keywords astropy would merge: astropy writes
                    wcs_header = _wcs_header(
                        cutout_wcs(tile_wcs, *w) if isinstance(w, tuple) else w
                    )
                    if own:
                        wcs_header = [wcs_header] * len(self.bands)
                        for c, band_wcs_c, _ in own:
                            wcs_header[c] = _wcs_header(cutout_wcs(
                                band_wcs_c, *_band_geometry(result, k, c, w)
                            ))
                    content = self._source_hdul(
                        images[k], wcs_header, cards, tile_names, extra
                    )
                batch.write(content, os.path.join(self.out_dir, name))
                written[k] = name
        return written.astype(str)


    def _source_hdul(self, images, wcs_header, cards, tile_names, extra):
        """The HDU list of one source's file: an empty primary HDU and one
        image HDU per band, each with the cutout's WCS (``wcs_header``, or
        a list of headers per band) and ``cards``."""
        primary = fits.PrimaryHDU()
        primary.header["CUTANAV"] = (_cutana_version(), "cutana version")
        primary.header["NBANDS"] = (len(self.bands), "number of band HDUs")
        for key, value in cards.items():
            primary.header[key] = value
        hdus = [primary]
        # a new header per source: filled once, copied per band
        bases = wcs_header if isinstance(wcs_header, list) else [wcs_header]
        for base in {id(b): b for b in bases}.values():
            for key, value in cards.items():
                base[key] = value
        names = zip(self.bands, self._extnames, strict=True)
        for c, (band, extname) in enumerate(names):
            hdr = bases[c if len(bases) > 1 else 0].copy()
            comment = f"tile file of band {_fits_text(band)}"
            hdr["TILE"] = _text_card(tile_names[c], comment)
            for key, value in extra.items():
                hdr[key] = value
            hdus.append(
                fits.ImageHDU(
                    data=np.ascontiguousarray(images[c]), header=hdr, name=extname
                )
            )
        return fits.HDUList(hdus)


def _cutana_version():
    from .. import __version__

    return str(__version__)


def cutout_status(path, row):
    """The status that a cutout file of a FITS output gives its row.

    Parameters
    ----------
    path : str or path-like
        A file `FitsWriter.write_sources` wrote.
    row : int
        The catalogue row the file is expected to hold.

    Returns
    -------
    status : int or None
        ``STATUS`` of the primary header (`~cutana.Status.OK` or
        `~cutana.Status.PARTIAL_OVERLAP`), or `None` if the file cannot be
        read, holds another row (``ROW``) or another status.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from cutana.io import FitsWriter, JobResult, cutout_status
    >>> out = tempfile.mkdtemp()
    >>> job = JobResult(
    ...     job_id=0, rows=np.array([7]), images=np.ones((1, 1, 2, 2), np.float32),
    ...     status=np.array([1], np.int16), tile=0, origin=np.zeros((1, 2), int),
    ...     box_shape=np.full((1, 2), 2))
    >>> names = FitsWriter(out, ["r"]).write_sources(
    ...     job, ["s7"], [1.0], [2.0], ["t.fits"], [None], ["s7.fits"])
    >>> path = os.path.join(out, "s7.fits")
    >>> cutout_status(path, 7), cutout_status(path, 8)
    (1, None)
    """
    try:
        header = fits.getheader(path)
        if int(header["ROW"]) != int(row):
            return None
        status = int(header["STATUS"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        logger.info("%s is not kept: %s", path, exc)
        return None
    return status if status in _WRITTEN else None


def _fits_output_others(out_dir):
    """The names in ``out_dir`` that a FITS output of cutana does not hold
    (beside its FITS files), or `None` if it holds none (no index or
    bookkeeping)."""
    names = set(os.listdir(out_dir))
    if INDEX_NAME not in names and not os.path.isdir(state_dir(out_dir)):
        return None
    names -= {INDEX_NAME, os.path.basename(state_dir(out_dir))}
    return {n for n in names if not n.lower().endswith(".fits")}


def _remove_fits_output(out_dir):
    """Remove an earlier cutana FITS output, leaving other files alone."""
    import shutil

    index = os.path.join(out_dir, INDEX_NAME)
    listed = set()
    if os.path.exists(index):
        files = read_index(out_dir).columns.get("file")
        if files is not None:
            listed = {v for v in files.tolist() if v}
        del files
    with ThreadPoolExecutor(REMOVE_THREADS) as pool:
        batch = []
        for entry in os.scandir(out_dir):
            if not entry.is_file() or not entry.name.lower().endswith(".fits"):
                continue
            ours = entry.name in listed
            if not ours:
                with fits.open(entry.path) as hdul:
                    ours = "CUTANAV" in hdul[0].header
            if ours:
                batch.append(entry.path)
            else:
                logger.info("keeping %s: not written by cutana", entry.path)
            if len(batch) == _REMOVE_BATCH:
                list(pool.map(os.remove, batch))
                batch = []
        list(pool.map(os.remove, batch))
    if os.path.exists(index):
        os.remove(index)
    if os.path.isdir(state_dir(out_dir)):
        shutil.rmtree(state_dir(out_dir))


def write_index(
    out_dir, rows, source_id, status, files, messages, *, ra=None, dec=None, meta=None
):
    """Write ``index.ecsv``: one line per catalogue row (parent only).

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.
    rows : array-like of int
        ``(N,)`` catalogue rows (normally ``0 .. N-1``).
    source_id : array-like of str
        ``(N,)`` ids.
    status : array-like of int
        ``(N,)`` final `~cutana.Status` codes.
    files : array-like of str
        ``(N,)`` file names, ``''`` where a row has no file.
    messages : dict
        Row to message (rows without one get ``''``).
    ra, dec : array-like of float, optional
        ``(N,)`` positions (degrees), added as columns when given.
    meta : dict, optional
        Table metadata, e.g. ``bands`` and ``config`` (JSON-like values).

    Returns
    -------
    path : str
        The index written (atomically).

    Raises
    ------
    ValueError
        If the arrays' lengths differ, a status is unknown or a file name is
        unsafe.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> from astropy.table import Table
    >>> from cutana.io import write_index
    >>> out = tempfile.mkdtemp()
    >>> path = write_index(
    ...     out, [0, 1], ["a", "b"], [0, 3], ["a.fits", ""], {1: "ra is NaN"},
    ...     meta={"bands": ["r"]})
    >>> os.path.basename(path)
    'index.ecsv'
    >>> table = Table.read(path, format="ascii.ecsv")
    >>> table.colnames
    ['row', 'source_id', 'status', 'file', 'message']
    >>> str(table["message"][1]), table.meta["bands"]
    ('ra is NaN', ['r'])
    """
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    cols = {"row": rows, "source_id": source_id, "status": status}
    if ra is not None:
        cols["ra"] = ra
    if dec is not None:
        cols["dec"] = dec
    cols["file"] = files
    for name in cols:
        if name != "file":  # (a list of names stays a list: no copy of all)
            cols[name] = np.asarray(cols[name])
        shape = np.shape(cols[name])
        if shape != (n,):
            msg = f"{name} must have shape ({n},), got {shape}"
            raise ValueError(msg)
    known = {int(s) for s in Status}
    bad = [int(v) for v in np.unique(cols["status"]) if int(v) not in known]
    if bad:
        msg = f"status holds unknown codes {bad}"
        raise ValueError(msg)
    for name in files if isinstance(files, list) else np.asarray(files).tolist():
        if name:
            _check_name(str(name))
    meta = {
        "cutana_version": _cutana_version(),
        "status_codes": {s.name: int(s.value) for s in Status},
        **(meta or {}),
    }
    messages = messages or {}
    out_dir = os.fspath(out_dir)
    final = os.path.join(out_dir, INDEX_NAME)
    tmp = os.path.join(out_dir, f".{INDEX_NAME}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            _write_index_parts(fh, cols, messages, meta, n)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return final


def _index_table(cols, messages, meta, lo, hi):
    """The `~astropy.table.Table` of rows ``lo:hi`` of an index."""
    part = {
        "row": cols["row"][lo:hi],
        "source_id": np.asarray(cols["source_id"][lo:hi], dtype=str),
        "status": np.asarray(cols["status"][lo:hi], dtype=np.int16),
    }
    for name in ("ra", "dec"):
        if name in cols:
            part[name] = np.asarray(cols[name][lo:hi], dtype=np.float64)
    part["file"] = np.asarray(cols["file"][lo:hi], dtype=str)
    part["message"] = np.array(
        [str(messages.get(int(r), "")) for r in part["row"].tolist()], dtype=str
    )
    table = Table(part)
    table["status"].description = "cutana.Status code: " + ", ".join(
        f"{s.value} {s.name}" for s in Status
    )
    if "ra" in part:
        table["ra"].unit = "deg"
    if "dec" in part:
        table["dec"].unit = "deg"
    table.meta.update(meta)
    return table


def _ecsv_text(table):
    """``table`` as the text of an ECSV file (astropy's writer)."""
    buffer = io.StringIO()
    table.write(buffer, format="ascii.ecsv")
    return buffer.getvalue()


def _write_index_parts(fh, cols, messages, meta, n):
    """Write an index to the open text file ``fh``, `INDEX_PART_ROWS` at a time.

    astropy writes each part as a whole ECSV file; the header (metadata and
    column types, which depend only on the columns' kinds) is kept once,
    from an empty table of the same columns, and every part's data lines
    follow it: the same file as one write of all rows. Should a part's
    header ever differ (a change of astropy), all rows are written at once.
    """
    header = _ecsv_text(_index_table(cols, messages, meta, 0, 0))
    fh.write(header)
    for lo in range(0, n, INDEX_PART_ROWS):
        text = _ecsv_text(_index_table(cols, messages, meta, lo, lo + INDEX_PART_ROWS))
        if not text.startswith(header):
            logger.debug("index parts differ in their header: writing it whole")
            fh.seek(0)
            fh.truncate()
            fh.write(_ecsv_text(_index_table(cols, messages, meta, 0, n)))
            return
        fh.write(text[len(header) :])
        # a part's table and columns refer to each other: only the cyclic
        # collector frees them, and without it the parts piled up (1,000,000
        # rows: +297 MB instead of +72 MB)
        del text
        gc.collect()


@dataclass
class IndexColumns:
    """The columns of an ``index.ecsv`` (`read_index`).

    Attributes
    ----------
    meta : dict
        The table's metadata (``bands``, ``config``, ``tiles``, ...).
    columns : dict
        Column name to ``(N,)`` array: ``row`` (int64), ``source_id`` and
        ``file`` (str, ``''`` where empty), ``status`` (int16), and ``ra``
        and ``dec`` (float64) where the index has them.
    messages : dict
        Position in the index to message, for the rows that have one.
    """

    meta: dict
    columns: dict
    messages: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.columns["row"])


#: The columns `read_index` keeps as arrays, and their dtypes (the
#: ``message`` column is kept as a dict; any other is left out).
_INDEX_DTYPES = {
    "row": np.int64, "source_id": str, "status": np.int16, "ra": np.float64,
    "dec": np.float64, "file": str,
}


def read_index(out_dir):
    """Read the ``index.ecsv`` of a FITS output, `INDEX_PART_ROWS` rows at a time.

    astropy's ECSV reader holds about 1.2 kB per row while it reads (235 MB
    for the index of 200,000 rows read at once). Each part of the data
    lines is read as a whole ECSV text behind the file's header, and only
    its columns' arrays are kept. A file with a quoted value that goes on
    to the next line (an odd number of quotes in a line), or that astropy
    cannot parse, is read at once (so that astropy's error names the line).

    Parameters
    ----------
    out_dir : str or path-like
        The output folder.

    Returns
    -------
    index : `IndexColumns`
        The metadata, the columns and the messages.

    Raises
    ------
    OSError
        If the index cannot be read.
    ValueError
        If astropy cannot parse it, or a column the index needs is missing.

    Examples
    --------
    >>> import tempfile
    >>> from cutana.io import read_index, write_index
    >>> out = tempfile.mkdtemp()
    >>> _ = write_index(out, [0, 1], ["a", "b"], [0, 3], ["a.fits", ""],
    ...                 {1: "ra is NaN"}, meta={"bands": ["r"]})
    >>> index = read_index(out)
    >>> len(index), index.columns["file"].tolist(), index.messages
    (2, ['a.fits', ''], {1: 'ra is NaN'})
    >>> index.meta["bands"]
    ['r']
    """
    path = os.path.join(os.fspath(out_dir), INDEX_NAME)
    header, parts, lines = [], [], []
    with open(path, encoding="utf-8", newline="") as fh:
        for line in fh:
            header.append(line)
            if not line.startswith("#"):
                break  # the column names
        try:
            for line in fh:
                if line.count('"') % 2:
                    break  # a value goes on to the next line
                lines.append(line)
                if len(lines) == INDEX_PART_ROWS:
                    parts.append(_index_part(header, lines))
                    lines = []
            else:
                if lines or not parts:
                    parts.append(_index_part(header, lines))
                return _joined_parts(parts)
        except ValueError:  # (astropy's errors) the whole file says where
            pass
    del parts, lines
    return _table_columns(Table.read(path, format="ascii.ecsv"))


def _index_part(header, lines):
    """`IndexColumns` of the data ``lines`` of an index behind its ``header``."""
    table = Table.read(header + lines, format="ascii.ecsv")
    part = _table_columns(table)
    # a table's columns and the table refer to each other: only the cyclic
    # collector frees them (see `_write_index_parts`)
    del table
    gc.collect()
    return part


def _table_columns(table):
    """`IndexColumns` of an index read as an astropy ``table``."""
    needed = ("row", "source_id", "status", "file")
    missing = [c for c in needed if c not in table.colnames]
    if missing:
        msg = f"{INDEX_NAME} has no column {missing[0]!r}"
        raise ValueError(msg)
    columns = {
        name: _filled_column(table[name], dtype)
        for name, dtype in _INDEX_DTYPES.items()
        if name in table.colnames
    }
    messages = {}
    if "message" in table.colnames:
        text = _filled_column(table["message"], str)
        messages = {int(i): str(text[i]) for i in np.flatnonzero(text != "")}
    return IndexColumns(dict(table.meta), columns, messages)


def _joined_parts(parts):
    """One `IndexColumns` of the `IndexColumns` ``parts``, in order."""
    if len(parts) == 1:
        return parts[0]
    columns = {
        name: np.concatenate([p.columns[name] for p in parts])
        for name in parts[0].columns
    }
    messages, offset = {}, 0
    for p in parts:
        messages.update({offset + i: m for i, m in p.messages.items()})
        offset += len(p)
    return IndexColumns(parts[0].meta, columns, messages)


def _filled_column(col, dtype):
    """A column as a plain array of ``dtype``; masked values ``''`` for text
    (an empty string is written ``""``, which astropy reads as masked), NaN
    for floats."""
    if hasattr(col, "filled"):
        col = col.filled("" if dtype is str else np.nan if dtype is np.float64 else 0)
    return np.asarray(col).astype(dtype)


def _band_geometry(result, k, c, tile_geometry):
    """``(origin, box, out_shape)`` of source ``k`` in band ``c``, a band on a
    pixel grid of its own: its origin in its file, and its own box where the
    job cut one (``result.band_box``), else the tile's (``tile_geometry``)."""
    _, box, out_shape = tile_geometry
    if result.band_box is not None:
        box = result.band_box[k, c]
    return result.band_origin[k, c], box, out_shape
