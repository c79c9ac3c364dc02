# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Tests of the batch window kernel (`cutana._extract`) through `extract_stack`.

The reference is an independent NumPy implementation: every output pixel is
looked up with fancy indexing, or set to the fill value where the window
leaves the image.
"""

import mmap
import tracemalloc

import numpy as np
import pytest
from astropy.io import fits

from cutana import _extract
from cutana.cutout import extract_stack

ALL_DTYPES = ["u1", "i2", "i4", "i8", "f4", "f8", "i1", "u2", "u4"]
FITS_DTYPES = ["u1", "i2", "i4", "i8", "f4", "f8"]


def _image(dtype, shape=(23, 31), seed=0):
    """A seeded image whose values fit every integer dtype, in ``dtype``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 127, size=shape).astype(dtype)


def _starts(shape, window, n=60, seed=1):
    """Window corners: inside, across every edge and corner, and fully outside."""
    rng = np.random.default_rng(seed)
    ny, nx = window
    y = rng.integers(-ny - 2, shape[0] + 2, n)
    x = rng.integers(-nx - 2, shape[1] + 2, n)
    fixed = np.array(
        [
            [0, 0],
            [shape[0] - ny, shape[1] - nx],
            [-ny, 0],  # just above the image: no overlap
            [0, shape[1]],  # just right of it: no overlap
            [-1, -1],
            [shape[0] - 1, shape[1] - 1],
            [-1000, 5],
            [5, 10**6],
        ]
    )
    return np.concatenate([fixed, np.column_stack([y, x])]).astype(np.int64)


def _is_memory_mapped(arr):
    """Whether ``arr`` is (a view of) a memory map."""
    base = arr
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


def reference(data, starts, window, fill_value, dtype=None):
    """Independent result: fancy indexing with a validity mask."""
    data = np.asarray(data)
    ny, nx = window
    out_dtype = data.dtype.newbyteorder("=") if dtype is None else np.dtype(dtype)
    starts = np.asarray(starts).reshape(-1, 2)
    yy = starts[:, :1, None] + np.arange(ny)[None, :, None]
    xx = starts[:, 1:, None].transpose(0, 2, 1) + np.arange(nx)[None, None, :]
    yy, xx = np.broadcast_arrays(yy, xx)
    valid = (yy >= 0) & (yy < data.shape[0]) & (xx >= 0) & (xx < data.shape[1])
    out = np.full(yy.shape, fill_value, dtype=out_dtype)
    out[valid] = data[yy[valid], xx[valid]]
    n_in = valid.reshape(len(starts), -1).sum(axis=1)
    overlap = np.where(n_in == ny * nx, 0, np.where(n_in > 0, 1, 2)).astype(np.int8)
    return out, overlap


def check(data, starts, window, fill_value, **kwargs):
    """Compare extract_stack with the reference and return its outputs."""
    stack, overlap = extract_stack(data, starts, window, fill_value, **kwargs)
    ref, ref_overlap = reference(data, starts, window, fill_value, kwargs.get("dtype"))
    assert stack.dtype == ref.dtype
    assert stack.dtype.isnative
    assert stack.flags.c_contiguous
    np.testing.assert_array_equal(stack, ref, strict=True)
    np.testing.assert_array_equal(overlap, ref_overlap)
    assert not np.shares_memory(stack, np.asarray(data))
    return stack, overlap


# --------------------------------------------------------------------------
# dtypes and byte orders
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("window", [(5, 7), (1, 1), (8, 3), (40, 50)])
def test_dtypes_and_byte_orders(dtype, order, window):
    """Test that every dtype and byte order is copied and swapped exactly."""
    data = _image(np.dtype(order + dtype))
    fill = 0 if dtype[0] == "u" else -3
    check(data, _starts(data.shape, window), window, fill)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("dtype", ["f4", "f8"])
