# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Stretches for whole stacks of cutouts, as `astropy.visualization` defines them.

Every cutout and every band is normalised on its own. For the stretches
``linear``, ``sqrt``, ``log`` and ``asinh`` the display limits of an image are
`~astropy.visualization.PercentileInterval` of its finite pixels; for
``zscale`` they are `~astropy.visualization.ZScaleInterval`. With limits
:math:`v_{\\min}, v_{\\max}` each pixel :math:`x` becomes

.. math::

    u = \\mathrm{clip}\\left(\\frac{x - v_{\\min}}{v_{\\max} - v_{\\min}}, 0, 1\\right)

(astropy's ``BaseInterval.__call__``: when :math:`v_{\\max} = v_{\\min}` the
difference is not divided, only clipped), and then

========== ===========================================================
method     value in [0, 1]
========== ===========================================================
``linear`` :math:`u` (`~astropy.visualization.LinearStretch`)
``sqrt``   :math:`\\sqrt{u}` (`~astropy.visualization.SqrtStretch`)
``log``    :math:`\\log(a u + 1) / \\log(a + 1)`, default :math:`a = 1000`
           (`~astropy.visualization.LogStretch`)
``asinh``  :math:`\\operatorname{asinh}(u / a) / \\operatorname{asinh}(1 / a)`,
           default :math:`a = 0.1` (`~astropy.visualization.AsinhStretch`)
``zscale`` :math:`u` with the zscale limits
``none``   the pixel value itself (float32 output only; NaN stays NaN)
========== ===========================================================

float32 output is that value; uint8 and uint16 output is it times 255 or
65535, rounded to the nearest integer (ties to even, as `numpy.round`), in
the same pass, so no float64 copy of the stack is ever made. Non-finite pixels
become 0, and so does every pixel of an image without any finite pixel
(whose limits are NaN).

