# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The tile index: which survey tile (and which file per band) holds each source.

A `TileIndex` is built from FITS headers only; pixel data are never read
while indexing. Files are local paths, glob patterns or fsspec URLs
(``memory://``, ``s3://``, ...). Band files of the same sky tile are grouped
into one `Tile` (by the ``TILEID`` keyword, a ``TILE<digits>`` token in the
file name, or an identical WCS), and `TileIndex.assign` picks for every
source the tile that holds its whole cutout, vectorised over sources.

Files that cannot be indexed (unreadable, truncated, not FITS, no 2-D image,
no celestial WCS) never stop the index: they are listed in
`TileIndex.errors` with the reason, and only the sources that need them are
affected.

`open_pixels` is the one place where pixel data are opened: memory-mapped,
raw (never scaled as a whole), in the byte order of the file.
"""

import functools
import glob
import hashlib
import logging
import mmap
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from astropy import units as u
from astropy.io import fits

from ._astropy_log import astropy_log_kept
from ._geometry import (
    BOX_OK,
    DISTORTION_TOL,
    angles_in_pixels,
    compute_boxes,
    near_rounding_boundary,
)
from .exceptions import TileError

__all__ = [
    "Assignment",
    "BandFile",
    "Tile",
    "TileIndex",
    "TilePixels",
    "close_kept_maps",
    "missing_band_message",
    "open_pixels",
    "sky_to_pixel",
]

logger = logging.getLogger(__name__)

# numpy type codes of the FITS BITPIX values
_BITPIX_CODES = {8: "u1", 16: "i2", 32: "i4", 64: "i8", -32: "f4", -64: "f8"}
# header keywords that name the band, in order of preference
_BAND_KEYWORDS = ("BAND", "FILTER", "FILTNAME")
# Euclid MER names: EUC_MER_BGSUB-MOSAIC-NIR-H_TILE102018211-...
_BAND_FROM_NAME = re.compile(r"MOSAIC-([A-Z0-9-]+?)_TILE")
_TILE_FROM_NAME = re.compile(r"TILE(\d+)")
_FITS_ENDINGS = (".fits", ".fit", ".fts", ".fz", ".gz")
_DICT_FORMAT = "cutana.TileIndex"
_DICT_VERSION = 1


# --------------------------------------------------------------------------
# headers and WCS (cached by header text: BandFile is frozen and hashable)
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _parse_header(text):
    """The `~astropy.io.fits.Header` of a header string (cached, shared).

    Its cards are all parsed here, quietly: what astropy warns of in a
    header (a card it cannot parse, say) was logged when its file was
    indexed, and parsing it again (in a worker process, or once the cache
    has let it go) must not warn, nor fail where warnings are errors.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = fits.Header.fromstring(text)
        for card in header.cards:
            try:
                card.value  # noqa: B018 - parsed now, not later
            except Exception:  # noqa: BLE001, S110 - unparsable: as astropy leaves it
                pass
    return header


@functools.lru_cache(maxsize=1024)
def _wcs_and_notes(text):
    """The celestial `~astropy.wcs.WCS` of a header string, and what astropy
    logged (not warned) while making it, one line per message: e.g. that
    the header has SIP coefficients but no ``-SIP`` in its CTYPE, which
    `_read_record` reports with the file's name (cached, shared)."""
    from astropy.wcs import WCS  # (not at import: workers need no WCS to cut)

    header = _parse_header(text)
    with astropy_log_kept() as notes, warnings.catch_warnings():
        # header fix-ups (DATE-OBS, RADESYS...) are routine for survey tiles,
        # and what else WCS warns of was logged when the file was indexed
        warnings.simplefilter("ignore")
        wcs = WCS(header).celestial
    if wcs.naxis == 2 and header.get("NAXIS1") is not None and header.get("NAXIS2"):
        wcs.pixel_shape = (int(header["NAXIS1"]), int(header["NAXIS2"]))
    return wcs, tuple(notes)


def _celestial_wcs(text):
    """The celestial `~astropy.wcs.WCS` of a header string (cached, shared)."""
    return _wcs_and_notes(text)[0]


def _world_order(wcs, lon, lat):
    """Arrange longitude/latitude arrays in the axis order of ``wcs``."""
    return (lat, lon) if wcs.wcs.lng == 1 else (lon, lat)


def _lonlat(wcs, world):
    """Pick longitude and latitude from world arrays in ``wcs`` axis order."""
    return (world[1], world[0]) if wcs.wcs.lng == 1 else (world[0], world[1])


def _frame_of(wcs):
    """The celestial frame of ``wcs`` when it is not ICRS, else None.

    None also for a WCS whose frame astropy cannot name: its coordinates
    are then taken as they are.
    """
    from astropy.coordinates import ICRS
    from astropy.wcs.utils import wcs_to_celestial_frame

    try:
        frame = wcs_to_celestial_frame(wcs)
    except ValueError:
        return None
    return None if isinstance(frame, ICRS) else frame


def _icrs_to(frame, ra, dec):
    """ICRS ``ra``, ``dec`` (degrees) as longitude and latitude (degrees) in
    ``frame`` (None: ICRS), converted as `~astropy.wcs.utils.skycoord_to_pixel`
    converts a `~astropy.coordinates.SkyCoord`: for FK5 and FK4 tiles (e.g.
    headers with ``EQUINOX`` and no ``RADESYS``) and Galactic ones."""
    if frame is None:
        return ra, dec
    from astropy.coordinates import SkyCoord

    sph = SkyCoord(ra, dec, unit="deg", frame="icrs").transform_to(frame).spherical
    return sph.lon.to_value(u.deg), sph.lat.to_value(u.deg)


def _to_icrs(frame, lon, lat):
    """The inverse of `_icrs_to`: ``frame`` longitude and latitude to ICRS."""
    if frame is None:
        return lon, lat
    from astropy.coordinates import SkyCoord

    sph = SkyCoord(lon, lat, unit="deg", frame=frame).icrs.spherical
    return sph.lon.to_value(u.deg), sph.lat.to_value(u.deg)


# --------------------------------------------------------------------------
# band files and tiles
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BandFile:
    """One band of one tile: a 2-D image HDU in a FITS file.

    Attributes
    ----------
    band : str
        Band name (from the ``BAND``, ``FILTER`` or ``FILTNAME`` keyword, else
        from the file name).
    path : str
        Local path or fsspec URL, as given.
    hdu : int or str
        Index (or name) of the image HDU in the file.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    dtype : str
        Numpy dtype string of the values `open_pixels` returns: as stored
        for uncompressed images (e.g. ``'>f4'``), native for compressed ones.
        Values are raw: ``BSCALE``/``BZERO`` are not applied.
    header : str
        The HDU header as a string (`astropy.io.fits.Header.tostring`).
    compressed : bool
        Whether the HDU is a tile-compressed image (`~astropy.io.fits.CompImageHDU`).
    primary_header : str
        The primary header as a string when the image is in an extension
        (keywords such as the zero point may be there), else ``''``.

    Examples
    --------
    Band files are made by `TileIndex.from_paths`:

    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.tiles import TileIndex
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> index = TileIndex.from_paths(survey.paths)
    >>> band = index.tiles[0].bands[0]
    >>> band.band, band.hdu, band.shape, band.dtype, band.compressed
    ('VIS', 0, (512, 512), '>f4', False)
    >>> band.is_remote, band.zeropoint(), round(band.pixel_scale_arcsec(), 3)
    (False, 24.6, 0.1)
    >>> BandFile.from_dict(band.to_dict()) == band
    True
    """

    band: str
    path: str
    hdu: int | str
    shape: tuple
    dtype: str
    header: str
    compressed: bool = False
    primary_header: str = ""

    def fits_header(self):
        """Return the header as a new `~astropy.io.fits.Header`.

        Returns
        -------
        header : `~astropy.io.fits.Header`
            A copy, free to modify.
        """
        return _parse_header(self.header).copy()

    def wcs(self):
        """Return the celestial WCS of the image.

        Returns
        -------
        wcs : `~astropy.wcs.WCS`
            The celestial part of the header's WCS, with ``pixel_shape`` set.
            The object is cached and shared between calls: treat it as
            read-only (``wcs.deepcopy()`` before modifying it).
        """
        return _celestial_wcs(self.header)

    def pixel_scale_arcsec(self):
        """Return the mean pixel scale in arcseconds per pixel.

        Returns
        -------
        scale : float
            Mean of the two projection-plane pixel scales at the reference
            point, e.g. for converting diameters in arcsec to pixels.
        """
        return _mean_scale_arcsec(self.wcs())

    def angle_in_pixels(self, arcsec):
        """Return angular diameters as pixels of this file's grid.

        As `astropy.nddata.Cutout2D` converts an angular size, to the last
        bit (which decides how a size of about a half-integer number of
        pixels rounds): the angle over the projection-plane pixel scale.
        For pixels that are not square, where ``Cutout2D`` gives each axis
        its own count, the angle over the mean scale
        (`pixel_scale_arcsec`): cutana's boxes are square.

        Parameters
        ----------
        arcsec : float or array-like
            Diameters in arcseconds.

        Returns
        -------
        pixels : `~numpy.ndarray` of float64
            The diameters in pixels, not rounded.
        """
        return _angle_in_pixels(self.wcs(), arcsec)

    def zeropoint(self, keyword="MAGZERO"):
        """Return the photometric zero point from the header.

        Parameters
        ----------
        keyword : str, optional
            Header keyword holding the AB zero point.

        Returns
        -------
        zeropoint : float or None
            The value, or None if the keyword is absent.

        Raises
        ------
        TileError
            If the keyword is present but not a finite number.

        Notes
        -----
        The image HDU's header is looked at first, then, for an image in an
        extension, the primary header (as for the band and tile keywords).
        """
        raw = _parse_header(self.header).get(keyword)
        if raw is None and self.primary_header:
            raw = _parse_header(self.primary_header).get(keyword)
        if raw is None or isinstance(raw, fits.card.Undefined):
            return None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = np.nan
        if isinstance(raw, bool) or not np.isfinite(value):
            msg = (
                f"{self.path}: header keyword {keyword} = {raw!r} is not a zero point "
                "(a finite number)"
            )
            raise TileError(msg)
        return value

    @property
    def is_remote(self):
        """True if ``path`` is an fsspec URL that is not a local file."""
        return _local_path(self.path) is None

    def to_dict(self):
        """Return a JSON-serialisable dict of this band file.

        Returns
        -------
        d : dict
            Inverse of `BandFile.from_dict`.
        """
        return {
            "band": self.band,
            "path": self.path,
            "hdu": self.hdu,
            "shape": [int(v) for v in self.shape],
            "dtype": self.dtype,
            "header": self.header,
            "compressed": bool(self.compressed),
            "primary_header": self.primary_header,
        }

    @classmethod
    def from_dict(cls, d):
        """Build a `BandFile` from `BandFile.to_dict` output.

        Parameters
        ----------
        d : dict
            As returned by `BandFile.to_dict`.

        Returns
        -------
        band_file : `BandFile`
            The band file.
        """
        return cls(
            band=d["band"],
            path=d["path"],
            hdu=d["hdu"],
            shape=tuple(int(v) for v in d["shape"]),
            dtype=d["dtype"],
            header=d["header"],
            compressed=bool(d["compressed"]),
            primary_header=d.get("primary_header", ""),
        )


@dataclass(frozen=True)
class Tile:
    """One sky tile: one `BandFile` per band of the index.

    Attributes
    ----------
    key : str
        Sky-tile identifier (``TILEID``, the digits of ``TILE<digits>`` in the
        file name, or a ``wcs-...`` fingerprint).
    bands : tuple
        `BandFile` per band, in `TileIndex.bands` order; None where the tile
        has no file for a band.
    shape : tuple of int
        ``(ny, nx)`` of the reference (first available) band.
    problems : tuple of (str, str)
        ``(band, reason)`` for each band whose file the index left out
        (e.g. one whose WCS cannot be read), so that
        `missing_band_message` can say why.
    own_grid : tuple of int
        Indices of the bands whose files are on a pixel grid of their own
        (another shape, pixel scale or WCS than the reference band's):
        their cutouts are cut at each source's own position in that file
        (`TileIndex.band_pixels`), with the reference band's box size (or,
        for sizes in arcseconds resampled to one size, the angle at that
        file's own pixel scale).

    Examples
    --------
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.tiles import TileIndex
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> index = TileIndex.from_paths(survey.paths)
    >>> tile = index.tiles[0]
    >>> tile.key, tile.shape, len(tile.bands)
    ('102000001', (512, 512), 4)
    >>> [b.band for b in tile.bands]
    ['VIS', 'NIR-Y', 'NIR-J', 'NIR-H']
    >>> tile.reference is tile.bands[0], tile.missing_bands, tile.same_grid
    (True, (), True)
    >>> round(tile.pixel_scale_arcsec(), 3), tile.wcs().pixel_shape
    (0.1, (512, 512))
    """

    key: str
    bands: tuple
    shape: tuple = field(default=None, compare=False)
    problems: tuple = field(default=(), compare=False)
    own_grid: tuple = field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "bands", tuple(self.bands))
        if self.shape is None:
            object.__setattr__(self, "shape", tuple(self.reference.shape))

    @property
    def reference(self):
        """The first available `BandFile` (its WCS is the tile's WCS)."""
        for band in self.bands:
            if band is not None:
                return band
        msg = f"tile {self.key!r} has no band file"
        raise ValueError(msg)

    @property
    def missing_bands(self):
        """Indices of the bands this tile has no file for."""
        return tuple(i for i, b in enumerate(self.bands) if b is None)

    @property
    def same_grid(self):
        """True if all band files share the reference band's shape and WCS."""
        ref = self.reference
        return all(
            _grid_difference(ref, band) is None
            for band in self.bands
            if band is not None and band is not ref
        )

    def pixel_scale_arcsec(self):
        """Return the mean pixel scale of the reference band in arcsec per pixel.

        Returns
        -------
        scale : float
            See `BandFile.pixel_scale_arcsec`.
        """
        return self.reference.pixel_scale_arcsec()

    def angle_in_pixels(self, arcsec):
        """Return angular diameters in arcseconds (float or array-like) as
        pixels of the reference band: a float64 array, see
        `BandFile.angle_in_pixels`."""
        return self.reference.angle_in_pixels(arcsec)

    def wcs(self):
        """Return the celestial WCS of the reference band.

        Returns
        -------
        wcs : `~astropy.wcs.WCS`
            Shared, read-only (see `BandFile.wcs`).
        """
        return self.reference.wcs()