def test_nan_fill_and_special_values(order, dtype):
    """Test that NaN fill, NaN and inf pixels and signed zeros survive byte swapping."""
    data = _image(np.dtype(order + dtype))
    data[3, 4] = np.nan
    data[5, 6] = -np.inf
    data[7, 8] = -0.0
    stack, _ = check(data, _starts(data.shape, (6, 6)), (6, 6), np.nan)
    assert np.signbit(stack[np.nonzero(stack == 0)]).any() or (data != 0).all()


def test_byte_swap_bit_patterns():
    """Test that swapped values match astropy's own big-endian decoding bit for bit."""
    rng = np.random.default_rng(4)
    for dtype in ["i2", "u2", "i4", "u4", "i8", "f4", "f8"]:
        native = rng.integers(
            0, 255, size=(9, 11 * np.dtype(dtype).itemsize), dtype=np.uint8
        )
        data = native.view(">" + dtype)
        stack, _ = extract_stack(data, [[0, 0], [2, 3]], (5, 6), 0)
        np.testing.assert_array_equal(
            stack[0].view(np.uint8), data[:5, :6].astype(dtype).view(np.uint8)
        )
        np.testing.assert_array_equal(
            stack[1].view(np.uint8), data[2:7, 3:9].astype(dtype).view(np.uint8)
        )


# --------------------------------------------------------------------------
# memory maps, strided views, no whole-array copies
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FITS_DTYPES)
def test_fits_memmap(tmp_path, dtype):
    """Test that a memory-mapped FITS image (big-endian) is read in place."""
    path = tmp_path / "tile.fits"
    fits.PrimaryHDU(_image(dtype, shape=(40, 33))).writeto(path)
    with fits.open(path, memmap=True) as hdul:
        data = hdul[0].data
        assert not data.dtype.isnative or data.dtype.itemsize == 1
        assert _is_memory_mapped(data)
        check(data, _starts(data.shape, (7, 9)), (7, 9), 0)
        del data


@pytest.mark.parametrize("order", ["<", ">"])
def test_numpy_memmap(tmp_path, order):
    """Test that a read-only numpy memmap is read in place."""
    path = tmp_path / "tile.raw"
    src = _image(order + "f4", shape=(30, 41))
    src.tofile(path)
    data = np.memmap(path, dtype=order + "f4", mode="r", shape=(30, 41))
    assert not data.flags.writeable
    assert _is_memory_mapped(data)
    check(data, _starts(data.shape, (6, 5)), (6, 5), np.nan)
    del data


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::2],
        lambda a: a[3:-2, 4:-1],
        lambda a: a[::-1],
        lambda a: a[:, ::3],
        lambda a: a[1::2, 2::5],
        lambda a: a[:, ::-1],
        lambda a: a[:, 7:8],
        lambda a: a.T,
        lambda a: np.broadcast_to(a[:1], (20, a.shape[1])),
        lambda a: np.broadcast_to(a[:, :1], (a.shape[0], 17)),
    ],
    ids=[
        "rows2",
        "inner",
        "rows_rev",
        "cols3",
        "both",
        "cols_rev",
        "one_col",
        "T",
        "bcast_rows",
        "bcast_cols",
    ],
)
@pytest.mark.parametrize("dtype", ["<i2", ">f4", ">f8", "u1"])
def test_strided_views(view, dtype):
    """Test that non-contiguous views give the same windows as a contiguous copy."""
    data = view(_image(dtype, shape=(40, 50)))
    check(data, _starts(data.shape, (4, 6)), (4, 6), 0)


