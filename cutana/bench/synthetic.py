# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
A synthetic, Euclid-like survey: tiles, bands and a catalogue with known truth.

`make_survey` writes a small mosaic of overlapping image tiles, one FITS file
per tile and band, and a source catalogue in the layout ESA Cutana uses
(``SourceID``, ``RA``, ``Dec``, ``diameter_pixel``, ``diameter_arcsec``,
``fits_file_paths``). It is used by ``cutana demo``, by the tests and by the
benchmark harness, so it is deterministic for a seed, fast (a pair of
1000 x 1000 tiles in four bands takes well under a second) and streams its
output: only one tile array is held in memory at a time, whatever the number
and size of the tiles.

The tiles
    The ``n_tiles`` tiles sit on a rectangular grid (as close to square as
    ``n_tiles`` allows) and share one gnomonic (TAN) projection with its
    tangent point at ``(RA, Dec) = (150, 2)`` deg, north up and east left,
    at ``pixel_scale_arcsec``. Neighbouring tiles therefore overlap by
    exactly ``overlap_pixels`` pixels, and pixel ``(x, y)`` of one tile is
    pixel ``(x + dx, y + dy)`` of another for integer offsets. The *mosaic*
    frame of the truth table is the pixel frame of tile 0 (lower left).
The files
    Each file holds its image in the primary HDU (``compress=False``), or
    in a lossless GZIP-compressed image extension (HDU 1) after an empty
    primary HDU (``compress=True``); `Survey.hdu` says which.
The pixels
    Background-subtracted Gaussian noise plus one pixel-integrated,
    axis-aligned elliptical Gaussian galaxy per catalogue row with a valid
    position; a galaxy in the overlap of two tiles has identical noiseless
    pixels in both.
The catalogue rows
    Column ``category`` of `Survey.truth` says what each row is:
    ``'ok'``, the whole cutout (of ``diameter_pixel`` pixels) lies inside
    at least one tile; ``'edge'``, the centre lies on the mosaic less than
    half a cutout from its *outer* edge, so the cutout overlaps the mosaic
    edge in every tile; ``'off'``, the cutout misses every tile; ``'bad'``,
    an invalid row (column ``bad_kind``): NaN ``RA``, ``Dec`` = 95, a
    negative size, or a duplicate ``SourceID`` repeating the id of an
    earlier valid row, which keeps its own category.
