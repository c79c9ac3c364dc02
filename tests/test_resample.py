# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of cutana.resample.extract_resampled against scipy and brute force.

Tolerances: bilinear output is compared with
``scipy.ndimage.map_coordinates(order=1, mode='nearest')`` on the same
sample grid to 1e-12 relative (float64 output; both work in float64 but sum
the taps in a different order); nearest output must equal the hand-computed
pixel exactly; area output must match a brute-force overlap computation to
1e-12 relative and preserve each window's total to 1e-5 relative (float32
output).
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage

from cutana.resample import RESAMPLE_METHODS, Resampler, extract_resampled


def _window(data, start, shape, fill):
    """The window of ``data`` starting at ``start``, filled outside (float64)."""
    (y0, x0), (ny, nx) = start, shape
    win = np.full((ny, nx), fill, dtype=np.float64)
    ys = np.arange(y0, y0 + ny)
    xs = np.arange(x0, x0 + nx)
    iy = (ys >= 0) & (ys < data.shape[0])
    ix = (xs >= 0) & (xs < data.shape[1])
    win[np.ix_(iy, ix)] = data[np.ix_(ys[iy], xs[ix])]
    return win


def _grid(n, m):
    """Input coordinates sampled by the m output pixels (aligned centres)."""
    return (np.arange(m) + 0.5) * n / m - 0.5


def _overlap_matrix(n, m):
    """Brute-force (m, n) overlaps of output [j n/m, (j+1) n/m) with input [i, i+1)."""
    lo = np.arange(m)[:, None] * n / m
    hi = np.arange(1, m + 1)[:, None] * n / m
    i = np.arange(n)[None, :]
    return np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)


