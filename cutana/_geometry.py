# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Positions and sizes to integer pixel boxes: the one place for rounding rules.

Every other module (the cutout classes, the tile index, the planner) turns
positions into boxes through this module, so that a cutout made by the batch
pipeline is pixel for pixel the one `astropy.nddata.Cutout2D` makes.

The rules reproduce `astropy.nddata.utils.overlap_slices` exactly, vectorised
over N sources. Positions are in the *array* axis order ``(y, x)`` here, as in
``overlap_slices``; integer positions are pixel centres. For an axis of
``n`` pixels centred on ``p``, the first pixel of the box is
``limit_rounding_method(p - n / 2)`` (``ceil`` by default), so an even size
centred on a whole pixel extends one pixel further towards larger indices.
"""

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BOUNDARY_TOL",
    "DISTORTION_TOL",
    "BOX_OK",
    "BOX_NONFINITE",
    "BOX_NO_OVERLAP",
    "BOX_OVERFLOW",
    "BOX_PARTIAL",
    "Boxes",
    "angles_in_pixels",
    "compute_boxes",
    "near_rounding_boundary",
    "round_limits",
]

#: Box limits this close to a rounding boundary (a multiple of 0.5) can be
#: rounded either way on a last-bit difference in the position.
BOUNDARY_TOL = 1e-6

#: Box limits this close to a rounding boundary are computed again source by
#: source when the WCS has distortions: ``all_world2pix`` iterates over all
#: the positions given at once until every one has converged to 1e-4 pixel,
#: so a vectorised call can differ from astropy's per-source call by up to
#: that much (1.3e-5 pixel seen with SIP), and there that could move a box
#: by a pixel.
DISTORTION_TOL = 1e-3


def angles_in_pixels(angles, wcs):
    """Angular sizes as pixel counts of a WCS, as `astropy.nddata.Cutout2D`
    converts them (not rounded).

    ``Cutout2D`` divides the angle by the projection-plane pixel scale of
    the axis, with the unit of the first axis's ``CUNIT``, and decomposes the
    quotient; this repeats that expression, vectorised, so that the counts
    are equal to the last bit (which decides how a count of about a
    half-integer rounds). As in ``Cutout2D``, the count of array axis ``k``
    (0 is y) uses the scale of WCS axis ``k`` (0 is x).

    Parameters
    ----------
    angles : `~astropy.units.Quantity`, shape ``(n, 2)``
        ``(ny, nx)`` sizes in an angular unit.
    wcs : `~astropy.wcs.WCS`
        The celestial WCS.

    Returns
    -------
    pixels : `~numpy.ndarray` of float64, shape ``(n, 2)``

    Examples
    --------
    >>> import astropy.units as u
    >>> import numpy as np
    >>> from astropy.wcs import WCS
    >>> from cutana._geometry import angles_in_pixels
    >>> wcs = WCS(naxis=2)
    >>> wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> wcs.wcs.cdelt = [-0.1 / 3600, 0.1 / 3600]
    >>> angles_in_pixels(np.array([[1.5, 1.5]]) * u.arcsec, wcs)
    array([[15., 15.]])
    """
    import astropy.units as u
    from astropy.wcs.utils import proj_plane_pixel_scales

    scales = u.Quantity(proj_plane_pixel_scales(wcs), wcs.wcs.cunit[0])
    angles = u.Quantity(angles)
    out = np.empty(angles.shape, dtype=np.float64)
    for axis in (0, 1):
        out[:, axis] = (angles[:, axis] / scales[axis]).decompose().value
    return out


def near_rounding_boundary(values, tol=BOUNDARY_TOL):
    """Whether each value lies within ``tol`` of a multiple of 0.5.

    There a box limit's rounding (ceil, floor, trunc or round) can go either
    way on a difference in the position smaller than ``tol``.

    Parameters
    ----------
    values : array-like
        Box limits (or positions, for whole box sizes), in pixels.
    tol : float, optional
        Distance, in pixels (default `BOUNDARY_TOL`).

    Returns
    -------
    near : `~numpy.ndarray` of bool
        Elementwise; False for NaN.

    Examples
    --------
    >>> from cutana._geometry import near_rounding_boundary
    >>> near_rounding_boundary([3.5, 3.5 + 1e-9, 3.25, float("nan")]).tolist()
    [True, True, False, False]
    """
    twice = 2.0 * np.asarray(values, dtype=np.float64)
    return np.abs(twice - np.round(twice)) < 2 * tol


#: astropy's message when the box limits cannot be rounded to numbers.
ROUNDING_ERROR = (
    "Limit rounding method must accept a single number as input and return a "
    "single number."
)

#: The box was computed (for ``strict``, the box lies wholly in the image).
BOX_OK = 0
#: The position is NaN or infinite (astropy raises `ValueError`).
BOX_NONFINITE = 1
#: The box misses the image (astropy raises `~astropy.nddata.NoOverlapError`).
BOX_NO_OVERLAP = 2
#: ``strict`` mode and the box leaves the image
#: (astropy raises `~astropy.nddata.PartialOverlapError`).
BOX_PARTIAL = 3
#: The rounded box limit does not fit in a 64-bit integer (the position is
#: astronomically far from the image; astropy raises `OverflowError`).
BOX_OVERFLOW = 4

# Rounded limits are kept within +-2**62 so that ``start + size`` never
# overflows; anything that far out has no overlap with any image.
_LIMIT = float(2**62)
_INT64_RANGE = (-(2.0**63), 2.0**63)

_MODES = ("partial", "trim", "strict")

# Rounding callables that have an exact elementwise numpy equivalent.
_VECTOR_ROUNDING = {
    np.ceil: np.ceil,
    np.floor: np.floor,
    np.round: np.round,
    np.rint: np.rint,
    np.trunc: np.trunc,
    np.fix: np.trunc,
    math.ceil: np.ceil,
    math.floor: np.floor,
    math.trunc: np.trunc,
    round: np.round,
}


@dataclass(frozen=True)
class Boxes:
    """Integer boxes of N cutouts in one image, in array ``(y, x)`` order.

    Attributes
    ----------
    start : `~numpy.ndarray`, shape ``(N, 2)``, int64
        First pixel of each requested box in the image (``indices_min`` of
        ``overlap_slices``); may be negative or beyond the image.
    shape : `~numpy.ndarray`, shape ``(N, 2)``, int64
        Requested ``(ny, nx)`` of each box.
    large_start, large_stop : `~numpy.ndarray`, shape ``(N, 2)``, int64
        ``slices_large``: the part of the image that the box overlaps.
    small_start, small_stop : `~numpy.ndarray`, shape ``(N, 2)``, int64
        ``slices_small``: where that part sits in the cutout (for ``trim``,
        from 0 to the trimmed size).
    code : `~numpy.ndarray`, shape ``(N,)``, int8
        ``BOX_OK``, ``BOX_NONFINITE``, ``BOX_NO_OVERLAP``, ``BOX_PARTIAL``
        or ``BOX_OVERFLOW``.
        Slices of sources whose code is not ``BOX_OK`` are meaningless.
    mode : str
        The mode the boxes were computed for.
    """

    start: np.ndarray
    shape: np.ndarray
    large_start: np.ndarray
    large_stop: np.ndarray
    small_start: np.ndarray
    small_stop: np.ndarray
    code: np.ndarray
    mode: str

    def __len__(self):
        return len(self.code)

    @property
    def is_partial(self):
        """Boolean mask of boxes that overlap the image only in part."""
        inside = self.code == BOX_OK
        for a in (0, 1):  # column by column, as in `compute_boxes`
            start = self.start[:, a]
            inside &= (start >= 0) & (start + self.shape[:, a] <= self._large[a])
        return (self.code == BOX_OK) & ~inside

    @property
    def out_shape(self):
        """``(N, 2)`` shape of each cutout array (trimmed in ``trim`` mode)."""
        if self.mode == "trim":
            return self.large_stop - self.large_start
        return self.shape.copy()

    def slices(self, i):
        """Return ``(slices_large, slices_small)`` of source ``i`` as astropy does.

        Parameters
        ----------
        i : int
            Index of the source.

        Returns
        -------
        slices_large, slices_small : tuple of slice
            The ``overlap_slices`` result for source ``i``.
        """
        large = tuple(
            slice(int(self.large_start[i, a]), int(self.large_stop[i, a]))
            for a in (0, 1)
        )
        small = tuple(
            slice(int(self.small_start[i, a]), int(self.small_stop[i, a]))
            for a in (0, 1)
        )
        return large, small

    # the image shape is kept privately for ``is_partial``
    _large: tuple = (0, 0)


def round_limits(values, limit_rounding_method=np.ceil, *, return_overflow=False):
    """Round box limits with ``limit_rounding_method`` exactly as astropy does.

    Parameters
    ----------
    values : `~numpy.ndarray` of float64
        The unrounded first-pixel coordinates ``position - size / 2``.
    limit_rounding_method : callable, optional
        Rounding applied to each value; numpy and `math` rounding functions
        are applied vectorised, any other callable element by element.
    return_overflow : bool, optional
        If `True`, also return a mask of the values whose rounded value
        does not fit in a 64-bit integer (astropy raises `OverflowError`
        for them); their rounded value is clipped.

    Returns
    -------
    rounded : `~numpy.ndarray` of int64
        The rounded values, clipped to ``[-2**62, 2**62]``.
    overflow : `~numpy.ndarray` of bool
        Only if ``return_overflow`` is `True`.

    Raises
    ------
    ValueError
        If the method is not callable or does not return a number.
    """
    if not callable(limit_rounding_method):
        msg = "Limit rounding method must be a callable function."
        raise ValueError(msg)
    values = np.asarray(values, dtype=np.float64)
    try:
        vector = _VECTOR_ROUNDING.get(limit_rounding_method)
    except TypeError:  # unhashable callable
        vector = None
    try:
        if vector is not None:
            rounded = vector(values)
            overflow = ~((rounded >= _INT64_RANGE[0]) & (rounded < _INT64_RANGE[1]))
            if rounded.size and not (np.abs(rounded).max() <= _LIMIT):  # incl. NaN
                rounded = np.clip(rounded, -_LIMIT, _LIMIT)
            result = rounded.astype(np.int64)
        else:
            flat = [int(limit_rounding_method(v)) for v in values.ravel()]
            overflow = np.array(
                [not (-(2**63) <= v < 2**63) for v in flat], dtype=bool
            ).reshape(values.shape)
            limit = int(_LIMIT)
            result = np.array(
                [min(max(v, -limit), limit) for v in flat], dtype=np.int64
            ).reshape(values.shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(ROUNDING_ERROR) from exc
    if return_overflow:
        return result, overflow
    return result


def _either(mask):
    """Row-wise ``any`` of an ``(N, 2)`` boolean array."""
    return mask[:, 0] | mask[:, 1]


def _both(mask):
    """Row-wise ``all`` of an ``(N, 2)`` boolean array."""
    return mask[:, 0] & mask[:, 1]


def compute_boxes(
    large_shape, shapes, positions_yx, mode="partial", *, limit_rounding_method=np.ceil
):
    """Compute the boxes of N cutouts in one image, as ``overlap_slices`` does.

    Parameters
    ----------
    large_shape : tuple of int
        ``(ny, nx)`` shape of the image.
    shapes : array-like, shape ``(N, 2)`` or ``(2,)``
        Integer ``(ny, nx)`` size of each cutout, or one size for all.
    positions_yx : array-like, shape ``(N, 2)``
        ``(y, x)`` position of each cutout's centre; integers are pixel centres.
    mode : {'partial', 'trim', 'strict'}, optional
        As in `astropy.nddata.utils.overlap_slices`.
    limit_rounding_method : callable, optional
        Rounding of the first pixel, `numpy.ceil` by default.

    Returns
    -------
    boxes : `Boxes`
        The boxes, with a per-source ``code`` saying whether astropy would
        have raised for that source (and which exception).

    Raises
    ------
    ValueError
        If ``mode`` or ``limit_rounding_method`` is invalid (these apply to
        all sources at once, so they are raised, not coded).
    """
    if mode not in _MODES:
        msg = 'Mode can be only "partial", "trim", or "strict".'
        raise ValueError(msg)
    pos = np.asarray(positions_yx, dtype=np.float64).reshape(-1, 2)
    n = len(pos)
    # (N, 2) arrays are computed column by column (y, then x): a ufunc over
    # an (N, 2) array and a (2,) row would run an inner loop of length 2
    shp = np.asarray(shapes, dtype=np.int64)
    if shp.ndim > 1:
        shp = np.ascontiguousarray(shp.reshape(-1, 2))
        shp = np.broadcast_to(shp, (n, 2)) if len(shp) == 1 else shp
    shape_cols = np.empty((n, 2), dtype=np.int64)
    values = np.empty((n, 2), dtype=np.float64)
    finite = _both(np.isfinite(pos))
    safe = pos if finite.all() else np.where(finite[:, None], pos, 0.0)
    for a in (0, 1):
        shape_cols[:, a] = shp[..., a]
        np.subtract(safe[:, a], shp[..., a] / 2.0, out=values[:, a])
    shp = shape_cols
    large = np.asarray(large_shape, dtype=np.int64)
    start, overflow = round_limits(
        values, limit_rounding_method, return_overflow=True
    )

    zero_size = (shp[:, 0] == 0) & (shp[:, 1] == 0)
    no_overlap = np.zeros(n, dtype=bool)
    outside = np.zeros(n, dtype=bool)
    stop = np.empty_like(start)
    large_start = np.empty_like(start)
    large_stop = np.empty_like(start)
    small_start = np.empty_like(start)
    small_stop = np.empty_like(start)
    for a in (0, 1):
        st, size, edge = start[:, a], shp[:, a], int(large[a])
        sp = np.add(st, size, out=stop[:, a])
        no_overlap |= (sp < 0) | ((sp == 0) & ~zero_size) | (st >= edge)
        outside |= (st < 0) | (sp > edge)
        np.maximum(st, 0, out=large_start[:, a])
        np.minimum(sp, edge, out=large_stop[:, a])
        if mode == "trim":
            small_start[:, a] = 0
            np.subtract(large_stop[:, a], large_start[:, a], out=small_stop[:, a])
        else:
            np.maximum(np.negative(st), 0, out=small_start[:, a])
            np.minimum(edge - st, size, out=small_stop[:, a])

    code = np.full(n, BOX_OK, dtype=np.int8)
    if mode == "strict":
        code[outside] = BOX_PARTIAL
    code[no_overlap] = BOX_NO_OVERLAP
    code[_either(overflow)] = BOX_OVERFLOW
    code[~finite] = BOX_NONFINITE

    return Boxes(
        start=start,
        shape=shp,
        large_start=large_start,
        large_stop=large_stop,
        small_start=small_start,
        small_stop=small_stop,
        code=code,
        mode=mode,
        _large=tuple(int(v) for v in large),
    )