"""

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.special import erf

from ..status import Status

__all__ = [
    "BAND_PROPERTIES",
    "Survey",
    "make_demo_survey",
    "make_survey",
    "tile_file_name",
]

logger = logging.getLogger(__name__)

#: Per-band header values and noise: ``FILTER``, ``MAGZERO`` (AB zero point of
#: the pixel values), the 1-sigma surface-brightness depth per pixel (AB mag)
#: and the mean colour (band minus VIS, mag) of the synthetic galaxies. Bands
#: not listed here get ``FILTER`` = the band name, ``MAGZERO`` = 30.0.
BAND_PROPERTIES = {
    "VIS": {"filter": "VIS", "magzero": 24.6, "depth": 29.0, "colour": 0.0},
    "NIR-Y": {"filter": "Y", "magzero": 30.1, "depth": 28.6, "colour": -0.3},
    "NIR-J": {"filter": "J", "magzero": 30.05, "depth": 28.6, "colour": -0.4},
    "NIR-H": {"filter": "H", "magzero": 30.0, "depth": 28.6, "colour": -0.5},
}
_DEFAULT_BAND = {"magzero": 30.0, "depth": 28.6, "colour": -0.3}

_CATALOGUE_FORMATS = {
    "csv": ("csv", "ascii.csv"),
    "ecsv": ("ecsv", "ascii.ecsv"),
    "fits": ("fits", "fits"),
    "parquet": ("parquet", "parquet"),
}
_DTYPES = ("f4", "f8", "i2", "i4")
_BAD_KINDS = ("nan_ra", "dec_out_of_range", "negative_size", "duplicate_id")
_CATEGORY_STATUS = {
    "ok": Status.OK,
    "edge": Status.PARTIAL_OVERLAP,
    "off": Status.NO_OVERLAP,
    "bad": Status.BAD_ROW,
}
_CRVAL = (150.0, 2.0)
_FIRST_TILE_ID = 102000001
_TIMESTAMP = "20260101T000000.000000Z"
_ROWS_PER_WRITE = 256  # rows converted to the file dtype and written at once
_STAMP_SIGMAS = 3.5  # a galaxy is drawn out to this many sigma


@dataclass
class Survey:
    """The files and the truth of a synthetic survey made by `make_survey`.

    Attributes
    ----------
    out_dir : str
        Folder holding the tiles and the catalogue.
    tile_paths : list of list of str
        Absolute paths, ``tile_paths[k][b]`` for tile ``k`` and band ``b``.
    bands : list of str
        Band names, in the order of ``tile_paths[k]``.
    catalogue_path : str
        Absolute path of the catalogue.
    n_sources : int
        Number of catalogue rows.
    truth : `~astropy.table.Table`
        One row per catalogue row, in catalogue order: ``row``,
        ``source_id``, ``ra``, ``dec`` and ``diameter_pixel`` as written,
        ``category`` (``'ok'``, ``'edge'``, ``'off'``, ``'bad'``),
        ``bad_kind``, ``expected_status`` (`~cutana.Status` value),
        ``mosaic_x``/``mosaic_y`` (0-based pixel position in the frame of
        tile 0; NaN when the row has no valid position), ``x_tile`` /
        ``y_tile`` (shape ``(N, n_tiles)``: the position in every tile),
        ``inside_tile`` (shape ``(N, n_tiles)``: the whole cutout lies in
        that tile), ``tile`` (the tile where the source lies deepest, -1 for
        ``'off'`` and ``'bad'`` rows; ties go to the lower index) with ``x``
        and ``y`` in that tile, ``sigma_x``/``sigma_y`` (galaxy Gaussian
        widths, pixels) and ``flux`` (shape ``(N, n_bands)``: total galaxy
        counts per band).
    tile_ids : list of int
        ``TILEID`` of each tile.
    tile_shape : tuple of int
        ``(ny, nx)`` of every tile.
    grid_shape : tuple of int
        ``(rows, columns)`` of the tile grid.
    tile_origins : list of tuple of int
        ``(x0, y0)`` of each tile's first pixel in the mosaic frame.
    overlap_pixels : int
        Overlap of neighbouring tiles, pixels.
    pixel_scale_arcsec : float
        Pixel scale.
    hdu : int
        Index of the image HDU in every tile file (0, or 1 when compressed).
    seed : int
        The seed the survey was made with.

    Examples
    --------
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> survey.bands
    ['VIS', 'NIR-Y', 'NIR-J', 'NIR-H']
    >>> len(survey.tile_paths), len(survey.paths), survey.grid_shape, survey.tile_shape
    (4, 16, (2, 2), (512, 512))
    >>> len(survey.truth) == survey.n_sources == 40
    True
    >>> sorted(set(survey.truth["category"].tolist()))
    ['bad', 'edge', 'off', 'ok']
    >>> survey.wcs(0).wcs.ctype[0]
    'RA---TAN'
    """

    out_dir: str
    tile_paths: list
    bands: list
    catalogue_path: str
    n_sources: int
    truth: Table = field(repr=False)
    tile_ids: list = field(default_factory=list)
    tile_shape: tuple = (0, 0)
    grid_shape: tuple = (1, 1)
    tile_origins: list = field(default_factory=list)
    overlap_pixels: int = 0
    pixel_scale_arcsec: float = 0.1
    hdu: int = 0
    seed: int = 0

    @property
    def paths(self):
        """Every tile file, tile by tile and band by band (list of str)."""
        return [p for tile in self.tile_paths for p in tile]

    def wcs(self, tile=0):
        """Return the celestial WCS of one tile (all bands share it).

        Parameters
        ----------
        tile : int, optional
            Tile index.

        Returns
        -------
        wcs : `~astropy.wcs.WCS`
            Read from the header of the tile's first band.
        """
        header = fits.getheader(self.tile_paths[tile][0], self.hdu)
        return WCS(header)


def tile_file_name(band, tile_id):
    """Return the Euclid-like file name of one band of one tile.

    Parameters
    ----------
    band : str
        Band name, e.g. ``'VIS'``.
    tile_id : int
        Tile identifier.

    Returns
    -------
    name : str
        ``EUC_MER_BGSUB-MOSAIC-{band}_TILE{tile_id}-SYNTH_20260101T000000.000000Z_00.00.fits``.

    Examples
    --------
    >>> from cutana.bench.synthetic import tile_file_name
    >>> tile_file_name("NIR-H", 102000001)
    'EUC_MER_BGSUB-MOSAIC-NIR-H_TILE102000001-SYNTH_20260101T000000.000000Z_00.00.fits'
    """
    return f"EUC_MER_BGSUB-MOSAIC-{band}_TILE{tile_id}-SYNTH_{_TIMESTAMP}_00.00.fits"


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _check_int(name, value, minimum):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        msg = f"{name} must be an integer >= {minimum}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _check_fraction(name, value):
    if not (isinstance(value, (int, float, np.number)) and 0 <= value <= 1):
        msg = f"{name} must be a number between 0 and 1, got {value!r}"
        raise ValueError(msg)
    return float(value)


def _tile_shape(tile_size):
    if np.ndim(tile_size) == 0:
        tile_size = (tile_size, tile_size)
    if len(tile_size) != 2:
        msg = f"tile_size must be an integer or (ny, nx), got {tile_size!r}"
        raise ValueError(msg)
    return tuple(_check_int("tile_size", v, 1) for v in tile_size)


def _grid_shape(n_tiles):
    """(rows, columns) of the most nearly square rectangular grid of n tiles."""
    rows = max(d for d in range(1, math.isqrt(n_tiles) + 1) if n_tiles % d == 0)
    return rows, n_tiles // rows


def _file_dtype(dtype):
    dt = np.dtype(dtype)
    key = f"{dt.kind}{dt.itemsize}"
    if key not in _DTYPES:
        msg = f"dtype must be one of '>f4', '>f8', '>i2', '>i4', got {dtype!r}"
        raise ValueError(msg)
    return dt.newbyteorder(">")


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------


def _tile_header(shape, crpix, scale_deg, dtype, band, tile_id, bscale):
    """Header of one band of one tile (primary-HDU form)."""
    props = BAND_PROPERTIES.get(band, {"filter": band, **_DEFAULT_BAND})
    header = fits.Header()
    header["SIMPLE"] = (True, "conforms to FITS standard")
    header["BITPIX"] = (
        {"f4": -32, "f8": -64, "i2": 16, "i4": 32}[f"{dtype.kind}{dtype.itemsize}"],
        "array data type",
    )
    header["NAXIS"] = (2, "number of array dimensions")
    header["NAXIS1"] = shape[1]
    header["NAXIS2"] = shape[0]
    header["EXTEND"] = True
    if bscale is not None:
        header["BSCALE"] = (bscale, "physical = BZERO + BSCALE * stored")
        header["BZERO"] = 0.0
    header["WCSAXES"] = 2
    header["CTYPE1"] = ("RA---TAN", "gnomonic projection")
    header["CTYPE2"] = ("DEC--TAN", "gnomonic projection")
    header["CUNIT1"] = "deg"
    header["CUNIT2"] = "deg"
    header["CRVAL1"] = (_CRVAL[0], "[deg] RA of the tangent point")
    header["CRVAL2"] = (_CRVAL[1], "[deg] Dec of the tangent point")
    header["CRPIX1"] = (float(crpix[0]), "tangent point, 1-based pixel x")
    header["CRPIX2"] = (float(crpix[1]), "tangent point, 1-based pixel y")
    header["CD1_1"] = -scale_deg
    header["CD1_2"] = 0.0
    header["CD2_1"] = 0.0
    header["CD2_2"] = scale_deg
    header["RADESYS"] = "ICRS"
    header["TELESCOP"] = ("EUCLID", "synthetic data in a Euclid-like layout")
    header["INSTRUME"] = "VIS" if band == "VIS" else "NISP"
    header["BAND"] = (band, "band name")
    header["FILTER"] = (props["filter"], "filter name")
    header["MAGZERO"] = (props["magzero"], "AB zero point of the pixel values")
    header["TILEID"] = (tile_id, "tile identifier")
    header["BUNIT"] = ("ADU", "background-subtracted counts")
    header["ORIGIN"] = "cutana synthetic survey"
    return header


def _depth(x, y, shape):
    """Distance (pixels) from (x, y) to the nearest edge of a tile's pixel area."""
    ny, nx = shape
    return np.minimum(
        np.minimum(x + 0.5, nx - 0.5 - x), np.minimum(y + 0.5, ny - 0.5 - y)
    )


