# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
`extract_stack`: the Python face of the batch extractor.

This module wraps the compiled kernel (:mod:`cutana._extract`) for whole
stacks: byte views of the input, fill values, the order in which windows
are visited, threads, and the allocation of the output. It imports only
numpy, so that the pipeline can cut without loading `astropy.nddata`; the
public name is `cutana.cutout.extract_stack`.
"""

import numpy as np

from . import _extract
from ._threads import resolve_n_threads, run_chunks

__all__ = ["extract_stack"]


def _fill_bytes(fill_value, dtype):
    """The fill value converted as astropy converts it, and its bytes."""
    tmp = np.zeros(1, dtype=dtype)
    tmp[:] = fill_value
    return tmp


def _byte_view(data):
    """A 2-D uint8 view of ``data`` for the kernel, without copying it.

    Returns ``(src_bytes, arr, col_stride)``: the rows of ``arr`` seen as
    bytes, from each row's first to its last item, and the distance in bytes
    between items of a row. Only an array whose items run backwards along a
    row (negative column stride) is copied, to a C-contiguous array.
    """
    arr = np.asarray(data)
    if arr.ndim != 2:
        msg = f"data must be a 2-D array, got {arr.ndim} dimensions"
        raise ValueError(msg)
    if arr.dtype.kind not in "biuf" or arr.dtype.itemsize not in (1, 2, 4, 8):
        msg = f"data has an unsupported dtype {arr.dtype}; use a numeric dtype"
        raise TypeError(msg)
    itemsize = arr.dtype.itemsize
    ny, nx = arr.shape
    if arr.size == 0:
        return np.zeros((ny, nx * itemsize), np.uint8), arr, itemsize
    col_stride = arr.strides[1] if nx > 1 else itemsize
    if col_stride == itemsize and (nx > 1 or itemsize > 1 or arr.strides[1] == 1):
        return arr.view(np.uint8), arr, itemsize
    if col_stride < 0:
        arr = np.ascontiguousarray(arr)
        return arr.view(np.uint8), arr, itemsize
    # items are col_stride bytes apart: view each row's byte span
    first = arr[:1, :1].view(np.uint8)
    span = (nx - 1) * col_stride + itemsize
    src = np.lib.stride_tricks.as_strided(
        first, shape=(ny, span), strides=(arr.strides[0], 1), writeable=False
    )
    return src, arr, col_stride


def extract_stack(
    data, starts, shape, fill_value=0, *, dtype=None, out=None, n_threads=1
):
    """Copy N windows of one shape out of a 2-D array into an ``(N, ny, nx)`` stack.

    This is the batch primitive under `BatchCutout2D` and the pipeline: it
    calls the compiled kernel, converting big-endian data to native byte order
    while copying and filling what lies outside the array.

    Parameters
    ----------
    data : `~numpy.ndarray`
        The 2-D image, any numeric dtype and byte order, e.g. a memory map of
        a FITS tile. It is never copied or converted as a whole.
    starts : array-like, shape ``(N, 2)``
        ``(y0, x0)`` of each window's first pixel; may lie outside ``data``.
    shape : tuple of int
        ``(ny, nx)`` of every window.
    fill_value : scalar, optional
        Value of pixels outside ``data``.
    dtype : `~numpy.dtype`, optional
        dtype of the output; by default the native-order dtype of ``data``.
        A different dtype is converted in chunks of windows after the copy.
    out : `~numpy.ndarray`, optional
        Preallocated C-contiguous ``(N, ny, nx)`` output.
    n_threads : int, optional
        Number of threads running the kernel on disjoint sets of windows.
        The result does not depend on it.

    Returns
    -------
    stack : `~numpy.ndarray`, shape ``(N, ny, nx)``
        The windows.
    overlap : `~numpy.ndarray` of int8, shape ``(N,)``
        0 if the window lies inside ``data``, 1 if partly, 2 if not at all.

    Raises
    ------
    ValueError
        If ``fill_value`` cannot be represented in the output dtype, or
        ``n_threads`` is not a positive integer.
    OverflowError
        If an integer ``fill_value`` is out of range for the output dtype.

    Notes
    -----
    Only the pixels inside the windows are read, with a byte-order swap
    where needed, so a memory-mapped tile is never converted or loaded as a
    whole (an array whose rows run backwards along the second axis is the
    one exception: it is first copied to C order). When the output dtype is
    the native form of ``data``'s dtype, the windows are copied in one pass,
    visited in bands of rows of the tile rather than in the given order:
    for a large tile and a random catalogue this makes the reads several
    times faster, and it changes nothing in the result. An output larger
    than 32 MiB that this function allocates is aligned to 64 bytes and
    written with streaming stores, which bypass the CPU caches: such an
    output could not stay in them anyway, and the stores then neither read
    the fresh memory first nor evict the tile's lines.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.cutout import extract_stack
    >>> image = np.arange(16.0).reshape(4, 4).astype(">f4")
    >>> stack, overlap = extract_stack(image, [[0, 0], [3, 3]], (2, 2), np.nan)
    >>> stack[1]
    array([[15., nan],
           [nan, nan]], dtype=float32)
    >>> overlap
    array([0, 1], dtype=int8)
    """
    n_threads = resolve_n_threads(n_threads)
    src_bytes, arr, col_stride = _byte_view(data)
    native = arr.dtype.newbyteorder("=")
    out_dtype = native if dtype is None else np.dtype(dtype)
    starts = np.ascontiguousarray(starts, dtype=np.int64).reshape(-1, 2)
    n = len(starts)
    ny, nx = (int(v) for v in shape)
    stream = False
    if out is None:
        out = _empty_aligned((n, ny, nx), out_dtype)
        stream = out.nbytes > STREAM_ABOVE_BYTES
    elif out.shape != (n, ny, nx) or not out.flags.c_contiguous:
        msg = f"out must be C-contiguous with shape {(n, ny, nx)}, got {out.shape}"
        raise ValueError(msg)
    swap = not arr.dtype.isnative and arr.dtype.itemsize > 1
    itemsize = arr.dtype.itemsize
    direct = out.dtype == native

    fill_native = _fill_bytes(fill_value, native) if direct else np.zeros(1, native)
    fill = fill_native.view(np.uint8)
    if n == 0 or ny == 0 or nx == 0:
        return out, _overlap_of(starts, (ny, nx), arr.shape)

    if direct:
        # one kernel pass over all windows, visited in an order that keeps
        # the reads from the tile local; threads take disjoint parts of it
        target = out.view(np.uint8).reshape(n, ny, nx * itemsize)
        order = _read_order(starts, (ny, nx), arr.shape)

        def run_direct(lo, hi):
            return _extract.extract_windows(
                src_bytes,
                arr.shape[1],
                itemsize,
                swap,
                starts,
                target,
                fill,
                col_stride,
                order[lo:hi],
                stream,
            )

        parts = run_chunks(run_direct, n, n_threads if n >= 2 * n_threads else 1)
        # each part sets only its own windows and leaves the others at 0
        return out, np.maximum.reduce(parts)

    def run(lo, hi):
        # convert in chunks small enough to stay in cache
        ov = np.empty(hi - lo, dtype=np.int8)
        step = max(1, (1 << 20) // max(1, ny * nx * itemsize))
        tmp = np.empty((min(step, hi - lo), ny, nx), dtype=native)
        for a in range(lo, hi, step):
            b = min(hi, a + step)
            t = tmp[: b - a]
            ov[a - lo : b - lo] = _extract.extract_windows(
                src_bytes,
                arr.shape[1],
                itemsize,
                swap,
                starts[a:b],
                t.view(np.uint8).reshape(b - a, ny, nx * itemsize),
                fill,
                col_stride,
            )
            out[a:b] = t
            filled = ov[a - lo : b - lo] != _extract.OVERLAP_FULL
            if filled.any():
                _apply_fill(out[a:b], starts[a:b], filled, arr.shape, fill_value)
        return ov

    parts = run_chunks(run, n, n_threads if n >= 2 * n_threads else 1)
    return out, np.concatenate(parts)


#: Size of a stack above which `extract_stack` writes it with streaming stores.
STREAM_ABOVE_BYTES = 32 * 2**20


def _empty_aligned(shape, dtype, align=64):
    """An uninitialised C-contiguous array starting on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