The compiled kernels (``cutana._normalize``) compute the limits with a
selection algorithm instead of a sort and reproduce `numpy.percentile` and
`~astropy.visualization.ZScaleInterval` exactly; the arithmetic is done in
float64 (astropy works in the input's precision, so for float32 input the
two differ by float32 rounding, about 1e-7).
"""

import logging
import numbers

import numpy as np

from . import _normalize
from ._threads import output_array, resolve_n_threads, run_chunks

__all__ = [
    "DEFAULT_A",
    "NORMALIZATIONS",
    "Normalizer",
    "OUTPUT_DTYPES",
    "compute_limits",
    "normalize",
]

logger = logging.getLogger(__name__)

#: Names accepted by `normalize`.
NORMALIZATIONS = ("none", "linear", "sqrt", "log", "asinh", "zscale")

#: Output dtypes accepted by `normalize`.
OUTPUT_DTYPES = ("float32", "uint8", "uint16")

_STRETCH_CODES = {
    "none": _normalize.STRETCH_NONE,
    "linear": _normalize.STRETCH_LINEAR,
    "sqrt": _normalize.STRETCH_SQRT,
    "log": _normalize.STRETCH_LOG,
    "asinh": _normalize.STRETCH_ASINH,
    "zscale": _normalize.STRETCH_LINEAR,
}

#: astropy's default ``a`` of the stretches that take one.
DEFAULT_A = {"log": 1000.0, "asinh": 0.1}


def _check_method(method):
    if method not in NORMALIZATIONS:
        msg = f"method must be one of {NORMALIZATIONS}, got {method!r}"
        raise ValueError(msg)


def _as_images(stack):
    """The stack as an ``(M, H, W)`` array and the kernel's dtype for it.

    Returns the (possibly non-native) array, its leading shape (``(N,)`` or
    ``(N, C)``) and the dtype the kernel reads: the native float32 or
    float64, or float64 for integers (exact) and other floats. Conversion,
    when needed, is done block by block in `_blocks`.
    """
    arr = np.asarray(stack)
    if arr.ndim not in (3, 4):
        msg = (
            "stack must have shape (N, H, W) or (N, C, H, W), got "
            f"{arr.ndim} dimension(s) {arr.shape}"
        )
        raise ValueError(msg)
    if arr.dtype.kind not in "biuf":
        msg = f"stack has an unsupported dtype {arr.dtype}; use a numeric dtype"
        raise TypeError(msg)
    if arr.dtype.kind == "f" and arr.dtype.itemsize in (4, 8):
        dtype = arr.dtype.newbyteorder("=")
    else:
        dtype = np.dtype(np.float64)
    lead = arr.shape[:-2]
    n_images = lead[0] * lead[1] if len(lead) == 2 else lead[0]
    return arr.reshape((n_images,) + arr.shape[-2:]), lead, dtype


def _blocks(images, dtype, lo, hi, size=64):
    """Yield ``(start, block)`` with C-contiguous ``dtype`` blocks of images."""
    if images.dtype == dtype and images.flags.c_contiguous:
        yield lo, images[lo:hi]
        return
    for start in range(lo, hi, size):
        stop = min(hi, start + size)
        yield start, np.ascontiguousarray(images[start:stop], dtype=dtype)


def _crop_region(crop, shape):
    """Rows ``r0:r1`` and columns ``c0:c1`` of the central crop."""
    height, width = shape
    if crop is None:
        return 0, height, 0, width
    # each value keeps its own kind: in (1, 0.5), 1 is one pixel
    if isinstance(crop, np.ndarray):
        values = crop.tolist() if crop.ndim == 1 else [crop.tolist()]
    else:
        values = list(crop) if isinstance(crop, (tuple, list)) else [crop]
    if len(values) not in (1, 2) or not all(
        isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
        for v in values
    ):
        msg = (
            "crop must be a number or a pair (for rows and columns): a fraction "
            f"in (0, 1] of the image or a number of pixels, got {crop!r}"
        )
        raise ValueError(msg)
    if len(values) == 1:
        values = values * 2
    sizes = []
    for value, full in zip(values, (height, width), strict=True):
        if not np.isfinite(value) or value <= 0:
            msg = f"crop must be positive, got {crop!r}"
            raise ValueError(msg)
        if not isinstance(value, numbers.Integral) and value <= 1:
            size = max(1, int(round(float(value) * full)))
        elif float(value) == int(value):
            size = int(value)
            if size > full:
                msg = f"crop of {size} pixels is larger than the image ({full} pixels)"
                raise ValueError(msg)
        else:
            msg = (
                "crop must be a fraction in (0, 1] or a whole number of pixels, "
                f"got {crop!r}"
            )
            raise ValueError(msg)
        sizes.append(size)
    r0 = (height - sizes[0]) // 2
    c0 = (width - sizes[1]) // 2
    return r0, r0 + sizes[0], c0, c0 + sizes[1]


def _interval_params(method, percentile, contrast, n_samples):
    """Kernel interval code and parameters, validated."""
    if method == "zscale":
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral):
            msg = f"n_samples must be a positive integer, got {n_samples!r}"
            raise ValueError(msg)
        if n_samples < 1:
            msg = f"n_samples must be a positive integer, got {n_samples!r}"
            raise ValueError(msg)
        if not (np.isfinite(contrast) and contrast >= 0):
            msg = f"contrast must be a finite number >= 0, got {contrast!r}"
            raise ValueError(msg)
        return _normalize.INTERVAL_ZSCALE, 0.0, 1.0, int(n_samples), float(contrast)
    if not (np.isscalar(percentile) and 0 <= percentile <= 100):
        msg = f"percentile must be in [0, 100], got {percentile!r}"
        raise ValueError(msg)
    # exactly astropy's PercentileInterval and numpy.percentile arithmetic
    # (numpy divides the float64 percentiles by 100)
    lower = (100 - float(percentile)) * 0.5
    upper = 100 - lower
    return _normalize.INTERVAL_PERCENTILE, lower / 100, upper / 100, 1000, 0.25


def _unsure_flags(interval, n):
    """Per-image flags for the kernel to mark zscale limits that astropy's
    rounding decides, or `None` for percentile limits."""
    if interval != _normalize.INTERVAL_ZSCALE:
        return None
    return np.zeros(n, dtype=np.uint8)


def _astropy_zscale(image, region, n_samples, contrast):
    """astropy's `~astropy.visualization.ZScaleInterval` limits of the
    ``(r0, r1, c0, c1)`` region of one image.

    For the rare images whose samples are all or mostly equal: astropy's
    least-squares fit leaves residuals and a slope of rounding size there,
    which decide its limits; only astropy itself gives them.
    """
    from astropy.visualization import ZScaleInterval

    r0, r1, c0, c1 = region
    zscale = ZScaleInterval(n_samples=n_samples, contrast=contrast)
    lo, hi = zscale.get_limits(image[r0:r1, c0:c1])
    return float(lo), float(hi)


def compute_limits(
    stack,
    method="linear",
    *,
    percentile=99.8,
    contrast=0.25,
    n_samples=1000,
    crop=None,
    n_threads=None,
):
    """Compute the display limits of every cutout and band of a stack.

    Parameters
    ----------
    stack : array-like, shape ``(N, H, W)`` or ``(N, C, H, W)``
        The cutouts; any numeric dtype.
    method : str, optional
        Any name of `NORMALIZATIONS` but ``'none'``: ``'zscale'`` gives
        `~astropy.visualization.ZScaleInterval` limits, every other name
        `~astropy.visualization.PercentileInterval` limits.
    percentile : float, optional
        The percentage of finite pixels kept between the limits, in
        [0, 100]; ``(100 - percentile) / 2`` percent are cut at each end.
    contrast : float, optional
        The zscale contrast.
    n_samples : int, optional
        The maximum number of pixels zscale samples.
    crop : float, int or tuple, optional
        Compute the limits from the central region only: a fraction in
        (0, 1] of the height and width, or a size in pixels; a pair gives
        rows and columns separately. The region starts at
        ``(H - h) // 2, (W - w) // 2``.
    n_threads : int or None, optional
        Number of threads, each working on a contiguous block of images.
        `None` (default) uses every available core once the stack exceeds
        64 MB, one thread below that.

    Returns
    -------
    vmin, vmax : `~numpy.ndarray` of float64, shape ``(N,)`` or ``(N, C)``
        The limits of each image; NaN where an image (region) has no finite
        pixel.

    Raises
    ------
    ValueError
        If a parameter is out of range, or ``method`` is ``'none'``.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.normalization import compute_limits
    >>> stack = np.arange(2 * 3 * 5.0).reshape(2, 3, 5)
    >>> vmin, vmax = compute_limits(stack, percentile=100)
    >>> vmin, vmax
    (array([ 0., 15.]), array([14., 29.]))
    """
    _check_method(method)
    if method == "none":
        msg = "method 'none' has no limits; choose a stretch such as 'linear'"
        raise ValueError(msg)
    n_threads = resolve_n_threads(n_threads, getattr(stack, "nbytes", 0))
    interval, q_lo, q_hi, n_samples, contrast = _interval_params(
        method, percentile, contrast, n_samples
    )
    images, lead, kernel_dtype = _as_images(stack)
    vmin = np.full(len(images), np.nan)
    vmax = np.full(len(images), np.nan)
    if images.size == 0:
        return vmin.reshape(lead), vmax.reshape(lead)
    region = _crop_region(crop, images.shape[1:])
    unsure = _unsure_flags(interval, len(images))

    def work(lo, hi):
        for start, block in _blocks(images, kernel_dtype, lo, hi):
            stop = start + len(block)
            _normalize.compute_limits(
                block,
                interval,
                q_lo,
                q_hi,
                n_samples,
                contrast,
                *region,
                vmin[start:stop],
                vmax[start:stop],
                None if unsure is None else unsure[start:stop],
            )

    run_chunks(work, len(images), n_threads)
    for i in np.flatnonzero(unsure) if unsure is not None else ():
        image = np.asarray(images[i], dtype=kernel_dtype)
        vmin[i], vmax[i] = _astropy_zscale(image, region, n_samples, contrast)
    return vmin.reshape(lead), vmax.reshape(lead)


def normalize(
    stack,
    method="none",
    *,
    percentile=99.8,
    a=None,
    contrast=0.25,
    n_samples=1000,
    crop=None,
    dtype="float32",
    out=None,
    rows=None,
    n_threads=None,
):
    """Stretch every cutout and band of a stack, as `astropy.visualization` does.

    Parameters
    ----------
    stack : array-like, shape ``(N, H, W)`` or ``(N, C, H, W)``
        The cutouts; any numeric dtype and byte order.
    method : str, optional
        One of `NORMALIZATIONS`: ``'none'`` (values unchanged, float32 only),
        ``'linear'``, ``'sqrt'``, ``'log'``, ``'asinh'`` (each between
        percentile limits) or ``'zscale'`` (linear between zscale limits).
    percentile : float, optional
        The percentage of finite pixels kept between the limits, in
        [0, 100] (`~astropy.visualization.PercentileInterval`). Not used by
        ``'zscale'`` and ``'none'``.
    a : float, optional
        The ``a`` of ``'log'`` (default 1000) or ``'asinh'`` (default 0.1),
        > 0; ignored by the other methods.
    contrast : float, optional
        The zscale contrast (default 0.25).
    n_samples : int, optional
        The maximum number of pixels zscale samples (default 1000).
    crop : float, int or tuple, optional
        Compute the limits from the central region of each image only (see
        `compute_limits`); the stretch still applies to the whole image.
    dtype : {'float32', 'uint8', 'uint16'}, optional
        Output type.
    out : `~numpy.ndarray`, optional
        C-contiguous output of the stack's shape and ``dtype``; with
        ``rows``, of shape ``(M, H, W)``.
    rows : array-like of int, optional
        For an ``(N, H, W)`` stack and a given ``out``: write image ``i``
        into ``out[rows[i]]`` (distinct rows in ``[0, M)``) instead of
        ``out[i]``, e.g. straight into the rows of a larger array, without
        the copy that ``big[rows] = normalize(stack, ...)`` makes. Returns
        ``out``.
    n_threads : int or None, optional
        Number of threads, each working on a contiguous block of images;
        the result does not depend on it. `None` (default) uses every
        available core once the stack exceeds 64 MB, one thread below that.

    Returns
    -------
    out : `~numpy.ndarray`
        The stretched stack, of the input's shape and type ``dtype``.

    Raises
    ------
    ValueError
        If a parameter is out of range, or ``method`` is ``'none'`` with an
        integer ``dtype``.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.normalization import normalize
    >>> stack = np.linspace(0, 1, 8).reshape(1, 2, 4)
    >>> normalize(stack, "linear", percentile=100, dtype="uint8")
    array([[[  0,  36,  73, 109],
            [146, 182, 219, 255]]], dtype=uint8)
    """
    _check_method(method)
    n_threads = resolve_n_threads(n_threads, getattr(stack, "nbytes", 0))
    normalizer = Normalizer(
        method, percentile=percentile, a=a, contrast=contrast, n_samples=n_samples,
        crop=crop, dtype=dtype, n_threads=n_threads,
    )
    return normalizer(stack, out=out, rows=rows)


class Normalizer:
    """`normalize` prepared once, to stretch many stacks the same way.

    The parameters are checked and converted here once; each call then
    checks only its stack and goes to the kernel (6 µs per call beside the
    kernel, against 14 µs for `normalize`), for callers that stretch many
    stacks alike. The result is that of `normalize` with the same
    parameters.

    Parameters
    ----------
    method : str, optional
        One of `NORMALIZATIONS` (see `normalize`).
    percentile, a, contrast, n_samples, crop, dtype
        As for `normalize`.
    n_threads : int or None, optional
        Number of threads of each call, each working on a contiguous block
        of images. `None` (default) chooses per call as `normalize` does.

    Raises
    ------
    ValueError
        If a parameter is out of range, or ``method`` is ``'none'`` with an
        integer ``dtype``.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.normalization import Normalizer
    >>> stretch = Normalizer("linear", percentile=100, dtype="uint8")
    >>> stretch(np.linspace(0, 1, 8).reshape(1, 2, 4))
    array([[[  0,  36,  73, 109],
            [146, 182, 219, 255]]], dtype=uint8)
    >>> out = np.zeros((3, 1, 2), np.uint8)
    >>> stretch(np.array([[[2.0, 4.0]]]), out=out, rows=[2])[2]
    array([[  0, 255]], dtype=uint8)
    """

    def __init__(self, method="none", *, percentile=99.8, a=None, contrast=0.25,
                 n_samples=1000, crop=None, dtype="float32", n_threads=None):
        _check_method(method)
        self.n_threads = None if n_threads is None else resolve_n_threads(n_threads)
        try:
            out_dtype = np.dtype(dtype)
        except TypeError:
            out_dtype = None
        if out_dtype is None or out_dtype.name not in OUTPUT_DTYPES:
            msg = f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}"
            raise ValueError(msg)
        self.dtype = np.dtype(out_dtype.name)  # native byte order
        if method == "none" and self.dtype != np.float32:
            msg = (
                f"method 'none' cannot produce {self.dtype.name} output: integer "
                "output needs a stretch to map the data to [0, 1]; choose one of "
                f"{NORMALIZATIONS[1:]}, or dtype='float32'"
            )
            raise ValueError(msg)
        if a is None:
            a = DEFAULT_A.get(method, 1.0)
        if method in DEFAULT_A and not (np.isscalar(a) and np.isfinite(a) and a > 0):
            msg = f"a must be a finite number > 0 for the {method} stretch, got {a!r}"
            raise ValueError(msg)
        self.method = method
        self._a = float(a)
        self._stretch = _STRETCH_CODES[method]
        self._interval = _interval_params(method, percentile, contrast, n_samples)
        self._crop = crop
        self._regions = {}  # image shape -> rows and columns of the crop

    def region(self, shape):
        """The part of an image of ``shape`` that the limits are computed from.

        Parameters
        ----------
        shape : tuple of int
            ``(H, W)`` of the images.

        Returns
        -------
        r0, r1, c0, c1 : int
            Rows ``r0:r1`` and columns ``c0:c1``: the central crop, or the
            whole image without one.

        Raises
        ------
        ValueError
            If the crop does not fit in images of ``shape``.

        Examples
        --------
        >>> from cutana.normalization import Normalizer
        >>> Normalizer("linear", crop=0.5).region((100, 40))
        (25, 75, 10, 30)
        >>> Normalizer("linear", crop=(20, 10)).region((100, 40))
        (40, 60, 15, 25)
        """
        shape = (int(shape[0]), int(shape[1]))
        region = self._regions.get(shape)
        if region is None:
            region = self._regions[shape] = _crop_region(self._crop, shape)
        return region

    def __call__(self, stack, *, out=None, rows=None):
        """Stretch every cutout and band of ``stack``.

        Parameters
        ----------
        stack : array-like, shape ``(N, H, W)`` or ``(N, C, H, W)``
            The cutouts; any numeric dtype and byte order.
        out : `~numpy.ndarray`, optional
            C-contiguous output of the stack's shape and the dtype; with
            ``rows``, of shape ``(M, H, W)``.
        rows : array-like of int, optional
            As for `normalize`: write image ``i`` into ``out[rows[i]]``.

        Returns
        -------
        out : `~numpy.ndarray`
            The stretched stack.
        """
        n_threads = self.n_threads
        if n_threads is None:
            n_threads = resolve_n_threads(None, getattr(stack, "nbytes", 0))
        images, lead, kernel_dtype = _as_images(stack)
        shape = lead + images.shape[1:]
        if rows is not None:
            rows = np.ascontiguousarray(rows, dtype=np.intp)
            if out is None or len(lead) != 1 or rows.shape != lead:
                msg = (
                    "rows needs an (N, H, W) stack, an out array and N rows, got a "
                    f"stack of shape {shape}, out {None if out is None else out.shape} "
                    f"and rows of shape {rows.shape}"
                )
                raise ValueError(msg)
            shape = (len(out), *shape[1:])
            ordered = np.sort(rows)
            if (ordered[1:] == ordered[:-1]).any():
                msg = "rows must be distinct"
                raise ValueError(msg)
        out = output_array(out, shape, self.dtype)
        if images.size == 0:
            return out
        target = out if rows is not None else out.reshape(images.shape)
        region = self.region(images.shape[1:])
        vmin = np.empty(len(images))
        vmax = np.empty(len(images))
        unsure = None
        if self._stretch != _normalize.STRETCH_NONE:
            unsure = _unsure_flags(self._interval[0], len(images))

        def work(lo, hi):
            for start, block in _blocks(images, kernel_dtype, lo, hi):
                stop = start + len(block)
                _normalize.normalize_stack(
                    block,
                    target if rows is not None else target[start:stop],
                    self._stretch,
                    self._a,
                    vmin[start:stop],
                    vmax[start:stop],
                    True,
                    *self._interval,
                    *region,
                    rows=None if rows is None else rows[start:stop],
                    unsure=None if unsure is None else unsure[start:stop],
                )

        if n_threads == 1:
            work(0, len(images))
        else:
            run_chunks(work, len(images), n_threads)
        for i in np.flatnonzero(unsure) if unsure is not None else ():
            # stretched again with astropy's own limits (see _astropy_zscale)
            image = np.ascontiguousarray(images[i : i + 1], dtype=kernel_dtype)
            n_samples, contrast = self._interval[3:5]
            limits = _astropy_zscale(image[0], region, n_samples, contrast)
            vmin[i], vmax[i] = limits
            _normalize.normalize_stack(
                image,
                target if rows is not None else target[i : i + 1],
                self._stretch,
                self._a,
                vmin[i : i + 1],
                vmax[i : i + 1],
                False,
                rows=None if rows is None else rows[i : i + 1],
            )
        return out