def _place_sources(rng, n, counts, size_range, mosaic_shape, tile_shape, origins):
    """Mosaic positions and diameters of every category, unshuffled."""
    my, mx = mosaic_shape
    ny, nx = tile_shape
    n_ok, n_edge, n_off, n_bad = counts
    diam = rng.integers(size_range[0], size_range[1] + 1, size=n).astype(np.int64)
    half = diam / 2.0
    x = np.empty(n)
    y = np.empty(n)

    # ok (and bad, which start as ok sources): whole box inside a random tile
    # with a 1-pixel margin, so that rounding through RA/Dec cannot matter
    inner = np.r_[0:n_ok, n_ok + n_edge + n_off : n]
    tiles = rng.integers(0, len(origins), size=len(inner))
    h = half[inner]
    ox = np.array([o[0] for o in origins], dtype=float)[tiles]
    oy = np.array([o[1] for o in origins], dtype=float)[tiles]
    x[inner] = ox + rng.uniform(h + 1, nx - 2 - h)
    y[inner] = oy + rng.uniform(h + 1, ny - 2 - h)

    # edge: centre on the mosaic, less than half a box (minus 2) from its outer edge
    sl = slice(n_ok, n_ok + n_edge)
    h = half[sl]
    side = rng.integers(0, 4, size=n_edge)
    along_x = rng.uniform(0, mx - 1, size=n_edge)
    along_y = rng.uniform(0, my - 1, size=n_edge)
    depth = rng.uniform(0, 1, size=n_edge) * (h - 2)
    x[sl] = np.select([side == 0, side == 1], [depth, mx - 1 - depth], along_x)
    y[sl] = np.select([side == 2, side == 3], [depth, my - 1 - depth], along_y)

    # off: the box misses the mosaic by at least 2 pixels
    sl = slice(n_ok + n_edge, n_ok + n_edge + n_off)
    h = half[sl]
    side = rng.integers(0, 4, size=n_off)
    beyond = h + 2 + rng.uniform(0, 50, size=n_off)
    along_x = rng.uniform(-50, mx + 49, size=n_off)
    along_y = rng.uniform(-50, my + 49, size=n_off)
    x[sl] = np.select(
        [side == 0, side == 1], [-0.5 - beyond, mx - 0.5 + beyond], along_x
    )
    y[sl] = np.select(
        [side == 2, side == 3], [-0.5 - beyond, my - 0.5 + beyond], along_y
    )
    return x, y, diam


