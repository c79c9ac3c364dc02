# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Drop-in `Cutout2D` and the batch `BatchCutout2D`.

`Cutout2D` has the signature, attributes and exceptions of
`astropy.nddata.Cutout2D` (it *is* one: it subclasses astropy's class and
inherits its properties and methods), but computes its box through
:mod:`cutana._geometry` and builds its WCS only when it is first asked for.

`BatchCutout2D` makes N such cutouts from one image at once: one
``world_to_pixel`` call, one vectorised rounding pass, and one pass of the
compiled kernel (:mod:`cutana._extract`) that copies all windows into an
``(N, ny, nx)`` stack, converting byte order while copying.
"""

import contextlib
import numbers
import warnings
from copy import deepcopy

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io.fits.hdu.compressed import CompImageSection
from astropy.io.fits.hdu.image import Section
from astropy.nddata import Cutout2D as _AstropyCutout2D
from astropy.nddata import NoOverlapError, PartialOverlapError
from astropy.wcs import NoConvergence, Sip
from astropy.wcs.utils import proj_plane_pixel_scales, skycoord_to_pixel

from ._geometry import (
    _VECTOR_ROUNDING,
    BOX_NO_OVERLAP,
    BOX_NONFINITE,
    BOX_OK,
    BOX_OVERFLOW,
    BOX_PARTIAL,
    DISTORTION_TOL,
    ROUNDING_ERROR,
    angles_in_pixels,
    compute_boxes,
    near_rounding_boundary,
)
from ._stack import _fill_bytes, extract_stack
from ._threads import resolve_n_threads

__all__ = [
    "BatchCutout2D",
    "Cutout2D",
    "NoOverlapError",
    "PartialOverlapError",
    "cutout_wcs",
    "extract_stack",
]

_MODES = ("partial", "trim", "strict")

# Per-source codes beyond those of _geometry, for failures that astropy's
# Cutout2D raises although overlap_slices accepts the box.
#: A (0, 0) cutout whose box starts at pixel 0 on some axis: astropy's second
#: ``overlap_slices`` call (with the size as an array) raises ValueError.
_BOX_ZERO_SIZE_EDGE = 5
#: ``'partial'`` mode needs filling and ``fill_value`` does not fit the dtype.
_BOX_BAD_FILL = 6
#: ``'partial'`` mode with a negative size: astropy's ``np.zeros(size)``, to
#: be filled, raises ValueError.
_BOX_NEGATIVE_SIZE = 7
#: A source without a pixel position: a SkyCoord ``all_world2pix`` cannot
#: solve (astropy's `Cutout2D` raises `~astropy.wcs.NoConvergence`), or a
#: masked position (`numpy.ma.MaskError`).
_BOX_NO_CONVERGENCE = 8
#: astropy's error for a masked position (numpy's, when it rounds the box).
_MASKED_POSITION = "Cannot convert masked element to a Python int."
#: A size astropy's `Cutout2D` refuses (not finite, too large): its error.
_BOX_BAD_SIZE = 9


_FILL_DTYPE_MSG = (
    "fill_value is inconsistent with the data type of the input array (e.g., "
    "fill_value cannot be set to np.nan if the input array has integer type). "
    "Please change either the input array dtype or the fill_value."
)


# --------------------------------------------------------------------------
# sizes and positions
# --------------------------------------------------------------------------


def _size_to_shape(size, wcs):
    """Convert one astropy-style ``size`` to an integer ``(ny, nx)`` array.

    This follows `astropy.nddata.Cutout2D` step by step, including its
    choice of pixel scale and unit for angular sizes.
    """
    if np.isscalar(size):
        size = np.repeat(size, 2)
    if isinstance(size, u.Quantity):
        size = np.atleast_1d(size)
        if len(size) == 1:
            size = np.repeat(size, 2)
    if len(size) > 2:
        msg = "size must have at most two elements"
        raise ValueError(msg)
    shape = np.zeros(2).astype(int)
    pixel_scales = None
    for axis, side in enumerate(size):
        if not isinstance(side, u.Quantity):
            shape[axis] = int(np.round(side))
        elif side.unit == u.pixel:
            shape[axis] = int(np.round(side.value))
        elif side.unit.physical_type == "angle":
            if wcs is None:
                msg = "wcs must be input if any element of size has angular units"
                raise ValueError(msg)
            if pixel_scales is None:
                pixel_scales = u.Quantity(
                    proj_plane_pixel_scales(wcs), wcs.wcs.cunit[axis]
                )
            shape[axis] = int(np.round((side / pixel_scales[axis]).decompose()))
        else:
            msg = "shape can contain Quantities with only pixel or angular units"
            raise ValueError(msg)
    return shape


def _sizes_to_shapes(size, n, wcs):
    """Convert one size or N sizes to an ``(N, 2)`` int64 array of ``(ny, nx)``.

    One size is anything `astropy.nddata.Cutout2D` accepts. N sizes are an
    array-like (or `~astropy.units.Quantity`) of shape ``(N,)`` (square) or
    ``(N, 2)``. A length-2 sequence is always read as one ``(ny, nx)`` size,
    as astropy reads it, even when N is 2.

    Returns the shapes and ``{source: exception}`` for the N sizes astropy
    would refuse (not finite, too large): the error astropy's `Cutout2D`
    raises for that size (their shapes are 0).
    """

    def one(size):
        return np.broadcast_to(_size_to_shape(size, wcs), (n, 2)).astype(np.int64), {}

    if np.isscalar(size) or (isinstance(size, u.Quantity) and size.ndim == 0):
        return one(size)
    # a list of N sizes, one per source, each as astropy takes one
    per_source = isinstance(size, (list, tuple)) and len(size) == n and n != 2
    if per_source and any(type(s) is np.ndarray and s.ndim == 0 for s in size):
        # e.g. a 0-d array, which astropy refuses (`len()` of it)
        return _shapes_one_by_one(size, wcs)
    if isinstance(size, np.ndarray) and size.ndim == 0:
        return one(size)  # (refused as astropy refuses it)
    if isinstance(size, (list, tuple)) and any(isinstance(s, u.Quantity) for s in size):
        if len(size) <= 2 and not per_source:
            # one astropy size, possibly mixing numbers and Quantities
            return one(size)
        if len({getattr(s, "unit", None) for s in size}) > 1:
            # e.g. pixels and arcsec, or arcsec and deg: each in its own unit,
            # as astropy converts it (one unit could round differently)
            return _shapes_one_by_one(size, wcs)
        try:
            size = u.Quantity(size)
        except (u.UnitsError, TypeError, ValueError):  # e.g. ragged (ny, nx) pairs
            return _shapes_one_by_one(size, wcs)
    if isinstance(size, u.Quantity):
        arr = size
    else:
        try:
            arr = np.asarray(size)
        except (ValueError, TypeError):  # ragged mixture such as (3 * u.pix, 4)
            arr = None
        if arr is None or arr.dtype == object:
            if per_source:  # e.g. [(3 * u.arcsec, 4), (5 * u.arcsec, 6), ...]
                return _shapes_one_by_one(size, wcs)
            return one(size)
    if arr.ndim == 1 and (len(arr) <= 2 and not (len(arr) == n and n != 2)):
        return one(size)
    given = arr  # each source's size as given, for its error
    if arr.ndim == 1 and len(arr) == n:
        arr = arr[:, None] * np.ones((1, 2))
    if arr.ndim != 2 or arr.shape != (n, 2):
        msg = (
            f"size must be one size or {n} sizes (shape ({n},) or ({n}, 2)), "
            f"got shape {arr.shape}"
        )
        raise ValueError(msg)
    if not isinstance(arr, u.Quantity):
        values = np.asarray(arr, dtype=np.float64)
    elif arr.unit == u.pixel:
        values = np.asarray(arr.value, dtype=np.float64)
    elif arr.unit.physical_type == "angle":
        if wcs is None:
            msg = "wcs must be input if any element of size has angular units"
            raise ValueError(msg)
        values = angles_in_pixels(arr, wcs)
    else:
        msg = "shape can contain Quantities with only pixel or angular units"
        raise ValueError(msg)
    # sizes astropy cannot turn into integers (NaN, infinite, beyond int64)
    errors = {}
    for i in np.flatnonzero(~(np.abs(values) < 2.0**62).all(axis=1)).tolist():
        try:
            _size_to_shape(given[i], wcs)
        except (ValueError, OverflowError) as exc:
            errors[i] = exc
    if errors:  # (a copy: values may be the caller's sizes)
        values = values.copy()
        values[list(errors)] = 0.0
    return np.round(values).astype(np.int64), errors


def _shapes_one_by_one(sizes, wcs):
    """`_sizes_to_shapes` of N sizes of mixed kinds, converted one by one."""
    shapes = np.zeros((len(sizes), 2), dtype=np.int64)
    errors = {}
    for i, one in enumerate(sizes):
        try:
            shapes[i] = _size_to_shape(one, wcs)
        except (ValueError, OverflowError, TypeError) as exc:
            errors[i] = exc
    return shapes, errors


def _sky_to_xy_one_by_one(sky, wcs):
    """`_positions_to_xy` of a SkyCoord source by source: ``(xy, errors)``,
    with the `~astropy.wcs.NoConvergence` of each source that raised it."""
    sky = sky.reshape((1,)) if sky.isscalar else sky
    xy = np.full((len(sky), 2), np.nan)
    errors = {}
    for i in range(len(sky)):
        try:
            xy[i] = [float(v) for v in skycoord_to_pixel(sky[i], wcs, mode="all")]
        except NoConvergence as exc:
            errors[i] = exc
    return xy, errors


def _positions_to_xy(positions, wcs):
    """Convert N positions to a float64 ``(N, 2)`` array of ``(x, y)`` pixels.

    Returns the array, a per-source list of the positions as astropy's
    `~astropy.nddata.Cutout2D` would store them (``input_position_original``;
    `None` for a SkyCoord), and ``{source: exception}`` of the positions
    without a pixel position: SkyCoords ``all_world2pix`` cannot solve
    (`~astropy.wcs.NoConvergence`, NaN in the array) and masked pixel
    positions (`numpy.ma.MaskError`).
    """
    if isinstance(positions, SkyCoord):
        if wcs is None:
            msg = "wcs must be input if position is a SkyCoord"
            raise ValueError(msg)
        try:
            xp, yp = skycoord_to_pixel(positions, wcs, mode="all")
        except NoConvergence:
            # some position cannot be solved: solve each, as astropy would,
            # to know which (their positions are NaN, their errors kept)
            xy, unsolved = _sky_to_xy_one_by_one(positions, wcs)
            return xy, None, unsolved
        xy = np.column_stack([np.atleast_1d(xp), np.atleast_1d(yp)]).astype(np.float64)
        return xy, None, {}
    if isinstance(positions, np.ndarray):
        if positions.ndim == 1 and positions.shape == (2,):
            positions = positions[None, :]
        if positions.ndim != 2 or positions.shape[1] != 2:
            msg = f"positions must have shape (N, 2) of (x, y), got {positions.shape}"
            raise ValueError(msg)
        if positions.dtype.kind not in "biuf":
            for i, pos in enumerate(positions):
                if not all(isinstance(v, numbers.Real) for v in pos):
                    _check_numbers(i, tuple(pos))
        if not np.ma.isMaskedArray(positions):
            return np.asarray(positions, dtype=np.float64), positions, {}
        # masked positions fail their source, as astropy's rounding of them
        masked = np.flatnonzero(np.ma.getmaskarray(positions).any(axis=1))
        failed = {int(i): np.ma.MaskError(_MASKED_POSITION) for i in masked}
        return np.asarray(positions.data, dtype=np.float64), positions, failed
    positions = list(positions)
    if len(positions) == 2 and all(isinstance(v, numbers.Real) for v in positions):
        positions = [tuple(positions)]
    xy = np.empty((len(positions), 2), dtype=np.float64)
    for i, pos in enumerate(positions):
        if len(pos) != 2:
            msg = f"position {i} must be an (x, y) pair, got {pos!r}"
            raise ValueError(msg)
        if not (type(pos[0]) in _PLAIN_NUMBERS and type(pos[1]) in _PLAIN_NUMBERS):
            if not all(isinstance(v, numbers.Real) for v in pos):
                _check_numbers(i, pos)
        xy[i] = pos
    return xy, positions, {}


#: Types of position values taken as they are (the rest are checked, once).
_PLAIN_NUMBERS = frozenset((float, int, np.float64, np.float32, np.int64, np.int32))


def _check_numbers(i, pos):
    """Raise astropy's error, naming source ``i``, for a position ``pos``
    that is not a pair of real numbers (text, complex numbers), as its
    `Cutout2D` raises it; numpy numbers and 0-d arrays pass."""
    try:
        Cutout2D(np.zeros((1, 1)), pos, 1, mode="partial")
    except (NoOverlapError, PartialOverlapError):
        pass  # (numbers after all: the box is for later)
    except (TypeError, ValueError) as exc:
        raise _naming_source(i, exc) from exc


def _target_shape(target):
    """``(H, W)`` of a `BatchCutout2D.resample` target: a whole number, or
    a pair of them (2.5 was taken as 2, and "4" as 4)."""
    pair = (target, target) if np.ndim(target) == 0 else tuple(target)
    if len(pair) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
        for v in pair
    ):
        msg = f"target must be a whole number or a pair of them, got {target!r}"
        raise TypeError(msg)
    return int(pair[0]), int(pair[1])


def _resample_region(source, starts, shapes, ok, margin=2):
    """What `BatchCutout2D.resample` hands the kernel, and the boxes'
    ``starts`` in it: ``source`` itself, or, for a FITS section (which is
    not an array) or float16 data (which the kernel does not read), the
    part of it that the boxes of the sources in ``ok`` reach, widened by
    ``margin`` pixels (the kernel reads at most one beyond a box), read and
    as float32 if float16. Pixels outside ``source`` stay outside."""
    if (
        not isinstance(source, (Section, CompImageSection))
        and source.dtype != np.float16  # (an array: BatchCutout2D made it one)
    ):
        return source, starts
    shape = np.asarray(source.shape[-2:], dtype=np.int64)
    lo = hi = np.zeros(2, dtype=np.int64)
    if ok.any():
        lo = np.maximum(starts[ok].min(axis=0) - margin, 0)
        hi = np.maximum(np.minimum((starts[ok] + shapes[ok]).max(axis=0) + margin,
                                   shape), lo)
    region = np.asarray(source[lo[0] : hi[0], lo[1] : hi[1]])
    if region.dtype == np.float16:
        region = region.astype(np.float32)  # (exactly)
    return region, np.where(ok[:, None], starts - lo, starts)


def _naming_source(i, exc):
    """A copy of exception ``exc`` whose message starts ``source i: ``."""
    args = (f"source {i}: {exc.args[0] if exc.args else exc}", *exc.args[1:])
    if isinstance(exc, NoConvergence):  # (its solution goes with it)
        return NoConvergence(
            *args,
            best_solution=exc.best_solution,
            accuracy=exc.accuracy,
            niter=exc.niter,
            divergent=exc.divergent,
            slow_conv=exc.slow_conv,
        )
    return type(exc)(*args)


# --------------------------------------------------------------------------
# per-cutout WCS
# --------------------------------------------------------------------------


def _scaled_sip(sip, scale, crpix):
    """The SIP distortion of a pixel grid scaled by ``scale`` = ``(s_x, s_y)``.

    With ``u = s_x u'`` and ``v = s_y v'`` (offsets from CRPIX), and the CD
    matrix's columns multiplied by ``s_x`` and ``s_y``, a term
    ``A_pq u^p v^q`` of the x distortion becomes ``A_pq s_x^p s_y^q / s_x``
    in the new pixels (``/ s_y`` for y); the inverse polynomials, in the
    same scaled intermediate coordinates, transform alike. Exact.
    """

    def scaled(coeffs, axis):
        if coeffs is None:
            return None
        p = np.arange(coeffs.shape[0])[:, None]
        q = np.arange(coeffs.shape[1])[None, :]
        return coeffs * scale[0] ** p * scale[1] ** q / scale[axis]

    return Sip(
        scaled(sip.a, 0), scaled(sip.b, 1), scaled(sip.ap, 0), scaled(sip.bp, 1),
        np.asarray(crpix, dtype=float),
    )


def _resample_scale(shape, out_shape):
    """``(sx, sy)`` input pixels per output pixel of a resampled cutout."""
    return np.array([shape[1] / out_shape[1], shape[0] / out_shape[0]], dtype=float)


def _cutout_crpix(crpix, origin_xy, shape, out_shape=None):
    """The reference pixel of a cutout's WCS (`cutout_wcs`), from the image's.

    Parameters
    ----------
    crpix : array-like of float
        ``(2,)`` FITS ``CRPIX`` (1-based) of the whole image.
    origin_xy : tuple of int
        ``(x, y)`` of the cutout's first pixel in the image.
    shape : tuple of int
        ``(ny, nx)`` of the cutout as extracted.
    out_shape : tuple of int, optional
        ``(ny, nx)`` after resampling with aligned pixel centres.

    Returns
    -------
    crpix : `~numpy.ndarray`
        ``(2,)`` the cutout's ``CRPIX``, the very values `cutout_wcs` gives.

    Examples
    --------
    >>> from cutana.cutout import _cutout_crpix
    >>> _cutout_crpix([50.5, 50.5], (10, 20), (32, 32)).tolist()
    [40.5, 30.5]
    >>> _cutout_crpix([50.5, 50.5], (10, 20), (32, 32), (16, 16)).tolist()
    [20.5, 15.5]
    """
    crpix = np.asarray(crpix, dtype=np.float64)
    crpix = crpix - np.asarray(origin_xy, dtype=np.float64)
    if out_shape is not None and tuple(out_shape) != tuple(shape):
        # input pixel p (0-based) = (q + 0.5) * s - 0.5 with s = n_in / n_out
        # FITS CRPIX is 1-based: p1 = p + 1, q1 = q + 1
        # p1 = (q1 - 0.5) * s + 0.5  ->  q1 = (p1 - 0.5) / s + 0.5
        crpix = (crpix - 0.5) / _resample_scale(shape, out_shape) + 0.5
    return crpix


def cutout_wcs(wcs, origin_xy, shape, out_shape=None):
    """Build the WCS of a cutout, as `astropy.nddata.Cutout2D` does.

    Parameters
    ----------
    wcs : `~astropy.wcs.WCS`
        The WCS of the whole image.
    origin_xy : tuple of int
        ``(x, y)`` of the cutout's first pixel (including any filled part)
        in the image.
    shape : tuple of int
        ``(ny, nx)`` of the cutout as extracted.
    out_shape : tuple of int, optional
        ``(ny, nx)`` after resampling with aligned pixel centres; the WCS is
        then rescaled so that output pixel ``j`` samples input coordinate
        ``(j + 0.5) * n / m - 0.5``.

    Returns
    -------
    cutout_wcs : `~astropy.wcs.WCS`
        A new WCS; ``wcs`` is not modified.

    Examples
    --------
    >>> import numpy as np
    >>> from astropy.wcs import WCS
    >>> from cutana.cutout import cutout_wcs
    >>> wcs = WCS(naxis=2)
    >>> wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    >>> wcs.wcs.crval = [150.0, 2.0]
    >>> wcs.wcs.crpix = [50.5, 50.5]
    >>> wcs.wcs.cdelt = [-1e-4, 1e-4]
    >>> sub = cutout_wcs(wcs, (10, 20), (32, 32))
    >>> sub.wcs.crpix.tolist(), sub.array_shape
    ([40.5, 30.5], (32, 32))

    Pixel ``(0, 0)`` of the cutout is pixel ``(10, 20)`` of the image:

    >>> bool(np.allclose(sub.pixel_to_world_values(0, 0),
    ...                  wcs.pixel_to_world_values(10, 20)))
    True

    Resampled to half the size, each output pixel covers two input pixels:

    >>> half = cutout_wcs(wcs, (10, 20), (32, 32), out_shape=(16, 16))
    >>> half.array_shape, half.wcs.get_pc().diagonal().tolist()
    ((16, 16), [2.0, 2.0])
    """
    origin = np.asarray(origin_xy, dtype=np.float64)
    new = deepcopy(wcs)
    new.wcs.crpix = _cutout_crpix(wcs.wcs.crpix, origin, shape, out_shape)
    if wcs.sip is not None:
        new.sip = Sip(
            wcs.sip.a, wcs.sip.b, wcs.sip.ap, wcs.sip.bp, wcs.sip.crpix - origin
        )
    if out_shape is not None and tuple(out_shape) != tuple(shape):
        scale = _resample_scale(shape, out_shape)
        if new.wcs.has_cd():
            new.wcs.cd = new.wcs.cd * scale[None, :]
        else:
            pc = new.wcs.get_pc()
            cdelt = new.wcs.cdelt.copy()
            new.wcs.pc = pc * scale[None, :]
            new.wcs.cdelt = cdelt
        if wcs.sip is not None:
            new.sip = _scaled_sip(wcs.sip, scale, new.wcs.crpix)
        shape = tuple(out_shape)
    new.array_shape = tuple(int(v) for v in shape)
    return new


# --------------------------------------------------------------------------
# Cutout2D
# --------------------------------------------------------------------------


def _raise_for_code(code, index=None):
    """Raise astropy's exception for a geometry code."""
    prefix = "" if index is None else f"source {index}: "
    if code == BOX_NONFINITE:
        msg = f"{prefix}Input position contains invalid values (NaNs or infs)."
        raise ValueError(msg)
    if code == BOX_NO_OVERLAP:
        msg = f"{prefix}Arrays do not overlap."
        raise NoOverlapError(msg)
    if code == BOX_PARTIAL:
        msg = f"{prefix}Arrays overlap only partially."
        raise PartialOverlapError(msg)
    if code == BOX_OVERFLOW:
        msg = (
            f"{prefix}Python int too large to convert to C long (position too far out)"
        )
        raise OverflowError(msg)
    if code == _BOX_ZERO_SIZE_EDGE:
        msg = (
            f"{prefix}a cutout of size (0, 0) whose box starts at pixel 0 is "
            "refused by astropy.nddata.Cutout2D with a ValueError; cutana does the same"
        )
        raise ValueError(msg)
    if code == _BOX_NEGATIVE_SIZE:
        msg = f"{prefix}negative dimensions are not allowed"
        raise ValueError(msg)