#: Rows per band of the read order (see `_read_order`).
_READ_BAND = 256


def _read_order(starts, shape, large):
    """Order in which to copy windows so that reads from the tile stay local.

    Windows are visited band by band (bands of `_READ_BAND` image rows, or
    of the window height if larger) and, within a band, from left to right
    in steps of a few columns. Compared with catalogue order this turns
    random reads all over a large (memory-mapped) tile into a sweep, and it
    decides only the order of the copies, never their result.

    Returns
    -------
    order : `~numpy.ndarray` of int64, shape ``(N,)``
        A permutation of ``range(N)``.
    """
    n = len(starts)
    if n < 64:
        return np.arange(n, dtype=np.int64)
    ny, nx = shape
    band = max(_READ_BAND, ny)
    # windows far outside the tile are pure fill: clip to one band/step beyond
    y = np.clip(starts[:, 0], -band, large[0]) + band
    x = np.clip(starts[:, 1], -nx, large[1]) + nx
    n_bands = int((large[0] + band) // band) + 1
    # a 16-bit key sorts in linear time (radix sort): coarsen the columns so
    # that bands x columns fit in it
    width = int(large[1]) + nx + 1
    step = max(1, -(-width * n_bands // 2**16))
    n_cols = -(-width // step)
    if n_bands * n_cols > 2**16:  # a very tall, thin tile: plain sort
        return np.argsort((y // band) * width + x).astype(np.int64, copy=False)
    key = ((y // band) * n_cols + x // step).astype(np.uint16)
    return np.argsort(key, kind="stable").astype(np.int64, copy=False)


def _overlap_of(starts, shape, large):
    """Overlap codes computed from geometry alone (for empty windows)."""
    starts = np.asarray(starts).reshape(-1, 2)
    stop = starts + np.asarray(shape)
    large = np.asarray(large)
    inside = np.all((starts >= 0) & (stop <= large), axis=1)
    touches = np.all((stop > 0) & (starts < large), axis=1)
    return np.where(inside, 0, np.where(touches, 1, 2)).astype(np.int8)


def _apply_fill(block, starts, which, large, fill_value):
    """Write ``fill_value`` (in the output dtype) outside the image."""
    ny, nx = block.shape[1:]
    yy = np.arange(ny)
    xx = np.arange(nx)
    for k in np.flatnonzero(which):
        y0, x0 = starts[k]
        rows = (y0 + yy < 0) | (y0 + yy >= large[0])
        cols = (x0 + xx < 0) | (x0 + xx >= large[1])
        block[k][rows, :] = fill_value
        block[k][:, cols] = fill_value