def _make_catalogue(
    rng, n, counts, bands, size_range, mosaic_shape, tile_shape, origins, wcs0, scale
):
    """Build the truth table (catalogue order) and the galaxy parameters."""
    n_ok, n_edge, n_off, n_bad = counts
    x, y, diam = _place_sources(
        rng, n, counts, size_range, mosaic_shape, tile_shape, origins
    )
    category = np.array(
        ["ok"] * n_ok + ["edge"] * n_edge + ["off"] * n_off + ["bad"] * n_bad,
        dtype="<U4",
    )
    bad_kind = np.full(n, "", dtype="<U16")
    bad_kind[n - n_bad :] = [_BAD_KINDS[i % len(_BAD_KINDS)] for i in range(n_bad)]

    # galaxies: magnitude, colours, widths
    mag_vis = rng.uniform(19.0, 23.5, size=n)
    flux = np.empty((n, len(bands)))
    for b, band in enumerate(bands):
        props = BAND_PROPERTIES.get(band, _DEFAULT_BAND)
        colour = (
            props["colour"] + rng.normal(0.0, 0.15, size=n) if props["colour"] else 0.0
        )
        flux[:, b] = 10.0 ** (-0.4 * (mag_vis + colour - props["magzero"]))
    sigma = diam[:, None] / 10.0 * rng.uniform(0.7, 1.3, size=(n, 2))

    # shuffle rows, keep a valid row first so every duplicate has an original before it
    order = rng.permutation(n)
    if n and category[order[0]] == "bad" and n_bad < n:
        first_valid = int(np.flatnonzero(category[order] != "bad")[0])
        order[[0, first_valid]] = order[[first_valid, 0]]
    x, y, diam, category, bad_kind = (
        a[order] for a in (x, y, diam, category, bad_kind)
    )
    mag_vis, flux, sigma = mag_vis[order], flux[order], sigma[order]

    source_id = np.array([f"SYN-{i + 1:06d}" for i in range(n)])
    ra, dec = wcs0.wcs_pix2world(x, y, 0) if n else (np.empty(0), np.empty(0))
    ra = np.asarray(ra, dtype=np.float64)
    dec = np.asarray(dec, dtype=np.float64)
    written_diam = diam.copy()
    valid_pos = np.ones(n, dtype=bool)
    valid_rows = np.flatnonzero(category != "bad")
    for row in np.flatnonzero(category == "bad"):
        kind = bad_kind[row]
        if kind == "nan_ra":
            ra[row] = np.nan
            valid_pos[row] = False
        elif kind == "dec_out_of_range":
            dec[row] = 95.0
            valid_pos[row] = False
        elif kind == "negative_size":
            written_diam[row] = -diam[row]
        else:  # duplicate_id of an earlier valid row
            earlier = valid_rows[valid_rows < row]
            source_id[row] = source_id[rng.choice(earlier)]

    mosaic_x = np.where(valid_pos, x, np.nan)
    mosaic_y = np.where(valid_pos, y, np.nan)
    ox = np.array([o[0] for o in origins], dtype=float)
    oy = np.array([o[1] for o in origins], dtype=float)
    x_tile = mosaic_x[:, None] - ox[None, :]
    y_tile = mosaic_y[:, None] - oy[None, :]
    with np.errstate(invalid="ignore"):
        depth = _depth(x_tile, y_tile, tile_shape)
        # astropy's rule: the box starts at ceil(position - n / 2)
        first_x = np.ceil(x_tile - diam[:, None] / 2.0)
        first_y = np.ceil(y_tile - diam[:, None] / 2.0)
        inside = (
            (first_x >= 0)
            & (first_x + diam[:, None] <= tile_shape[1])
            & (first_y >= 0)
            & (first_y + diam[:, None] <= tile_shape[0])
        )
    best = np.argmax(np.where(np.isnan(depth), -np.inf, depth), axis=1)
    has_tile = np.isin(category, ("ok", "edge"))
    tile = np.where(has_tile, best, -1).astype(np.int32)
    rows = np.arange(n)
    tile_x = np.where(has_tile, x_tile[rows, best], np.nan)
    tile_y = np.where(has_tile, y_tile[rows, best], np.nan)
    # for the fits_file_paths column: the nearest tile, also for off and bad rows
    nearest = best

    truth = Table()
    truth["row"] = rows
    truth["source_id"] = source_id
    truth["ra"] = ra
    truth["dec"] = dec
    truth["diameter_pixel"] = written_diam
    truth["diameter_arcsec"] = np.round(written_diam * scale, 10)
    truth["category"] = category
    truth["bad_kind"] = bad_kind
    truth["expected_status"] = np.array(
        [int(_CATEGORY_STATUS[c]) for c in category], dtype=np.int16
    )
    truth["tile"] = tile
    truth["x"] = tile_x
    truth["y"] = tile_y
    truth["mosaic_x"] = mosaic_x
    truth["mosaic_y"] = mosaic_y
    truth["x_tile"] = x_tile
    truth["y_tile"] = y_tile
    truth["inside_tile"] = inside
    truth["sigma_x"] = sigma[:, 0]
    truth["sigma_y"] = sigma[:, 1]
    truth["mag_vis"] = mag_vis
    truth["flux"] = flux
    # galaxies are drawn wherever the row has a real position (all but NaN RA / Dec 95)
    galaxies = {"x": x, "y": y, "sigma": sigma, "flux": flux, "draw": valid_pos}
    return truth, galaxies, nearest