@pytest.mark.parametrize(
    "view",
    [lambda a: a, lambda a: a[::2], lambda a: a[:, ::2], lambda a: a[1:, 3:]],
    ids=["whole", "rows2", "cols2", "inner"],
)
@pytest.mark.parametrize("dtype", [">f4", "<f4", ">i2", ">f8"])
def test_no_whole_array_copy(tmp_path, view, dtype):
    """Test that peak allocation is about the output size, not the tile size."""
    shape = (1024, 1024)
    path = tmp_path / "big.raw"
    _image(dtype, shape=shape).tofile(path)
    tile = np.memmap(path, dtype=dtype, mode="r", shape=shape)
    data = view(tile)
    starts = _starts(data.shape, (16, 16), n=40)
    out_bytes = len(starts) * 16 * 16 * np.dtype(dtype).itemsize
    tile_bytes = data.size * np.dtype(dtype).itemsize
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        stack, _ = extract_stack(data, starts, (16, 16), 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < out_bytes + 64 * 1024
    assert peak < tile_bytes / 10
    ref, _ = reference(data, starts, (16, 16), 0)
    np.testing.assert_array_equal(stack, ref)
    del tile, data


def test_no_astype_on_input():
    """Test that extract_stack never converts or copies the input object as a whole."""

    class Guarded(np.ndarray):
        def astype(self, *args, **kwargs):
            msg = "astype called on the whole input"
            raise AssertionError(msg)

        def copy(self, *args, **kwargs):
            msg = "copy called on the whole input"
            raise AssertionError(msg)

        def byteswap(self, *args, **kwargs):
            msg = "byteswap called on the whole input"
            raise AssertionError(msg)

        def newbyteorder(self, *args, **kwargs):
            msg = "newbyteorder called on the whole input"
            raise AssertionError(msg)

    data = _image(">f4").view(Guarded)
    check(data, _starts(data.shape, (5, 5)), (5, 5), np.nan)
    check(data, _starts(data.shape, (5, 5)), (5, 5), np.nan, dtype=np.float64)


# --------------------------------------------------------------------------
# geometry edge cases
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [">f4", "<i4", "u1"])
def test_windows_fully_outside(dtype):
    """Test that windows missing the image hold only the fill value."""
    data = _image(dtype)
    starts = np.array(
        [[-10, 0], [0, -10], [23, 0], [0, 31], [-5, -5], [10**9, -(10**9)]]
    )
    stack, overlap = check(data, starts, (5, 5), 7)
    assert np.all(stack == 7)
    assert np.all(overlap == _extract.OVERLAP_NONE)


def test_overlap_codes():
    """Test the three overlap codes on hand-computed windows."""
    data = _image("f8", shape=(10, 10))
    starts = [[0, 0], [5, 5], [6, 6], [-1, 3], [3, 8], [10, 0], [-4, -4], [-3, -3]]
    _, overlap = check(data, starts, (4, 4), np.nan)
    assert list(overlap) == [0, 0, 0, 1, 1, 2, 2, 1]


def test_no_windows():
    """Test that N = 0 gives an empty (0, ny, nx) stack."""
    data = _image(">f4")
    stack, overlap = extract_stack(
        data, np.zeros((0, 2), dtype=np.int64), (5, 6), np.nan
    )
    assert stack.shape == (0, 5, 6)
    assert stack.dtype == np.dtype("f4")
    assert overlap.shape == (0,)
    assert overlap.dtype == np.int8


@pytest.mark.parametrize("window", [(0, 0), (0, 5), (5, 0)])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_zero_size_windows(window, n_threads):
    """Test that zero-size windows give empty cutouts of the right shape."""
    data = _image(">i2")
    starts = _starts(data.shape, (1, 1), n=10)
    stack, overlap = extract_stack(data, starts, window, 0, n_threads=n_threads)
    assert stack.shape == (len(starts), *window)
    assert stack.dtype == np.dtype("i2")
    assert overlap.shape == (len(starts),)
    inside = np.all((starts >= 0) & (starts + window <= data.shape), axis=1)
    assert np.all(overlap[inside] == 0)


def test_empty_image():
    """Test that an empty image gives windows full of the fill value."""
    data = np.zeros((0, 0), dtype=">f4")
    stack, overlap = extract_stack(data, [[0, 0], [-1, -1]], (2, 3), np.nan)
    assert stack.shape == (2, 2, 3)
    assert np.isnan(stack).all()
    assert np.all(overlap == 2)


