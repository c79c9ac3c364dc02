# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Reading cutana outputs back (`open_output`, exposed as ``cutana.open``) and
checking them (`verify_output`, behind ``cutana verify``).
"""

import codecs
import logging
import os
import warnings
from functools import cached_property

import numpy as np
import zarr
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from .._astropy_log import astropy_log_kept
from ..status import Status
from .fits import INDEX_NAME, _check_name, _fits_text, read_index
from .ledger import Ledger
from .staging import REPAIR_MARKER, state_dir
from .zarr import CHECKSUMS, ZarrWriter, chunk_digest, split_geometry

__all__ = [
    "CutoutArchive",
    "FitsArchive",
    "ZarrArchive",
    "open_output",
    "verify_output",
]

logger = logging.getLogger(__name__)

_KNOWN = np.array(sorted(int(s) for s in Status if s != Status.PENDING), dtype=np.int16)
_MAX_LISTED = 10


def _own_grid_origin(wcs, ra, dec, box):
    """``(x0, y0)`` of the box of a source at ``ra``, ``dec`` in a band file
    on a pixel grid of its own, placed as the worker placed it
    (`cutana.tiles.sky_to_pixel`, then astropy's rounding)."""
    from .._geometry import compute_boxes
    from ..tiles import sky_to_pixel

    x, y = sky_to_pixel(wcs, np.atleast_1d(float(ra)), np.atleast_1d(float(dec)))
    if not (np.isfinite(x[0]) and np.isfinite(y[0])):
        msg = "the cutout's position cannot be placed in this band's file"
        raise ValueError(msg)
    ny, nx = (int(v) for v in box)
    start = compute_boxes((ny, nx), (ny, nx), [[y[0], x[0]]], "partial").start[0]
    return np.array([start[1], start[0]], dtype=np.int64)


def _wcs_from_header(text):
    """Celestial WCS of a FITS header string."""
    with warnings.catch_warnings(), astropy_log_kept():
        # a tile header's harmless fixes (e.g. DATE-OBS format), a card
        # astropy cannot parse, or what astropy logs of it (SIP terms under a
        # CTYPE without "-SIP") were news when the tile was indexed, not here
        warnings.simplefilter("ignore")
        return WCS(fits.Header.fromstring(text)).celestial


class CutoutArchive:
    """Common interface of a cutana output opened for reading.

    Use `open_output` (``cutana.open``); subclasses are `ZarrArchive` and
    `FitsArchive`.

    Attributes
    ----------
    path : str
        The output.
    bands : list of str
        Band names, in channel order.
    config : dict
        The run's configuration.
    attrs : dict
        All stored metadata.

    Examples
    --------
    >>> import tempfile
    >>> from cutana.io import CutoutArchive, open_output, write_index
    >>> out = tempfile.mkdtemp()
    >>> _ = write_index(out, [0, 1], ["a", "b"], [2, 3], ["", ""], {},
    ...                 ra=[1.0, 2.0], dec=[0.0, 0.0], meta={"bands": ["r"]})
    >>> archive = open_output(out)
    >>> isinstance(archive, CutoutArchive), len(archive), archive.bands
    (True, 2, ['r'])
    >>> archive.to_table()["status_name"].tolist()
    ['NO_OVERLAP', 'BAD_ROW']
    """

    path = None
    bands = ()
    config = None
    attrs = None

    def __len__(self):
        return len(self.status)

    def __repr__(self):
        counts = {
            Status(int(v)).name: int(c)
            for v, c in zip(*np.unique(self.status, return_counts=True), strict=True)
        }
        name = type(self).__name__
        return f"<{name} {self.path!r}: {len(self)} rows, bands {self.bands}, {counts}>"

    def _row(self, i):
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            msg = f"row must be an integer, got {i!r}"
            raise TypeError(msg)
        if not -n <= i < n:
            msg = f"row {i} is out of range for an output of {n} rows"
            raise IndexError(msg)
        return int(i) % n

    def to_table(self):
        """Return the per-source arrays as a table.

        Returns
        -------
        table : `~astropy.table.Table`
            Columns ``row``, ``source_id``, ``ra``, ``dec``, ``status``,
            ``status_name`` and, where stored, ``tile``, ``origin`` and
            ``box_shape``.
        """
        status = np.asarray(self.status)
        names = np.array([s.name for s in Status], dtype=str)
        codes = np.array([int(s) for s in Status])
        lookup = {int(c): n for c, n in zip(codes, names, strict=True)}
        table = Table(
            {
                "row": np.arange(len(status), dtype=np.int64),
                "source_id": np.asarray(self.source_id, dtype=str),
                "ra": np.asarray(self.ra, dtype=np.float64),
                "dec": np.asarray(self.dec, dtype=np.float64),
                "status": status,
                "status_name": np.array(
                    [lookup.get(int(v), "UNKNOWN") for v in status.tolist()], dtype=str
                ),
            }
        )
        table["ra"].unit = "deg"
        table["dec"].unit = "deg"
        for name in ("tile", "origin", "box_shape"):
            values = getattr(self, name, None)
            if values is not None:
                table[name] = np.asarray(values)
        table.meta["bands"] = list(self.bands)
        return table


class ZarrArchive(CutoutArchive):
    """A cutana Zarr store opened for reading.

    Parameters
    ----------
    path : str or path-like
        The store folder.

    Attributes
    ----------
    images : `zarr.Array`
        ``(N, C, H, W)`` cutouts, read lazily.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, ZarrWriter
    >>> out = os.path.join(tempfile.mkdtemp(), "cutouts.zarr")
    >>> writer = ZarrWriter.create(
    ...     out, n_rows=3, bands=["r"], out_shape=(4, 4), dtype="uint8",
    ...     source_id=["a", "b", "c"], ra=[1.0, 2.0, 3.0], dec=[0.0, 0.0, 0.0],
    ...     tiles=[{"key": "t0", "paths": ["t0.fits"], "header": ""}])
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> checksums = writer.write_chunks(
    ...     range(writer.n_chunks), (np.zeros(3, int), np.arange(3)),
    ...     np.full(3, -1), results={0: result})
    >>> _ = writer.finalize(checksums)
    >>> from cutana.io import ZarrArchive
    >>> archive = ZarrArchive(out)
    >>> len(archive), archive.bands, archive.out_shape, archive.images.shape
    (3, ['r'], (4, 4), (3, 1, 4, 4))
    >>> archive[2].shape, int(archive[2].sum()), archive.source_id.tolist()
    ((1, 4, 4), 16, ['a', 'b', 'c'])
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._group = zarr.open_group(self.path, mode="r", zarr_format=3)
        self.attrs = self._group.attrs.asdict()
        if "cutana_format" not in self.attrs:
            msg = (
                f"{self.path} is not a cutana Zarr store (no 'cutana_format' attribute)"
            )
            raise ValueError(msg)
        self.bands = list(self.attrs["bands"])
        self.config = self.attrs.get("config", {})
        self.tiles = list(self.attrs.get("tiles", []))
        self.out_shape = tuple(self.attrs["out_shape"])
        self.images = self._group["images"]
        self._arrays = {"images": self.images}
        self._wcs_cache = {}

    def _array(self, name):
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def _read(self, name):
        return self._array(name)[:]

    @cached_property
    def source_id(self):
        """`~numpy.ndarray` of str: ``(N,)`` catalogue ids."""
        return _as_unicode(self._read("source_id"))

    @cached_property
    def ra(self):
        """`~numpy.ndarray`: ``(N,)`` right ascensions (degrees)."""
        return self._read("ra")

    @cached_property
    def dec(self):
        """`~numpy.ndarray`: ``(N,)`` declinations (degrees)."""
        return self._read("dec")

    @cached_property
    def status(self):
        """`~numpy.ndarray`: ``(N,)`` int16 `~cutana.Status` codes."""
        return self._read("status")

    @cached_property
    def messages(self):
        """dict: Row to the message saying why it has no complete cutout
        (the run report's), for the rows that have one; empty for a store
        finalised before cutana kept them."""
        if "message" not in self._group:
            return {}
        arr = self._array("message")
        step = arr.chunks[0]
        found = {}
        for lo in range(0, arr.shape[0], step):
            block = arr[lo : lo + step]
            for k in np.flatnonzero(block != "").tolist():
                found[lo + k] = str(block[k])
        return found

    @cached_property
    def _has_geometry(self):
        """Whether the store is of format 2 or later (one ``geometry`` array)."""
        return "geometry" in self._group

    @cached_property
    def _geometry(self):
        """``(tile, origin, box_shape)`` of every row."""
        if self._has_geometry:
            return split_geometry(self._read("geometry"))
        return tuple(self._read(n) for n in ("tile", "origin", "box_shape"))  # v1

    def _geometry_of(self, i):
        """``(tile, origin, box_shape)`` of row ``i`` (read alone)."""
        if self._has_geometry:
            tile, origin, box = split_geometry(self._array("geometry")[i])
            return int(tile[0]), origin[0], box[0]
        return (
            int(self._array("tile")[i]),
            self._array("origin")[i],
            self._array("box_shape")[i],
        )

    @property
    def tile(self):
        """`~numpy.ndarray`: ``(N,)`` int32 tile index (-1: none)."""
        return self._geometry[0]

    def tile_numbers(self):
        """Return every row's tile index (`tile`) alone.

        The rows' origins and box shapes are neither kept nor returned, as
        `tile` keeps them (8 bytes per row against 40).

        Returns
        -------
        tile : `~numpy.ndarray`
            ``(N,)`` int32 tile index in `tiles` (-1: none).
        """
        if "_geometry" in self.__dict__:
            return self._geometry[0]
        if self._has_geometry:
            return np.asarray(self._array("geometry")[:, 0], dtype=np.int32)
        return np.asarray(self._read("tile"), dtype=np.int32)  # v1

    @property
    def origin(self):
        """`~numpy.ndarray`: ``(N, 2)`` ``(x0, y0)`` of each box in its tile."""
        return self._geometry[1]

    @property
    def box_shape(self):
        """`~numpy.ndarray`: ``(N, 2)`` ``(ny, nx)`` of each box before resampling."""
        return self._geometry[2]

    def __len__(self):
        return int(self.images.shape[0])

    def __getitem__(self, i):
        """Return cutout ``i`` as a ``(C, H, W)`` array.

        Parameters
        ----------
        i : int or slice
            Row, or a slice of rows.

        Returns
        -------
        image : `~numpy.ndarray`
            ``(C, H, W)``, or ``(n, C, H, W)`` for a slice.
        """
        if isinstance(i, slice):
            return self.images[i]
        return self.images[self._row(i)]

    def tile_wcs(self, tile, band=0):
        """Return the WCS of one tile (of one band) as stored.

        Parameters
        ----------
        tile : int
            Index into the ``tiles`` attribute.
        band : int, optional
            Band index; bands without their own stored header use the first
            band's.

        Returns
        -------
        wcs : `~astropy.wcs.WCS`
            The tile's celestial WCS.
        """
        key = (int(tile), int(band))
        if key not in self._wcs_cache:
            info = self.tiles[key[0]]
            headers = info.get("headers")
            text = headers[key[1]] if headers and headers[key[1]] else info["header"]
            self._wcs_cache[key] = _wcs_from_header(text)
        return self._wcs_cache[key]

    @cached_property
    def _band_box(self):
        """The store's ``band_box`` array (boxes per band of bands on grids
        of their own), or None when the run cut none."""
        return self._array("band_box") if "band_box" in self._group else None

    def wcs(self, i, band=0):
        """Return the WCS of cutout ``i``.

        Rebuilt from the tile's stored header with
        `cutana.cutout.cutout_wcs`, so it equals the WCS of
        `astropy.nddata.Cutout2D` for an unresampled cutout.

        Parameters
        ----------
        i : int
            Row.
        band : int, optional
            Band index (bands share the tile's pixel grid unless the tile
            stores one header per band).

        Returns
        -------
        wcs : `~astropy.wcs.WCS`
            The cutout's celestial WCS.

        Raises
        ------
        ValueError
            If row ``i`` has no cutout (it lies on no tile, or is a bad row).
        """
        from ..cutout import cutout_wcs

        i = self._row(i)
        if not 0 <= band < len(self.bands):
            msg = f"band must be in [0, {len(self.bands)}), got {band!r}"
            raise IndexError(msg)
        tile, origin, box = self._geometry_of(i)
        if tile < 0:
            status = Status(int(self._array("status")[i]))
            msg = f"row {i} has no cutout (status {status.name}), so it has no WCS"
            raise ValueError(msg)
        wcs = self.tile_wcs(tile, band)
        if band in self.tiles[tile].get("own_grid", ()):
            if self._band_box is not None:  # (boxes of their own: angles)
                box = np.asarray(self._band_box[i, band], dtype=np.int64)
            origin = _own_grid_origin(
                wcs, self._array("ra")[i], self._array("dec")[i], box
            )
        return cutout_wcs(wcs, origin, box, self.out_shape)


class _FitsImages:
    """Lazy ``(N, C, H, W)``-like access to the cutouts of a FITS output.

    When the cutouts share one size (``--size`` or ``--target-size``), it
    has a ``shape`` and ``dtype``, and rows without a cutout read as zeros,
    as in a Zarr store; otherwise such rows raise `ValueError`.
    """

    def __init__(self, archive):
        self._archive = archive

    def __len__(self):
        return len(self._archive)

    @cached_property
    def _one(self):
        """``(shape, dtype)`` of one cutout when all share it, else `None`."""
        config = self._archive.config or {}
        side = config.get("target_size") or config.get("size")
        if side is None:
            return None
        has = np.flatnonzero(self._archive.files != "")
        if not len(has):  # no file to look at: as the options made them
            shape = (len(self._archive.bands), int(side), int(side))
            return shape, np.dtype(config.get("dtype", "float32"))
        first = self._archive[int(has[0])]
        return first.shape, first.dtype

    def _need_one(self, what):
        if self._one is None:
            msg = (
                f"the cutouts of {self._archive.path} have no common {what}: their "
                "sizes come from the catalogue (read them one by one)"
            )
            raise AttributeError(msg)
        return self._one

    @property
    def shape(self):
        """``(N, C, H, W)``."""
        return (len(self), *self._need_one("shape")[0])

    @property
    def dtype(self):
        """The cutouts' dtype."""
        return self._need_one("dtype")[1]

    def _row(self, j):
        if self._one is not None and not self._archive.files[j]:
            return np.zeros(*self._one)
        return self._archive[j]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return np.stack([self._row(j) for j in range(*i.indices(len(self)))])
        return self._row(self._archive._row(i))


class FitsArchive(CutoutArchive):
    """A cutana FITS output folder opened for reading (through its index).

    Parameters
    ----------
    path : str or path-like
        The folder holding ``index.ecsv``.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import (FitsArchive, FitsWriter, JobResult,
    ...                        fits_filenames, write_index)
    >>> out = tempfile.mkdtemp()
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(2), images=np.ones((2, 1, 4, 4), np.uint8),
    ...     status=np.zeros(2, np.int16), tile=0, origin=np.zeros((2, 2), int),
    ...     box_shape=np.full((2, 2), 4))
    >>> ids, ra, dec = ["a", "b"], [1.0, 2.0], [0.0, 0.0]
    >>> files = FitsWriter.create(out, ["r"]).write_sources(
    ...     result, ids, ra, dec, ["t0.fits"], None, fits_filenames(ids))
    >>> _ = write_index(out, result.rows, ids, result.status, files, {},
    ...                 ra=ra, dec=dec, meta={"bands": ["r"]})
    >>> archive = FitsArchive(out)
    >>> len(archive), archive.files.tolist(), archive[1].shape
    (2, ['a.fits', 'b.fits'], (1, 4, 4))
    >>> archive.tile_files(1)
    ['t0.fits']
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        index = read_index(self.path)  # (in parts: bounded memory)
        columns = index.columns
        self.attrs = index.meta
        self.bands = list(self.attrs.get("bands", []))
        self.config = self.attrs.get("config", {})
        #: ``(N,)`` the ``row`` column of the index (``0 .. N-1`` as written).
        self.rows = columns["row"]
        self.source_id = columns["source_id"]
        self.status = columns["status"]
        self.files = columns["file"]
        n = len(index)
        self.ra = columns.get("ra", np.full(n, np.nan))
        self.dec = columns.get("dec", np.full(n, np.nan))
        #: Position in the index to message, for the rows that have one.
        self.messages = index.messages
        self.images = _FitsImages(self)

    def _file(self, i):
        i = self._row(i)
        name = self.files[i]
        if not name:
            status = Status(int(self.status[i])).name
            msg = f"row {i} has no cutout file (status {status})"
            raise ValueError(msg)
        return os.path.join(self.path, _check_name(name))

    def __getitem__(self, i):
        """Return cutout ``i`` as a ``(C, H, W)`` array.

        Parameters
        ----------
        i : int
            Row.

        Returns
        -------
        image : `~numpy.ndarray`
            ``(C, H, W)``, read from the row's file.

        Raises
        ------
        ValueError
            If the row has no cutout file.
        """
        with fits.open(self._file(i)) as hdul:
            return np.stack([np.asarray(hdu.data) for hdu in hdul[1:]])

    def tile_files(self, i):
        """Return the tile file each band of cutout ``i`` was cut from.

        Parameters
        ----------
        i : int
            Row.

        Returns
        -------
        paths : list of str or None
            One per band HDU: its ``TILE`` keyword, the path of the tile's
            file (`None` for a band the tile has no file for).

        Raises
        ------
        ValueError
            If the row has no cutout file.
        OSError
            If the file cannot be read.
        """
        with fits.open(self._file(i)) as hdul:
            found = [hdu.header.get("TILE", "") for hdu in hdul[1:]]
        return [codecs.decode(t, "unicode_escape") if t else None for t in found]

    def wcs(self, i, band=0):
        """Return the WCS of cutout ``i`` from its file.

        Parameters
        ----------
        i : int
            Row.
        band : int, optional
            Band index.

        Returns
        -------
        wcs : `~astropy.wcs.WCS`
            The celestial WCS stored in the band's HDU.
        """
        with fits.open(self._file(i)) as hdul:
            header = hdul[1 + int(band)].header
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FITSFixedWarning)
                return WCS(header).celestial


def _as_unicode(arr):
    """A fixed-width ``<U`` copy of a string array (also numpy's StringDType)."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "T":
        width = int(np.strings.str_len(arr).max()) if arr.size else 0
        return arr.astype(f"<U{max(width, 1)}")
    return arr.astype(str)


def open_output(path):
    """Open a cutana output (Zarr store or FITS folder) for reading.

    Parameters
    ----------
    path : str or path-like
        The output given to ``cutana run --output``.

    Returns
    -------
    archive : `CutoutArchive`
        A `ZarrArchive` or a `FitsArchive`, with ``images``, ``source_id``,
        ``ra``, ``dec``, ``status``, ``bands``, ``config``, ``attrs``,
        ``len()``, ``archive[i]`` (a ``(C, H, W)`` array), ``wcs(i)`` and
        ``to_table()``.

    Raises
    ------
    FileNotFoundError
        If ``path`` holds neither a Zarr store nor a FITS index.

    Examples
    --------
    A finished Zarr store of three 4x4 cutouts in one band:

    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import JobResult, ZarrWriter
    >>> out = os.path.join(tempfile.mkdtemp(), "cutouts.zarr")
    >>> writer = ZarrWriter.create(
    ...     out, n_rows=3, bands=["r"], out_shape=(4, 4), dtype="uint8",
    ...     source_id=["a", "b", "c"], ra=[1.0, 2.0, 3.0], dec=[0.0, 0.0, 0.0],
    ...     tiles=[{"key": "t0", "paths": ["t0.fits"], "header": ""}])
    >>> result = JobResult(
    ...     job_id=0, rows=np.arange(3), images=np.ones((3, 1, 4, 4), np.uint8),
    ...     status=np.zeros(3, np.int16), tile=0, origin=np.zeros((3, 2), int),
    ...     box_shape=np.full((3, 2), 4))
    >>> checksums = writer.write_chunks(
    ...     range(writer.n_chunks), (np.zeros(3, int), np.arange(3)),
    ...     np.full(3, -1), results={0: result})
    >>> _ = writer.finalize(checksums)
    >>> from cutana.io import open_output
    >>> archive = open_output(out)  # also available as cutana.open
    >>> type(archive).__name__, len(archive), archive.bands
    ('ZarrArchive', 3, ['r'])
    >>> archive[0].shape, archive.status.tolist()
    ((1, 4, 4), [0, 0, 0])
    >>> archive.to_table()["source_id"].tolist()
    ['a', 'b', 'c']
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "zarr.json")):
        return ZarrArchive(path)
    if os.path.isfile(os.path.join(path, INDEX_NAME)):
        return FitsArchive(path)
    raise FileNotFoundError(_not_an_output(path))


def _listed(rows):
    rows = [int(r) for r in rows[:_MAX_LISTED]]
    return ", ".join(map(str, rows))


def _check_status(status, problems):
    status = np.asarray(status)
    pending = np.flatnonzero(status == Status.PENDING)
    if len(pending):
        problems.append(
            f"{len(pending)} rows have no final status (pending), "
            f"e.g. rows {_listed(pending)}"
        )
    unknown = np.flatnonzero(~np.isin(status, _KNOWN) & (status != Status.PENDING))
    if len(unknown):
        problems.append(
            f"{len(unknown)} rows have an unknown status code, "
            f"e.g. rows {_listed(unknown)} (codes {np.unique(status[unknown])[:5]})"
        )


def _verify_zarr(path, problems):
    try:
        writer = ZarrWriter.open(path)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        problems.append(f"cannot open the store: {exc}")
        return
    group = writer._group
    n = writer.n_rows
    expected = {
        "images": ((n, len(writer.bands), *writer.out_shape), writer.dtype),
        "status": ((n,), np.dtype("int16")),
        "ra": ((n,), np.dtype("float64")),
        "dec": ((n,), np.dtype("float64")),
        "source_id": ((n,), None),
    }
    if "geometry" in group:
        expected["geometry"] = ((n, 5), np.dtype("int64"))
    else:  # a store of format 1
        expected["tile"] = ((n,), np.dtype("int32"))
        expected["origin"] = ((n, 2), np.dtype("int64"))
        expected["box_shape"] = ((n, 2), np.dtype("int32"))
    for name, (shape, dtype) in expected.items():
        if name not in group:
            problems.append(f"array {name!r} is missing")
            continue
        arr = group[name]
        if tuple(arr.shape) != shape:
            problems.append(
                f"array {name!r} has shape {tuple(arr.shape)}, expected {shape}"
            )
        if dtype is not None and np.dtype(arr.dtype) != dtype:
            problems.append(f"array {name!r} has dtype {arr.dtype}, expected {dtype}")
        elif dtype is None and np.dtype(arr.dtype).kind not in "UOT":
            problems.append(f"array {name!r} has dtype {arr.dtype}, expected strings")
        row_arrays = ("status", "geometry", "tile", "origin", "box_shape")
        if (
            (name == "images" or (name in row_arrays and writer.rows_in_chunks))
            and arr.chunks[0] != writer.chunk_rows
        ):
            problems.append(
                f"array {name!r} has row chunks of {arr.chunks[0]}, "
                f"expected {writer.chunk_rows}"
            )
    if problems:
        return
    # a removed chunk of a per-row array reads as its fill value (NaN
    # positions, empty ids, -1 geometry): count their chunk files
    per_row = ["source_id", "ra", "dec"]
    if writer.attrs.get("complete") and not writer.rows_in_chunks:
        per_row += ["status", "geometry"]  # written once every chunk is
    for name, gone in writer.missing_chunks(per_row).items():
        problems.append(
            f"array {name!r}: {gone} of its {group[name].nchunks} chunks are missing"
        )
    try:
        status = group["status"][:]
        tile = (
            split_geometry(group["geometry"][:])[0] if "geometry" in group
            else group["tile"][:]
        )
        for name in ("source_id", "ra", "dec"):
            group[name][:]  # decodes (a damaged chunk may not)
    except Exception as exc:  # noqa: BLE001 - any decoding error is damage
        kind = type(exc).__name__
        problems.append(f"the per-row arrays cannot be read: {kind}: {exc}")
        return
    _check_status(status, problems)
    recorded = writer.attrs.get("status_counts")
    if writer.attrs.get("complete") and isinstance(recorded, dict):
        values, counts = np.unique(status, return_counts=True)
        names = {s.value: s.name for s in Status}
        actual = {names.get(int(v), str(int(v))): int(c) for v, c in zip(
            values, counts, strict=True)}
        listed = {k: int(v) for k, v in recorded.items() if v}
        if listed != actual:
            problems.append(
                f"the attribute status_counts {listed} disagrees with the status "
                f"array {actual}"
            )
    bad = np.flatnonzero((tile < -1) | (tile >= len(writer.attrs.get("tiles", []))))
    if len(bad):
        problems.append(
            f"{len(bad)} rows name a tile that is not listed, e.g. rows {_listed(bad)}"
        )

    # checksums: stored in the store once finalised, else in the ledger
    checksums = {}
    name, size = CHECKSUMS[writer.checksum]
    if name in group:
        digests = group[name][:]
        if digests.shape != (writer.n_chunks, size):
            problems.append(
                f"{name} has shape {digests.shape}, "
                f"expected {(writer.n_chunks, size)}"
            )
        else:
            checksums = {k: bytes(digests[k]).hex() for k in range(writer.n_chunks)}
    ledger = Ledger(path).read()
    for k, value in ledger.chunks.items():
        if k in checksums and checksums[k] != value:
            problems.append(f"chunk {k}: the ledger and {name} disagree")
        checksums.setdefault(k, value)
    complete = bool(writer.attrs.get("complete"))
    if not complete:
        problems.append(
            "the run has not been finalised (attribute complete is false): "
            "finish it with `cutana run ... --resume`"
        )
    missing = [k for k in range(writer.n_chunks) if k not in checksums]
    if missing:
        problems.append(
            f"{len(missing)} of {writer.n_chunks} chunks have no recorded "
            f"checksum, e.g. chunks {_listed(missing)}"
        )
    mismatched, absent = [], []
    for k in sorted(checksums):
        if not 0 <= k < writer.n_chunks:
            problems.append(f"checksum recorded for chunk {k}, which does not exist")
            continue
        if not writer.chunk_exists(k):
            absent.append(k)
            continue
        try:
            parts = writer.read_chunk(k)
            if not writer.rows_in_chunks and not complete and k in ledger.chunk_rows:
                # format 4: an unfinished run's statuses and geometry are in
                # the ledger, and reach the store only when it is finalised
                status_k, geometry_k = ledger.chunk_rows[k]
                parts = (parts[0], status_k, *split_geometry(geometry_k))
            digest = chunk_digest(*parts, writer.checksum)
        except (RuntimeError, ValueError, OSError) as exc:  # undecodable chunk
            logger.info("chunk %d of %s cannot be read: %s", k, path, exc)
            digest = None
        if digest != checksums[k]:
            mismatched.append(k)
    if absent:
        problems.append(
            f"{len(absent)} chunks are missing from the store, e.g. chunks "
            f"{_listed(absent)}"
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} chunks do not match their checksum, e.g. chunks "
            f"{_listed(mismatched)}"
        )


def _verify_fits(path, problems):
    try:
        archive = FitsArchive(path)
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"cannot read {INDEX_NAME}: {exc}")
        return
    if os.path.exists(os.path.join(state_dir(path), REPAIR_MARKER)):
        problems.append(
            "a --resume that cuts the failed sources of this run again was "
            "stopped: finish it with `cutana run ... --resume`"
        )
    n = len(archive.status)
    rows = archive.rows
    if not np.array_equal(rows, np.arange(n)):
        problems.append(f"{INDEX_NAME} does not list rows 0..{n - 1} in order")
    _check_status(archive.status, problems)
    has_cutout = np.isin(archive.status, [Status.OK, Status.PARTIAL_OVERLAP])
    has_file = archive.files != ""
    for label, sel in (
        ("have a cutout status but no file", has_cutout & ~has_file),
        ("have a file but no cutout status", ~has_cutout & has_file),
    ):
        bad = np.flatnonzero(sel)
        if len(bad):
            problems.append(f"{len(bad)} rows {label}, e.g. rows {_listed(bad)}")
    # cutouts of one shape, unless their sizes came from the catalogue
    config = archive.config or {}
    one_shape = config.get("target_size") is not None or config.get("size") is not None
    shape = None
    bad_files = []
    names, counts = np.unique(archive.files[has_file], return_counts=True)
    for name in names[counts > 1][:_MAX_LISTED]:
        rows = np.flatnonzero(archive.files == name)
        problems.append(f"rows {_listed(rows)} all name the file {name}")
    ids = np.asarray(archive.source_id).astype(str)
    for i in np.flatnonzero(has_file).tolist():
        name = archive.files[i]
        try:
            this = _fits_file_shape(
                path, name, archive.bands, (i, int(archive.status[i]), ids[i])
            )
            if shape is None or not one_shape:
                shape = this
            elif this != shape:
                msg = f"shape {this} differs from {shape}"
                raise ValueError(msg)
        except (OSError, ValueError, TypeError) as exc:
            bad_files.append(f"row {i} ({name}): {exc}")
    if bad_files:
        problems.append(
            f"{len(bad_files)} files are missing or wrong: "
            + "; ".join(bad_files[:_MAX_LISTED])
        )


def _fits_file_shape(path, name, bands, listed=None):
    """Open one cutout file and return its ``(C, H, W)``; raise if it is wrong
    (also if its ``ROW``, ``STATUS`` and ``SRCID`` are not ``listed``, the
    index's ``(row, status, source id)``)."""
    _check_name(name)
    with fits.open(os.path.join(path, name)) as hdul:
        names = [hdu.name for hdu in hdul[1:]]
        shapes = {None if hdu.data is None else hdu.data.shape for hdu in hdul[1:]}
        head = hdul[0].header
        found = (head.get("ROW"), head.get("STATUS"), head.get("SRCID"))
    if listed is not None:
        # the id as SRCID escapes it; blanks around it aside (index.ecsv
        # does not keep them); a keyword a file lacks is not compared
        row, status, srcid = listed
        want = (row, status, _fits_text(str(srcid).strip()))
        got = (*found[:2], None if found[2] is None else _fits_text(
            codecs.decode(found[2], "unicode_escape").strip()))
        if any(g is not None and g != w for g, w in zip(got, want, strict=True)):
            msg = f"its ROW, STATUS, SRCID {found} are not the index's {want}"
            raise ValueError(msg)
    if bands and [b.upper() for b in bands] != names:
        msg = f"band HDUs {names} do not match the bands {list(bands)}"
        raise ValueError(msg)
    if len(shapes) != 1 or None in shapes:
        msg = f"band images have shapes {sorted(map(str, shapes))}"
        raise ValueError(msg)
    return (len(names), *shapes.pop())


def verify_output(path):
    """Check a cutana output for completeness and integrity.

    For a Zarr store: every array present with the right shape, dtype and
    chunking; every row with a known, final status and a listed tile; every
    chunk present and matching the checksum recorded for it (in the store's
    ``chunk_crc32c`` or ``chunk_sha256`` once finalised, or in the ledger).
    For a FITS folder: the index lists every row with a known status, and
    every row with a cutout has a readable file of its own with one HDU per
    band, all of one shape (and all files of one shape, unless the cutouts'
    sizes came from the catalogue's size column), whose ``ROW``, ``STATUS``
    and ``SRCID`` are the index's.

    Parameters
    ----------
    path : str or path-like
        The output.

    Returns
    -------
    problems : list of str
        One message per problem found; empty if the output is sound.

    Examples
    --------
    A Zarr store of three rows that lie on no tile, checked before and after
    its chunks are written:

    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> from cutana.io import ZarrWriter, verify_output
    >>> out = os.path.join(tempfile.mkdtemp(), "cutouts.zarr")
    >>> writer = ZarrWriter.create(
    ...     out, n_rows=3, bands=["r"], out_shape=(4, 4), dtype="uint8",
    ...     source_id=["a", "b", "c"], ra=[1.0, 2.0, 3.0], dec=[0.0, 0.0, 0.0])
    >>> len(verify_output(out)) > 0  # rows pending, not finalised
    True
    >>> no_job = (np.full(3, -1), np.zeros(3, int))
    >>> checksums = writer.write_chunks(range(writer.n_chunks), no_job,
    ...                                 np.full(3, 2))  # NO_OVERLAP
    >>> _ = writer.finalize(checksums)
    >>> verify_output(out)
    []
    >>> verify_output(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    ['... is not a cutana output (no zarr.json and no index.ecsv)']
    """
    path = os.fspath(path)
    problems = []
    if os.path.isfile(os.path.join(path, "zarr.json")):
        _verify_zarr(path, problems)
    elif os.path.isfile(os.path.join(path, INDEX_NAME)):
        _verify_fits(path, problems)
    else:
        problems.append(_not_an_output(path))
    return problems


def _not_an_output(path):
    """Why ``path`` is not a cutana output, naming the outputs one folder
    down if there are any (``cutana demo --output DIR`` writes its cutouts
    to ``DIR/cutouts``)."""
    msg = f"{path} is not a cutana output (no zarr.json and no {INDEX_NAME})"
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:  # not a folder, or not readable: nothing to suggest
        return msg
    inside = [
        e.path for e in entries
        if e.is_dir() and any(
            os.path.isfile(os.path.join(e.path, name))
            for name in ("zarr.json", INDEX_NAME)
        )
    ]
    if len(inside) == 1:
        msg += f", but {inside[0]} is"
    elif inside:
        more = ", ..." if len(inside) > 3 else ""
        msg += f", but {', '.join(inside[:3])}{more} are"
    return msg