@dataclass
class Assignment:
    """Which tile holds each source, and where.

    Attributes
    ----------
    tile : `~numpy.ndarray` of int32
        Index into `TileIndex.tiles`, -1 if the source's cutout overlaps no
        tile (or its coordinates are not finite).
    x, y : `~numpy.ndarray` of float64
        0-based pixel position in that tile's reference band (NaN if none).
    inside : `~numpy.ndarray` of bool
        Whether the whole cutout lies inside the tile.
    file_error : `~numpy.ndarray` of bool
        Only for `TileIndex.assign_by_files`: the row's tile files could not
        be indexed (a tile error, not "no overlap"). All False otherwise.
    messages : dict
        Row to message for rows with ``file_error``.

    Examples
    --------
    An assignment is made by `TileIndex.assign` (or
    `TileIndex.assign_by_files`):

    >>> import numpy as np
    >>> from cutana.catalog import read_catalog
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.tiles import TileIndex
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> index = TileIndex.from_paths(survey.paths)
    >>> cat = read_catalog(survey.catalogue_path)
    >>> a = index.assign(cat.ra, cat.dec, np.full(len(cat), 16.0))
    >>> len(a), a.tile.dtype, a.x.dtype
    (40, dtype('int32'), dtype('float64'))
    >>> int((a.tile >= 0).sum()), int(a.inside.sum()), bool(a.file_error.any())
    (38, 37, False)
    >>> bool(np.isnan(a.x[a.tile < 0]).all())
    True
    """

    tile: np.ndarray
    x: np.ndarray
    y: np.ndarray
    inside: np.ndarray
    file_error: np.ndarray = None
    messages: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.file_error is None:
            self.file_error = np.zeros(len(self.tile), dtype=bool)

    def __len__(self):
        return len(self.tile)


# --------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------


def _reason(exc):
    """One-line text of an exception: its type and message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _local_path(path):
    """The local file path of ``path``, or None for a non-local fsspec URL."""
    path = os.fspath(path)
    if "://" not in path:
        return path
    import fsspec.core

    protocol, rest = fsspec.core.split_protocol(path)
    if protocol in (None, "file", "local"):
        return rest
    return None


def _is_fits_name(name):
    return name.lower().endswith(_FITS_ENDINGS)


def _expand(paths):
    """Expand globs and folders; return ``(paths, errors)`` in a stable order."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out, errors = [], []
    for entry in paths:
        entry = os.fspath(entry)
        local = _local_path(entry)
        if local is None:
            if glob.has_magic(entry.split("://", 1)[1]):
                import fsspec.core

                fs, pattern = fsspec.core.url_to_fs(entry)
                found = sorted(fs.glob(pattern))
                if not found:
                    errors.append((entry, f"{entry}: no file matches this pattern"))
                out.extend(fs.unstrip_protocol(p) for p in found)
            else:
                out.append(entry)
        elif glob.has_magic(local):
            found = sorted(glob.glob(os.path.expanduser(local)))
            if not found:
                errors.append((entry, f"{entry}: no file matches this pattern"))
            out.extend(_absolute(found))
        elif os.path.isdir(local):
            found = sorted(
                os.path.join(local, n) for n in os.listdir(local) if _is_fits_name(n)
            )
            if not found:
                errors.append((entry, f"{entry}: folder holds no FITS file"))
            out.extend(_absolute(found))
        else:
            out.extend(_absolute([entry]) if entry == local else [entry])
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique, errors


def _absolute(paths):
    """Local paths made absolute, so that workers in another working folder
    (those of a Dask cluster, say) open the same files."""
    return [os.path.abspath(os.path.expanduser(p)) for p in paths]


def _stem(path):
    """File name without directory and FITS/compression endings."""
    name = os.path.basename(path.rstrip("/"))
    changed = True
    while changed:
        changed = False
        for ending in _FITS_ENDINGS:
            if name.lower().endswith(ending) and len(name) > len(ending):
                name = name[: -len(ending)]
                changed = True
    return name


def _band_from_name(path):
    """Band name from a Euclid file name (``MOSAIC-<band>_TILE``), or None."""
    match = _BAND_FROM_NAME.search(os.path.basename(path))
    return match.group(1) if match else None


#: Seconds of reading tile headers after which `TileIndex.from_paths` and
#: `TileIndex.from_file_lists` show their progress bar, when asked to.
INDEX_PROGRESS_DELAY = 1.0


def _indexing(paths, progress):
    """``paths``, with a progress bar over them if ``progress``."""
    if not progress or not paths:
        return paths
    from tqdm.auto import tqdm

    return tqdm(
        paths, desc="indexing tiles", unit="file", delay=INDEX_PROGRESS_DELAY,
        leave=False,
    )


def _bands_from_stems(groups):
    """Band names for files that name none, when their whole names do not
    line up as bands across tiles (tile key -> `_Record` list, changed in
    place).

    A file with no band keyword and no Euclid name is its own band, named
    after the file: ``field1.fits`` and ``field2.fits`` of two tiles would be
    two bands, each missing from the other tile, and no source could be
    cut; ``g/T0.fits`` and ``r/T0.fits`` would be two files of one band.
    When no file of any tile names its band, and either there are several
    tiles whose file names do not give every tile the same bands, or two
    files of one tile have the same name:

    - files alone on their tile are one band, named after the start (else
      the end) their names share, without separators and digits
      (``field1``, ``field2``: ``field``), else ``image``; unless two of
      them have their centres within half an image of each other (then
      they are bands of one field on different pixel grids, not tiles);
    - otherwise the band of a file is what is left of its path (from the
      folder all files share, without ending) once the start and the end
      that all files of its tile share are taken off, cut at ``/``, ``_``,
      ``.`` or blanks (``T0_g``, ``T0_NIR-H``: ``g``, ``NIR-H``; ``g/T0``,
      ``r/T0``: ``g``, ``r``), else also at ``-`` (``T0-g``, ``T0-r``), if
      that gives each tile distinct bands and all tiles no more bands than
      the largest tile has files. The file of a tile with one file (its
      others unreadable, say) takes the one band that is a word of its
      name (``T2_r``: ``r``).

    Otherwise the names stay as they are.
    """
    recs = [r for group in groups.values() for r in group]
    if not recs or any(r.named for r in recs):
        return
    same_name = any(len({r.band for r in g}) < len(g) for g in groups.values())
    if not same_name and (
        len(groups) < 2
        or len({frozenset(r.band for r in g) for g in groups.values()}) == 1
    ):
        return  # the names already give every tile the same bands
    sizes = {len(group) for group in groups.values()}
    if sizes == {1}:
        if _one_field(recs):
            return  # images of one field: bands on other grids, not tiles
        band = _shared_name([r.band for r in recs])
        logger.info(
            "%d tiles of one file each, none naming its band: band %r for all",
            len(recs), band,
        )
        for r in recs:
            r.band = band
        return
    names = _relative_names(recs)
    for separators in _BAND_SEPARATORS:
        derived = _differing_parts(groups, names, separators)
        if derived is not None:
            break
    else:
        return
    logger.info(
        "no tile file names its band: bands %s from the parts of the file "
        "names that differ within a tile",
        sorted({b for bands in derived.values() for b in bands}),
    )
    for key, bands in derived.items():
        for r, band in zip(groups[key], bands, strict=True):
            r.band = band


#: Where the parts of file names that name bands are cut (`_differing_parts`):
#: first at ``/``, ``_``, ``.`` and blanks (``NIR-H`` stays whole), else also
#: at ``-``.
_BAND_SEPARATORS = ("/_. \t", "/_. \t-")


def _relative_names(recs):
    """Each file's path from the folder all of them share, without ending
    (`_bands_from_stems`; by record identity)."""
    folders = [re.split(r"/+", r.path.replace(os.sep, "/"))[:-1] for r in recs]
    shared = 0
    while all(len(f) > shared for f in folders) and len(
        {f[shared] for f in folders}
    ) == 1:
        shared += 1
    return {
        id(r): "/".join([*f[shared:], r.band])
        for r, f in zip(recs, folders, strict=True)
    }