def _zero_size_edge(boxes):
    """Mask of boxes astropy's Cutout2D refuses although overlap_slices accepts them.

    `astropy.nddata.Cutout2D` calls ``overlap_slices`` a second time with the
    size as an array; for a ``(0, 0)`` size whose (empty) box ends at index 0
    on some axis, that call fails with a ValueError.
    """
    shape = boxes.shape
    zero = (shape[:, 0] == 0) & (shape[:, 1] == 0)
    if not zero.any():
        return zero
    stop = boxes.start + shape
    return (boxes.code == BOX_OK) & zero & ((stop[:, 0] == 0) | (stop[:, 1] == 0))


def _check_wcs(wcs):
    """Raise astropy's error for a ``wcs`` its `Cutout2D` could not shift.

    The cutouts' WCS are built when first asked for; astropy's `Cutout2D`
    builds its WCS at once (``wcs.wcs.crpix -= origin``), so a WCS that is
    not 2-D, or an object that is not a WCS, fails there. This does the same
    on a copy of CRPIX, to fail in the same way at the same time.
    """
    crpix = np.array(wcs.wcs.crpix, dtype=np.float64)
    crpix -= (0.0, 0.0)


class _LazyWCS:
    """Descriptor that builds a cutout's WCS on first access."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        if "_wcs" not in obj.__dict__:
            parent = obj.__dict__.get("_parent_wcs")
            if parent is None:
                obj.__dict__["_wcs"] = None
            else:
                shape = obj.__dict__.get("_wcs_shape", obj.data.shape)
                obj.__dict__["_wcs"] = cutout_wcs(
                    parent, obj._origin_original_true, shape
                )
        return obj.__dict__["_wcs"]

    def __set__(self, obj, value):
        obj.__dict__["_wcs"] = value


class Cutout2D(_AstropyCutout2D):
    """
    Create a cutout object from a 2D array, exactly as `astropy.nddata.Cutout2D`.

    This class is a drop-in replacement: same signature, same attributes,
    same results and the same exceptions in the same cases. It is a subclass
    of `astropy.nddata.Cutout2D`, so ``isinstance`` checks keep working. The
    box is computed by cutana's geometry module, and the cutout's WCS is
    built only when the ``wcs`` attribute is first read.

    Parameters
    ----------
    data : `~numpy.ndarray`, `~astropy.io.fits.Section` or `~astropy.io.fits.CompImageSection`
        The 2D data array from which to extract the cutout array. Sections
        are read lazily: only the cutout's pixels are read from the file.
    position : tuple or `~astropy.coordinates.SkyCoord`
        The position of the cutout's centre, ``(x, y)`` in pixels (integers
        are pixel centres) or a `~astropy.coordinates.SkyCoord`, which needs
        ``wcs``.
    size : int, array-like or `~astropy.units.Quantity`
        The size of the cutout, one value (square) or ``(ny, nx)``; numbers
        are pixels, Quantities may be in pixels or angular units. Rounded to
        the nearest integer number of pixels.
    wcs : `~astropy.wcs.WCS`, optional
        The WCS of ``data``; the cutout then carries an updated copy.
    mode : {'trim', 'partial', 'strict'}, optional
        ``'trim'`` returns only the overlapping part, ``'partial'`` fills the
        rest with ``fill_value``, ``'strict'`` raises
        `~astropy.nddata.PartialOverlapError` unless the cutout lies wholly
        inside the array. All modes raise `~astropy.nddata.NoOverlapError`
        for no overlap.
    fill_value : float or int, optional
        Value of pixels outside ``data`` in ``'partial'`` mode.
    copy : bool, optional
        If `False` (default), the cutout is a view into ``data`` where
        astropy's would be; if `True`, a copy.
    limit_rounding_method : callable, optional
        Rounding of the box limits, `numpy.ceil` by default.

    Raises
    ------
    ValueError
        For invalid arguments, non-finite positions, or a ``fill_value``
        that the data type cannot hold when filling is needed.
    NoOverlapError
        If the cutout does not overlap ``data``.
    PartialOverlapError
        In ``'strict'`` mode, if the cutout leaves ``data``.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana import Cutout2D
    >>> data = np.arange(20.0).reshape(5, 4)
    >>> cutout = Cutout2D(data, (2, 2), (3, 3))
    >>> print(cutout.data)
    [[ 5.  6.  7.]
     [ 9. 10. 11.]
     [13. 14. 15.]]
    >>> cutout.origin_original
    (1, 1)
    """  # noqa: E501 - a numpydoc parameter type is one line

    wcs = _LazyWCS()

    def __init__(
        self,
        data,
        position,
        size,
        wcs=None,
        mode="trim",
        fill_value=np.nan,
        copy=False,
        *,
        limit_rounding_method=np.ceil,
    ):
        if wcs is None:
            wcs = getattr(data, "wcs", None)
        if isinstance(position, SkyCoord):
            if wcs is None:
                msg = "wcs must be input if position is a SkyCoord"
                raise ValueError(msg)
            position = skycoord_to_pixel(position, wcs, mode="all")
        shape = _size_to_shape(size, wcs)
        if not isinstance(data, (Section, CompImageSection)):
            data = np.asanyarray(data)
        pos_yx = position[::-1]

        if mode not in _MODES:
            msg = "Valid modes are 'partial', 'trim', and 'strict'."
            raise ValueError(msg)
        pos_check = (pos_yx,) if np.isscalar(pos_yx) else pos_yx
        masked = np.ma.is_masked(position)  # (astropy fails when rounding it)
        if not masked and any(~np.isfinite(pos_check)):
            msg = "Input position contains invalid values (NaNs or infs)."
            raise ValueError(msg)
        if len(data.shape) != 2:
            msg = (
                '"large_array_shape" and "small_array_shape" must have the same '
                "number of dimensions."
            )
            raise ValueError(msg)
        if len(pos_check) != 2:
            msg = (
                '"position" must have the same number of dimensions as '
                '"small_array_shape".'
            )
            raise ValueError(msg)

        if any(np.ndim(v) != 0 or np.iscomplexobj(v) for v in pos_check) or (
            isinstance(position, u.Quantity)
            and position.unit != u.dimensionless_unscaled
        ):
            # e.g. a (2, 1) array, a complex number or a Quantity array in
            # pixels: where astropy's rounding of the box limits fails
            raise ValueError(ROUNDING_ERROR)
        if masked:
            raise np.ma.MaskError(_MASKED_POSITION)
        boxes = compute_boxes(
            data.shape,
            shape,
            [tuple(float(v) for v in pos_check)],
            mode,
            limit_rounding_method=limit_rounding_method,
        )
        _raise_for_code(boxes.code[0])
        if _zero_size_edge(boxes)[0]:
            _raise_for_code(_BOX_ZERO_SIZE_EDGE)
        slices_large, slices_small = boxes.slices(0)

        cutout = data[slices_large]
        new_pos = [p - s.start for p, s in zip(pos_yx, slices_large, strict=True)]
        if cutout.shape != tuple(shape) and mode == "partial":
            full = np.zeros(tuple(shape), dtype=cutout.dtype)
            try:
                full[:] = fill_value
            except ValueError as exc:
                exc.args += (_FILL_DTYPE_MSG,)
                raise
            full[slices_small] = cutout
            cutout = full
            new_pos = [p + s.start for p, s in zip(new_pos, slices_small, strict=True)]
        if copy:
            cutout = np.copy(cutout)
        if wcs is not None:
            _check_wcs(wcs)

        self._set_state(
            cutout,
            position,
            tuple(new_pos)[::-1],
            slices_large,
            slices_small,
            shape,
            None if wcs is None else deepcopy(wcs),  # as the caller's is now
        )

    def _set_state(
        self,
        data,
        position,
        input_position_cutout,
        slices_original,
        slices_cutout,
        shape_input,
        parent_wcs,
    ):
        """Set every attribute astropy's ``__init__`` sets (the WCS lazily)."""
        self.data = data
        self.input_position_cutout = input_position_cutout
        self.slices_original = slices_original
        self.slices_cutout = slices_cutout
        self.shape = data.shape
        self.input_position_original = position
        self.shape_input = shape_input
        (
            (self.ymin_original, self.ymax_original),
            (self.xmin_original, self.xmax_original),
        ) = self.bbox_original
        (
            (self.ymin_cutout, self.ymax_cutout),
            (self.xmin_cutout, self.xmax_cutout),
        ) = self.bbox_cutout
        self._origin_original_true = (
            self.origin_original[0] - self.slices_cutout[1].start,
            self.origin_original[1] - self.slices_cutout[0].start,
        )
        self.__dict__["_parent_wcs"] = parent_wcs
        self.__dict__["_wcs_shape"] = data.shape  # (the data may be replaced)
        self.__dict__.pop("_wcs", None)

    @classmethod
    def _from_batch(
        cls,
        data,
        position,
        input_position_cutout,
        slices_original,
        slices_cutout,
        shape_input,
        parent_wcs,
    ):
        """Build a cutout from geometry already computed by `BatchCutout2D`."""
        obj = cls.__new__(cls)
        obj._set_state(
            data,
            position,
            input_position_cutout,
            slices_original,
            slices_cutout,
            shape_input,
            parent_wcs,
        )
        return obj