def _cases(seed, count, data_shape=(40, 50)):
    """Random (start, shape, out_shape) cases, some partly or wholly outside."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = tuple(int(v) for v in rng.integers(1, 25, 2))
        out_shape = tuple(int(v) for v in rng.integers(1, 40, 2))
        start = (
            int(rng.integers(-15, data_shape[0] + 5)),
            int(rng.integers(-15, data_shape[1] + 5)),
        )
        yield start, shape, out_shape


@pytest.mark.parametrize("seed", range(4))
def test_bilinear_matches_map_coordinates(seed):
    """Test that bilinear equals map_coordinates(order=1, mode='nearest')."""
    data = np.random.default_rng(seed).normal(size=(40, 50))
    for start, shape, out_shape in _cases(seed, 60):
        out, _ = extract_resampled(
            data, [start], shape, out_shape, "bilinear", -2.0, dtype=np.float64
        )
        win = _window(data, start, shape, -2.0)
        gy, gx = np.meshgrid(
            _grid(shape[0], out_shape[0]), _grid(shape[1], out_shape[1]), indexing="ij"
        )
        ref = ndimage.map_coordinates(win, [gy, gx], order=1, mode="nearest")
        assert_allclose(out[0], ref, rtol=1e-12, atol=1e-12)


def test_bilinear_matches_zoom_grid_mode():
    """Test that the sample grid is scipy.ndimage.zoom's with grid_mode=True."""
    data = np.random.default_rng(5).normal(size=(64, 64)).astype(">f4")
    out, _ = extract_resampled(data, [[0, 0]], (64, 64), (150, 150), "bilinear")
    ref = ndimage.zoom(
        data.astype(np.float64), 150 / 64, order=1, mode="nearest", grid_mode=True
    )
    assert_allclose(out[0], ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_nearest_picks_rounded_coordinate(seed):
    """Test that nearest picks input pixel floor(c + 0.5), clipped to the window."""
    data = np.random.default_rng(seed).normal(size=(40, 50))
    for start, shape, out_shape in _cases(seed + 10, 60):
        out, _ = extract_resampled(
            data, [start], shape, out_shape, "nearest", 7.0, dtype=np.float64
        )
        win = _window(data, start, shape, 7.0)
        iy = np.clip(
            np.floor(_grid(shape[0], out_shape[0]) + 0.5).astype(int), 0, shape[0] - 1
        )
        ix = np.clip(
            np.floor(_grid(shape[1], out_shape[1]) + 0.5).astype(int), 0, shape[1] - 1
        )
        assert_array_equal(out[0], win[np.ix_(iy, ix)])


def test_nearest_by_hand():
    """Test nearest on a 4 x 4 window resampled to 2 x 3 and 8 x 8 by hand."""
    data = np.arange(16.0).reshape(4, 4)
    out, _ = extract_resampled(data, [[0, 0]], (4, 4), (2, 3), "nearest")
    # rows: c = 0.5, 2.5 -> 1, 3; columns: c = 1/6, 5/6 + 2/3, ... -> 0, 2, 3
    assert_array_equal(out[0], [[4, 6, 7], [12, 14, 15]])
    out, _ = extract_resampled(data, [[0, 0]], (4, 4), (8, 8), "nearest")
    assert_array_equal(out[0], np.repeat(np.repeat(data, 2, axis=0), 2, axis=1))


@pytest.mark.parametrize("seed", range(3))
def test_area_matches_brute_force_and_conserves_flux(seed):
    """Test that area is the overlap-weighted sum and preserves the total."""
    data = np.random.default_rng(seed).lognormal(size=(40, 50))
    for start, shape, out_shape in _cases(seed + 20, 60):
        out64, _ = extract_resampled(
            data, [start], shape, out_shape, "area", 0.5, dtype=np.float64
        )
        win = _window(data, start, shape, 0.5)
        ref = (
            _overlap_matrix(shape[0], out_shape[0])
            @ win
            @ _overlap_matrix(shape[1], out_shape[1]).T
        )
        assert_allclose(out64[0], ref, rtol=1e-12, atol=1e-12)
        out32, _ = extract_resampled(data, [start], shape, out_shape, "area", 0.5)
        assert out32.dtype == np.float32
        assert abs(out32[0].sum(dtype=np.float64) / win.sum() - 1) < 1e-5


def test_area_of_a_constant_is_the_pixel_area():
    """Test that area resampling of a constant gives value times covered area."""
    data = np.full((30, 30), 2.0)
    out, _ = extract_resampled(
        data, [[0, 0]], (30, 30), (7, 4), "area", dtype=np.float64
    )
    assert_allclose(out[0], 2.0 * (30 / 7) * (30 / 4), rtol=1e-13)


@pytest.mark.parametrize(
    "dtype",
    [
        "<f4",
        ">f4",
        "<f8",
        ">f8",
        "i1",
        "<i2",
        ">i2",
        ">i4",
        "<i8",
        ">i8",
        "u1",
        ">u2",
        "<u4",
        ">u4",
        "u8",
        "bool",
    ],
)
@pytest.mark.parametrize("method", RESAMPLE_METHODS)
def test_dtypes_and_byte_orders(dtype, method):
    """Test that every numeric dtype and byte order gives the float64 result."""
    rng = np.random.default_rng(1)
    if dtype == "bool":
        data = rng.random((30, 31)) > 0.5
    else:
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
        lo, hi = (
            (-100, 100) if info is None else (max(info.min, -100), min(info.max, 100))
        )
        data = rng.integers(lo, hi, (30, 31)).astype(dtype)
    starts = [[-3, -4], [5, 6], [25, 28], [100, 100]]
    out, overlap = extract_resampled(
        data, starts, (9, 11), (13, 5), method, 3.0, dtype=np.float64
    )
    ref, ref_overlap = extract_resampled(
        data.astype(np.float64), starts, (9, 11), (13, 5), method, 3.0, dtype=np.float64
    )
    assert_array_equal(out, ref)
    assert_array_equal(overlap, ref_overlap)
    assert_array_equal(overlap, [1, 0, 1, 2])


def test_partial_windows_fill_and_scale():
    """Test the fill outside the image, per-source scale factors and overlap codes."""
    data = np.arange(100.0).reshape(10, 10)
    starts = [[-2, -2], [3, 3], [8, 8], [20, 0]]
    out, overlap = extract_resampled(
        data,
        starts,
        (4, 4),
        (4, 4),
        "nearest",
        -1.0,
        scale=[1.0, 2.0, 10.0, 5.0],
        dtype=np.float64,
    )
    assert_array_equal(overlap, [1, 0, 1, 2])
    assert_array_equal(out[0][:2], -1.0)  # fill is not scaled
    assert_array_equal(out[0][2:, 2:], data[:2, :2])
    assert_array_equal(out[1], 2.0 * data[3:7, 3:7])
    assert_array_equal(out[2][:2, :2], 10.0 * data[8:, 8:])
    assert_array_equal(out[2][2:], -1.0)
    assert_array_equal(out[3], -1.0)
    same, _ = extract_resampled(
        data, starts, (4, 4), (4, 4), "nearest", -1.0, scale=3.0, dtype=np.float64
    )
    assert_array_equal(same[1], 3.0 * data[3:7, 3:7])


def test_nan_fill_spreads_like_scipy():
    """Test that a NaN fill spreads to the bilinear outputs that use it, as in scipy."""
    data = np.random.default_rng(2).normal(size=(20, 20))
    start, shape, out_shape = (-3, 14), (12, 9), (25, 17)
    out, _ = extract_resampled(
        data, [start], shape, out_shape, "bilinear", np.nan, dtype=np.float64
    )
    win = _window(data, start, shape, np.nan)
    gy, gx = np.meshgrid(_grid(12, 25), _grid(9, 17), indexing="ij")
    ref = ndimage.map_coordinates(win, [gy, gx], order=1, mode="nearest")
    assert_allclose(out[0], ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isnan(out[0]).any() and np.isfinite(out[0]).any()


@pytest.mark.parametrize("vector", [True, False], ids=["avx2", "portable"])
@pytest.mark.parametrize("line", [1, -2], ids=["second", "last-but-one"])
def test_nan_beside_the_edge_stays_there_when_upsampling(vector, line):
    """Test upsampling a window whose second (or last but one) row and
    column are NaN: outputs outside the edge pixels' centres take the edge
    pixel alone, as in scipy, so the edge rows and columns stay finite."""
    data = np.arange(36.0).reshape(6, 6)
    data[line, :] = np.nan
    data[:, line] = np.nan
    gy, gx = np.meshgrid(_grid(6, 8), _grid(6, 8), indexing="ij")
    ref = ndimage.map_coordinates(data, [gy, gx], order=1, mode="nearest")
    from cutana import _extract

    saved = _extract._set_vector_swap(vector)
    try:
        out, _ = extract_resampled(
            data, [(0, 0)], (6, 6), (8, 8), "bilinear", np.nan, dtype=np.float64
        )
    finally:
        _extract._set_vector_swap(saved)
    assert_allclose(out[0], ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    edge = 0 if line == 1 else -1
    assert np.isfinite(out[0][edge, edge])


def test_varying_window_shapes_and_memory_layouts():
    """Test per-source window shapes and a non-contiguous, memory-mapped-like image."""
    data = np.random.default_rng(3).normal(size=(60, 80))
    strided = data[::2, ::2]  # items of a row are not adjacent: copied
    rows = data[::2]  # strided rows: not copied
    flipped = data[::-1]  # negative row stride: not copied
    shapes = [[5, 7], [12, 3], [1, 1], [20, 20]]
    starts = [[0, 0], [10, 10], [29, 39], [-5, 30]]
    for image in (strided, rows, flipped):
        out, _ = extract_resampled(
            image, starts, shapes, (6, 6), "area", dtype=np.float64
        )
        for k in range(4):
            one, _ = extract_resampled(
                np.ascontiguousarray(image),
                [starts[k]],
                shapes[k],
                (6, 6),
                "area",
                dtype=np.float64,
            )
            assert_array_equal(out[k], one[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bilinear_vector_passes_equal_portable_loops(dtype):
    """Test that the AVX2 bilinear passes give the portable loops' very bits.

    Up- and downsampling, output widths that are and are not multiples of 4,
    windows partly outside the image (NaN fill), a big-endian image.
    """
    from cutana import _extract

    rng = np.random.default_rng(11)
    data = rng.normal(size=(300, 280)).astype(">f4")
    n = 60
    sizes = rng.integers(1, 130, size=(n, 2))
    starts = np.c_[rng.integers(-60, 290, n), rng.integers(-60, 270, n)]
    for out_shape in [(150, 150), (37, 61), (3, 5), (1, 1)]:
        results = []
        for vector in (True, False):
            previous = _extract._set_vector_swap(vector)
            try:
                out, overlap = extract_resampled(
                    data, starts, sizes, out_shape, "bilinear", np.nan,
                    scale=np.linspace(0.5, 2.0, n), dtype=dtype,
                )
            finally:
                _extract._set_vector_swap(previous)
            results.append((out, overlap))
        assert_array_equal(results[0][1], results[1][1])
        # bit for bit, NaN included
        assert results[0][0].tobytes() == results[1][0].tobytes()
        assert np.isfinite(results[0][0]).any()


@pytest.mark.parametrize("n_threads", [2, 3, 7])
@pytest.mark.parametrize("method", RESAMPLE_METHODS)
def test_thread_count_does_not_change_results(n_threads, method):
    """Test that the output is identical for any number of threads."""
    rng = np.random.default_rng(4)
    data = rng.normal(size=(100, 120)).astype(">f4")
    starts = rng.integers(-10, 110, (23, 2))
    one, ov1 = extract_resampled(data, starts, (16, 16), (24, 24), method)
    many, ov2 = extract_resampled(
        data, starts, (16, 16), (24, 24), method, n_threads=n_threads
    )
    assert_array_equal(one, many)
    assert_array_equal(ov1, ov2)


def test_out_argument_and_no_sources():
    """Test the out argument and an empty list of sources."""
    data = np.ones((5, 5), np.float32)
    out = np.empty((1, 3, 3), np.float32)
    result, overlap = extract_resampled(data, [[0, 0]], (5, 5), (3, 3), out=out)
    assert result is out
    assert_allclose(out, 1.0)
    empty, overlap = extract_resampled(data, np.empty((0, 2)), (5, 5), (3, 3))
    assert empty.shape == (0, 3, 3) and overlap.shape == (0,)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([[0, 0]], (4, 4), (3, 3), "cubic"), {}, ValueError, "method must be one of"),
        (([[0, 0]], (4, 4), (0, 3)), {}, ValueError, "out_shape must be"),
        (([[0, 0]], (4, 4), 3), {}, ValueError, "out_shape must be"),
        (([[0, 0]], (0, 4), (3, 3)), {}, ValueError, "at least 1 pixel"),
        (([[0, 0]], (4, 4), (3, 3)), {"n_threads": 0}, ValueError, "n_threads"),
        (
            ([[0, 0]], (4, 4), (3, 3)),
            {"dtype": np.uint8},
            ValueError,
            "float32 or float64",
        ),
        (
            ([[0, 0]], (4, 4), (3, 3)),
            {"scale": [1.0, 2.0]},
            ValueError,
            "scale must be",
        ),
        (([[0.5, 0]], (4, 4), (3, 3)), {}, ValueError, "whole numbers"),
        (([0, 0, 0],), {}, TypeError, "missing"),
        (
            ([[0, 0, 0]], (4, 4), (3, 3)),
            {},
            ValueError,
            r"starts must have shape \(N, 2\)",
        ),
        (
            ([[0, 0]], (4, 4), (3, 3)),
            {"out": np.empty((1, 3, 3))},
            ValueError,
            "out must",
        ),
    ],
)
def test_invalid_arguments(args, kwargs, error, match):
    """Test that invalid arguments raise errors naming the bad value."""
    with pytest.raises(error, match=match):
        extract_resampled(np.zeros((10, 10)), *args, **kwargs)


def test_unsupported_data():
    """Test that float16, complex and non-2-D data are refused clearly."""
    with pytest.raises(TypeError, match="unsupported dtype"):
        extract_resampled(np.zeros((4, 4), np.float16), [[0, 0]], (2, 2), (2, 2))
    with pytest.raises(TypeError, match="unsupported dtype"):
        extract_resampled(np.zeros((4, 4), complex), [[0, 0]], (2, 2), (2, 2))
    with pytest.raises(ValueError, match="2-D"):
        extract_resampled(np.zeros((2, 4, 4)), [[0, 0]], (2, 2), (2, 2))


@pytest.mark.parametrize("method", RESAMPLE_METHODS)
@pytest.mark.parametrize("vector", [True, False])
def test_big_endian_float32_windows_equal_native_float64(method, vector):
    """Test that big-endian and native float32 windows give the very bits of
    the same values read as native float64 (byte swap and conversion change
    no value; windows inside the image take the one-pass float32 read).

    Windows inside, across the edge and outside the image; NaN and
    infinities among the pixels; with and without a flux factor.
    """
    from cutana import _extract

    rng = np.random.default_rng(21)
    native = rng.normal(size=(200, 190)).astype(np.float32)
    native[rng.integers(0, 200, 40), rng.integers(0, 190, 40)] = np.nan
    native[5, 7], native[9, 11] = np.inf, -np.inf
    big = native.astype(">f4")
    n = 80
    sizes = rng.integers(1, 90, size=(n, 2))
    starts = np.c_[rng.integers(-40, 200, n), rng.integers(-40, 190, n)]
    inside = ((starts >= 0) & (starts + sizes <= native.shape)).all(axis=1)
    assert inside.sum() > 20 and (~inside).sum() > 20
    previous = _extract._set_vector_swap(vector)
    try:
        for scale in (None, np.linspace(0.25, 3.0, n)):
            ref, ov_ref = extract_resampled(native.astype(np.float64), starts, sizes,
                                            (33, 47), method, np.nan, scale=scale,
                                            dtype=np.float64)
            for image in (big, native):
                got, ov_got = extract_resampled(image, starts, sizes, (33, 47), method,
                                                np.nan, scale=scale, dtype=np.float64)
                assert_array_equal(ov_got, ov_ref)
                assert got.tobytes() == ref.tobytes()  # bit for bit, NaN included
    finally:
        _extract._set_vector_swap(previous)


@pytest.mark.parametrize("method", RESAMPLE_METHODS)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_resampler_batches_equal_scipy(method, n_threads):
    """Test that a prepared Resampler, called batch by batch on a big-endian
    image with per-window scale factors, gives scipy's values window by window,
    and the same bytes as one `extract_resampled` call."""
    rng = np.random.default_rng(7)
    data = rng.normal(size=(40, 50)).astype(">f4")
    cases = list(_cases(11, 30))
    starts = np.array([c[0] for c in cases], dtype=np.int64)
    shapes = np.array([c[1] for c in cases], dtype=np.int64)
    scale = rng.uniform(0.5, 2.0, len(cases))
    resample = Resampler(data, (9, 13), method, -3.0, n_threads=n_threads)
    out = np.empty((len(cases), 9, 13), np.float32)
    overlaps = []
    for lo in range(0, len(cases), 7):  # batches of 7, the last of 2
        block, overlap = resample(
            starts[lo : lo + 7], shapes[lo : lo + 7], scale=scale[lo : lo + 7]
        )
        out[lo : lo + 7] = block
        overlaps.append(overlap)
    whole, overlap = extract_resampled(
        data, starts, shapes, (9, 13), method, -3.0, scale=scale, n_threads=1
    )
    assert_array_equal(out, whole)
    assert_array_equal(np.concatenate(overlaps), overlap)
    native = data.astype(np.float64)
    for i, (start, shape, _) in enumerate(cases):
        inside = np.isfinite(_window(native, start, shape, np.nan))
        win = _window(native * scale[i], start, shape, -3.0)  # fill not scaled
        if method == "bilinear":
            gy, gx = np.meshgrid(_grid(shape[0], 9), _grid(shape[1], 13), indexing="ij")
            ref = ndimage.map_coordinates(win, [gy, gx], order=1, mode="nearest")
        elif method == "nearest":
            iy = np.clip(np.floor(_grid(shape[0], 9) + 0.5), 0, shape[0] - 1)
            ix = np.clip(np.floor(_grid(shape[1], 13) + 0.5), 0, shape[1] - 1)
            ref = win[np.ix_(iy.astype(int), ix.astype(int))]
        else:
            ref = _overlap_matrix(shape[0], 9) @ win @ _overlap_matrix(shape[1], 13).T
        assert_allclose(out[i], ref.astype(np.float32), rtol=1e-6, atol=1e-6)
        # overlap: 0 inside, 1 partly, 2 not at all
        assert overlap[i] == (0 if inside.all() else 2 if not inside.any() else 1)


def test_resampler_checks_each_call():
    """Test that a Resampler checks its arguments once and each call's windows."""
    data = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="method must be one of"):
        Resampler(data, (4, 4), "cubic")
    with pytest.raises(ValueError, match="out_shape must be a pair"):
        Resampler(data, (0, 4))
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        Resampler(data, (4, 4), dtype=np.int16)
    with pytest.raises(ValueError, match="n_threads must be a positive integer"):
        Resampler(data, (4, 4), n_threads=0)
    with pytest.raises(TypeError, match="unsupported dtype"):
        Resampler(data.astype(np.complex64), (4, 4))
    resample = Resampler(data, (4, 4))
    with pytest.raises(ValueError, match="starts must have shape"):
        resample([1, 2, 3], (2, 2))
    with pytest.raises(ValueError, match="whole numbers of pixels"):
        resample([[0.5, 1.0]], (2, 2))
    with pytest.raises(ValueError, match="out must be a C-contiguous float32"):
        resample([[0, 0]], (2, 2), out=np.empty((1, 4, 4), np.float64))
    with pytest.raises(ValueError, match="scale must be a number or have shape"):
        resample([[0, 0]], (2, 2), scale=[1.0, 2.0])
    out, overlap = resample(np.empty((0, 2)), (2, 2))
    assert out.shape == (0, 4, 4) and overlap.shape == (0,)