def _differing_parts(groups, names, separators):
    """Per tile key, the bands of its files from what their names do not
    share, cut at ``separators``; None if they do not make consistent
    bands (`_bands_from_stems`)."""

    def trim_start(text):  # up to and including its last separator
        cut = max(text.rfind(c) for c in separators)
        return text[: cut + 1]

    derived, single = {}, []
    for key, group in groups.items():
        if len(group) == 1:
            single.append(key)
            continue
        full = [names[id(r)] for r in group]
        start = len(trim_start(os.path.commonprefix(full)))
        tails = [n[start:][::-1] for n in full]
        end = len(trim_start(os.path.commonprefix(tails)))
        parts = [t[end:][::-1].strip(separators) for t in tails]
        if len(set(parts)) != len(parts) or "" in parts:
            return None
        derived[key] = parts
    known = {b for bands in derived.values() for b in bands}
    if len(known) > max(len(g) for g in groups.values()):
        return None
    for key in single:  # a tile with one file (its others unreadable, say)
        words = re.split("[" + re.escape(separators) + "]+", names[id(groups[key][0])])
        hits = known.intersection(words)
        if len(hits) != 1:
            return None
        derived[key] = [hits.pop()]
    return derived


def _one_field(recs):
    """Whether the centre of one file's image lies within half an image
    (the smaller's shorter side) of another's (`_bands_from_stems`); also
    when a centre cannot be placed in ICRS."""
    close = _close_centres(recs)
    return close is None or bool(close.any())


def _close_centres(recs):
    """``(n, n)`` bool: whether the centres of two files' images lie within
    half an image (the smaller's shorter side) of each other (False on the
    diagonal); None when a centre cannot be placed in ICRS."""
    from astropy.coordinates import SkyCoord

    centres, half = [], []
    for r in recs:
        w = _celestial_wcs(r.header)
        ny, nx = r.shape
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                centres.append(w.pixel_to_world((nx - 1) / 2, (ny - 1) / 2).icrs)
        except Exception:  # noqa: BLE001 - a frame astropy cannot convert
            return None
        scale = min(q.to_value(u.deg) for q in w.proj_plane_pixel_scales())
        half.append(0.5 * min(nx, ny) * scale)
    sky = SkyCoord(
        [c.ra.deg for c in centres], [c.dec.deg for c in centres], unit="deg"
    )
    i, j, sep, _ = sky.search_around_sky(sky, max(half) * u.deg)
    half = np.asarray(half)
    keep = (i != j) & (sep.deg < np.minimum(half[i], half[j]))
    close = np.zeros((len(recs), len(recs)), dtype=bool)
    close[i[keep], j[keep]] = True
    return close


def _join_fields(groups):
    """Join the files of one field on different pixel grids into one tile
    (tile key -> `_Record` list, changed in place).

    Files with no tile id are grouped by their pixel grid (``wcs-...``
    keys), so that the bands of one field on grids of their own (``g`` at
    0.2″ and ``r`` at 0.3″ per pixel, say) would be tiles of one band each,
    each missing the other's band. Two such groups are one tile when their
    bands differ and their images' centres lie within half an image of each
    other (`_close_centres`); the tile keeps the key of the group whose files
    came first, and the files their order.
    """
    keys = [k for k in groups if k.startswith("wcs-")]  # in the files' order
    if len(keys) < 2:
        return
    close = _close_centres([groups[k][0] for k in keys])
    if close is None:
        return  # (a centre that cannot be placed: the grids stay apart)
    for k, key in enumerate(keys):
        if key not in groups:
            continue
        for m in np.flatnonzero(close[k, k + 1 :]).tolist():
            other = keys[k + 1 + m]
            if other not in groups:
                continue
            mine = {r.band for r in groups[key]}
            if mine & {r.band for r in groups[other]}:
                continue
            logger.info(
                "files %s and %s are one field on different pixel grids: one tile",
                [r.path for r in groups[key]], [r.path for r in groups[other]],
            )
            groups[key].extend(groups.pop(other))


def _shared_name(stems):
    """What file names without ending share, as a band name (see
    `_bands_from_stems`)."""
    strip = "-_. \t0123456789"
    start = os.path.commonprefix(stems).rstrip(strip)
    end = os.path.commonprefix([s[::-1] for s in stems])[::-1].lstrip(strip)
    return start or end or "image"


def _wcs_fingerprint(wcs, shape):
    """A key identifying a pixel grid on the sky (rounded WCS + shape)."""
    values = (
        tuple(str(c) for c in wcs.wcs.ctype),
        tuple(np.round(wcs.wcs.crval, 7).tolist()),
        tuple(np.round(wcs.wcs.crpix, 3).tolist()),
        tuple(np.round(wcs.pixel_scale_matrix.ravel() * 3600.0, 7).tolist()),
        tuple(int(v) for v in shape),
    )
    return "wcs-" + hashlib.sha1(repr(values).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------
# reading one file's header
# --------------------------------------------------------------------------


@dataclass
class _Record:
    """What indexing learned about one file."""

    path: str
    band: str
    named: bool  # band from a header keyword or the file name
    name_band: str
    key: str
    hdu: int | str
    shape: tuple
    dtype: str
    header: str
    compressed: bool
    primary_header: str = ""
    wcs_notes: tuple = ()  # what astropy logged of the file's WCS

    def band_file(self, band=None):
        return BandFile(
            band=self.band if band is None else band,
            path=self.path,
            hdu=self.hdu,
            shape=self.shape,
            dtype=self.dtype,
            header=self.header,
            compressed=self.compressed,
            primary_header=self.primary_header,
        )


def _open_fits(path, **kwargs):
    """Open a local file or fsspec URL with astropy (headers read lazily)."""
    local = _local_path(path)
    if local is None:
        return fits.open(path, use_fsspec=True, lazy_load_hdus=True, **kwargs)
    if not os.path.exists(local):
        msg = "file does not exist"
        raise FileNotFoundError(msg)
    # astropy leaves the file open when the first header cannot be parsed
    # (e.g. a corrupt NAXIS card): open it here so that it is always closed,
    # also when astropy wraps it (gzip) and would not close it itself
    fh = open(local, "rb")  # noqa: SIM115 - closed with the HDUList
    try:
        hdul = fits.open(fh, lazy_load_hdus=True, **kwargs)
    except BaseException:
        fh.close()
        raise
    close = hdul.close

    def close_file_too(*args, **kwargs):
        try:
            close(*args, **kwargs)
        finally:
            fh.close()

    hdul.close = close_file_too
    return hdul


def _file_size(path, hdul):
    """Size in bytes of the file behind ``hdul``."""
    local = _local_path(path)
    if local is not None:
        return os.path.getsize(local)
    import fsspec.core

    fs, fpath = fsspec.core.url_to_fs(path)
    return fs.size(fpath)


def _is_image_2d(hdu):
    return (
        isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU)
        and len(hdu.shape) == 2
        and min(hdu.shape) > 0
    )


def _raw_data_bytes(hdu, fileinfo):
    """Bytes of stored data of ``hdu`` (without the final FITS padding)."""
    if isinstance(hdu, fits.CompImageHDU):
        bintable = getattr(hdu, "_bintable", None)
        if bintable is not None:
            h = bintable.header
            return int(h["NAXIS1"]) * int(h["NAXIS2"]) + int(h.get("PCOUNT", 0))
        return int(fileinfo["datSpan"])
    h = hdu.header
    n = abs(int(h["BITPIX"])) // 8
    size = int(np.prod([int(h[f"NAXIS{k}"]) for k in range(1, int(h["NAXIS"]) + 1)]))
    return n * int(h.get("GCOUNT", 1)) * (int(h.get("PCOUNT", 0)) + size)


def _check_complete(path, hdul, index, hdu):
    """Raise TileError if the file ends before the data of HDU ``index``.

    Files compressed as a whole (gzip, bzip2, ...) are not checked: offsets
    refer to the decompressed stream, and astropy reports their truncation
    when the data are read.
    """
    info = hdul.fileinfo(index)
    if getattr(info["file"], "compression", None):
        return
    need = int(info["datLoc"]) + _raw_data_bytes(hdu, info)
    have = _file_size(path, hdul)
    if have < need:
        msg = (
            f"{path}: file is truncated: {have} bytes, but the data of HDU {index} "
            f"end at byte {need}"
        )
        raise TileError(msg)


def _find_image(path, hdul, hdu):
    """Return ``(index, hdu_object)`` of the image HDU to use."""
    if hdu is not None:
        try:
            h = hdul[hdu]
        except (IndexError, KeyError) as exc:
            msg = f"{path}: no HDU {hdu!r} ({exc})"
            raise TileError(msg) from exc
        index = hdul.index(h) if not isinstance(hdu, int) else hdu
        if not _is_image_2d(h):
            shape = getattr(h, "shape", None)
            msg = f"{path}: HDU {hdu!r} is not a 2-D image (shape {shape})"
            raise TileError(msg)
        return index, h
    i = 0
    while True:
        try:
            h = hdul[i]
        except IndexError:
            break
        if _is_image_2d(h):
            return i, h
        i += 1
    msg = f"{path}: no 2-D image HDU among its {i} HDU(s)"
    raise TileError(msg)


def _header_value(headers, keywords):
    """First non-empty value of ``keywords`` in ``headers`` (in order), or None."""
    for keyword in keywords:
        for header in headers:
            value = header.get(keyword)
            if value is not None and not isinstance(value, bool) and str(value).strip():
                return str(value).strip()
    return None


class _Unreadable(TileError):
    """A file whose header places its image on the sky, but whose pixels
    cannot be read (truncated): not indexed, but the sources it holds are
    tile errors, not sources off every tile (`TileIndex.on_unreadable`)."""

    def __init__(self, message, wcs, shape, key=None, band=None):
        super().__init__(message)
        self.wcs = wcs
        self.shape = tuple(shape)
        self.key = key  # the tile and band it would be (`_Record`)
        self.band = band