# --------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------


def _pixel_profiles(offset, sigma, radius):
    """Pixel-integrated 1-D Gaussians on pixels -radius..radius of each centre pixel."""
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    scale = np.sqrt(2.0) * sigma[:, None]
    lo = (k[None, :] - 0.5 - offset[:, None]) / scale
    hi = (k[None, :] + 0.5 - offset[:, None]) / scale
    return (0.5 * (erf(hi) - erf(lo))).astype(np.float32)


class _TileGalaxies:
    """The galaxies that touch one tile, as separable, band-independent profiles."""

    def __init__(self, galaxies, origin, shape):
        ny, nx = shape
        x = galaxies["x"] - origin[0]
        y = galaxies["y"] - origin[1]
        sigma = galaxies["sigma"]
        rad = np.ceil(_STAMP_SIGMAS * sigma).astype(np.int64)  # (n, 2): (rx, ry)
        cx = np.rint(x).astype(np.int64)
        cy = np.rint(y).astype(np.int64)
        sel = (
            galaxies["draw"]
            & (cx + rad[:, 0] >= 0)
            & (cx - rad[:, 0] < nx)
            & (cy + rad[:, 1] >= 0)
            & (cy - rad[:, 1] < ny)
        )
        idx = np.flatnonzero(sel)
        self.index = idx
        r = int(rad[idx].max()) if len(idx) else 0
        self.gx = _pixel_profiles(x[idx] - cx[idx], sigma[idx, 0], r)
        self.gy = _pixel_profiles(y[idx] - cy[idx], sigma[idx, 1], r)
        # per galaxy: the window in the tile and the matching part of the profiles
        x0 = np.maximum(cx[idx] - rad[idx, 0], 0)
        x1 = np.minimum(cx[idx] + rad[idx, 0] + 1, nx)
        y0 = np.maximum(cy[idx] - rad[idx, 1], 0)
        y1 = np.minimum(cy[idx] + rad[idx, 1] + 1, ny)
        px0 = x0 - cx[idx] + r
        py0 = y0 - cy[idx] + r
        self.windows = np.stack(
            [y0, y1, x0, x1, py0, py0 + (y1 - y0), px0, px0 + (x1 - x0)], axis=1
        ).tolist()

    def add_to(self, image, flux):
        """Add the galaxies with total fluxes ``flux`` (one per galaxy) to ``image``."""
        f = flux[self.index].astype(np.float32)
        gx, gy = self.gx, self.gy
        for i, (y0, y1, x0, x1, py0, py1, px0, px1) in enumerate(self.windows):
            image[y0:y1, x0:x1] += (f[i] * gy[i, py0:py1])[:, None] * gx[
                i, None, px0:px1
            ]