# --------------------------------------------------------------------------
# output dtype, out=, fill values
# --------------------------------------------------------------------------


@pytest.mark.parametrize("src", [">i2", "<u1", ">f8", ">i4"])
@pytest.mark.parametrize("dst", ["f4", "f8", ">f4"])
def test_output_dtype_conversion(src, dst):
    """Test that dtype= converts while filling with the value in the output dtype."""
    data = _image(src)
    starts = _starts(data.shape, (6, 4))
    stack, overlap = extract_stack(data, starts, (6, 4), np.nan, dtype=dst)
    ref, ref_overlap = reference(data, starts, (6, 4), np.nan, dtype=dst)
    assert stack.dtype == np.dtype(dst)
    np.testing.assert_array_equal(stack, ref)
    np.testing.assert_array_equal(overlap, ref_overlap)


def test_out_argument():
    """Test that a preallocated out is filled in place and a bad one refused."""
    data = _image(">f4")
    starts = _starts(data.shape, (3, 4))
    out = np.empty((len(starts), 3, 4), dtype=np.float32)
    stack, _ = extract_stack(data, starts, (3, 4), -1.0, out=out)
    assert stack is out
    np.testing.assert_array_equal(out, reference(data, starts, (3, 4), -1.0)[0])
    with pytest.raises(ValueError, match="out must be"):
        extract_stack(data, starts, (3, 4), -1.0, out=np.empty((1, 3, 4), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        bad = np.empty((len(starts), 3, 8), np.float32)[:, :, ::2]
        extract_stack(data, starts, (3, 4), -1.0, out=bad)


@pytest.mark.parametrize(
    ("dtype", "fill"), [("i2", np.nan), ("u1", "abc"), ("i8", np.nan)]
)
def test_unrepresentable_fill(dtype, fill):
    """Test that a fill value the output dtype cannot hold raises ValueError."""
    data = _image(">" + dtype if dtype != "u1" else dtype)
    with pytest.raises(ValueError):
        extract_stack(data, [[-1, -1]], (3, 3), fill)


@pytest.mark.parametrize(
    ("dtype", "fill"), [("u1", 300), ("i2", -40000), ("u1", np.inf)]
)
def test_overflowing_fill(dtype, fill):
    """Test that an out-of-range integer fill raises OverflowError as numpy does."""
    with pytest.raises(OverflowError):
        extract_stack(_image(dtype), [[-1, -1]], (3, 3), fill)


def test_unsupported_input():
    """Test that 1-D data and complex data are refused with clear errors."""
    with pytest.raises(ValueError, match="2-D"):
        extract_stack(np.zeros(10), [[0, 0]], (2, 2))
    with pytest.raises(TypeError, match="dtype"):
        extract_stack(np.zeros((4, 4), complex), [[0, 0]], (2, 2))


# --------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n_threads", [2, 3, 7])
@pytest.mark.parametrize("dtype", [">f4", "<i8", "f8"])
def test_thread_parity(n_threads, dtype):
    """Test that several threads give exactly the one-thread result."""
    data = _image(dtype, shape=(120, 90))
    starts = _starts(data.shape, (9, 11), n=500, seed=8)
    one, ov1 = extract_stack(data, starts, (9, 11), 5, n_threads=1)
    many, ovn = extract_stack(data, starts, (9, 11), 5, n_threads=n_threads)
    np.testing.assert_equal(many, one)
    np.testing.assert_equal(ovn, ov1)
    conv1, _ = extract_stack(data, starts, (9, 11), np.nan, dtype="f4", n_threads=1)
    convn, _ = extract_stack(
        data, starts, (9, 11), np.nan, dtype="f4", n_threads=n_threads
    )
    np.testing.assert_equal(convn, conv1)


def test_threads_few_windows():
    """Test that more threads than windows still works."""
    data = _image(">f4")
    check(data, [[1, 1], [-2, 3]], (3, 3), np.nan, n_threads=3)


@pytest.mark.parametrize("n_threads", [0, -1, 1.5, "2", None, True])
def test_invalid_n_threads(n_threads):
    """Test that a non-positive or non-integer thread count is rejected."""
    with pytest.raises(ValueError, match="n_threads"):
        extract_stack(_image("f4"), [[0, 0]], (2, 2), n_threads=n_threads)


# --------------------------------------------------------------------------
# the raw kernel's argument checks
# --------------------------------------------------------------------------


def test_kernel_argument_checks():
    """Test that the raw kernel refuses inconsistent buffers."""
    src = np.zeros((4, 16), np.uint8)
    corners = np.zeros((2, 2), np.int64)
    out = np.zeros((2, 2, 8), np.uint8)
    fill = np.zeros(4, np.uint8)
    overlap = _extract.extract_windows(src, 4, 4, True, corners, out, fill)
    assert overlap.dtype == np.int8
    with pytest.raises(ValueError, match="itemsize"):
        _extract.extract_windows(src, 4, 3, True, corners, out, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="windows"):
        _extract.extract_windows(src, 4, 4, True, corners[:1], out, fill)
    with pytest.raises(ValueError, match="fill"):
        _extract.extract_windows(src, 4, 4, True, corners, out, np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="row length"):
        _extract.extract_windows(src, 5, 4, True, corners, out, fill)
    with pytest.raises(ValueError, match="whole number"):
        _extract.extract_windows(
            src, 4, 4, True, corners, np.zeros((2, 2, 6), np.uint8), fill
        )
    with pytest.raises(ValueError, match="col_stride"):
        _extract.extract_windows(src, 4, 4, True, corners, out, fill, -2)


def test_kernel_order_subset():
    """Test that the kernel copies only the windows listed in order, in any order."""
    data = _image(">f4")
    src = data.view(np.uint8)
    corners = _starts(data.shape, (3, 4), n=20)
    n = len(corners)
    out = np.full((n, 3, 16), 0xAB, np.uint8)
    fill = np.zeros(4, np.uint8)
    order = np.array([5, 0, 17, 3], dtype=np.int64)
    overlap = _extract.extract_windows(
        src, data.shape[1], 4, True, corners, out, fill, -1, order
    )
    ref, ref_overlap = reference(data, corners, (3, 4), 0.0)
    stack = out.view(np.float32).reshape(n, 3, 4)
    for i in range(n):
        if i in order:
            np.testing.assert_array_equal(stack[i], ref[i])
            assert overlap[i] == ref_overlap[i]
        else:
            assert np.all(out[i] == 0xAB)
            assert overlap[i] == 0
    with pytest.raises(ValueError, match="order"):
        _extract.extract_windows(
            src, data.shape[1], 4, True, corners, out, fill, -1, np.array([n], np.int64)
        )
    with pytest.raises(ValueError, match="order"):
        _extract.extract_windows(
            src,
            data.shape[1],
            4,
            True,
            corners,
            out,
            fill,
            -1,
            np.array([-1], np.int64),
        )


@pytest.mark.parametrize("n", [1, 63, 64, 65, 300])
def test_many_windows_any_count(n):
    """Test that results do not depend on the window count (reordered or not)."""
    data = _image(">f8", shape=(300, 200))
    starts = _starts(data.shape, (10, 12), n=max(0, n - 8), seed=n)[:n]
    check(data, starts, (10, 12), np.nan)


@pytest.fixture(params=[True, False], ids=["vector_swap", "scalar_swap"])
def swap_backend(request):
    """Run a test with and without the AVX2 byte-swap loops."""
    previous = _extract._set_vector_swap(request.param)
    yield request.param
    _extract._set_vector_swap(previous)


@pytest.mark.parametrize("dtype", [">i2", ">u2", ">i4", ">f4", ">i8", ">f8"])
@pytest.mark.parametrize("window", [(3, 1), (5, 7), (4, 33)])
def test_swap_backends(swap_backend, dtype, window):
    """Test that the vector and the scalar byte-swap loops give the same result."""
    data = _image(dtype, shape=(40, 70))
    data[1, :] = np.arange(70) * 1.5 if dtype[1] == "f" else np.arange(70)
    check(data, _starts(data.shape, window), window, 3)


# --------------------------------------------------------------------------
# streaming stores
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("window", [(3, 1), (4, 5), (2, 33), (3, 70)])
@pytest.mark.parametrize("offset", [0, 1, 8, 24, 40])
def test_streaming_stores(swap_backend, dtype, order, window, offset):
    """Test that streamed rows equal the reference at any output alignment.

    Offsets move the output off the 32-byte boundary by whole items (the
    streamed body starts after a normally copied head) or by a byte (the
    rows are then copied the normal way).
    """
    data = _image(np.dtype(dtype).newbyteorder(order), shape=(30, 90), seed=4)
    itemsize = data.dtype.itemsize
    starts = _starts(data.shape, window, n=40, seed=5)
    n, (ny, nx) = len(starts), window
    nbytes = n * ny * nx * itemsize
    raw = np.full(nbytes + 128, 0xCD, np.uint8)
    base = -raw.ctypes.data % 64
    out = raw[base + offset : base + offset + nbytes].reshape(n, ny, nx * itemsize)
    fill = np.array([7], data.dtype.newbyteorder("=")).view(np.uint8)
    overlap = _extract.extract_windows(
        data.view(np.uint8).reshape(data.shape[0], -1),
        data.shape[1],
        itemsize,
        not data.dtype.isnative and itemsize > 1,
        starts,
        out,
        fill,
        -1,
        None,
        True,
    )
    ref, ref_overlap = reference(data, starts, window, 7)
    np.testing.assert_array_equal(out.view(ref.dtype).reshape(ref.shape), ref)
    np.testing.assert_array_equal(overlap, ref_overlap)
    # nothing written outside the output
    assert np.all(raw[: base + offset] == 0xCD)
    assert np.all(raw[base + offset + nbytes :] == 0xCD)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_large_stack_is_streamed_and_aligned(monkeypatch, n_threads):
    """Test that a stack above the streaming threshold is aligned and exact."""
    import cutana._stack

    monkeypatch.setattr(cutana._stack, "STREAM_ABOVE_BYTES", 0)
    data = _image(">f4", shape=(200, 300))
    starts = _starts(data.shape, (16, 16), n=400, seed=9)
    stack, _ = check(data, starts, (16, 16), np.nan, n_threads=n_threads)
    assert stack.ctypes.data % 64 == 0


@pytest.mark.parametrize(
    "large", [(100, 100), (8000, 8000), (19200, 19200), (2**25, 12), (40, 10**6)]
)
def test_read_order_is_a_band_sweep(large):
    """Test that the copy order is a permutation sweeping bands of rows."""
    from cutana._stack import _READ_BAND, _read_order

    rng = np.random.default_rng(3)
    window = (64, 48)
    starts = np.column_stack(
        [
            rng.integers(-200, large[0] + 200, 3000),
            rng.integers(-200, large[1] + 200, 3000),
        ]
    ).astype(np.int64)
    starts[:5] = [[-(10**9), 0], [10**9, 0], [0, -(10**9)], [0, 10**9], [5, 5]]
    order = _read_order(starts, window, large)
    assert order.dtype == np.int64
    np.testing.assert_array_equal(np.sort(order), np.arange(len(starts)))
    band = np.clip(starts[order, 0], -_READ_BAND, large[0]) // _READ_BAND
    assert np.all(np.diff(band) >= 0)