def _read_record(path, hdu=None):
    """Index one file from its headers; raise TileError with the reason."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _open_fits(path) as hdul:
                index, h = _find_image(path, hdul, hdu)
                try:
                    _check_complete(path, hdul, index, h)
                    unreadable = None
                except TileError as exc:  # (its header may still place it)
                    unreadable = str(exc)
                header = h.header
                primary = hdul[0].header if index != 0 else header
                compressed = isinstance(h, fits.CompImageHDU)
                shape = tuple(int(v) for v in h.shape)
                code = _BITPIX_CODES.get(int(header["BITPIX"]))
                if code is None:
                    msg = f"{path}: unsupported BITPIX {header['BITPIX']!r}"
                    raise TileError(msg)
                dtype = (
                    np.dtype(code).str
                    if compressed
                    else np.dtype(code).newbyteorder(">").str
                )
                text = header.tostring()
                primary_text = primary.tostring() if index != 0 else ""
                band = _header_value([header, primary], _BAND_KEYWORDS)
                tile_id = _header_value([header, primary], ("TILEID",))
                hdu_id = index if hdu is None or isinstance(hdu, int) else hdu
        for w in caught:
            logger.debug("%s: %s", path, w.message)
    except TileError:
        raise
    except FileNotFoundError as exc:
        msg = f"{path}: file does not exist"
        raise TileError(msg) from exc
    except Exception as exc:  # any failure to parse a corrupt file is reported
        msg = f"{path}: cannot read FITS header ({_reason(exc)})"
        raise TileError(msg) from exc

    # a damaged header warns about every unparsable card: keep that out of
    # the user's terminal (and out of the result when warnings are errors)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            wcs, notes = _wcs_and_notes(text)
        except Exception as exc:  # invalid WCS keywords raise many exception types
            msg = f"{path}: invalid WCS ({_reason(exc)})"
            raise TileError(msg) from exc
        if wcs.naxis != 2 or not wcs.has_celestial:
            ctypes = [header.get(f"CTYPE{k}") for k in (1, 2)]
            msg = (
                f"{path}: no celestial WCS in HDU {hdu_id!r} "
                f"(CTYPE1, CTYPE2 = {ctypes})"
            )
            raise TileError(msg)
        ny, nx = shape
        try:
            with np.errstate(invalid="ignore"):
                centre = wcs.all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0)
        except Exception as exc:  # wcslib errors (singular matrix, ...) vary
            msg = f"{path}: invalid WCS ({_reason(exc)})"
            raise TileError(msg) from exc
    for w in caught:
        logger.debug("%s: %s", path, w.message)
    if not np.all(np.isfinite(centre)):
        msg = f"{path}: the WCS gives no sky position for the image centre"
        raise TileError(msg)
    name_band = _band_from_name(path)
    named = band is not None or name_band is not None  # not just the file's stem
    if band is None:
        band = name_band if name_band is not None else _stem(path)
    if tile_id is None:
        match = _TILE_FROM_NAME.search(os.path.basename(path))
        tile_id = match.group(1) if match else _wcs_fingerprint(wcs, shape)
    if unreadable is not None:
        raise _Unreadable(unreadable, wcs, shape, key=tile_id, band=band)
    return _Record(
        path=path,
        band=band,
        named=named,
        name_band=name_band,
        key=tile_id,
        hdu=hdu_id,
        shape=shape,
        dtype=dtype,
        header=text,
        compressed=compressed,
        primary_header=primary_text,
        wcs_notes=notes,
    )


def _report_wcs_notes(records):
    """Report once what astropy logged of the WCS of the files indexed
    (each file at INFO level, all of them in one warning), with the files'
    names: astropy prints such a message, without them, for each file (say
    SIP coefficients under a CTYPE without ``-SIP``, which astropy applies,
    as `~astropy.nddata.Cutout2D` does)."""
    noted = [r for r in records if r.wcs_notes]
    for r in noted:
        for note in r.wcs_notes:
            logger.info("%s: astropy.wcs: %s", r.path, note)
    if noted:
        first = noted[0].wcs_notes[0]
        short = ". ".join(first.split(". ")[:2]).rstrip(".")
        logger.warning(
            "astropy.wcs reports on the WCS of %d tile file(s), e.g. %s: %s "
            "(cutana uses the WCS as astropy makes it; each file is listed "
            "at INFO level)", len(noted), noted[0].path, short,
        )


def _unnamed_positions(tuples, records, n_pos):
    """Band names for the positions of file lists whose files name no band
    (`TileIndex.from_file_lists`): what differs between the paths of the
    first list with a readable file at every position (``T0_g.fits``,
    ``T0_r.fits``: ``g``, ``r``), as `_bands_from_stems` reads them; None
    when some file names its band, or when no start or end that the paths
    share (up to a separator) can be taken off to leave distinct names."""
    if n_pos < 2 or any(r.named for r in records.values()):
        return None
    for files in tuples:
        if len(files) == n_pos and all(p in records for p in files):
            recs = [records[p] for p in files]
            break
    else:
        return None
    names = _relative_names(recs)
    whole = [names[id(r)] for r in recs]
    for separators in _BAND_SEPARATORS:
        parts = _differing_parts({0: recs}, names, separators)
        if parts is not None and parts[0] != whole:  # a shared start or end
            return parts[0]
    return None


def _warn_band_order(tuples, records, names):
    """Warn when file lists name their bands in another order than the
    first: bands are positional, so such files fill the channel of their
    position, not of their band."""
    first = {}  # position -> the band named first there
    moved, example = 0, None
    for files in tuples:
        for pos, path in enumerate(files):
            rec = records.get(path)
            if rec is None or not rec.named:
                continue
            if first.setdefault(pos, rec.band) != rec.band:
                moved += 1
                example = example or (path, rec.band, pos, names[pos])
                break
    if moved:
        path, band, pos, name = example
        logger.warning(
            "%d of %d tile file lists hold a band at another position than the "
            "first list, e.g. %s (band %s) at position %d, which is channel %s: "
            "bands are positional (as in ESA Cutana), so its pixels go to "
            "channel %s", moved, len(tuples), path, band, pos, name, name,
        )


def _positions_most_list(fits_file_paths, tuples, names):
    """How many band positions are the bands by default: the most that at
    least half the rows with a file list list (every position when the
    lists are as long). Longer lists keep their further files out of the
    bands, with a warning: one row listing a file too many made that file
    a band, for which every other row was then a bad row."""
    n_pos = len(names)
    if len({len(files) for files in tuples}) < 2:  # (rows are counted only then)
        return n_pos
    rows_of = Counter(map(len, filter(None, fits_file_paths)))
    total = sum(rows_of.values())
    n = n_pos
    while n > 1 and 2 * sum(c for k, c in rows_of.items() if k >= n) < total:
        n -= 1
    if n < n_pos:
        row, files = next(
            (r, f) for r, f in enumerate(fits_file_paths) if f and len(f) > n
        )
        logger.warning(
            "%d of %d rows list more than the %d file(s) at least half the rows "
            "list (e.g. row %d: %d files): the bands are the first %d position(s), "
            "%s; their further files are not cut (give --bands to choose among "
            "%s)", sum(c for k, c in rows_of.items() if k > n), total, n, row,
            len(files), n, ", ".join(names[:n]), ", ".join(names),
        )
    return n


def _closest_hint(name, choices):
    import difflib

    same_case = [c for c in choices if c.lower() == name.lower()]
    match = same_case or difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


def _check_bands(requested, found, errors):
    """Raise ValueError if a requested band was found nowhere."""
    for band in requested:
        if band not in found:
            msg = (
                f"band {band!r} was found in no tile file; bands found: "
                f"{', '.join(map(repr, found)) or 'none'}."
                + _closest_hint(band, list(found))
            )
            if errors:
                msg += (
                    f" ({len(errors)} file(s) could not be indexed, "
                    f"e.g. {errors[0][1]})"
                )
            raise ValueError(msg)


# --------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------


class TileIndex:
    """The tiles of a survey, their band files and their sky footprints.

    Parameters
    ----------
    tiles : list of `Tile`
        The tiles, each with one entry per band of ``bands``.
    bands : list of str
        Band names, in output channel order.
    errors : list of tuple, optional
        ``(path, message)`` of files that could not be indexed.
    file_lists : dict, optional
        For indexes built by `TileIndex.from_file_lists`: tuple of paths to
        tile index (-1 if its files could not be indexed).

    Notes
    -----
    Build an index with `TileIndex.from_paths` (``--tiles``) or
    `TileIndex.from_file_lists` (ESA Cutana's ``fits_file_paths`` column).

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.catalog import read_catalog
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.tiles import TileIndex
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> index = TileIndex.from_paths(survey.paths)
    >>> index
    <TileIndex: 4 tile(s), bands ['VIS', 'NIR-Y', 'NIR-J', 'NIR-H'], 0 error(s)>
    >>> len(index.tiles), index.bands, index.errors
    (4, ['VIS', 'NIR-Y', 'NIR-J', 'NIR-H'], [])
    >>> cat = read_catalog(survey.catalogue_path)
    >>> a = index.assign(cat.ra, cat.dec, cat.diameter_pixels())
    >>> bool((a.tile == np.asarray(survey.truth["tile"])).all())
    True
    >>> TileIndex.from_dict(index.to_dict()) == index
    True
    """

    def __init__(self, tiles, bands, errors=(), file_lists=None):
        self.tiles = list(tiles)
        self.bands = list(bands)
        self.errors = [tuple(e) for e in errors]
        self.file_lists = dict(file_lists or {})
        # the `_Unreadable` errors of the files in ``errors`` that their
        # headers place on the sky (`on_unreadable`, `unreadable_reason`);
        # not saved with the index
        self.unreadable = []

    def __len__(self):
        return len(self.tiles)

    def __repr__(self):
        return (
            f"<TileIndex: {len(self.tiles)} tile(s), bands {self.bands}, "
            f"{len(self.errors)} error(s)>"
        )

    def __eq__(self, other):
        if not isinstance(other, TileIndex):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    # ---- construction

    @classmethod
    def from_paths(cls, paths, *, bands=None, hdu=None, progress=False):
        """Index tile files given as paths, globs, folders or fsspec URLs.

        Parameters
        ----------
        paths : str, `os.PathLike` or list of them
            Files, glob patterns (expanded, sorted), folders (their FITS
            files) or fsspec URLs (``memory://``, ``s3://``, ``file://``).
        bands : list of str, optional
            Bands to use, in channel order. Files of other bands are ignored.
            By default all bands, in order of first appearance.
        hdu : int or str, optional
            The image HDU to use in every file; by default the first HDU
            holding a 2-D image.
        progress : bool, optional
            Show a progress bar (tqdm) over the files when reading their
            headers takes longer than `INDEX_PROGRESS_DELAY` seconds.

        Returns
        -------
        index : `TileIndex`
            The index; files that could not be indexed are in ``errors``.

        Raises
        ------
        ValueError
            If a band in ``bands`` is found in no file.

        Notes
        -----
        Only headers are read. The band of a file comes from its ``BAND``,
        ``FILTER`` or ``FILTNAME`` keyword (in that order), else from its
        name (Euclid ``...MOSAIC-<band>_TILE...``, else the name without
        ending). When no file names its band either way and the names
        without ending do not give every tile the same bands (or give two
        files of one tile the same band), files alone on their tile are one
        band (``field1.fits``, ``field2.fits``: band ``field``), and the
        parts of the paths that differ between the files of one tile are the
        bands (``T0_g.fits``, ``T0_r.fits``, ``T1_g.fits``, ``T1_r.fits``:
        bands ``g`` and ``r``; ``T0_NIR-H.fits``: ``NIR-H``; ``g/T0.fits``,
        ``r/T0.fits``: ``g`` and ``r``). Files of one sky tile are
        grouped by the ``TILEID`` keyword, else by ``TILE<digits>`` in the
        file name, else by an identical (rounded) WCS and shape, where
        groups of other bands whose images' centres lie within half an
        image of each other are one field on different pixel grids, so one
        tile (`Tile.own_grid`); the tiles are in the order of their keys.
        If two files of one tile give the same band name but their file
        names give different ones (a science image and its RMS map, say),
        the file-name bands are used for them; otherwise the file whose
        name gives that band (a science image beside a background model,
        say), else the first, is used, and the others are reported in
        ``errors``.
        """
        files, errors = _expand(paths)
        groups = {}
        unreadable = []
        for path in _indexing(files, progress):
            try:
                rec = _read_record(path, hdu)
            except TileError as exc:
                errors.append((path, str(exc)))
                if isinstance(exc, _Unreadable):
                    unreadable.append(exc)
                continue
            groups.setdefault(rec.key, []).append(rec)
        _report_wcs_notes([r for recs in groups.values() for r in recs])
        _bands_from_stems(groups)
        _join_fields(groups)

        found = []
        members = {}
        for key, recs in groups.items():
            names = [r.band for r in recs]
            for name in set(names):
                dups = [r for r in recs if r.band == name]
                file_bands = {r.name_band for r in dups}
                if (
                    len(dups) > 1
                    and None not in file_bands
                    and len(file_bands) == len(dups)
                ):
                    logger.info(
                        "tile %s: files %s all have band %r; "
                        "using band names from file names",
                        key,
                        [r.path for r in dups],
                        name,
                    )
                    for r in dups:
                        r.band = r.name_band
            # of several files for one band, the one whose name says the band
            # (a science image among, say, background models), else the first
            chosen = {}
            for r in recs:
                if r.band not in chosen or (
                    r.name_band == r.band != chosen[r.band].name_band
                ):
                    chosen[r.band] = r
            by_band = {}
            for r in recs:
                if chosen[r.band] is not r:
                    errors.append(
                        (
                            r.path,
                            f"{r.path}: tile {key!r} already has a file for band "
                            f"{r.band!r} "
                            f"({chosen[r.band].path}); this one is ignored",
                        )
                    )
                    continue
                by_band[r.band] = r
                if r.band not in found:
                    found.append(r.band)
            members[key] = by_band

        if bands is not None:
            bands = [str(b) for b in bands]
            _check_bands(bands, found, errors)
        else:
            bands = found
        tiles = []
        # in the order of their keys, not of their first file: a tile's number
        # (and which of two tiles a source lying equally deep in both goes
        # to) then does not depend on which of its files can be read
        for key, by_band in sorted(members.items()):
            entries = tuple(
                by_band[b].band_file() if b in by_band else None for b in bands
            )
            if any(e is not None for e in entries):
                entries, problems, own = _one_grid(key, entries, bands, errors)
                tiles.append(
                    Tile(key=key, bands=entries, problems=problems, own_grid=own)
                )
            else:
                logger.debug("tile %s has none of the bands %s; skipped", key, bands)
        logger.info(
            "indexed %d tile(s) in band(s) %s; %d file error(s)",
            len(tiles),
            bands,
            len(errors),
        )
        index = cls(tiles, bands, errors)
        index.unreadable = unreadable
        return index

    @classmethod
    def from_file_lists(cls, fits_file_paths, *, bands=None, progress=False):
        """Index the per-source tile files of an ESA Cutana catalogue.

        Parameters
        ----------
        fits_file_paths : sequence of tuple of str
            Per catalogue row, the tile files of the source, one per band
            (`cutana.catalog.Catalog.fits_file_paths`). Repeated tuples are
            indexed once; empty tuples are skipped.
        bands : list of str, optional
            Bands to use, by name, in channel order; by default the
            positions that at least half the rows list (every position when
            the lists are as long), in order.
        progress : bool, optional
            Show a progress bar (tqdm) over the files when reading their
            headers takes longer than `INDEX_PROGRESS_DELAY` seconds.

        Returns
        -------
        index : `TileIndex`
            One tile per distinct tuple whose (used) files could all be
            indexed; the tuple-to-tile map is in ``file_lists``.

        Raises
        ------
        ValueError
            If a band in ``bands`` is not among the band names.

        Notes
        -----
        Bands are positional: the n-th file of every tuple is band n. A
        row listing fewer files than the bands has no file for the last
        ones (`cutana.pipeline` makes it a bad row); the further files of a
        longer list are not cut (a warning says so) unless ``bands`` names
        them. Band names come from the headers (or Euclid file names) of
        the first tuple that has a readable file at each position; if two
        positions give the same name, the later one is called
        ``'NAME[position]'``. When no file names its band, they are what
        differs between the paths of the first complete tuple
        (``T0_g.fits``, ``T0_r.fits``, or ``g/T0.fits``, ``r/T0.fits``:
        ``g``, ``r``), else the file names without ending.
        """
        tuples = []
        seen = set()
        done = set()  # ids of entries already looked at (rows share tuples)
        for entry in fits_file_paths:
            if entry is None or id(entry) in done:
                continue
            if isinstance(entry, tuple):
                done.add(id(entry))  # immutable: the same object, the same key
            key = tuple(os.fspath(p) for p in entry)
            if key and key not in seen:
                seen.add(key)
                tuples.append(key)

        records, errors, failed = {}, [], {}
        paths = dict.fromkeys(p for files in tuples for p in files)
        for path in _indexing(paths, progress):
            try:
                records[path] = _read_record(path)
            except TileError as exc:
                failed[path] = str(exc)
                errors.append((path, str(exc)))
        _report_wcs_notes(records.values())

        n_pos = max((len(t) for t in tuples), default=0)
        names = _unnamed_positions(tuples, records, n_pos) or [None] * n_pos
        for files in tuples:
            for pos, path in enumerate(files):
                if names[pos] is None and path in records:
                    names[pos] = records[path].band
        for pos in range(n_pos):
            if names[pos] is None:
                names[pos] = f"band{pos}"
        _warn_band_order(tuples, records, names)
        for pos in range(n_pos):
            if names[pos] in names[:pos]:
                names[pos] = f"{names[pos]}[{pos}]"

        if bands is not None:
            bands = [str(b) for b in bands]
            _check_bands(bands, names, errors)
        else:
            bands = names[: _positions_most_list(fits_file_paths, tuples, names)]
        positions = [names.index(b) for b in bands]

        tiles, file_lists, keys = [], {}, set()
        for files in tuples:
            used = [files[p] if p < len(files) else None for p in positions]
            if any(p is not None and p in failed for p in used) or all(
                p is None for p in used
            ):
                file_lists[files] = -1
                continue
            entries = tuple(
                None if p is None else records[p].band_file(band)
                for p, band in zip(used, bands, strict=True)
            )
            ref = next(p for p in used if p is not None)
            key = records[ref].key
            if key in keys:
                n = 2
                while f"{key}#{n}" in keys:
                    n += 1
                key = f"{key}#{n}"
            keys.add(key)
            file_lists[files] = len(tiles)
            entries, problems, own = _one_grid(key, entries, bands, errors)
            tiles.append(Tile(key=key, bands=entries, problems=problems, own_grid=own))
        logger.info(
            "indexed %d tile(s) from %d file list(s); %d file error(s)",
            len(tiles),
            len(tuples),
            len(errors),
        )
        return cls(tiles, bands, errors, file_lists)

    # ---- footprints and assignment

    def footprints(self):
        """Return the sky footprint of every tile as a circle.

        Returns
        -------
        ra, dec : `~numpy.ndarray` of float64
            Centre of each tile (degrees, ICRS whatever the tile's frame).
        radius : `~numpy.ndarray` of float64
            Largest angular distance from the centre to the tile's outer
            pixel edges (degrees).
        pixel_scale : `~numpy.ndarray` of float64
            Largest pixel scale of each tile (degrees per pixel).
        """
        n = len(self.tiles)
        ra, dec, radius, scale = (np.full(n, np.nan) for _ in range(4))
        for t, tile in enumerate(self.tiles):
            wcs = tile.wcs()
            frame = _frame_of(wcs)
            ny, nx = tile.shape
            lon, lat = _to_icrs(frame, *_lonlat(
                wcs, wcs.all_pix2world((nx - 1) / 2.0, (ny - 1) / 2.0, 0)
            ))
            # 17 points along each outer pixel edge
            along_x = np.linspace(-0.5, nx - 0.5, 17)
            along_y = np.linspace(-0.5, ny - 0.5, 17)
            ex = np.concatenate(
                [along_x, along_x, np.full(17, -0.5), np.full(17, nx - 0.5)]
            )
            ey = np.concatenate(
                [np.full(17, -0.5), np.full(17, ny - 0.5), along_y, along_y]
            )
            blon, blat = _to_icrs(frame, *_lonlat(wcs, wcs.all_pix2world(ex, ey, 0)))
            dist = _angular_distance(float(lon), float(lat), blon, blat)
            ra[t], dec[t] = float(lon), float(lat)
            radius[t] = float(np.nanmax(dist))
            scale[t] = max(q.to_value(u.deg) for q in wcs.proj_plane_pixel_scales())
        return ra, dec, radius, scale

    def assign(self, ra, dec, diameter_pix, diameter_arcsec=None):
        """Choose the tile of every source.

        Parameters
        ----------
        ra, dec : array-like
            ICRS source coordinates in degrees; converted to a tile's frame
            where it has another, as astropy's ``Cutout2D`` converts a
            `~astropy.coordinates.SkyCoord`.
        diameter_pix : float or array-like
            Cutout diameter in pixels, one for all or one per source; the box
            is ``round(diameter)`` pixels wide, as in `~astropy.nddata.Cutout2D`.
            Non-finite diameters count as 0 (only the position matters),
            unless ``diameter_arcsec`` gives them.
        diameter_arcsec : float or array-like, optional
            Cutout diameter in arcseconds, for the sources whose
            ``diameter_pix`` is not finite: in each tile, the box is that
            diameter over the tile's pixel scale (`Tile.pixel_scale_arcsec`)
            wide, so a source is placed by the box it gets in that tile.

        Returns
        -------
        assignment : `Assignment`
            Per source: tile index, pixel position in that tile, and whether
            the whole cutout lies inside.

        Notes
        -----
        The depth of a source in a tile is its distance in pixels to the
        nearest outer edge, ``min(x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y)``.
        The cutout box follows `cutana._geometry.compute_boxes` (first pixel
        ``ceil(pos - n / 2)``). Among the tiles that hold the whole cutout the
        deepest is chosen; if none does, the deepest of the tiles the cutout
        overlaps; if it overlaps none, -1. Ties go to the earlier tile.

        Sources are sorted by Dec once; each tile then looks only at the Dec
        band it can reach and, within it, at the sources closer to its centre
        than its footprint radius plus the largest cutout's half diagonal. The
        WCS is evaluated for those candidates only (1e6 sources on 100 tiles
        take about a second).
        """
        ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
        dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
        if ra.shape != dec.shape or ra.ndim != 1:
            msg = (
                "ra and dec must be 1-D arrays of one length, got shapes "
                f"{ra.shape} and {dec.shape}"
            )
            raise ValueError(msg)
        n = len(ra)
        diameter, arcsec = _diameter_arrays(n, diameter_pix, diameter_arcsec)
        size = _box_sizes(diameter)
        widest = float(np.max(arcsec, initial=0.0, where=np.isfinite(arcsec)))

        tile = np.full(n, -1, dtype=np.int32)
        x = np.full(n, np.nan)
        y = np.full(n, np.nan)
        inside = np.zeros(n, dtype=bool)
        depth = np.full(n, -np.inf)
        if n == 0 or not self.tiles:
            return Assignment(tile, x, y, inside)

        # sources sorted by Dec (NaN last, never selected): each tile first
        # takes the Dec band it can reach (a slice), then the angular cut
        by_dec = np.argsort(dec, kind="stable")
        sorted_dec = dec[by_dec]
        sorted_vec = _unit_vectors(ra[by_dec], sorted_dec)
        c_ra, c_dec, radius, scale = self.footprints()
        widest_pix = float(size.max())
        for t, tl in enumerate(self.tiles):
            tile_scale = tl.pixel_scale_arcsec() if widest > 0 else 1.0
            widest_box = max(widest_pix, np.round(widest / tile_scale))
            half_diag = widest_box * np.sqrt(0.5) + 1.0
            reach_deg = (radius[t] + half_diag * scale[t]) * (1 + 1e-9) + 1e-9
            lo = np.searchsorted(sorted_dec, c_dec[t] - reach_deg, side="left")
            hi = np.searchsorted(sorted_dec, c_dec[t] + reach_deg, side="right")
            if hi <= lo:
                continue
            centre = _unit_vectors(np.array([c_ra[t]]), np.array([c_dec[t]]))[0]
            cos_reach = np.cos(min(np.deg2rad(reach_deg), np.pi))
            near = sorted_vec[lo:hi] @ centre >= cos_reach
            cand = np.sort(by_dec[lo:hi][near])
            if not len(cand):
                continue
            px, py = self._world_to_pixel(tl, ra[cand], dec[cand])
            ny, nx = tl.shape
            box = _box_sizes(diameter[cand], arcsec[cand], tl)
            sizes = np.repeat(box[:, None], 2, axis=1)
            boxes = compute_boxes(
                (ny, nx), sizes, np.column_stack([py, px]), mode="partial"
            )
            overlap = boxes.code == BOX_OK
            whole = overlap & ~boxes.is_partial
            if tl.own_grid:
                hit, all_whole = _own_grid_overlap(tl, ra[cand], dec[cand], sizes)
                overlap |= hit
                whole &= all_whole
            with np.errstate(invalid="ignore"):
                dpt = np.minimum(
                    np.minimum(px + 0.5, nx - 0.5 - px),
                    np.minimum(py + 0.5, ny - 0.5 - py),
                )
            b_in = inside[cand]
            better = overlap & (
                (whole & ~b_in) | ((whole == b_in) & (dpt > depth[cand]))
            )
            sel = cand[better]
            tile[sel] = t
            x[sel] = px[better]
            y[sel] = py[better]
            inside[sel] = whole[better]
            depth[sel] = dpt[better]
        return Assignment(tile, x, y, inside)

    def on_unreadable(self, ra, dec, diameter_pix, diameter_arcsec=None):
        """Which sources lie on files the index left out as unreadable.

        A file whose header places its image on the sky but whose pixels
        cannot be read (a truncated file) is not a tile of the index, but
        the sources whose cutout would meet it are on a broken tile, not
        off every tile: `cutana.make_cutouts` gives them ``TILE_ERROR`` with
        the reason (with ``--tiles``; a catalogue's own file lists name
        their files anyway).

        Parameters
        ----------
        ra, dec : array-like
            ICRS positions in degrees.
        diameter_pix : float or array-like
            Cutout diameters in pixels, as for `assign`.
        diameter_arcsec : float or array-like, optional
            Diameters in arcseconds where ``diameter_pix`` is not finite.

        Returns
        -------
        reasons : dict
            Source index to the reason its file cannot be read (the first
            such file it meets).
        """
        reasons = {}
        if not self.unreadable:
            return reasons
        ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
        dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
        diameter, arcsec = _diameter_arrays(len(ra), diameter_pix, diameter_arcsec)
        for error in self.unreadable:
            wcs = error.wcs
            px, py = sky_to_pixel(wcs, ra, dec)
            placed = np.isfinite(px) & np.isfinite(py)
            angle = np.isfinite(arcsec) & ~np.isfinite(diameter)
            dia = np.where(angle, _angle_in_pixels(wcs, arcsec), diameter)
            size = np.maximum(_box_sizes(dia), 1)
            yx = np.where(placed[:, None], np.column_stack([py, px]), 0.0)
            boxes = compute_boxes(error.shape, np.c_[size, size], yx, mode="partial")
            for k in np.flatnonzero(placed & (boxes.code == BOX_OK)).tolist():
                reasons.setdefault(k, str(error))
        return reasons

    def unreadable_reason(self, key, band):
        """Why the file of ``band`` of the tile ``key`` was left out, if its
        header named that tile and band but its data cannot be read (a
        truncated file); `None` otherwise (no such file, or one whose header
        could not be read either).

        Parameters
        ----------
        key : str
            The tile's key (`Tile.key`).
        band : str
            The band's name.

        Returns
        -------
        reason : str or None
            The reason, naming the file.
        """
        for error in self.unreadable:
            if error.key == key and error.band == band:
                return str(error)
        return None

    @staticmethod
    def _world_to_pixel(tile, ra, dec):
        """0-based pixel ``(x, y)`` of ICRS positions in ``tile``'s reference WCS."""
        return sky_to_pixel(tile.wcs(), ra, dec)

    def band_positions(self, tile, ra, dec):
        """Return every row's position in the band files on grids of their own.

        Parameters
        ----------
        tile : array-like of int
            Tile of each row (`Assignment.tile`; -1: none).
        ra, dec : array-like
            ICRS positions in degrees.

        Returns
        -------
        band_xy : `~numpy.ndarray` of float64, shape ``(N, C, 2)``, or None
            ``(x, y)`` of each row in each band of its tile that is on a
            pixel grid of its own (`Tile.own_grid`, `band_pixels`), NaN
            elsewhere; None when no tile has such a band.
        """
        if not any(t.own_grid for t in self.tiles):
            return None
        tile = np.asarray(tile)
        ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
        out = np.full((len(tile), len(self.bands), 2), np.nan)
        for k, tl in enumerate(self.tiles):
            rows = np.flatnonzero(tile == k) if tl.own_grid else ()
            if not len(rows):
                continue
            for c in tl.own_grid:
                x, y = self.band_pixels(k, c, ra[rows], dec[rows])
                out[rows, c, 0], out[rows, c, 1] = x, y
        return out

    def band_pixels(self, tile, band, ra, dec):
        """Return the pixel positions of sources in one band file of a tile.

        For a band on the reference band's grid these are the tile's pixel
        positions (`assign`); for one on a grid of its own
        (`Tile.own_grid`) they are the positions in that file, where its
        cutouts are cut.

        Parameters
        ----------
        tile : int
            Index of the tile.
        band : int
            Index of the band.
        ra, dec : array-like
            ICRS positions in degrees.

        Returns
        -------
        x, y : `~numpy.ndarray` of float64
            0-based pixel positions (NaN where the WCS cannot place one).
        """
        tl = self.tiles[tile]
        entry = tl.bands[band] or tl.reference
        return sky_to_pixel(entry.wcs(), ra, dec)

    def assign_by_files(
        self, file_tuples, ra=None, dec=None, diameter_pix=None, diameter_arcsec=None
    ):
        """Map catalogue rows to tiles through their own ``fits_file_paths``.

        Parameters
        ----------
        file_tuples : sequence of tuple of str
            Per row, the tile files (`cutana.catalog.Catalog.fits_file_paths`).
        ra, dec : array-like, optional
            Source coordinates in degrees; if given, ``x``, ``y`` and
            ``inside`` are computed in each row's tile, and rows whose cutout
            misses their tile get tile -1 (no overlap).
        diameter_pix : float or array-like, optional
            Cutout diameter in pixels (needed with ``ra``/``dec``; 0 if not
            given).
        diameter_arcsec : float or array-like, optional
            Cutout diameter in arcseconds where ``diameter_pix`` is not
            finite, over the pixel scale of the row's tile (as in `assign`).

        Returns
        -------
        assignment : `Assignment`
            ``tile`` is -1 for rows whose files could not be indexed
            (``file_error`` True, and ``messages`` names the files and
            reasons), for rows with no files (``file_error`` False: such rows
            are bad rows already) and for rows whose cutout misses the tile.
        file_error : `~numpy.ndarray` of bool
            ``assignment.file_error``: rows that are tile errors, not "no
            overlap".
        """
        n = len(file_tuples)
        tile = np.full(n, -1, dtype=np.int32)
        file_error = np.zeros(n, dtype=bool)
        messages = {}
        reasons = dict(self.errors)
        cache = {}
        # rows share their entries (one tuple object per distinct list):
        # each distinct object is looked up once, then spread to its rows
        entries = list(file_tuples)
        ids = np.fromiter(map(id, entries), dtype=np.int64, count=n)
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        per_entry = []
        for i in first.tolist():
            entry = entries[i]
            files = tuple(entry) if entry is not None else ()
            if not files:
                per_entry.append((-1, None))
                continue
            if files not in cache:
                t = self.file_lists.get(files)
                if t is None:
                    cache[files] = (
                        -1,
                        "files were not indexed (not in this tile index): "
                        + ", ".join(files),
                    )
                elif t < 0:
                    why = [reasons[p] for p in files if p in reasons] or [
                        "a band file could not be indexed"
                    ]
                    cache[files] = (-1, "; ".join(why))
                else:
                    cache[files] = (t, None)
            per_entry.append(cache[files])
        if n:
            tile[:] = np.array([t for t, _ in per_entry], dtype=np.int32)[inverse]
            bad = [k for k, (_, why) in enumerate(per_entry) if why is not None]
            for i in np.flatnonzero(np.isin(inverse, bad)).tolist():  # row order
                file_error[i] = True
                messages[i] = per_entry[inverse[i]][1]
        x = np.full(n, np.nan)
        y = np.full(n, np.nan)
        inside = np.zeros(n, dtype=bool)
        if ra is not None and dec is not None:
            ra = np.asarray(ra, dtype=np.float64)
            dec = np.asarray(dec, dtype=np.float64)
            dia = 0.0 if diameter_pix is None else diameter_pix
            dia, arcsec = _diameter_arrays(n, dia, diameter_arcsec)
            for t in np.unique(tile[tile >= 0]).tolist():
                rows = np.flatnonzero(tile == t)
                tl = self.tiles[t]
                px, py = self._world_to_pixel(tl, ra[rows], dec[rows])
                size = _box_sizes(dia[rows], arcsec[rows], tl)
                sizes = np.repeat(size[:, None], 2, axis=1)
                boxes = compute_boxes(
                    tl.shape, sizes, np.column_stack([py, px]), mode="partial"
                )
                overlap = boxes.code == BOX_OK
                whole = overlap & ~boxes.is_partial
                if tl.own_grid:
                    hit, all_whole = _own_grid_overlap(tl, ra[rows], dec[rows], sizes)
                    overlap |= hit
                    whole &= all_whole
                x[rows], y[rows] = px, py
                inside[rows] = whole
                tile[rows[~overlap]] = -1
        return Assignment(tile, x, y, inside, file_error, messages), file_error

    # ---- serialisation

    def to_dict(self):
        """Return a JSON-serialisable dict of the index.

        Returns
        -------
        d : dict
            Inverse of `TileIndex.from_dict`.
        """
        return {
            "format": _DICT_FORMAT,
            "version": _DICT_VERSION,
            "bands": list(self.bands),
            "tiles": [
                {
                    "key": t.key,
                    "bands": [None if b is None else b.to_dict() for b in t.bands],
                    "problems": [list(p) for p in t.problems],
                    "own_grid": list(t.own_grid),
                }
                for t in self.tiles
            ],
            "errors": [[str(p), str(m)] for p, m in self.errors],
            "file_lists": [[list(k), int(v)] for k, v in self.file_lists.items()],
        }

    @classmethod
    def from_dict(cls, d):
        """Rebuild an index from `TileIndex.to_dict` output.

        Parameters
        ----------
        d : dict
            As returned by `TileIndex.to_dict` (possibly through JSON).

        Returns
        -------
        index : `TileIndex`
            The index.

        Raises
        ------
        ValueError
            If ``d`` is not a serialised tile index of a known version.
        """
        if d.get("format") != _DICT_FORMAT or d.get("version") != _DICT_VERSION:
            msg = (
                f"not a serialised TileIndex (format {d.get('format')!r}, version "
                f"{d.get('version')!r}; expected {_DICT_FORMAT!r}, {_DICT_VERSION})"
            )
            raise ValueError(msg)
        tiles = [
            Tile(
                key=t["key"],
                bands=tuple(
                    None if b is None else BandFile.from_dict(b) for b in t["bands"]
                ),
                problems=tuple(tuple(p) for p in t.get("problems", ())),
                own_grid=tuple(t.get("own_grid", ())),
            )
            for t in d["tiles"]
        ]
        errors = [tuple(e) for e in d.get("errors", [])]
        file_lists = {tuple(k): int(v) for k, v in d.get("file_lists", [])}
        return cls(tiles, d["bands"], errors, file_lists)


def sky_to_pixel(wcs, ra, dec):
    """Return the 0-based pixel ``(x, y)`` of ICRS positions in ``wcs``.

    Parameters
    ----------
    wcs : `~astropy.wcs.WCS`
        A celestial WCS, in any frame astropy transforms ICRS to.
    ra, dec : array-like
        Positions in degrees (ICRS).

    Returns
    -------
    x, y : `~numpy.ndarray` of float64
        Positions as `~astropy.wcs.utils.skycoord_to_pixel` gives them
        (``all_world2pix``, distortions included).
    """
    ra, dec = _icrs_to(_frame_of(wcs), ra, dec)
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        px, py = wcs.all_world2pix(*_world_order(wcs, ra, dec), 0, quiet=True)
        px = np.array(px, dtype=np.float64, ndmin=1)
        py = np.array(py, dtype=np.float64, ndmin=1)
        if wcs.has_distortion:
            # the iterative solution over all positions can differ from
            # astropy's for one position (by up to its tolerance); where
            # that could move a box limit (position - size / 2, with a
            # whole size: a position near a multiple of 0.5), solve
            # source by source
            near = np.flatnonzero(
                near_rounding_boundary(px, DISTORTION_TOL)
                | near_rounding_boundary(py, DISTORTION_TOL)
            )
            ra, dec = np.atleast_1d(ra), np.atleast_1d(dec)
            for i in near:
                one = wcs.all_world2pix(
                    *_world_order(wcs, ra[i], dec[i]), 0, quiet=True
                )
                px[i], py[i] = float(one[0]), float(one[1])
    return px, py


def _diameter_arrays(n, diameter_pix, diameter_arcsec):
    """``(pixels, arcsec)`` float64 arrays of length ``n``: the arcsec ones
    only where the pixel ones are not finite (NaN elsewhere)."""
    pix = np.broadcast_to(np.asarray(diameter_pix, dtype=np.float64), (n,))
    if diameter_arcsec is None:
        return pix, np.full(n, np.nan)
    arcsec = np.broadcast_to(np.asarray(diameter_arcsec, dtype=np.float64), (n,))
    return pix, np.where(np.isfinite(pix), np.nan, arcsec)


def _mean_scale_arcsec(wcs):
    """`BandFile.pixel_scale_arcsec` of a file with the WCS ``wcs``."""
    return float(np.mean([s.to_value(u.arcsec) for s in wcs.proj_plane_pixel_scales()]))


def _angle_in_pixels(wcs, arcsec):
    """`BandFile.angle_in_pixels` of a file with the WCS ``wcs``."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    size = np.asarray(arcsec, dtype=np.float64)
    scales = proj_plane_pixel_scales(wcs)
    if scales[0] != scales[1]:
        return size / _mean_scale_arcsec(wcs)
    flat = size.reshape(-1, 1)
    pixels = angles_in_pixels(np.hstack([flat, flat]) * u.arcsec, wcs)[:, 0]
    return pixels.reshape(size.shape)


def _own_grid_overlap(tile, ra, dec, sizes):
    """Where boxes of ``sizes`` (``(n, 2)`` pixels) at ICRS positions meet
    the band files of ``tile`` on pixel grids of their own
    (`Tile.own_grid`): ``(hit, whole)``, whether a box meets one of them,
    and whether it lies wholly inside every one. A source that misses the
    reference band file but meets such a band's is cut from the tile (that
    band's `~astropy.nddata.Cutout2D` gives a cutout), as a partial one."""
    hit = np.zeros(len(ra), dtype=bool)
    whole = np.ones(len(ra), dtype=bool)
    for c in tile.own_grid:
        band = tile.bands[c]
        if band is None:
            continue
        px, py = sky_to_pixel(band.wcs(), ra, dec)
        placed = np.isfinite(px) & np.isfinite(py)
        yx = np.where(placed[:, None], np.column_stack([py, px]), 0.0)
        boxes = compute_boxes(band.shape, sizes, yx, mode="partial")
        meets = placed & (boxes.code == BOX_OK)
        hit |= meets
        whole &= meets & ~boxes.is_partial
    return hit, whole


def _box_sizes(diameter_pix, diameter_arcsec=None, tile=None):
    """Whole box sizes in pixels: ``round(diameter_pix)``, or where that is
    not finite the angle ``diameter_arcsec`` in pixels of ``tile``
    (`Tile.angle_in_pixels`), rounded; 0 where neither is a positive number
    (only the position matters then)."""
    dia = diameter_pix
    if diameter_arcsec is not None and tile is not None:
        angle = np.isfinite(diameter_arcsec)
        if angle.any():
            dia = np.array(dia, dtype=np.float64)
            use = angle & ~np.isfinite(dia)
            dia[use] = tile.angle_in_pixels(diameter_arcsec[use])
    size = np.where(np.isfinite(dia) & (dia > 0), np.round(dia), 0.0)
    return np.minimum(size, 2**31).astype(np.int64)


def _unit_vectors(ra, dec):
    """``(N, 3)`` unit vectors of sky positions in degrees."""
    r = np.deg2rad(ra)
    d = np.deg2rad(dec)
    cd = np.cos(d)
    return np.column_stack([cd * np.cos(r), cd * np.sin(r), np.sin(d)])


def _angular_distance(lon0, lat0, lon, lat):
    """Angular distance in degrees (Vincenty formula, stable at all scales)."""
    lon0, lat0, lon, lat = (np.deg2rad(v) for v in (lon0, lat0, lon, lat))
    dlon = lon - lon0
    num = np.hypot(
        np.cos(lat) * np.sin(dlon),
        np.cos(lat0) * np.sin(lat) - np.sin(lat0) * np.cos(lat) * np.cos(dlon),
    )
    den = np.sin(lat0) * np.sin(lat) + np.cos(lat0) * np.cos(lat) * np.cos(dlon)
    return np.rad2deg(np.arctan2(num, den))


# --------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------


class TilePixels:
    """Open pixel data of one band file (returned by `open_pixels`).

    Parameters
    ----------
    band : `BandFile`
        The band file.
    data : array-like
        The raw 2-D image (see Attributes).
    bscale, bzero : float
        Scaling keywords of the header.
    blank : int or None
        ``BLANK`` keyword of the header.
    hdul : `~astropy.io.fits.HDUList`
        The open file, closed by `TilePixels.close`.
    kept : bool, optional
        See Attributes.

    Attributes
    ----------
    data : array-like
        The 2-D image, raw: a memory-mapped `~numpy.ndarray` in the file's
        byte order for local uncompressed files; an astropy ``section``
        (decompressing or downloading only what is sliced) for compressed
        or remote files. A 64-bit integer image with ``BLANK`` or stored as
        unsigned (``BZERO`` 2**63) gives astropy's physical values in
        float64 for what is sliced instead (see `_Int64Physical`), with
        ``bscale`` 1, ``bzero`` 0 and no ``blank``.
    bscale, bzero : float
        ``BSCALE`` and ``BZERO`` of the header (1 and 0 if absent). The
        physical value is ``data * bscale + bzero``; nothing is applied.
    blank : int or None
        The stored value read as NaN: the ``BLANK`` of an integer image,
        where astropy applies it (not to pseudo-unsigned images, nor a
        ``BLANK`` of 0).
    band : `BandFile`
        The band file.
    kept : bool
        Whether ``data`` is a mapping kept open between calls of
        `open_pixels` (``keep_bytes``): its pages stay mapped after
        `close`, for the next job, and must not be handed back to the OS.

    Examples
    --------
    `TilePixels` objects are made by `open_pixels`:

    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.tiles import TileIndex
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> index = TileIndex.from_paths(survey.paths)
    >>> px = open_pixels(index.tiles[0].bands[0])
    >>> px.data.shape, px.bscale, px.bzero, px.blank, px.scaled
    ((512, 512), 1.0, 0.0, None, False)
    >>> px.close()
    >>> px.data is None
    True
    """

    def __init__(self, band, data, bscale, bzero, blank, hdul, kept=False):
        self.band = band
        if _Int64Physical.needed(data, bscale, bzero, blank):
            data = _Int64Physical(data, bscale, bzero, blank)
            bscale, bzero, blank = 1.0, 0.0, None
        self.data = data
        self.bscale = bscale
        self.bzero = bzero
        self.blank = blank
        self._hdul = hdul
        self.kept = kept

    @property
    def scaled(self):
        """True if ``BSCALE``/``BZERO`` are not the identity."""
        return self.bscale != 1.0 or self.bzero != 0.0

    def close(self):
        """Close the file; ``data`` must not be used afterwards."""
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None
        self.data = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Int64Physical:
    """The physical values of a 64-bit integer image, as astropy reads them.

    Beyond 2**53 a float64 cannot hold every int64, so `TilePixels`' raw
    values with ``BSCALE``/``BZERO``/``BLANK`` applied in floats, as for other
    images, are not astropy's here: a pseudo-unsigned image (``BZERO``
    2**63) lost its small values (stored near -2**63, rounded before the
    offset: 50 became 0), and stored values that round to ``BLANK`` became
    NaN. astropy offsets pseudo-unsigned values in integers, and compares
    ``BLANK`` with the stored integers. A slice of this object does the
    same and gives float64 (what such images are cut in): a part of the
    image is read and converted at a time, as for a compressed tile.
    """

    dtype = np.dtype(np.float64)

    def __init__(self, raw, bscale, bzero, blank):
        self.base = raw  # (`mmap_of` finds the mapping behind it)
        self.shape = tuple(raw.shape)
        self.ndim = len(self.shape)
        self._unsigned = bscale == 1.0 and bzero == 2.0**63
        self._bscale, self._bzero, self._blank = bscale, bzero, blank

    @staticmethod
    def needed(raw, bscale, bzero, blank):
        """Whether the raw image ``raw`` needs it (else it is cut as is)."""
        dtype = np.dtype(raw.dtype)
        if dtype.kind != "i" or dtype.itemsize != 8:
            return False
        return blank is not None or (bscale == 1.0 and bzero == 2.0**63)

    def __array__(self, dtype=None, copy=None):
        values = self[...]
        return values if dtype is None else values.astype(dtype, copy=False)

    def __getitem__(self, key):
        raw = np.asarray(self.base[key]).astype(np.int64)
        if self._unsigned:
            # stored + 2**63 modulo 2**64: the sign bit flipped
            return (raw.view(np.uint64) ^ np.uint64(2**63)).astype(np.float64)
        values = raw.astype(np.float64)
        if self._bscale != 1.0:
            values *= self._bscale
        if self._bzero != 0.0:
            values += self._bzero
        if self._blank is not None:
            values[raw == self._blank] = np.nan
        return values


def _nan_blank(blank, dtype, bscale, bzero):
    """The stored value of an image that astropy reads as NaN, or None.

    astropy applies ``BLANK`` to integer images that it turns into floats:
    not to float images, not to "pseudo-unsigned" ones (``BSCALE`` 1,
    ``BZERO`` 2**(bits - 1), or -128 for bytes), which it reads as
    integers, not to a ``BLANK`` that is not an integer, and not to a
    ``BLANK`` of 0 (astropy tests the keyword's truth).
    """
    if (
        dtype.kind not in "iu"
        or isinstance(blank, bool)
        or not isinstance(blank, (int, np.integer))
        or blank == 0
    ):
        return None
    bits = 8 * dtype.itemsize
    pseudo = -128.0 if bits == 8 else float(2 ** (bits - 1))
    if bscale == 1.0 and bzero == pseudo:
        return None
    return int(blank)


def open_pixels(band, keep_bytes=0):
    """Open the pixels of a band file without reading or scaling them.

    Parameters
    ----------
    band : `BandFile`
        The band file to open.
    keep_bytes : int, optional
        Bytes of local, uncompressed band files this process may keep
        mapped between calls: the files opened before whose images fit
        together are not mapped afresh, so the pages a job touched stay
        mapped for the next job of the same tile, which saves faulting
        them in again (``pixels.kept`` is true). 0 (the default) maps every
        call afresh. `close_kept_maps` drops them.

    Returns
    -------
    pixels : `TilePixels`
        A context manager; ``pixels.data`` is the raw 2-D image. Local
        uncompressed files are memory-mapped (``memmap=True,
        do_not_scale_image_data=True``): nothing is read until sliced, and
        values keep the file's byte order (often big-endian). Compressed
        tiles return ``hdu.section``: each read decompresses the compressed
        tiles it touches. Remote (fsspec) files return ``hdu.section`` too,
        fetching only the bytes needed.

    Raises
    ------
    TileError
        If the file cannot be opened, is truncated, or its image no longer
        matches the indexed shape; the message names the path and reason.

    Examples
    --------
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.tiles import TileIndex
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> index = TileIndex.from_paths(survey.paths)
    >>> with open_pixels(index.tiles[0].bands[0]) as px:
    ...     print(px.data.dtype.byteorder, px.data.shape)
    ...     window = px.data[100:164, 200:264] * px.bscale + px.bzero
    > (512, 512)
    >>> window.shape, window.dtype.isnative
    ((64, 64), True)
    """
    pixels = _open_known_layout(band, keep_bytes)
    if pixels is not None:
        return pixels
    hdul = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            remote = band.is_remote
            if remote:
                hdul = _open_fits(band.path, do_not_scale_image_data=True)
            else:
                hdul = _open_fits(band.path, memmap=True, do_not_scale_image_data=True)
            h = hdul[band.hdu]
            index = hdul.index(h)
            if tuple(h.shape) != tuple(band.shape):
                msg = (
                    f"{band.path}: HDU {band.hdu!r} has shape {tuple(h.shape)}, "
                    f"indexed as {tuple(band.shape)}"
                )
                raise TileError(msg)
            _check_complete(band.path, hdul, index, h)
            header = h.header
            bscale = float(header.get("BSCALE", 1.0))
            bzero = float(header.get("BZERO", 0.0))
            blank = header.get("BLANK")
            if remote or isinstance(h, fits.CompImageHDU):
                data = h.section
            else:
                data = h.data
                if data is None or data.shape != tuple(band.shape):
                    msg = f"{band.path}: HDU {band.hdu!r} holds no image data"
                    raise TileError(msg)
        for w in caught:
            logger.debug("%s: %s", band.path, w.message)
    except TileError:
        if hdul is not None:
            hdul.close()
        raise
    except FileNotFoundError as exc:
        msg = f"{band.path}: file does not exist"
        raise TileError(msg) from exc
    except Exception as exc:  # corrupt files raise many exception types
        if hdul is not None:
            hdul.close()
        msg = f"{band.path}: cannot open pixels of HDU {band.hdu!r} ({_reason(exc)})"
        raise TileError(msg) from exc
    blank = _nan_blank(blank, np.dtype(data.dtype), bscale, bzero)
    if not remote and isinstance(data, np.ndarray):
        _remember_layout(band, hdul, index, data, bscale, bzero, blank)
        if keep_bytes > 0:  # checked just now: map it to keep from the start
            kept = _open_known_layout(band, keep_bytes)
            if kept is not None and kept.kept:
                hdul.close()
                return kept
    return TilePixels(band, data, bscale, bzero, blank, hdul)


#: Where the image of a local, uncompressed band file lies, by
#: ``(path, hdu, size, mtime)``: `open_pixels` maps it again without parsing
#: the headers (a worker opens the same tiles for many jobs).
_LAYOUTS = {}
_MAX_LAYOUTS = 1024
#: Mappings kept between jobs (``open_pixels(keep_bytes=...)``), by the
#: same key as ``_LAYOUTS``.
_KEPT = {}


def _stat_key(band):
    try:
        st = os.stat(band.path)
    except OSError:
        return None
    return (band.path, repr(band.hdu), st.st_size, st.st_mtime_ns)


def _remember_layout(band, hdul, index, data, bscale, bzero, blank):
    info = hdul.fileinfo(index)
    if getattr(info["file"], "compression", None) or mmap_of(data) is None:
        return
    key = _stat_key(band)
    if key is None:
        return
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (int(info["datLoc"]), data.dtype, data.shape, bscale, bzero, blank)


def mmap_of(data):
    """The `mmap.mmap` behind an array that views a memory-mapped file.

    Parameters
    ----------
    data : `~numpy.ndarray`
        An array, e.g. ``TilePixels.data`` or a view of it.

    Returns
    -------
    mapping : `mmap.mmap` or None
        The mapping, or `None` if the array is not backed by one.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.tiles import mmap_of
    >>> mmap_of(np.zeros(3)) is None
    True
    """
    base = data
    for _ in range(8):
        if base is None or isinstance(base, mmap.mmap):
            break
        base = getattr(base, "base", None)
    return base if isinstance(base, mmap.mmap) else None


def _open_known_layout(band, keep_bytes=0):
    """`TilePixels` of a file opened before and unchanged since, else `None`."""
    if not _LAYOUTS or band.is_remote:
        return None
    key = _stat_key(band)
    for old in [k for k in _KEPT if k[:2] == (band.path, repr(band.hdu)) and k != key]:
        del _KEPT[old]  # the file changed since it was mapped
    layout = _LAYOUTS.get(key)
    if layout is None:
        return None
    offset, dtype, shape, bscale, bzero, blank = layout
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    keep = nbytes <= keep_bytes
    data = _KEPT.get(key) if keep else None
    if data is not None:
        return TilePixels(band, data, bscale, bzero, blank, None, kept=True)
    try:
        data = np.memmap(band.path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError):
        return None  # the slow path explains
    if keep:
        # the files kept stay kept: jobs cycle through the tiles, and
        # replacing the least recently used would replace every one in turn
        keep = sum(a.nbytes for a in _KEPT.values()) + nbytes <= keep_bytes
        if keep:
            _KEPT[key] = data
    return TilePixels(band, data, bscale, bzero, blank, None, kept=keep)


def _grid_difference(ref, band):
    """How the pixel grid of `BandFile` ``band`` differs from ``ref``'s, or None.

    Bands on one grid are cut at the same pixels, those of the reference
    band; a band on another grid at its own (`Tile.own_grid`). One grid
    means equal shapes and the same WCS (reference pixel and
    value, pixel scale matrix, projection), to a thousandth of a pixel
    (headers written with fewer digits still agree). Files whose WCS
    headers are the same (as astropy writes them) share the grid without
    the comparison of distortions, which cannot place every pixel where a
    distortion cannot be inverted (strong TPV or SIP terms at the corners).
    """
    if tuple(band.shape) != tuple(ref.shape):
        return f"its shape {tuple(band.shape)} is not {tuple(ref.shape)}"
    w, r = band.wcs(), ref.wcs()
    if _wcs_header_text(w) == _wcs_header_text(r):
        return None
    if list(w.wcs.ctype) != list(r.wcs.ctype):
        return f"its projection {list(w.wcs.ctype)} is not {list(r.wcs.ctype)}"
    if not np.allclose(w.wcs.crpix, r.wcs.crpix, rtol=0, atol=1e-3):
        return f"its CRPIX {w.wcs.crpix.tolist()} is not {r.wcs.crpix.tolist()}"
    scale = float(np.min(np.abs(np.linalg.svd(r.pixel_scale_matrix, compute_uv=False))))
    if not np.allclose(w.wcs.crval, r.wcs.crval, rtol=0, atol=1e-3 * scale):
        return f"its CRVAL {w.wcs.crval.tolist()} is not {r.wcs.crval.tolist()}"
    if not np.allclose(w.pixel_scale_matrix, r.pixel_scale_matrix, rtol=1e-7, atol=0):
        return "its pixel scale or orientation differs"
    # distortions (SIP, PV terms, lookup tables) and the frame: 5 x 5 pixels
    # over the tile must map to the same sky, to a thousandth of a pixel
    fw, fr = _frame_of(w), _frame_of(r)
    if fw is not fr and (fw is None or fr is None or not fw.is_equivalent_frame(fr)):
        return f"its celestial frame {fw or 'ICRS'} is not {fr or 'ICRS'}"
    ny, nx = ref.shape
    gx, gy = (g.ravel() for g in np.meshgrid(np.linspace(0, nx - 1, 5),
                                             np.linspace(0, ny - 1, 5)))
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        known = np.isfinite(r.all_pix2world(gx, gy, 0)).all(axis=0)
        bx, by = r.all_world2pix(*w.all_pix2world(gx, gy, 0), 0, quiet=True)
    off = np.hypot(bx - gx, by - gy)[known]
    if not np.all(off <= 1e-3):
        worst = float(np.max(np.where(np.isfinite(off), off, np.inf)))
        return f"its distortion differs: pixels map up to {worst:.3g} pixels apart"
    return None


def _wcs_header_text(wcs):
    """The WCS header astropy writes for ``wcs`` (SIP and PV terms too)."""
    with astropy_log_kept(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return wcs.to_header(relax=True).tostring()


def _one_grid(key, entries, bands, errors):
    """A tile's band files, and which of them are on a pixel grid of their own.

    A file whose grid differs from the reference band's (the first) is
    kept: its cutouts are cut at each source's own position in it
    (`TileIndex.band_pixels`), as ESA Cutana cuts every file of a source.
    A file whose WCS cannot be compared with the reference band's is left
    out, with an entry in ``errors``; the tile's sources then get
    ``TILE_ERROR`` for lack of that band, with the reason. Returns
    ``(entries, problems, own_grid)`` for `Tile`.
    """
    ref = next((e for e in entries if e is not None), None)
    kept, problems, own = [], [], []
    for c, (entry, band) in enumerate(zip(entries, bands, strict=True)):
        why = None
        if entry is not None and entry is not ref:
            try:
                if _grid_difference(ref, entry) is not None:
                    own.append(c)
                    logger.info(
                        "tile %s: band %s (%s) is on a pixel grid of its own; its "
                        "cutouts are cut at each source's position in it",
                        key, band, entry.path,
                    )
            except Exception as exc:  # noqa: BLE001 - an unreadable WCS
                why = f"its WCS cannot be compared: {exc}"
        if why is None:
            kept.append(entry)
            continue
        text = (
            f"{entry.path}: {why}, so its pixels cannot be placed on the sky "
            f"against {ref.path} (tile {key}); band {band} is not cut there"
        )
        errors.append((entry.path, text))
        problems.append((str(band), text))
        kept.append(None)
    return tuple(kept), tuple(problems), tuple(own)


def missing_band_message(tile, band):
    """Why the sources of ``tile`` are not cut when it has no file for ``band``.

    Parameters
    ----------
    tile : `Tile`
        The tile.
    band : str
        The band's name.

    Returns
    -------
    message : str
        The message recorded for each of the tile's sources.

    Examples
    --------
    >>> from cutana.tiles import Tile, missing_band_message
    >>> tile = Tile(key="102018211", bands=(None,), shape=(100, 100))
    >>> missing_band_message(tile, "NIR-J")
    'tile 102018211 has no file for band NIR-J'
    """
    for name, reason in tile.problems:
        if name == str(band):
            return f"tile {tile.key}: {reason}"
    return f"tile {tile.key} has no file for band {band}"


def close_kept_maps():
    """Drop the tile mappings kept by `open_pixels` (``keep_bytes``).

    Examples
    --------
    >>> from cutana.tiles import close_kept_maps
    >>> close_kept_maps()
    """
    _KEPT.clear()
