# Licensed under a 3-clause BSD style license - see LICENSE.rst
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# cython: freethreading_compatible=True
"""
Batch window extraction: the hot loop of cutana.

The kernels here copy many rectangular windows out of one 2-D image into a
caller-allocated output, converting byte order while copying and filling
whatever lies outside the image. They work on the raw bytes of the image, so
one compiled loop serves every numeric dtype that `astropy.io.fits` produces,
native or big-endian, and the image is never converted or copied as a whole:
a memory-mapped tile is only touched where a window reads it.

All loops run without the GIL and use no global mutable state (the one global,
a CPU-feature flag choosing the AVX2 byte-swap loops, is set once at import),
so callers may run them on disjoint windows of the output from several threads
at once. They
do no WCS work, no I/O and no logging; geometry (which window belongs to
which source) is computed beforehand by :mod:`cutana._geometry`.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy

import numpy as np

__all__ = ["extract_windows", "OVERLAP_FULL", "OVERLAP_PARTIAL", "OVERLAP_NONE"]

cdef enum:
    # rows ahead of the copy whose source bytes are prefetched
    _PREFETCH_ROWS = 6

cdef enum:
    _FULL = 0
    _PARTIAL = 1
    _NONE = 2

# Probe the CPU once (a C-level flag, no Python state) so that byte swapping
# uses the widest vector instructions available.
cutana_cpu_init()

#: The window lies entirely inside the image.
OVERLAP_FULL = _FULL
#: The window overlaps the image only in part; the rest holds the fill value.
OVERLAP_PARTIAL = _PARTIAL
#: The window misses the image entirely; it holds only the fill value.
OVERLAP_NONE = _NONE


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <stddef.h>

    #if defined(__GNUC__) || defined(__clang__)
    #define CUTANA_BSWAP16(x) __builtin_bswap16(x)
    #define CUTANA_BSWAP32(x) __builtin_bswap32(x)
    #define CUTANA_BSWAP64(x) __builtin_bswap64(x)
    #else
    #define CUTANA_BSWAP16(x) ((uint16_t)((((x) >> 8) & 0xffu) | (((x) & 0xffu) << 8)))
    #define CUTANA_BSWAP32(x) ((((x) & 0xff000000u) >> 24) | (((x) & 0x00ff0000u) >> 8) | \
                               (((x) & 0x0000ff00u) << 8) | (((x) & 0x000000ffu) << 24))
    #define CUTANA_BSWAP64(x) ((((uint64_t)CUTANA_BSWAP32((uint32_t)(x))) << 32) | \
                               (uint64_t)CUTANA_BSWAP32((uint32_t)((x) >> 32)))
    #endif

    /* Byte-swapping copies of n items. The loops are written so that
       compilers vectorise them; on x86 an AVX2 build of the same loops is
       chosen at run time when the CPU has it (byte shuffles make the swap
       as fast as a plain copy). */
    #define CUTANA_SWAP_LOOP(BITS)                                          \
        ptrdiff_t k;                                                        \
        for (k = 0; k < n; k++) {                                           \
            uint##BITS##_t v;                                               \
            memcpy(&v, src + k * (BITS / 8), BITS / 8);                     \
            v = CUTANA_BSWAP##BITS(v);                                      \
            memcpy(dst + k * (BITS / 8), &v, BITS / 8);                     \
        }

    static void cutana_swap16_generic(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_SWAP_LOOP(16) }
    static void cutana_swap32_generic(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_SWAP_LOOP(32) }
    static void cutana_swap64_generic(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_SWAP_LOOP(64) }

    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    #define CUTANA_X86_DISPATCH 1
    __attribute__((target("avx2")))
    static void cutana_swap16_avx2(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_SWAP_LOOP(16) }
    __attribute__((target("avx2")))
    static void cutana_swap32_avx2(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_SWAP_LOOP(32) }
    __attribute__((target("avx2")))
    static void cutana_swap64_avx2(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_SWAP_LOOP(64) }
    /* -1: not yet probed; set once, before any kernel runs (see cutana_cpu_init). */
    static int cutana_has_avx2 = -1;
    static void cutana_cpu_init(void) {
        if (cutana_has_avx2 < 0) {
            __builtin_cpu_init();
            cutana_has_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
        }
    }
    /* For tests: use (1) or avoid (0) the AVX2 loops; returns the old state. */
    static int cutana_set_avx2(int on) {
        int previous;
        cutana_cpu_init();
        previous = cutana_has_avx2 > 0;
        cutana_has_avx2 = (on && __builtin_cpu_supports("avx2")) ? 1 : 0;
        return previous;
    }
    #define CUTANA_PICK(BITS)                                               \
        if (cutana_has_avx2 > 0) { cutana_swap##BITS##_avx2(src, dst, n); } \
        else { cutana_swap##BITS##_generic(src, dst, n); }
    #else
    static void cutana_cpu_init(void) {}
    static int cutana_set_avx2(int on) { (void)on; return 0; }
    #define CUTANA_PICK(BITS) cutana_swap##BITS##_generic(src, dst, n);
    #endif

    static inline void cutana_swap16(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_PICK(16) }
    static inline void cutana_swap32(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_PICK(32) }
    static inline void cutana_swap64(const uint8_t* src, uint8_t* dst, ptrdiff_t n)
    { CUTANA_PICK(64) }

    /* Streaming (non-temporal) copies, for outputs far larger than the
       caches: the stores bypass the cache, so the destination's lines are
       neither read before being overwritten nor evict the source's lines.
       The 32-byte-aligned body of the row is streamed, the unaligned head
       and tail are copied normally; byte order is swapped while copying
       when itemsize > 1 and swap is set. Returns 0 (nothing copied) when
       the CPU lacks AVX2 or dst is not aligned to the item size: the caller
       then copies the row the normal way. The caller must issue
       cutana_store_fence() before other threads read the output. */
    #if defined(CUTANA_X86_DISPATCH)
    #include <immintrin.h>
    __attribute__((target("avx2")))
    static int cutana_copy_stream(const uint8_t* src, uint8_t* dst, ptrdiff_t n,
                                  int itemsize, int swap)
    {
        __m256i mask;
        ptrdiff_t nbytes = n * itemsize, head, o;
        int shuffle = swap && itemsize > 1;
        if (cutana_has_avx2 <= 0 || ((uintptr_t)dst) % itemsize) { return 0; }
        if (itemsize == 2) {
            mask = _mm256_setr_epi8(1,0,3,2,5,4,7,6,9,8,11,10,13,12,15,14,
                                    1,0,3,2,5,4,7,6,9,8,11,10,13,12,15,14);
        } else if (itemsize == 4) {
            mask = _mm256_setr_epi8(3,2,1,0,7,6,5,4,11,10,9,8,15,14,13,12,
                                    3,2,1,0,7,6,5,4,11,10,9,8,15,14,13,12);
        } else {
            mask = _mm256_setr_epi8(7,6,5,4,3,2,1,0,15,14,13,12,11,10,9,8,
                                    7,6,5,4,3,2,1,0,15,14,13,12,11,10,9,8);
        }
        head = (ptrdiff_t)((32 - ((uintptr_t)dst & 31)) & 31);
        if (head > nbytes) { head = nbytes; }
        if (head > 0) {
            if (!shuffle) { memcpy(dst, src, head); }
            else if (itemsize == 2) { cutana_swap16(src, dst, head / 2); }
            else if (itemsize == 4) { cutana_swap32(src, dst, head / 4); }
            else { cutana_swap64(src, dst, head / 8); }
        }
        for (o = head; o + 32 <= nbytes; o += 32) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(src + o));
            if (shuffle) { v = _mm256_shuffle_epi8(v, mask); }
            _mm256_stream_si256((__m256i*)(dst + o), v);
        }
        if (o < nbytes) {
            if (!shuffle) { memcpy(dst + o, src + o, nbytes - o); }
            else if (itemsize == 2) { cutana_swap16(src + o, dst + o, (nbytes - o) / 2); }
            else if (itemsize == 4) { cutana_swap32(src + o, dst + o, (nbytes - o) / 4); }
            else { cutana_swap64(src + o, dst + o, (nbytes - o) / 8); }
        }
        return 1;
    }
    static void cutana_store_fence(void) { _mm_sfence(); }
    #else
    static int cutana_copy_stream(const uint8_t* src, uint8_t* dst, ptrdiff_t n,
                                  int itemsize, int swap)
    { (void)src; (void)dst; (void)n; (void)itemsize; (void)swap; return 0; }
    static void cutana_store_fence(void) {}
    #endif

    /* Ask for the cache lines of [p, p + nbytes) ahead of use (a hint only:
       it never faults and changes no result). */
    static inline void cutana_prefetch(const uint8_t* p, ptrdiff_t nbytes) {
    #if defined(__GNUC__) || defined(__clang__)
        ptrdiff_t o;
        for (o = 0; o < nbytes; o += 64) { __builtin_prefetch(p + o, 0, 0); }
        if (nbytes > 0) { __builtin_prefetch(p + nbytes - 1, 0, 0); }
    #else
        (void)p; (void)nbytes;
    #endif
    }
    """
    uint16_t CUTANA_BSWAP16(uint16_t x) nogil
    uint32_t CUTANA_BSWAP32(uint32_t x) nogil
    uint64_t CUTANA_BSWAP64(uint64_t x) nogil
    void cutana_cpu_init() nogil
    int cutana_set_avx2(int on) nogil
    void cutana_swap16(const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
    void cutana_swap32(const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
    void cutana_swap64(const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
    int cutana_copy_stream(
        const uint8_t* src, uint8_t* dst, Py_ssize_t n, int itemsize, int swap
    ) noexcept nogil
    void cutana_store_fence() noexcept nogil
    void cutana_prefetch(const uint8_t* p, Py_ssize_t nbytes) noexcept nogil


cdef inline void _copy_row(
    const uint8_t* src, uint8_t* dst, Py_ssize_t n_items, int itemsize, bint swap,
    bint stream=False,
) noexcept nogil:
    """Copy ``n_items`` items of ``itemsize`` bytes, swapping byte order if asked.

    With ``stream``, the stores bypass the cache where the CPU allows it.
    """
    if stream and cutana_copy_stream(src, dst, n_items, itemsize, swap):
        return
    if not swap or itemsize == 1:
        memcpy(dst, src, n_items * itemsize)
    elif itemsize == 4:
        cutana_swap32(src, dst, n_items)
    elif itemsize == 8:
        cutana_swap64(src, dst, n_items)
    elif itemsize == 2:
        cutana_swap16(src, dst, n_items)


cdef inline void _fill(
    uint8_t* dst, Py_ssize_t n_items, const uint8_t* fill, int itemsize
) noexcept nogil:
    """Write ``n_items`` copies of the ``itemsize``-byte pattern ``fill``."""
    cdef Py_ssize_t k
    for k in range(n_items):
        memcpy(dst + k * itemsize, fill, itemsize)


cdef inline void _copy_row_strided(
    const uint8_t* src, Py_ssize_t src_stride, uint8_t* dst, Py_ssize_t n_items,
    int itemsize, bint swap, bint stream=False,
) noexcept nogil:
    """Like `_copy_row`, for source items ``src_stride`` bytes apart."""
    cdef Py_ssize_t k
    if src_stride == itemsize:
        _copy_row(src, dst, n_items, itemsize, swap, stream)
        return
    for k in range(n_items):
        _copy_row(src + k * src_stride, dst + k * itemsize, 1, itemsize, swap)


cdef int _extract_one_strided(
    const uint8_t[:, :] src,
    Py_ssize_t src_ny,
    Py_ssize_t src_nx,
    Py_ssize_t src_col_stride,
    int64_t y0,
    int64_t x0,
    Py_ssize_t ny,
    Py_ssize_t nx,
    uint8_t* dst,
    Py_ssize_t dst_row_stride,
    const uint8_t* fill,
    int itemsize,
    bint swap,
    bint stream=False,
) noexcept nogil:
    """Copy one ``(ny, nx)`` window whose first pixel is ``(y0, x0)``.

    Source pixels of one row are ``src_col_stride`` bytes apart; the source
    bytes of the row `_PREFETCH_ROWS` ahead are prefetched while a row is
    copied. Returns OVERLAP_FULL, OVERLAP_PARTIAL or OVERLAP_NONE.
    """
    cdef Py_ssize_t r, sy, cx0, cx1, n_left, n_mid, n_right
    cdef uint8_t* row
    cdef bint any_in = False
    cdef bint all_in = True

    # columns of the window that fall inside the image: [cx0, cx1)
    cx0 = 0 if x0 >= 0 else -x0
    cx1 = nx if x0 + nx <= src_nx else src_nx - x0
    if cx1 < cx0:
        cx1 = cx0
    if cx0 > nx:
        cx0 = nx
        cx1 = nx
    n_left = cx0
    n_mid = cx1 - cx0
    n_right = nx - cx1
    if n_left > 0 or n_right > 0:
        all_in = False

    for r in range(ny):
        row = dst + r * dst_row_stride
        sy = y0 + r
        if sy < 0 or sy >= src_ny or n_mid <= 0:
            _fill(row, nx, fill, itemsize)
            all_in = False
            continue
        any_in = True
        if r + _PREFETCH_ROWS < ny and sy + _PREFETCH_ROWS < src_ny:
            cutana_prefetch(&src[sy + _PREFETCH_ROWS, (x0 + cx0) * src_col_stride],
                            (n_mid - 1) * src_col_stride + itemsize)
        if n_left > 0:
            _fill(row, n_left, fill, itemsize)
        _copy_row_strided(&src[sy, (x0 + cx0) * src_col_stride], src_col_stride,
                          row + cx0 * itemsize, n_mid, itemsize, swap, stream)
        if n_right > 0:
            _fill(row + cx1 * itemsize, n_right, fill, itemsize)

    if ny == 0 or nx == 0:
        return _FULL
    if all_in:
        return _FULL
    if any_in:
        return _PARTIAL
    return _NONE


def _set_vector_swap(bint enabled):
    """Use (or stop using) the AVX2 byte-swap loops; for tests.

    Parameters
    ----------
    enabled : bool
        Whether to use the AVX2 loops when the CPU has AVX2.

    Returns
    -------
    previous : bool
        Whether they were in use before the call.
    """
    return bool(cutana_set_avx2(enabled))


def extract_windows(
    const uint8_t[:, :] src,
    Py_ssize_t src_nx,
    int itemsize,
    bint swap,
    const int64_t[:, ::1] corners,
    uint8_t[:, :, ::1] out,
    const uint8_t[::1] fill,
    Py_ssize_t col_stride=-1,
    const int64_t[::1] order=None,
    bint stream=False,
):
    """Copy N windows of one shape out of a 2-D image, as raw bytes.

    Parameters
    ----------
    src : memoryview of uint8, shape ``(src_ny, (src_nx - 1) * col_stride + itemsize)``
        The image seen as bytes; rows may be any distance apart (also
        negative), and the bytes of one row from its first to its last item
        must be contiguous (items may be ``col_stride`` bytes apart).
        Read-only buffers (memory maps) are accepted.
    src_nx : int
        Number of pixels per image row.
    itemsize : int
        Bytes per pixel: 1, 2, 4 or 8.
    swap : bool
        Whether to reverse the byte order of every pixel while copying (for
        a big-endian image on a little-endian machine, or the converse).
    corners : memoryview of int64, shape ``(N, 2)``
        ``(y0, x0)`` of each window's first pixel in image coordinates; may
        be negative or beyond the image (the window then holds fill values).
    out : memoryview of uint8, shape ``(N, ny, nx * itemsize)``
        Caller-allocated output, seen as bytes.
    fill : memoryview of uint8, shape ``(itemsize,)``
        The fill value's bytes in the output's byte order.
    col_stride : int, optional
        Bytes from one item of a row to the next, ``>= 0``; the default
        (-1) means ``itemsize`` (contiguous rows).
    order : memoryview of int64, shape ``(M,)``, optional
        The windows to copy, in the order to copy them (distinct indices in
        ``range(N)``; by default all N in turn): window ``order[k]`` is
        written to ``out[order[k]]``, other windows are not touched.
        Visiting windows sorted by position keeps the reads of neighbouring
        windows close in memory, which matters for large tiles; disjoint
        parts of one order can be run from several threads at once.
    stream : bool, optional
        Write the output with streaming (non-temporal) stores where the CPU
        has them (AVX2): faster for outputs much larger than the caches,
        slower for outputs read again soon. The result is the same.

    Returns
    -------
    overlap : `~numpy.ndarray` of int8, shape ``(N,)``
        ``OVERLAP_FULL``, ``OVERLAP_PARTIAL`` or ``OVERLAP_NONE`` per window
        (0 for windows not listed in ``order``).
    """
    cdef Py_ssize_t n = corners.shape[0]
    cdef Py_ssize_t ny = out.shape[1]
    cdef Py_ssize_t nx
    cdef Py_ssize_t src_ny = src.shape[0]
    cdef Py_ssize_t i, k
    cdef Py_ssize_t row_stride
    cdef bint has_order = order is not None
    if itemsize not in (1, 2, 4, 8):
        msg = f"itemsize must be 1, 2, 4 or 8, got {itemsize}"
        raise ValueError(msg)
    if out.shape[0] != n:
        msg = f"out holds {out.shape[0]} windows but corners has {n}"
        raise ValueError(msg)
    if out.shape[2] % itemsize != 0:
        msg = "the last axis of out is not a whole number of items"
        raise ValueError(msg)
    if fill.shape[0] != itemsize:
        msg = f"fill must have {itemsize} bytes, got {fill.shape[0]}"
        raise ValueError(msg)
    if src.shape[1] > 0 and src.strides[1] != 1:
        msg = "the bytes of each image row must be contiguous (src.strides[1] == 1)"
        raise ValueError(msg)
    if col_stride == -1:
        col_stride = itemsize
    if col_stride < 0:
        msg = f"col_stride must be >= 0 (or -1 for itemsize), got {col_stride}"
        raise ValueError(msg)
    if src_nx > 0 and src.shape[1] != (src_nx - 1) * col_stride + itemsize:
        msg = "src_nx, col_stride and itemsize do not match the image row length in bytes"
        raise ValueError(msg)
    if src_nx == 0 and src.shape[1] != 0:
        msg = "src_nx is 0 but the image rows are not empty"
        raise ValueError(msg)
    cdef Py_ssize_t m = order.shape[0] if has_order else n
    if has_order:
        for k in range(m):
            if order[k] < 0 or order[k] >= n:
                msg = f"order[{k}] = {order[k]} is not a window index in [0, {n})"
                raise ValueError(msg)
    nx = out.shape[2] // itemsize
    overlap = np.zeros(n, dtype=np.int8)
    cdef signed char[::1] ov = overlap
    row_stride = out.strides[1]
    if n == 0:
        return overlap
    with nogil:
        for k in range(m):
            i = order[k] if has_order else k
            ov[i] = <signed char> _extract_one_strided(
                src, src_ny, src_nx, col_stride, corners[i, 0], corners[i, 1], ny, nx,
                &out[i, 0, 0] if ny > 0 and nx > 0 else <uint8_t*> NULL,
                row_stride, &fill[0], itemsize, swap, stream,
            )
        if stream:
            cutana_store_fence()
    return overlap
include "_resample.pxi"