# --------------------------------------------------------------------------
# BatchCutout2D
# --------------------------------------------------------------------------


def _has_distortion(wcs):
    """Whether pixel positions from ``wcs`` come from an iterative solution."""
    return bool(getattr(wcs, "has_distortion", False))


def _refine_sky_positions(xy, sky, wcs, shapes, limit_rounding_method):
    """Recompute, source by source, positions that sit on a rounding boundary.

    For a WCS with distortions, ``all_world2pix`` solves iteratively over all
    points at once, so a vectorised call can differ slightly from astropy's
    per-source call (by up to its convergence tolerance). That
    only matters where a box limit ``position - size / 2`` lies within
    `DISTORTION_TOL` of a rounding boundary (a multiple of 0.5 covers ceil,
    floor, trunc and round); those few positions are recomputed exactly as
    astropy computes them. For a custom rounding callable every position is
    recomputed.
    """
    try:
        known = _VECTOR_ROUNDING.get(limit_rounding_method) is not None
    except TypeError:  # unhashable callable
        known = False
    if known:
        limits = xy - shapes[:, ::-1] / 2.0
        near = near_rounding_boundary(limits, DISTORTION_TOL).any(axis=1)
        rows = np.flatnonzero(near | ~np.isfinite(limits).all(axis=1))
    else:
        rows = np.arange(len(xy))
    for i in rows:
        xp, yp = skycoord_to_pixel(sky[i], wcs, mode="all")
        xy[i] = (float(xp), float(yp))


