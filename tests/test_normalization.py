# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of cutana.normalization against astropy.visualization.

Tolerances: the limits are compared exactly (percentile) or to 1e-7
relative (zscale, whose line fit astropy does with ``np.polyfit``).
Stretched float32 values are compared with astropy run on the same data in
float64, to 1e-6 absolute (float32 rounding of values in [0, 1]); uint8 and
uint16 codes of the linear, sqrt and zscale stretches must equal
``np.round(astropy * 255)`` exactly, those of log and asinh (whose libm and
numpy transcendental functions may differ in the last bit) may differ by one
code in at most one pixel in 10,000.
"""

import itertools

import numpy as np
import pytest
from astropy.visualization import (
    AsinhStretch,
    LinearStretch,
    LogStretch,
    ManualInterval,
    PercentileInterval,
    SqrtStretch,
    ZScaleInterval,
)
from numpy.testing import assert_allclose, assert_array_equal

from cutana import _normalize
from cutana.normalization import NORMALIZATIONS, Normalizer, compute_limits, normalize

STRETCHES = {
    "linear": lambda a: LinearStretch(),
    "sqrt": lambda a: SqrtStretch(),
    "log": lambda a: LogStretch(1000.0 if a is None else a),
    "asinh": lambda a: AsinhStretch(0.1 if a is None else a),
}


def _images(kind, shape, dtype, seed=0, nan_fraction=0.0):
    """A stack of synthetic images of one kind."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        data = rng.normal(10.0, 2.0, shape)
    elif kind == "ties":
        data = rng.integers(0, 6, shape).astype(float)
    elif kind == "skewed":
        data = rng.lognormal(0.0, 2.5, shape)
    elif kind == "galaxy":
        # sky noise plus a bright, extended source and a star at the edge
        h, w = shape[-2:]
        yy, xx = np.mgrid[:h, :w]
        r2 = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
        data = rng.normal(0.0, 0.05, shape) + 30 * np.exp(-r2 / 18.0)
        data[..., 2, 3] += 500.0
    else:
        raise ValueError(kind)
    data = data.astype(dtype)
    if nan_fraction:
        data[rng.random(shape) < nan_fraction] = np.nan
    return data