def _noise_sigma(band):
    props = BAND_PROPERTIES.get(band, _DEFAULT_BAND)
    return 10.0 ** (-0.4 * (props["depth"] - props["magzero"]))


def _write_image(path, header, image, dtype, bscale, compress):
    """Write one tile band: streamed in row blocks, or compressed in one go."""
    tmp = f"{path}.part"
    if os.path.exists(tmp):
        os.remove(tmp)

    def stored(block):
        if bscale is None:
            return block.astype(dtype)
        info = np.iinfo(dtype)
        return np.clip(np.rint(block / bscale), info.min, info.max).astype(dtype)

    if compress:
        hdr = header.copy()
        for key in ("SIMPLE", "EXTEND", "BSCALE", "BZERO"):
            hdr.remove(key, ignore_missing=True)
        data = stored(image)
        comp = fits.CompImageHDU(
            data, hdr, compression_type="GZIP_2", quantize_level=0.0
        )
        if bscale is not None:
            comp.header["BSCALE"] = bscale
            comp.header["BZERO"] = 0.0
        fits.HDUList([fits.PrimaryHDU(), comp]).writeto(tmp)
    else:
        with fits.StreamingHDU(tmp, header) as stream:
            for start in range(0, image.shape[0], _ROWS_PER_WRITE):
                stream.write(stored(image[start : start + _ROWS_PER_WRITE]))
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def make_survey(
    out_dir,
    *,
    n_tiles=2,
    bands=("VIS", "NIR-Y", "NIR-J", "NIR-H"),
    tile_size=1000,
    n_sources=200,
    pixel_scale_arcsec=0.1,
    overlap_pixels=50,
    edge_fraction=0.05,
    off_tile_fraction=0.02,
    bad_row_fraction=0.0,
    size_range_pixels=(32, 128),
    seed=0,
    dtype=">f4",
    catalogue_format="csv",
    cutana_style=True,
    compress=False,
):
    """Write a synthetic Euclid-like survey: tiles in several bands and a catalogue.

    The tiles share one TAN projection (tangent point RA, Dec = 150, 2 deg)
    and lie on a rectangular grid, neighbours overlapping by
    ``overlap_pixels``. Each band of each tile is one FITS file named like
    Euclid's MER mosaics, with the image in the primary HDU (or, with
    ``compress=True``, in a lossless GZIP-compressed extension 1) and the
    header keywords ``BAND``, ``FILTER``, ``MAGZERO``, ``TILEID`` and
    ``BUNIT``. Pixels hold Gaussian noise and one Gaussian galaxy per
    catalogue source. Only one tile array is in memory at a time, and it is
    written in blocks of rows, so tiles of 8000 x 8000 pixels are fine.

    Parameters
    ----------
    out_dir : str or path-like
        Output folder, created if needed; existing files of the same names
        are replaced.
    n_tiles : int, optional
        Number of tiles (sky positions).
    bands : sequence of str, optional
        Band names, one file per band and tile. Known bands (see
        `BAND_PROPERTIES`) get Euclid-like zero points.
    tile_size : int or tuple of int, optional
        Tile size in pixels, ``n`` or ``(ny, nx)``.
    n_sources : int, optional
        Number of catalogue rows.
    pixel_scale_arcsec : float, optional
        Pixel scale of every tile.
    overlap_pixels : int, optional
        Overlap of neighbouring tiles, in pixels.
    edge_fraction : float, optional
        Fraction of rows whose cutout overlaps the outer edge of the mosaic.
    off_tile_fraction : float, optional
        Fraction of rows whose cutout misses every tile.
    bad_row_fraction : float, optional
        Fraction of invalid rows (NaN RA, Dec 95, negative size, duplicate
        id, in turn).
    size_range_pixels : tuple of int, optional
        Inclusive range of the integer cutout diameters ``diameter_pixel``.
    seed : int, optional
        Seed; the same seed gives byte-identical tiles and catalogue rows.
    dtype : str, optional
        Pixel type on disk: ``'>f4'`` (default), ``'>f8'``, or ``'>i2'`` /
        ``'>i4'`` (scaled with ``BSCALE`` = noise sigma / 8 and ``BZERO`` = 0).
    catalogue_format : {'csv', 'ecsv', 'fits', 'parquet'}, optional
        Format of ``catalogue.<format>`` in ``out_dir``.
    cutana_style : bool, optional
        If `True`, add ESA Cutana's ``fits_file_paths`` column: per row the
        string of a Python list of the absolute band paths of the tile that
        holds the source (the nearest tile for off-tile and bad rows).
    compress : bool, optional
        Write tiles as lossless GZIP-compressed image extensions.

    Returns
    -------
    survey : `Survey`
        Paths, metadata and the truth table.

    Raises
    ------
    ValueError
        If a parameter is out of range, e.g. the fractions add up to more
        than 1 or a tile is too small for the largest cutout.

    Examples
    --------
    >>> import tempfile
    >>> from cutana.bench import make_survey
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     survey = make_survey(tmp, n_tiles=2, bands=("VIS",), tile_size=200,
    ...                          n_sources=20, size_range_pixels=(16, 32))
    ...     print(len(survey.tile_paths), survey.bands, len(survey.truth))
    2 ['VIS'] 20
    """
    n_tiles = _check_int("n_tiles", n_tiles, 1)
    n_sources = _check_int("n_sources", n_sources, 0)
    seed = _check_int("seed", seed, 0)
    if isinstance(bands, str):
        bands = (bands,)
    bands = [str(b) for b in bands]
    if not bands or len(set(bands)) != len(bands) or any(not b for b in bands):
        msg = f"bands must be a non-empty sequence of distinct names, got {bands!r}"
        raise ValueError(msg)
    tile_shape = _tile_shape(tile_size)
    overlap = _check_int("overlap_pixels", overlap_pixels, 0)
    if overlap >= min(tile_shape):
        msg = (
            f"overlap_pixels must be smaller than the tiles {tile_shape}, got {overlap}"
        )
        raise ValueError(msg)
    if not (
        isinstance(pixel_scale_arcsec, (int, float, np.number))
        and pixel_scale_arcsec > 0
    ):
        msg = (
            f"pixel_scale_arcsec must be a positive number, got {pixel_scale_arcsec!r}"
        )
        raise ValueError(msg)
    fractions = [
        _check_fraction(name, value)
        for name, value in (
            ("edge_fraction", edge_fraction),
            ("off_tile_fraction", off_tile_fraction),
            ("bad_row_fraction", bad_row_fraction),
        )
    ]
    if sum(fractions) > 1:
        msg = f"edge, off-tile and bad-row fractions add up to {sum(fractions)} > 1"
        raise ValueError(msg)
    if len(size_range_pixels) != 2:
        msg = f"size_range_pixels must be (min, max), got {size_range_pixels!r}"
        raise ValueError(msg)
    lo = _check_int("size_range_pixels[0]", size_range_pixels[0], 8)
    hi = _check_int("size_range_pixels[1]", size_range_pixels[1], lo)
    if hi + 4 > min(tile_shape):
        msg = (
            f"tile_size {tile_shape} is too small for cutouts of up to {hi} pixels; "
            f"use tiles of at least {hi + 4} pixels"
        )
        raise ValueError(msg)
    file_dtype = _file_dtype(dtype)
    if catalogue_format not in _CATALOGUE_FORMATS:
        msg = (
            f"catalogue_format must be one of {sorted(_CATALOGUE_FORMATS)}, "
            f"got {catalogue_format!r}"
        )
        raise ValueError(msg)

    counts_edge, counts_off, counts_bad = (int(round(f * n_sources)) for f in fractions)
    counts_edge = min(counts_edge, n_sources)
    counts_off = min(counts_off, n_sources - counts_edge)
    counts_bad = min(counts_bad, n_sources - counts_edge - counts_off)
    counts_ok = n_sources - counts_edge - counts_off - counts_bad
    if counts_bad and counts_bad == n_sources and counts_bad >= len(_BAD_KINDS):
        msg = "bad_row_fraction leaves no valid row for the duplicate ids to repeat"
        raise ValueError(msg)
    counts = (counts_ok, counts_edge, counts_off, counts_bad)

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows, cols = _grid_shape(n_tiles)
    ny, nx = tile_shape
    step_x, step_y = nx - overlap, ny - overlap
    origins = [(c * step_x, r * step_y) for r in range(rows) for c in range(cols)]
    mosaic_shape = (rows * step_y + overlap, cols * step_x + overlap)
    scale_deg = pixel_scale_arcsec / 3600.0
    # tangent point at the mosaic centre; CRPIX is 1-based
    crpix0 = ((mosaic_shape[1] + 1) / 2.0, (mosaic_shape[0] + 1) / 2.0)
    tile_ids = [_FIRST_TILE_ID + k for k in range(n_tiles)]
    sigmas = {band: _noise_sigma(band) for band in bands}
    bscales = {
        band: (sigmas[band] / 8.0 if file_dtype.kind == "i" else None) for band in bands
    }

    headers = {}
    for k, (x0, y0) in enumerate(origins):
        for band in bands:
            headers[k, band] = _tile_header(
                tile_shape,
                (crpix0[0] - x0, crpix0[1] - y0),
                scale_deg,
                file_dtype,
                band,
                tile_ids[k],
                bscales[band],
            )
    wcs0 = WCS(headers[0, bands[0]])

    rng = np.random.default_rng([seed, 0])
    truth, galaxies, nearest = _make_catalogue(
        rng,
        n_sources,
        counts,
        bands,
        (lo, hi),
        mosaic_shape,
        tile_shape,
        origins,
        wcs0,
        pixel_scale_arcsec,
    )

    tile_paths = [
        [str(out / tile_file_name(band, tile_ids[k])) for band in bands]
        for k in range(n_tiles)
    ]
    logger.info(
        "writing %d tiles x %d bands of %s pixels to %s",
        n_tiles,
        len(bands),
        tile_shape,
        out,
    )
    for k in range(n_tiles):
        drawn = _TileGalaxies(galaxies, origins[k], tile_shape)
        for b, band in enumerate(bands):
            noise_rng = np.random.default_rng([seed, 1, k, b])
            image = noise_rng.standard_normal(tile_shape, dtype=np.float32)
            image *= np.float32(sigmas[band])
            drawn.add_to(image, galaxies["flux"][:, b])
            _write_image(
                tile_paths[k][b],
                headers[k, band],
                image,
                file_dtype,
                bscales[band],
                compress,
            )
            del image

    catalogue = Table()
    catalogue["SourceID"] = truth["source_id"]
    catalogue["RA"] = truth["ra"]
    catalogue["Dec"] = truth["dec"]
    catalogue["diameter_pixel"] = truth["diameter_pixel"]
    catalogue["diameter_arcsec"] = truth["diameter_arcsec"]
    if cutana_style:
        literals = [str(paths) for paths in tile_paths]
        catalogue["fits_file_paths"] = np.array(
            [literals[t] for t in nearest], dtype=str
        )
    suffix, fmt = _CATALOGUE_FORMATS[catalogue_format]
    catalogue_path = out / f"catalogue.{suffix}"
    catalogue.write(catalogue_path, format=fmt, overwrite=True)
    logger.info("wrote %d catalogue rows to %s", n_sources, catalogue_path)

    return Survey(
        out_dir=str(out),
        tile_paths=tile_paths,
        bands=list(bands),
        catalogue_path=str(catalogue_path),
        n_sources=n_sources,
        truth=truth,
        tile_ids=tile_ids,
        tile_shape=tile_shape,
        grid_shape=(rows, cols),
        tile_origins=origins,
        overlap_pixels=overlap,
        pixel_scale_arcsec=float(pixel_scale_arcsec),
        hdu=1 if compress else 0,
        seed=seed,
    )


def make_demo_survey(out_dir, *, n_sources=400, seed=0):
    """Write the small survey of ``cutana demo``: 2 x 2 tiles, 4 bands, 400 sources.

    It has every kind of row the pipeline must handle (complete cutouts,
    cutouts over the mosaic edge, sources off every tile and a few invalid
    rows) and takes well under a second to make.

    Parameters
    ----------
    out_dir : str or path-like
        Output folder, created if needed.
    n_sources : int, optional
        Number of catalogue rows.
    seed : int, optional
        Seed.

    Returns
    -------
    survey : `Survey`
        As from `make_survey`.

    Examples
    --------
    >>> import tempfile
    >>> from cutana.bench import make_demo_survey
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     survey = make_demo_survey(tmp)
    ...     print(survey.grid_shape, survey.tile_shape, survey.n_sources)
    (2, 2) (512, 512) 400
    """
    return make_survey(
        out_dir,
        n_tiles=4,
        tile_size=512,
        n_sources=n_sources,
        overlap_pixels=50,
        edge_fraction=0.05,
        off_tile_fraction=0.02,
        bad_row_fraction=0.02,
        size_range_pixels=(32, 96),
        seed=seed,
    )