def _kernel_supports(data):
    """Whether the compiled kernel can cut ``data`` (else: per-source cuts)."""
    return (
        isinstance(data, np.ndarray)
        and not isinstance(data, np.ma.MaskedArray)
        and data.dtype.kind in "biuf"
        and data.dtype.itemsize in (1, 2, 4, 8)
    )


def _stack_type(source):
    """The type a stack of cutouts of ``source`` needs for its rows to be
    the cutouts astropy makes: ``source``'s own ndarray subclass (a
    `~astropy.units.Quantity` keeps its unit), or `numpy.ndarray`."""
    if isinstance(source, (np.ma.MaskedArray, np.memmap)):
        return None  # (masked views inside, filled at the edge; memmap views)
    return type(source) if isinstance(source, np.ndarray) else np.ndarray


def _as_subclass_of(stack, source):
    """``stack`` viewed as ``source``'s ndarray subclass, with its attributes
    (a unit), where that subclass can hold a stack (`numpy.matrix` cannot)."""
    kind = _stack_type(source)
    if kind is None or kind is np.ndarray:
        return stack
    try:
        out = stack.view(kind)
        out.__array_finalize__(source)
    except (TypeError, ValueError):
        return stack
    return out


class BatchCutout2D:
    """
    Many cutouts from one 2D array, each equal to astropy's `~astropy.nddata.Cutout2D`.

    Positions are converted to pixels with one vectorised call, boxes are
    rounded in one vectorised pass that reproduces
    `astropy.nddata.utils.overlap_slices`, and the pixels of all cutouts are
    copied by a compiled kernel into one ``(N, ny, nx)`` stack (native byte
    order, same kind of dtype as ``data``) whenever all cutouts have the same
    shape. Per-source `Cutout2D` objects, and their WCS, are built only when
    asked for.

    Parameters
    ----------
    data : `~numpy.ndarray`, `~astropy.io.fits.Section` or `~astropy.io.fits.CompImageSection`
        The 2D image, any numeric dtype, native or big-endian, memory-mapped
        or not.
    positions : `~astropy.coordinates.SkyCoord`, array-like of shape ``(N, 2)`` or list of tuple
        The cutout centres: a `~astropy.coordinates.SkyCoord` array (needs
        ``wcs``) or ``(x, y)`` pixel positions.
    size : int, array-like or `~astropy.units.Quantity`
        One size for all cutouts, as `~astropy.nddata.Cutout2D` takes it, or
        N sizes of shape ``(N,)`` (square) or ``(N, 2)`` (``(ny, nx)``), in
        pixels or angular units. A length-2 sequence is one ``(ny, nx)``.
    wcs : `~astropy.wcs.WCS`, optional
        The WCS of ``data``.
    mode : {'trim', 'partial', 'strict'}, optional
        As in `~astropy.nddata.Cutout2D`.
    fill_value : float or int, optional
        Value of pixels outside ``data`` in ``'partial'`` mode.
    copy : bool, optional
        If `False` (default), ``b[i].data`` is a view: a row of the stack,
        or (when shapes differ) a view into ``data`` where astropy's would
        be. If `True`, each ``b[i].data`` is an independent copy.
    limit_rounding_method : callable, optional
        Rounding of the box limits, `numpy.ceil` by default.
    errors : {'raise', 'mask'}, optional
        With ``'raise'`` (default) the first source astropy would refuse
        raises astropy's exception type, naming its index. With ``'mask'``
        such sources are kept, filled with ``fill_value`` (or 0 for integer
        data), and flagged in `status`; ``b[i]`` raises for them.
    n_threads : int or None, optional
        Threads running the copy kernel. `None` (default) uses one thread
        for small batches and every available core once the stack exceeds
        64 MB, where copying is limited by memory bandwidth; results are
        identical for any number of threads.

    Attributes
    ----------
    positions : `~numpy.ndarray`, shape ``(N, 2)``
        ``(x, y)`` pixel positions (unrounded).
    shapes : `~numpy.ndarray`, shape ``(N, 2)``
        Requested ``(ny, nx)`` of each cutout.
    status : `~numpy.ndarray` of int8, shape ``(N,)``
        0 = ok; otherwise the reason astropy's `~astropy.nddata.Cutout2D`
        refuses the source (only with ``errors='mask'``): 1 = non-finite
        position, 2 = no overlap, 3 = partial overlap in ``'strict'`` mode,
        4 = position too far out for 64-bit integers, 5 = a ``(0, 0)`` size
        at index 0, 6 = ``fill_value`` does not fit the dtype where filling
        is needed, 7 = a negative size in ``'partial'`` mode, 8 = no pixel
        position (``all_world2pix`` does not converge for a
        `~astropy.coordinates.SkyCoord`, or the position is masked), 9 = a
        size that is not finite or too large.
    partial : `~numpy.ndarray` of bool, shape ``(N,)``
        Cutouts that overlap the edge of ``data`` (filled or trimmed).

    Raises
    ------
    ValueError, OverflowError, NoOverlapError, PartialOverlapError, NoConvergence
        As `~astropy.nddata.Cutout2D` would for the first failing source,
        with ``errors='raise'``; the message names the source's index.

    Notes
    -----
    ``b[i]`` equals ``astropy.nddata.Cutout2D(data, positions[i], size_i,
    wcs=wcs, mode=mode, fill_value=fill_value)`` in every attribute, with
    one deliberate difference: cutouts taken from the stack hold native
    byte order (astropy's views of a big-endian array stay big-endian); the
    values are the same.

    For `~astropy.coordinates.SkyCoord` positions and a WCS with
    distortions (SIP, lookup tables), ``all_world2pix`` iterates over all
    positions at once, and its result can differ slightly from
    astropy's one-source call. cutana therefore recomputes, source by
    source, the few positions whose box limits lie within 1e-3 pixel of a
    rounding boundary, and ``b[i]`` reports the per-source position, so that
    boxes and attributes are exactly astropy's.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana import BatchCutout2D
    >>> data = np.arange(100.0).reshape(10, 10)
    >>> batch = BatchCutout2D(data, [(2, 2), (7, 5)], 3)
    >>> len(batch), batch.data.shape
    (2, (2, 3, 3))
    >>> print(batch[1].data)
    [[46. 47. 48.]
     [56. 57. 58.]
     [66. 67. 68.]]
    """  # noqa: E501 - a numpydoc parameter type is one line

    def __init__(
        self,
        data,
        positions,
        size,
        wcs=None,
        mode="trim",
        fill_value=np.nan,
        copy=False,
        *,
        limit_rounding_method=np.ceil,
        errors="raise",
        n_threads=None,
    ):
        if errors not in ("raise", "mask"):
            msg = f"errors must be 'raise' or 'mask', got {errors!r}"
            raise ValueError(msg)
        if mode not in _MODES:
            msg = "Valid modes are 'partial', 'trim', and 'strict'."
            raise ValueError(msg)
        if wcs is None:
            wcs = getattr(data, "wcs", None)
        self._sky = None
        if isinstance(positions, SkyCoord):  # (one source of a scalar: sky[0])
            self._sky = positions.reshape((1,)) if positions.isscalar else positions
        # (positions without a pixel position: {source: exception})
        xy, originals, self._unsolved = _positions_to_xy(positions, wcs)
        n = len(xy)
        shapes, self._size_errors = _sizes_to_shapes(size, n, wcs)
        self._empty_shape = (0, 0)  # (no source: the stack has the size's shape)
        if n == 0:
            with contextlib.suppress(Exception):
                one, errors_one = _sizes_to_shapes(size, 1, wcs)
                if not errors_one:
                    self._empty_shape = tuple(int(v) for v in np.maximum(one[0], 0))
        if not isinstance(data, (Section, CompImageSection)):
            data = np.asanyarray(data)
        if len(data.shape) != 2:
            msg = f"data must be 2-D, got shape {data.shape}"
            raise ValueError(msg)
        # per-source pixel positions, exactly as astropy's per-source call
        # computes them, where a last-bit difference could change a box
        self._exact_sky = self._sky is not None and _has_distortion(wcs)
        if self._exact_sky and n and not self._unsolved:  # (else solved one by one)
            _refine_sky_positions(xy, self._sky, wcs, shapes, limit_rounding_method)

        boxes = compute_boxes(
            data.shape,
            shapes,
            xy[:, ::-1],
            mode,
            limit_rounding_method=limit_rounding_method,
        )
        status = boxes.code.copy()
        status[_zero_size_edge(boxes)] = _BOX_ZERO_SIZE_EDGE
        if mode == "partial":
            status[(status == BOX_OK) & (shapes < 0).any(axis=1)] = _BOX_NEGATIVE_SIZE
        # (astropy solves a position before it looks at the size)
        status[list(self._size_errors)] = _BOX_BAD_SIZE
        status[list(self._unsolved)] = _BOX_NO_CONVERGENCE

        # the fill value, converted as astropy converts it when filling
        dtype = np.dtype(getattr(data, "dtype", np.float64))
        native = dtype.newbyteorder("=")
        self._fill_error = None
        fill = None
        partial = boxes.is_partial
        needs_fill = (status == BOX_OK) & partial if mode == "partial" else None
        if needs_fill is not None and needs_fill.any():
            try:
                fill = _fill_bytes(fill_value, native)[0]
            except ValueError as exc:
                exc.args += (_FILL_DTYPE_MSG,)
                self._fill_error = exc
            except (OverflowError, TypeError) as exc:
                self._fill_error = exc
            if self._fill_error is not None:
                status[needs_fill] = _BOX_BAD_FILL
        if fill is None:
            # only failed sources (errors='mask') can still hold the fill value
            fill = native.type(0)
            if (status != BOX_OK).any():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    try:
                        fill = _fill_bytes(fill_value, native)[0]
                    except (ValueError, OverflowError, TypeError):
                        pass

        bad = np.flatnonzero(status != BOX_OK)
        if errors == "raise" and len(bad):
            self._raise_for(int(bad[0]), status[bad[0]])
        if wcs is not None and n:
            _check_wcs(wcs)

        self._source = data
        # the cutouts' WCS derive from the parent's as it is now (as astropy's)
        self._wcs = None if wcs is None else deepcopy(wcs)
        self._boxes = boxes
        self._originals = originals
        self._fill_value = fill_value
        self._copy = copy
        self.mode = mode
        self.positions = xy
        self.shapes = shapes
        self.status = status
        self.partial = partial
        self._data = self._extract(data, boxes, fill, n_threads)

    def _raise_for(self, i, code):
        """Raise astropy's exception for source ``i``, naming the index."""
        exc = {
            _BOX_BAD_SIZE: self._size_errors.get(i),
            _BOX_NO_CONVERGENCE: self._unsolved.get(i),
            _BOX_BAD_FILL: self._fill_error,
        }.get(code)
        if exc is not None:
            raise _naming_source(i, exc) from exc
        _raise_for_code(code, index=i)

    # -- extraction --------------------------------------------------------

    def _extract(self, data, boxes, fill, n_threads):
        """Build the stack with the kernel, or return `None` when shapes differ."""
        n = len(boxes)
        ok = self.status == BOX_OK
        native = np.dtype(getattr(data, "dtype", np.float64)).newbyteorder("=")
        if n == 0:
            return np.empty((0, *self._empty_shape), dtype=native)
        shapes = boxes.out_shape[ok] if ok.any() else boxes.shape
        # (a negative size gives an empty cutout in 'trim' and 'strict' mode,
        # as slicing gives; 'partial' refuses it, see _BOX_NEGATIVE_SIZE)
        shapes = np.maximum(shapes, 0)
        if not np.all(shapes == shapes[0]):
            return None
        shape = tuple(int(v) for v in shapes[0])
        if not _kernel_supports(data):
            # lazy sections and exotic arrays: cut source by source, as astropy
            cuts = {
                int(i): self._cut_one(int(i), *boxes.slices(i))
                for i in np.flatnonzero(ok)
            }
            out_dtype = next(iter(cuts.values())).dtype if cuts else native
            out_dtype = out_dtype.newbyteorder("=")
            if isinstance(data, np.ma.MaskedArray):
                # a masked stack; failed sources are wholly masked
                blank = np.ma.masked_all(shape, dtype=out_dtype)
                return np.ma.stack([cuts.get(i, blank) for i in range(n)])
            stack = np.empty((n, *shape), dtype=out_dtype)
            if len(cuts) < n:
                stack[~ok] = fill
            for i, cut in cuts.items():
                stack[i] = cut
            return stack
        starts = boxes.start if self.mode != "trim" else boxes.large_start
        starts = np.where(ok[:, None], starts, -(1 << 40))  # failed rows: all fill
        nbytes = n * shape[0] * shape[1] * np.dtype(native).itemsize
        n_threads = resolve_n_threads(n_threads, nbytes)
        stack, _ = extract_stack(data, starts, shape, fill, n_threads=n_threads)
        return _as_subclass_of(stack, data)

    # -- container protocol -------------------------------------------------

    def __len__(self):
        return len(self.positions)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index):
        if not isinstance(index, numbers.Integral):
            msg = f"BatchCutout2D indices must be integers, got {type(index).__name__}"
            raise TypeError(msg)
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            msg = f"index {index} is out of range for {n} cutouts"
            raise IndexError(msg)
        if self.status[i] != BOX_OK:
            self._raise_for(i, self.status[i])
        large, small = self._boxes.slices(i)
        if self._data is not None and type(self._data) is _stack_type(self._source):
            cut = self._data[i]
            if self._copy:
                cut = cut.copy()
            if self.mode == "partial" and self.partial[i]:
                cut = cut.view(np.ndarray)  # astropy fills a new plain array
        else:
            # (astropy's cutouts of a masked array are masked views inside
            # and plain filled arrays at the edge: cut them the same way)
            cut = self._cut_one(i, large, small)
        pos = self._position_of(i)
        pos_yx = pos[::-1]
        new_pos = [p - s.start for p, s in zip(pos_yx, large, strict=True)]
        full = tuple(int(v) for v in self._boxes.shape[i])
        if self.mode == "partial" and tuple(e.stop - e.start for e in large) != full:
            new_pos = [p + s.start for p, s in zip(new_pos, small, strict=True)]
        return Cutout2D._from_batch(
            cut,
            pos,
            tuple(new_pos)[::-1],
            large,
            small,
            self._boxes.shape[i].astype(int),
            self._wcs,
        )

    def _position_of(self, i):
        """The position as astropy's Cutout2D would have stored it."""
        if self._sky is not None:
            if self._exact_sky:
                # astropy's per-source solution of the distortion, bit for bit
                return skycoord_to_pixel(self._sky[i], self._wcs, mode="all")
            return (np.asarray(self.positions[i, 0]), np.asarray(self.positions[i, 1]))
        return self._originals[i]

    def _cut_one(self, i, large, small):
        """Cut source ``i`` on its own (shapes differ, or lazy sections)."""
        cut = self._source[large]
        full = tuple(int(v) for v in self._boxes.shape[i])
        if self.mode == "partial" and cut.shape != full:
            arr = np.zeros(full, dtype=cut.dtype)
            arr[:] = self._fill_value
            arr[small] = cut
            return arr
        return np.copy(cut) if self._copy else cut

    # -- stacked results ------------------------------------------------------

    @property
    def data(self):
        """The ``(N, ny, nx)`` stack, or a list of arrays when shapes differ."""
        if self._data is not None:
            return self._data
        out = []
        for i in range(len(self)):
            if self.status[i] != BOX_OK:
                out.append(None)
            else:
                large, small = self._boxes.slices(i)
                out.append(self._cut_one(i, large, small))
        return out

    @property
    def shape(self):
        """Shape of the stack ``(N, ny, nx)``, or `None` when shapes differ."""
        return None if self._data is None else self._data.shape

    @property
    def origins_original(self):
        """``(N, 2)`` array of ``(x, y)`` of each cutout's first pixel in ``data``.

        This is the true origin, including any filled part (negative for
        cutouts that start before the array).
        """
        start = self._boxes.start if self.mode != "trim" else self._boxes.large_start
        return start[:, ::-1].copy()

    @property
    def bbox_original(self):
        """``(N, 2, 2)`` array of ``((ymin, ymax), (xmin, xmax))`` of valid pixels."""
        return np.stack([self._boxes.large_start, self._boxes.large_stop - 1], axis=2)

    def cutout_wcs(self, i):
        """Return the WCS of cutout ``i`` (built on demand).

        Parameters
        ----------
        i : int
            Index of the source.

        Returns
        -------
        wcs : `~astropy.wcs.WCS` or None
            The cutout's WCS, or `None` when no WCS was given.
        """
        return self[i].wcs

    def resample(self, target, method="bilinear", *, scale=None, dtype=np.float32,
                 n_threads=None):
        """Resample every cutout to one target grid, straight from ``data``.

        The compiled kernel reads each source's box (the requested box in
        ``'partial'`` and ``'strict'`` modes, the trimmed one in ``'trim'``)
        from the original array and resamples it with pixel centres aligned:
        output pixel ``j`` of ``m`` samples input coordinate
        ``(j + 0.5) * n / m - 0.5`` of ``n``. Pixels outside ``data`` take
        ``fill_value``; failed sources (``errors='mask'``) are all fill.

        Parameters
        ----------
        target : int or tuple of int
            Output size ``(H, W)`` (one number for a square).
        method : {'bilinear', 'nearest', 'area'}, optional
            ``'area'`` sums the overlap-weighted input pixels, so that the
            total flux of each cutout is preserved.
        scale : float or array-like of shape ``(N,)``, optional
            Factor applied to the pixel values (e.g. a flux conversion).
        dtype : `~numpy.dtype`, optional
            ``float32`` (default) or ``float64``.
        n_threads : int or None, optional
            Kernel threads (default: every core for outputs over 64 MB).

        Returns
        -------
        stack : `~numpy.ndarray`, shape ``(N, H, W)``
            The resampled cutouts.

        Examples
        --------
        >>> import numpy as np
        >>> from cutana import BatchCutout2D
        >>> batch = BatchCutout2D(np.ones((50, 50)), [(10, 10), (30, 20)], 8)
        >>> float(batch.resample(4, method="area")[0].sum())  # flux preserved
        64.0
        """
        from .resample import extract_resampled

        target = _target_shape(target)
        boxes = self._boxes
        ok = self.status == BOX_OK
        if self.mode == "trim":
            starts, shapes = boxes.large_start, boxes.large_stop - boxes.large_start
        else:
            starts, shapes = boxes.start, boxes.shape
        starts = np.where(ok[:, None], starts, -(1 << 40))
        shapes = np.where(ok[:, None], shapes, 1)
        fill = self._fill_value
        try:
            fill = float(fill)
        except (TypeError, ValueError):
            fill = 0.0
        data, starts = _resample_region(self._source, starts, shapes, ok)
        out, _ = extract_resampled(
            data, starts, shapes, tuple(target), method=method, fill_value=fill,
            scale=scale, dtype=dtype, n_threads=n_threads,
        )
        return out

    def normalize(self, method="asinh", *, stack=None, percentile=99.8, a=None,
                  contrast=0.25, n_samples=1000, crop=None, dtype="float32",
                  n_threads=None):
        """Stretch every cutout (per cutout) into [0, 1] or an integer range.

        The definitions are astropy's: limits from
        `~astropy.visualization.PercentileInterval` (or
        `~astropy.visualization.ZScaleInterval` for ``'zscale'``) over the
        finite pixels, data scaled to [0, 1] by the limits and clipped, then
        the stretch; uint8/uint16 are that value times 255/65535, rounded.
        See `cutana.normalization.normalize`.

        Parameters
        ----------
        method : {'none', 'linear', 'sqrt', 'log', 'asinh', 'zscale'}, optional
            The stretch (default 'asinh', the usual choice for cutouts
            of a survey; `cutana.normalization.normalize` defaults to 'none').
        stack : `~numpy.ndarray`, optional
            The stack to normalise, e.g. from `resample`; default `data`.
        percentile : float, optional
            Percentile clip (default 99.8).
        a : float, optional
            Softening of ``'log'`` (default 1000) and ``'asinh'`` (0.1).
        contrast : float, optional
            ``'zscale'`` contrast.
        n_samples : int, optional
            ``'zscale'`` samples.
        crop : float or int, optional
            Compute the limits on the central crop (fraction or pixels).
        dtype : {'float32', 'uint8', 'uint16'}, optional
            Output type.
        n_threads : int or None, optional
            Kernel threads (default: every core for stacks over 64 MB).

        Returns
        -------
        stack : `~numpy.ndarray`
            The normalised stack.

        Raises
        ------
        ValueError
            If the cutouts have different shapes and no ``stack`` is given.

        Examples
        --------
        >>> import numpy as np
        >>> from cutana import BatchCutout2D
        >>> data = np.random.default_rng(0).normal(size=(64, 64))
        >>> batch = BatchCutout2D(data, [(20, 20), (40, 30)], 16)
        >>> batch.normalize("linear", dtype="uint8").dtype
        dtype('uint8')
        """
        from .normalization import normalize

        if stack is None:
            if self._data is None:
                msg = (
                    "the cutouts have different shapes: use mode='partial', or "
                    "resample() them first and pass the result as stack="
                )
                raise ValueError(msg)
            stack = self._data
        return normalize(
            stack, method, percentile=percentile, a=a, contrast=contrast,
            n_samples=n_samples, crop=crop, dtype=dtype, n_threads=n_threads,
        )

    def __repr__(self):
        shape = self.shape
        desc = f"stack {shape}" if shape is not None else "cutouts of differing shapes"
        n_bad = int(np.count_nonzero(self.status))
        return (
            f"<BatchCutout2D: {len(self)} sources, {desc}, mode={self.mode!r}, "
            f"{n_bad} failed>"
        )