def _astropy(
    image, method, percentile=99.8, a=None, contrast=0.25, n_samples=1000, region=None
):
    """astropy.visualization's normalised image, in float64."""
    image = np.asarray(image, dtype=np.float64)
    limits_from = image if region is None else image[region]
    if method == "zscale":
        vmin, vmax = ZScaleInterval(n_samples=n_samples, contrast=contrast).get_limits(
            limits_from
        )
        stretch = LinearStretch()
    else:
        vmin, vmax = PercentileInterval(percentile).get_limits(limits_from)
        stretch = STRETCHES[method](a)
    values = image - float(vmin)
    if (vmax - vmin) != 0:
        values /= vmax - vmin
    return stretch(np.clip(values, 0.0, 1.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["noise", "ties", "skewed", "galaxy"])
@pytest.mark.parametrize("percentile", [99.8, 90.0, 50.0, 100.0, 0.0, 99.99, 37.3])
@pytest.mark.parametrize("shape", [(3, 7, 9), (2, 80, 90)])
def test_percentile_limits_equal_astropy(dtype, kind, percentile, shape):
    """Test that percentile limits equal PercentileInterval's exactly."""
    data = _images(kind, shape, dtype, seed=1, nan_fraction=0.05)
    vmin, vmax = compute_limits(data, "linear", percentile=percentile)
    for i in range(shape[0]):
        ref = PercentileInterval(percentile).get_limits(data[i])
        assert vmin[i] == ref[0]
        assert vmax[i] == ref[1]


def test_one_pass_extreme_values_equal_sorting():
    """Test the one-pass order statistics that place the filter's thresholds
    against numpy.sort.

    Ranks at both ends differ (as the floors of the two quantiles make
    them), values repeat, and the extremes sit at the start, the end and
    the middle of the array.
    """
    rng = np.random.default_rng(21)
    for trial in range(300):
        n = int(rng.integers(64, 400))
        a = rng.normal(size=n)
        if trial % 3 == 1:
            a = np.round(a * 3)  # many ties
        elif trial % 3 == 2:
            a = np.sort(a)[:: 1 if trial % 2 else -1].copy()  # sorted either way
        r_lo, r_hi = (int(r) for r in rng.integers(0, 62, 2))
        lo, hi = _normalize._extreme_values(a, r_lo, r_hi)
        s = np.sort(a)
        assert lo == s[r_lo] and hi == s[n - 1 - r_hi], (trial, r_lo, r_hi)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_radix_selection_equals_sorting(dtype):
    """Test the radix selection of the order statistics r and r + 1 against
    numpy.sort: sizes from 2 to a few thousand (one level of 256 bins or
    several, and the insertion sort of the last few), every rank of the
    small arrays, ties, values of both signs and zeros of both signs, one
    value far from the rest (a wide key range with the others in one bin),
    magnitudes from subnormal to the largest finite, and sorted input."""
    rng = np.random.default_rng(8)
    info = np.finfo(dtype)
    arrays = []
    for trial in range(400):
        n = int(rng.choice([2, 3, 24, 25, 26, 100, 257, 600, 3000]))
        kind = trial % 8
        if kind == 0:
            a = rng.normal(size=n)
        elif kind == 1:
            a = np.round(rng.normal(size=n) * 2)  # many ties
        elif kind == 2:
            a = rng.choice([-0.0, 0.0, 1.0, -1.0], size=n)
        elif kind == 3:
            a = rng.normal(size=n) * 1e-3 + 5.0
            a[rng.integers(n)] = 1e30  # one outlier: the rest share a bin
        elif kind == 4:
            a = rng.choice([info.smallest_subnormal, info.tiny, -info.tiny,
                            info.max, -info.max, 1.0, 0.0], size=n)
        elif kind == 5:
            a = np.sort(rng.standard_cauchy(size=n))[:: 1 if trial % 2 else -1]
        elif kind == 6:
            a = np.full(n, 3.25)
        else:
            a = rng.normal(size=n) + 1e-7 * np.arange(n)  # near neighbours
        arrays.append(np.ascontiguousarray(a, dtype=dtype))
    for a in arrays:
        s = np.sort(a)
        ranks = range(len(a) - 1) if len(a) <= 30 else rng.integers(0, len(a) - 1, 6)
        for r in ranks:
            first, second = _normalize._radix_pair(a, int(r))
            assert (first, second) == (s[r], s[r + 1]), (len(a), r)
    with pytest.raises(ValueError, match="r must be"):
        _normalize._radix_pair(np.zeros(3, dtype=dtype), 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vector", [True, False])
def test_percentile_limits_large_images_and_infinities(dtype, vector):
    """Test that the filtered selection path is exact, with infinities and NaN,
    with and without the AVX2 filter (which also counts the finite pixels)."""
    rng = np.random.default_rng(2)
    data = rng.normal(size=(11, 150, 149)).astype(dtype)
    data[0, ::7, ::3] = np.inf
    data[1, ::5, ::2] = -np.inf
    data[2, :40] = np.nan
    data[3] = np.sort(data[3].ravel()).reshape(150, 149)  # sorted, correlated
    data[4, :, :] = 0.0  # constant except a few values
    data[4, 3, :10] = np.arange(10)
    data[5, 75:, :] = 7.0  # half the image at one value
    data[6][rng.random((150, 149)) < 0.7] = np.nan  # mostly NaN
    data[7].flat[::37] = np.nan  # NaN where the probe looks, finite elsewhere
    data[8] = np.nan  # a single finite pixel, then none
    data[8, 20, 30] = 3.5
    data[9] = np.nan
    data[10, :, :75] = np.nan  # NaN and +-inf on both sides of the limits
    data[10, ::4, 75:] = np.inf
    data[10, 1::4, 75:] = -np.inf
    # whole images (one run of pixels) and a central crop (row by row)
    crops = {None: np.s_[:, :], (140, 120): np.s_[5:145, 14:134]}
    previous = _normalize._set_vector_loops(vector)
    try:
        for percentile, crop in itertools.product((99.8, 99.0, 95.0), crops):
            vmin, vmax = compute_limits(data, "asinh", percentile=percentile, crop=crop)
            for i in range(len(data)):
                if i == 9:  # no finite pixel
                    assert np.isnan(vmin[i]) and np.isnan(vmax[i])
                    continue
                ref = PercentileInterval(percentile).get_limits(data[i][crops[crop]])
                assert (vmin[i], vmax[i]) == ref, (i, crop)
    finally:
        _normalize._set_vector_loops(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vector", [True, False])
def test_percentile_limits_when_the_probe_misleads(dtype, vector):
    """Test the filter's second and third passes: pixels planted where the
    probe looks (pixel floor((2 j + 1) n / (2 k)) of n, for j < k = 3.5
    sqrt(n)) make its lowest or highest ranks extreme, so that the first
    thresholds collect too few pixels on one side or both; then the limits
    must still equal astropy's."""
    rng = np.random.default_rng(12)
    ny, nx = 150, 149
    n = ny * nx
    k = int(3.5 * np.sqrt(n))
    probe = (2 * np.arange(k) + 1) * n // (2 * k)
    data = rng.normal(size=(6, ny, nx)).astype(dtype)
    for i, (n_low, n_high) in enumerate([(10, 0), (0, 10), (10, 10), (25, 25), (60, 0),
                                         (3, 40)]):
        flat = data[i].reshape(-1)
        chosen = rng.permutation(probe)
        flat[chosen[:n_low]] = -50 - np.arange(n_low)  # the probe's lowest
        flat[chosen[n_low:n_low + n_high]] = 50 + np.arange(n_high)
    previous = _normalize._set_vector_loops(vector)
    try:
        for percentile in (99.8, 99.0):
            vmin, vmax = compute_limits(data, "linear", percentile=percentile)
            for i in range(len(data)):
                ref = PercentileInterval(percentile).get_limits(data[i])
                assert (vmin[i], vmax[i]) == ref, (i, percentile)
    finally:
        _normalize._set_vector_loops(previous)


@pytest.mark.parametrize("shape", [(23, 25), (32, 32), (41, 39), (64, 64), (100, 90)])
@pytest.mark.parametrize("vector", [True, False])
def test_percentile_limits_small_images(shape, vector):
    """Test that the filtered selection path is exact on the small images,
    whose probe is smaller (it grows as the square root of the pixels):
    noise, ties, sorted pixels, NaN and infinities."""
    ny, nx = shape
    rng = np.random.default_rng(5)
    data = rng.normal(size=(9, ny, nx)).astype(np.float32)
    data[1] = np.round(data[1] * 2) / 2  # ties at the limits
    data[2] = np.sort(data[2].ravel()).reshape(ny, nx)
    data[3, : ny // 3] = np.nan
    data[4].flat[::5] = np.inf
    data[4].flat[1::7] = -np.inf
    data[5][rng.random((ny, nx)) < 0.8] = np.nan  # few finite pixels
    data[6] = 1.0  # constant but for a few values
    data[6, 1, :5] = np.arange(5)
    data[7] = rng.standard_cauchy(size=(ny, nx))  # far tails
    data[8].flat[3::11] = np.nan  # NaN spread over the image
    crops = {None: np.s_[:, :], (ny - 4, nx - 6): np.s_[2 : ny - 2, 3 : nx - 3]}
    previous = _normalize._set_vector_loops(vector)
    try:
        for percentile, crop in itertools.product((99.8, 99.0, 95.0), crops):
            vmin, vmax = compute_limits(data, "asinh", percentile=percentile, crop=crop)
            for i in range(len(data)):
                ref = PercentileInterval(percentile).get_limits(data[i][crops[crop]])
                assert (vmin[i], vmax[i]) == ref, (i, percentile, crop)
    finally:
        _normalize._set_vector_loops(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["noise", "ties", "skewed", "galaxy"])
@pytest.mark.parametrize(
    ("n_samples", "contrast"),
    [(1000, 0.25), (300, 0.1), (5000, 1.0), (3, 0.25), (50, 0.0)],
)
def test_zscale_limits_match_astropy(dtype, kind, n_samples, contrast):
    """Test that zscale limits agree with ZScaleInterval to 1e-7 relative."""
    data = _images(kind, (3, 60, 70), dtype, seed=3, nan_fraction=0.02)
    vmin, vmax = compute_limits(data, "zscale", n_samples=n_samples, contrast=contrast)
    for i in range(len(data)):
        ref = ZScaleInterval(n_samples=n_samples, contrast=contrast).get_limits(data[i])
        assert_allclose((vmin[i], vmax[i]), ref, rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zscale_of_mostly_equal_samples_is_astropys(dtype):
    """Test images whose pixels are mostly one value: astropy's fit leaves
    rounding-size residuals there, which decide what it rejects (often all:
    then the limits are the extreme samples); limits and uint8 codes must
    be astropy's (to float rounding, as elsewhere), in ``compute_limits``,
    ``normalize`` and crops."""
    rng = np.random.default_rng(5)
    images = np.stack([
        np.where(rng.random((40, 44)) < equal, 5.0, rng.normal(5.0, 1.0, (40, 44)))
        for equal in (0.8, 0.85, 0.9, 0.95) for _ in range(6)
    ]).astype(dtype)  # fmt: skip
    vmin, vmax = compute_limits(images, "zscale")
    out = normalize(images, "zscale", dtype="uint8")
    cropped = normalize(images, "zscale", dtype="uint8", crop=0.5)
    fallback = 0
    for i, image in enumerate(images):
        lo, hi = ZScaleInterval().get_limits(image)
        assert_allclose((vmin[i], vmax[i]), (lo, hi), rtol=1e-7, atol=0)
        fallback += (lo, hi) == (image.min(), image.max())
        ref = np.round(255 * ManualInterval(lo, hi)(image.astype(np.float64)))
        assert np.abs(out[i] - ref).max() <= 1
        lo, hi = ZScaleInterval().get_limits(image[10:30, 11:33])
        ref = np.round(255 * ManualInterval(lo, hi)(image.astype(np.float64)))
        assert np.abs(cropped[i] - ref).max() <= 1
    assert fallback > 0  # the case astropy's rounding decides occurred


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zscale_of_values_a_few_units_apart_is_astropys(dtype):
    """Test zscale of images whose values lie one or a few units in the last
    place apart (a 1-pixel box resampled bilinearly gives two such values):
    astropy's limits there come from the rounding of its fit, even inverted
    (vmin > vmax, the image mapped upside down), and the codes must be its
    own. They were the extreme values, and every code 255 codes off."""
    value = dtype(7.541668650270754)
    up = np.nextafter(value, dtype(10))
    images = []
    for n_up in (9, 3, 12, 20):
        image = np.full((5, 5), value, dtype=dtype)
        image.flat[np.random.default_rng(n_up).permutation(25)[:n_up]] = up
        images.append(image)
    images.append(np.where(np.arange(25).reshape(5, 5) % 3, value,
                           np.nextafter(up, dtype(10))).astype(dtype))
    images = np.stack(images)
    vmin, vmax = compute_limits(images, "zscale")
    out = normalize(images, "zscale", dtype="uint8")
    for i, image in enumerate(images):
        lo, hi = ZScaleInterval().get_limits(image)
        assert (vmin[i], vmax[i]) == (lo, hi)
        ref = np.round(255 * ManualInterval(lo, hi)(image.astype(np.float64)))
        np.testing.assert_array_equal(out[i], ref)


@pytest.mark.parametrize("value", [1000.0, 3.3, -7.1])
def test_zscale_of_a_constant_image_is_astropys(value):
    """Test zscale of a constant image (NaN pixels aside): astropy's fit of
    equal samples has a slope of rounding size, so its limits are the value
    give or take ~1e-12 (sometimes inverted), and the stretch follows them
    (computed in float64)."""
    images = np.full((6, 21, 21), value)
    images[1, 3] = np.nan
    images[2] = np.nan
    images[3, :, :5] = np.nan
    vmin, vmax = compute_limits(images, "zscale")
    out = normalize(images, "zscale", dtype="uint8")
    for i, image in enumerate(images):
        if not np.isfinite(image).any():
            assert np.isnan(vmin[i]) and not out[i].any()
            continue
        lo, hi = ZScaleInterval().get_limits(image)
        assert (vmin[i], vmax[i]) == (lo, hi)
        ref = np.round(255 * ManualInterval(lo, hi)(image))
        assert_array_equal(out[i], np.nan_to_num(ref).astype(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("method", "a"),
    [
        ("linear", None),
        ("sqrt", None),
        ("log", None),
        ("log", 10.0),
        ("asinh", None),
        ("asinh", 0.02),
        ("asinh", 3.0),
        ("zscale", None),
    ],
)
@pytest.mark.parametrize("kind", ["noise", "skewed", "galaxy"])
def test_float32_output_matches_astropy(dtype, method, a, kind):
    """Test that float32 output equals astropy's stretch to 1e-6."""
    data = _images(kind, (3, 48, 40), dtype, seed=4, nan_fraction=0.03)
    out = normalize(data, method, a=a, dtype="float32")
    assert out.dtype == np.float32 and out.shape == data.shape
    for i in range(len(data)):
        ref = _astropy(data[i], method, a=a)
        finite = np.isfinite(data[i])
        assert_allclose(out[i][finite], ref[finite], rtol=0, atol=1e-6)
        assert np.all(out[i][~finite] == 0)
        assert np.all((out[i] >= 0) & (out[i] <= 1))


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("method", ["linear", "sqrt", "log", "asinh", "zscale"])
@pytest.mark.parametrize("kind", ["noise", "ties", "galaxy"])
@pytest.mark.parametrize("shape", [(4, 20, 30), (2, 150, 150)])
def test_integer_output_is_rounded_astropy(dtype, method, kind, shape):
    """Test that uint8/uint16 output is astropy's value times 255/65535, rounded."""
    data = _images(kind, shape, np.float64, seed=5, nan_fraction=0.01)
    out = normalize(data, method, dtype=dtype)
    scale = 255 if dtype == "uint8" else 65535
    ref = np.stack([_astropy(image, method) for image in data])
    expected = np.round(np.nan_to_num(ref, nan=0.0) * scale).astype(dtype)
    expected[~np.isfinite(data)] = 0
    assert out.dtype == np.dtype(dtype)
    if method in ("linear", "sqrt", "zscale"):
        assert_array_equal(out, expected)
    else:
        diff = np.abs(out.astype(int) - expected.astype(int))
        assert diff.max() <= 1
        assert np.count_nonzero(diff) <= max(1, out.size // 10000)


def test_uint8_rounds_half_to_even():
    """Test that codes at exact halves round to even, as numpy.round does."""
    data = np.arange(511.0).reshape(1, 7, 73)  # u * 255 = x / 2: a half at odd x
    out = normalize(data, "linear", percentile=100, dtype="uint8")
    assert_array_equal(out.ravel(), np.round(np.arange(511.0) / 2).astype(np.uint8))


@pytest.mark.parametrize("stretch", ["log", "asinh", "sqrt"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("vector", [True, False])
def test_uint8_lookup_table_equals_direct_evaluation(stretch, dtype, vector):
    """Test that the uint8 lookup-table path gives the direct evaluation's codes.

    With and without the AVX2 table loop (float32), on images whose pixel
    count is and is not a multiple of its four lanes.
    """
    previous = _normalize._set_vector_loops(vector)
    try:
        _check_lookup_table(stretch, dtype)
    finally:
        _normalize._set_vector_loops(previous)


def _check_lookup_table(stretch, dtype):
    rng = np.random.default_rng(6)
    code = {
        "log": _normalize.STRETCH_LOG,
        "asinh": _normalize.STRETCH_ASINH,
        "sqrt": _normalize.STRETCH_SQRT,
    }[stretch]
    # random a, and the ends of the range where the table is used
    extremes = [1e-3, 1e12] if stretch == "log" else [1e-8, 1e8]
    for trial in range(14):
        if trial < 12:
            low, high = (-3, 4) if stretch == "log" else (-4, 2)
            a = float(10 ** rng.uniform(low, high))
        else:
            a = extremes[trial - 12]
        data = _images(
            ["noise", "skewed", "galaxy", "ties"][trial % 4],
            (2, 64, 70) if trial % 2 else (2, 33, 37),
            dtype,
            seed=trial,
            nan_fraction=0.01,
        )
        vmin = np.empty(2)
        vmax = np.empty(2)
        fast = np.empty(data.shape, np.uint8)
        slow = np.empty(data.shape, np.uint8)
        args = (True, _normalize.INTERVAL_PERCENTILE, 0.001, 0.999)
        _normalize.normalize_stack(data, fast, code, a, vmin, vmax, *args)
        _normalize.normalize_stack(
            data, slow, code, a, vmin, vmax, *args, allow_lut=False
        )
        assert_array_equal(fast, slow)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uint8_linear_fast_path_equals_division(dtype):
    """Test that the multiply-and-check linear path gives the division's codes.

    Besides random images, values are placed exactly on and one ulp around
    the half-integer code boundaries, where a multiplication by 1 / (vmax -
    vmin) could round the other way.
    """
    code = _normalize.STRETCH_LINEAR
    for trial in range(12):
        data = _images(
            ["noise", "skewed", "galaxy", "ties"][trial % 4],
            (3, 50, 61),
            dtype,
            seed=40 + trial,
            nan_fraction=0.01,
        )
        fast = np.empty(data.shape, np.uint8)
        slow = np.empty(data.shape, np.uint8)
        vmin, vmax = np.empty(3), np.empty(3)
        args = (True, _normalize.INTERVAL_PERCENTILE, 0.002, 0.998)
        _normalize.normalize_stack(data, fast, code, 1.0, vmin, vmax, *args)
        _normalize.normalize_stack(
            data, slow, code, 1.0, vmin, vmax, *args, allow_lut=False
        )
        assert_array_equal(fast, slow)
    # boundaries: (x - vmin) / (vmax - vmin) * 255 = k + 0.5, for odd spans
    # (float32 images are stretched in single precision when the limits allow
    # it, with an exact redo of every group of pixels near a boundary; far
    # from zero, as in the last two spans, that redo is frequent or the
    # double-precision path is taken)
    for lo, hi in [(0.0, 255.0), (-3.0, 7.0), (0.1, 0.7), (-0.123457, 1e-4),
                   (1000.3, 1010.7), (1e5, 1e5 + 3)]:
        k = np.arange(-1, 257) + 0.5
        x = lo + k * (hi - lo) / 255
        x = np.concatenate([x, np.nextafter(x, -np.inf), np.nextafter(x, np.inf)])
        data = np.resize(x.astype(dtype), (2, 40, 39))
        fast = np.empty(data.shape, np.uint8)
        slow = np.empty(data.shape, np.uint8)
        vmin, vmax = np.full(2, lo), np.full(2, hi)
        _normalize.normalize_stack(data, fast, code, 1.0, vmin, vmax, False)
        _normalize.normalize_stack(
            data, slow, code, 1.0, vmin, vmax, False, allow_lut=False
        )
        assert_array_equal(fast, slow)
        # and the codes are astropy's: rint(255 * clip((x - lo) / (hi - lo)))
        unit = np.clip((data.astype(np.float64) - lo) / (hi - lo), 0, 1)
        assert_array_equal(fast, np.rint(unit * 255).astype(np.uint8))


@pytest.mark.parametrize("method", ["linear", "asinh", "zscale"])
def test_nan_and_inf_become_zero(method):
    """Test that non-finite pixels become 0 and do not affect the limits."""
    data = _images("noise", (2, 30, 30), np.float32, seed=7)
    data[0, 0, :5] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
    for dtype in ("float32", "uint8", "uint16"):
        out = normalize(data, method, dtype=dtype)
        assert np.all(out[0, 0, :5] == 0)
        clean = data[0].copy()
        clean[0, :5] = np.nan
        ref = _astropy(clean, method)
        if dtype == "float32":
            assert_allclose(out[0, 1:], ref[1:], atol=1e-6)


def test_degenerate_images():
    """Test that all-NaN and constant images give zeros, never NaN."""
    data = np.zeros((3, 10, 10))
    data[0] = np.nan
    data[1] = 4.5
    data[2] = 4.5
    data[2, 5, 5] = 9.0  # limits equal (both 4.5): values clipped, not divided
    for method in NORMALIZATIONS[1:]:
        out = normalize(data, method, dtype="float32")
        assert np.all(np.isfinite(out))
        assert np.all(out[:2] == 0)
        assert out[2, 5, 5] == pytest.approx(_astropy(data[2], method)[5, 5])
        assert normalize(data, method, dtype="uint8")[2, 5, 5] == 255
    vmin, vmax = compute_limits(data, "asinh")
    assert np.isnan(vmin[0]) and np.isnan(vmax[0])
    assert vmin[1] == vmax[1] == 4.5


@pytest.mark.parametrize("method", ["linear", "sqrt", "log", "asinh"])
@pytest.mark.parametrize("span", [7e-310, 1e-305], ids=["subnormal", "tiny"])
@pytest.mark.parametrize("shape", [(4, 8), (100, 100)], ids=["small", "table"])
def test_uint8_of_limits_a_tiny_span_apart(method, span, shape):
    """Test uint8 output of images whose limits are less than ~1e-300 apart
    (the fast paths' 1 / (vmax - vmin) overflows there) against astropy."""
    image = np.linspace(0.0, span, shape[0] * shape[1]).reshape(shape)
    ref = np.round(255 * _astropy(image, method, percentile=100.0))
    out = normalize(image[None], method, percentile=100.0, dtype="uint8")[0]
    assert_array_equal(out, ref.astype(np.uint8))
    assert len(np.unique(out)) > 2


def test_none_passes_values_through():
    """Test that 'none' returns the values as float32, NaN included."""
    data = _images("skewed", (2, 3, 5, 6), np.float64, seed=8, nan_fraction=0.1)
    out = normalize(data, "none")
    assert out.dtype == np.float32
    assert_array_equal(out, data.astype(np.float32))


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_none_with_integer_dtype_asks_for_a_stretch(dtype):
    """Test that 'none' with an integer output type is a clear error."""
    with pytest.raises(ValueError, match="needs a stretch|choose one of"):
        normalize(np.zeros((1, 4, 4)), "none", dtype=dtype)


def test_four_dimensional_stacks_are_per_band():
    """Test that (N, C, H, W) stacks are normalised per cutout and per band."""
    data = _images("galaxy", (3, 2, 25, 25), np.float32, seed=9)
    data[:, 1] *= 100.0
    out = normalize(data, "asinh", dtype="float32")
    assert out.shape == data.shape
    for i in range(3):
        for c in range(2):
            finite = np.isfinite(data[i, c])
            assert_allclose(
                out[i, c][finite], _astropy(data[i, c], "asinh")[finite], atol=1e-6
            )
    vmin, vmax = compute_limits(data, "asinh")
    assert vmin.shape == vmax.shape == (3, 2)


@pytest.mark.parametrize(
    "crop", [0.5, 20, (10, 0.25), 1.0, (1, 0.5), (0.5, 1), np.array([10, 20])]
)
def test_crop_limits_come_from_the_centre(crop):
    """Test that crop computes the limits from the central region only, each
    value by its own kind (in ``(1, 0.5)`` the 1 is one pixel: it was read
    as the fraction 1.0 of a float pair)."""
    data = _images("galaxy", (2, 40, 60), np.float64, seed=10)
    data[:, 0, 0] = 1e6  # a bright neighbour at the edge
    out = normalize(data, "sqrt", crop=crop)
    heights = [
        crop if np.ndim(crop) == 0 else crop[0],
        crop if np.ndim(crop) == 0 else crop[1],
    ]
    sizes = []
    for value, full in zip(heights, (40, 60), strict=True):
        sizes.append(max(1, round(value * full)) if isinstance(value, float) else value)
    r0 = (40 - sizes[0]) // 2
    c0 = (60 - sizes[1]) // 2
    region = (slice(r0, r0 + sizes[0]), slice(c0, c0 + sizes[1]))
    for i in range(2):
        ref = _astropy(data[i], "sqrt", region=region)
        assert_allclose(out[i], ref, atol=1e-6)
    vmin, _ = compute_limits(data, "sqrt", crop=crop)
    assert vmin[0] == PercentileInterval(99.8).get_limits(data[0][region])[0]


def test_integer_and_big_endian_input():
    """Test that integer and big-endian stacks give the float64 results."""
    data = np.random.default_rng(11).integers(-500, 3000, (3, 17, 19))
    ref = normalize(data.astype(np.float64), "log", dtype="uint16")
    assert_array_equal(normalize(data.astype(np.int16), "log", dtype="uint16"), ref)
    assert_array_equal(normalize(data.astype(">i4"), "log", dtype="uint16"), ref)
    assert_array_equal(normalize(data.astype(">f8"), "log", dtype="uint16"), ref)
    non_contiguous = np.asfortranarray(data.astype(np.float64))
    assert_array_equal(normalize(non_contiguous, "log", dtype="uint16"), ref)


@pytest.mark.parametrize("n_threads", [2, 3, 8])
def test_thread_count_does_not_change_results(n_threads):
    """Test that the results are identical for any number of threads."""
    data = _images("galaxy", (13, 2, 30, 30), np.float32, seed=12, nan_fraction=0.01)
    for method in ("asinh", "zscale"):
        one = normalize(data, method, dtype="uint8")
        many = normalize(data, method, dtype="uint8", n_threads=n_threads)
        assert_array_equal(one, many)
        assert_array_equal(
            np.array(compute_limits(data, method)),
            np.array(compute_limits(data, method, n_threads=n_threads)),
        )


def test_out_argument_and_empty_stack():
    """Test the out argument and an empty stack."""
    data = _images("noise", (2, 8, 8), np.float32)
    out = np.empty((2, 8, 8), np.uint8)
    assert normalize(data, "sqrt", dtype="uint8", out=out) is out
    assert normalize(np.zeros((0, 8, 8)), "asinh").shape == (0, 8, 8)
    vmin, vmax = compute_limits(np.zeros((0, 3, 8, 8)))
    assert vmin.shape == vmax.shape == (0, 3)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_rows_write_into_a_larger_array(dtype, n_threads):
    """Test that ``rows`` writes each image straight into its row of ``out``,
    as assigning the normalised stack to those rows does, and nothing else."""
    data = _images("noise", (70, 9, 7), np.float64)  # more than one block of 64
    rows = np.random.default_rng(3).permutation(150)[:70]
    expected = np.full((150, 9, 7), 7, dtype=dtype)
    expected[rows] = normalize(data, "linear", dtype=dtype)
    out = np.full((150, 9, 7), 7, dtype=dtype)
    got = normalize(
        data, "linear", dtype=dtype, out=out, rows=rows, n_threads=n_threads
    )
    assert got is out
    assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="rows must be distinct"):
        normalize(data[:2], "linear", dtype=dtype, out=out, rows=[3, 3])
    with pytest.raises(ValueError, match="rows needs an"):
        normalize(data[:2], "linear", dtype=dtype, rows=[0, 1])
    with pytest.raises(ValueError, match=r"rows\[1\] = 150 is not a row of out"):
        normalize(data[:2], "linear", dtype=dtype, out=out, rows=[0, 150])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "gamma"}, "method must be one of"),
        ({"method": "asinh", "percentile": 101}, "percentile must be in"),
        ({"method": "asinh", "a": 0}, "a must be a finite number > 0"),
        ({"method": "log", "a": -1.0}, "a must be a finite number > 0"),
        ({"method": "zscale", "n_samples": 0}, "n_samples must be a positive integer"),
        ({"method": "zscale", "contrast": -1}, "contrast must be"),
        ({"method": "linear", "dtype": "int8"}, "dtype must be one of"),
        ({"method": "linear", "crop": 0}, "crop must be positive"),
        ({"method": "linear", "crop": 50}, "larger than the image"),
        ({"method": "linear", "crop": 2.5}, "whole number of pixels"),
        ({"method": "linear", "n_threads": 0}, "n_threads must be a positive integer"),
        ({"method": "linear", "out": np.empty((2, 8, 8), np.uint8)}, "out must be"),
    ],
)
def test_invalid_arguments(kwargs, match):
    """Test that invalid arguments raise ValueError naming the bad value."""
    with pytest.raises(ValueError, match=match):
        normalize(np.zeros((2, 8, 8)), **kwargs)


def test_invalid_stacks_and_limits_of_none():
    """Test that bad stack shapes and dtypes, and limits of 'none', are refused."""
    with pytest.raises(ValueError, match="must have shape"):
        normalize(np.zeros((8, 8)), "linear")
    with pytest.raises(TypeError, match="unsupported dtype"):
        normalize(np.zeros((1, 2, 2), dtype=complex), "linear")
    with pytest.raises(ValueError, match="has no limits"):
        compute_limits(np.zeros((1, 2, 2)), "none")


@pytest.mark.parametrize("method", ["linear", "asinh", "zscale"])
@pytest.mark.parametrize("n_threads", [1, 2, None])
def test_normalizer_reused_equals_astropy(method, n_threads):
    """Test that one Normalizer, called on stacks of two image sizes with a
    central crop (its crop region is kept per size) and with ``rows``, gives
    astropy.visualization's values image by image."""
    stretch = Normalizer(method, percentile=99.5, crop=0.5, n_threads=n_threads)
    for seed, (h, w) in enumerate([(30, 40), (12, 10), (30, 40)]):
        data = _images("galaxy", (5, h, w), np.float32, seed=seed, nan_fraction=0.02)
        region = (
            slice((h - round(h / 2)) // 2, (h - round(h / 2)) // 2 + round(h / 2)),
            slice((w - round(w / 2)) // 2, (w - round(w / 2)) // 2 + round(w / 2)),
        )
        out = np.full((9, h, w), -1.0, np.float32)
        rows = [8, 0, 3, 5, 1]
        assert stretch(data, out=out, rows=rows) is out
        for i, r in enumerate(rows):
            ref = _astropy(data[i], method, percentile=99.5, region=region)
            ref[~np.isfinite(data[i])] = 0.0
            assert_allclose(out[r], ref, atol=2e-6)
        assert (out[[2, 4, 6, 7]] == -1.0).all()  # the other rows untouched
        assert_array_equal(
            stretch(data), normalize(data, method, percentile=99.5, crop=0.5)
        )


def test_normalizer_checks_once_and_per_call():
    """Test that a Normalizer checks its parameters when made and each stack
    when called, with the messages of `normalize`."""
    with pytest.raises(ValueError, match="method must be one of"):
        Normalizer("gamma")
    with pytest.raises(ValueError, match="a must be a finite number > 0"):
        Normalizer("asinh", a=0)
    with pytest.raises(ValueError, match="n_threads must be a positive integer"):
        Normalizer("linear", n_threads=0)
    with pytest.raises(ValueError, match="method 'none' cannot produce uint8"):
        Normalizer("none", dtype="uint8")
    stretch = Normalizer("linear", dtype="uint8", crop=20)
    with pytest.raises(ValueError, match="larger than the image"):
        stretch(np.zeros((2, 8, 8)))
    out = np.zeros((4, 30, 30), np.uint8)
    with pytest.raises(ValueError, match="rows must be distinct"):
        stretch(np.zeros((2, 30, 30)), out=out, rows=[1, 1])
    with pytest.raises(ValueError, match="out must be a C-contiguous uint8"):
        stretch(np.zeros((2, 30, 30)), out=np.zeros((2, 30, 30), np.float32))
