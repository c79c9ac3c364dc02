# Licensed under a 3-clause BSD style license - see LICENSE.rst
#
# Fused extraction + resampling, included at the end of _extract.pyx so that
# it can reuse the window copy ``_extract_one_strided`` (byte swapping and fill).
#
# For each of N sources the kernel copies the source's window (which may lie
# partly or wholly outside the image) into a small native scratch buffer,
# converts it to float64 (one typed loop per dtype, chosen outside the pixel
# loop), multiplies the pixels that lie in the image by the source's scale
# factor, writes the fill value where the window lies outside the image, and
# resamples the window to the common output grid (H, W):
#
# * pixel centres are aligned: output pixel j of m samples input coordinate
#   c = (j + 0.5) * n / m - 0.5 of n (scipy.ndimage.zoom(grid_mode=True));
# * 'nearest' takes input pixel floor(c + 0.5), clamped to [0, n - 1];
# * 'bilinear' interpolates linearly between pixels floor(c) and
#   floor(c) + 1, each clamped to [0, n - 1], i.e. the window is extended by
#   repeating its edge pixels (scipy.ndimage.map_coordinates(order=1,
#   mode='nearest') on the same coordinates: outside the window both taps
#   are the edge pixel). As in scipy, both taps are used even when one has
#   weight 0, so a NaN next to an exact sample position propagates;
# * 'area' gives output pixel j the overlap-weighted *sum* of the input
#   pixels over [j * n / m, (j + 1) * n / m) (input pixel i covering
#   [i, i + 1)); the weights of every input pixel sum to 1, so the total flux
#   of the window is preserved.
#
# The loops run without the GIL and use no global mutable state; scratch is
# allocated with malloc inside each call.

from cython cimport floating
from libc.math cimport NAN
from libc.math cimport floor as _rs_floor
from libc.stdlib cimport free as _rs_free
from libc.stdlib cimport malloc as _rs_malloc
from libc.string cimport memset as _rs_memset

cdef extern from *:
    """
    /* AVX2 builds of the two bilinear passes (chosen at run time with the
       byte-swap loops, see cutana_set_avx2). They do the very operations of
       the portable loops in resample_windows, in the same order and without
       fused multiply-adds, so that both give identical results. */
    #if CUTANA_X86_DISPATCH
    #include <immintrin.h>
    __attribute__((target("avx2")))
    static void cutana_bilinear_h_avx2(
        const double* row, const int64_t* i0, const int64_t* i1,
        const double* wa, const double* wb, double* dst, ptrdiff_t n)
    {
        ptrdiff_t k = 0, adjacent = n;
        /* where the two taps are neighbours (all but the first and last
           samples, whose taps are clamped to the edge pixel), each pair is
           one 16-byte load, and the products are summed pairwise: the same
           two products and one addition per sample as below */
        while (adjacent > 0 && i1[adjacent - 1] != i0[adjacent - 1] + 1)
            adjacent--;
        for (; k < adjacent && i1[k] != i0[k] + 1; k++)
            dst[k] = wa[k] * row[i0[k]] + wb[k] * row[i1[k]];
        for (; k + 4 <= adjacent; k += 4) {
            __m256d x = _mm256_set_m128d(_mm_loadu_pd(row + i0[k + 2]),
                                         _mm_loadu_pd(row + i0[k]));
            __m256d y = _mm256_set_m128d(_mm_loadu_pd(row + i0[k + 3]),
                                         _mm_loadu_pd(row + i0[k + 1]));
            __m256d wa4 = _mm256_loadu_pd(wa + k), wb4 = _mm256_loadu_pd(wb + k);
            _mm256_storeu_pd(dst + k, _mm256_hadd_pd(
                _mm256_mul_pd(x, _mm256_unpacklo_pd(wa4, wb4)),
                _mm256_mul_pd(y, _mm256_unpackhi_pd(wa4, wb4))));
        }
        for (; k + 4 <= n; k += 4) {
            __m256d a = _mm256_set_pd(row[i0[k + 3]], row[i0[k + 2]],
                                      row[i0[k + 1]], row[i0[k]]);
            __m256d b = _mm256_set_pd(row[i1[k + 3]], row[i1[k + 2]],
                                      row[i1[k + 1]], row[i1[k]]);
            _mm256_storeu_pd(dst + k, _mm256_add_pd(
                _mm256_mul_pd(_mm256_loadu_pd(wa + k), a),
                _mm256_mul_pd(_mm256_loadu_pd(wb + k), b)));
        }
        for (; k < n; k++) dst[k] = wa[k] * row[i0[k]] + wb[k] * row[i1[k]];
    }
    __attribute__((target("avx2")))
    static void cutana_bilinear_v_f32_avx2(
        const double* r0, const double* r1, double w0, double w1, float* dst,
        ptrdiff_t n)
    {
        const __m256d v0 = _mm256_set1_pd(w0), v1 = _mm256_set1_pd(w1);
        ptrdiff_t k = 0;
        for (; k + 4 <= n; k += 4) {
            __m256d r = _mm256_add_pd(_mm256_mul_pd(v0, _mm256_loadu_pd(r0 + k)),
                                      _mm256_mul_pd(v1, _mm256_loadu_pd(r1 + k)));
            _mm_storeu_ps(dst + k, _mm256_cvtpd_ps(r));
        }
        for (; k < n; k++) dst[k] = (float)(w0 * r0[k] + w1 * r1[k]);
    }
    static int cutana_bilinear_avx2(void) { return cutana_has_avx2 > 0; }
    /* float32 pixels (byte order swapped if asked) to float64, times scale
       unless it is 1: the window copy, the conversion and the scaling of
       a window inside the image in one pass, with the same operations. */
    __attribute__((target("avx2")))
    static void cutana_f32_to_f64_avx2(const uint8_t* src, double* dst,
                                       ptrdiff_t n, int swap, double scale)
    {
        const __m256i mask = _mm256_setr_epi8(3,2,1,0,7,6,5,4,11,10,9,8,15,14,13,12,
                                              3,2,1,0,7,6,5,4,11,10,9,8,15,14,13,12);
        const __m256d s = _mm256_set1_pd(scale);
        const int mul = scale != 1.0;
        ptrdiff_t k = 0;
        for (; k + 8 <= n; k += 8) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(src + 4 * k));
            __m256 f;
            __m256d a, b;
            if (swap) v = _mm256_shuffle_epi8(v, mask);
            f = _mm256_castsi256_ps(v);
            a = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
            b = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
            if (mul) { a = _mm256_mul_pd(a, s); b = _mm256_mul_pd(b, s); }
            _mm256_storeu_pd(dst + k, a);
            _mm256_storeu_pd(dst + k + 4, b);
        }
        for (; k < n; k++) {
            uint32_t bits;
            float f;
            memcpy(&bits, src + 4 * k, 4);
            if (swap) bits = CUTANA_BSWAP32(bits);
            memcpy(&f, &bits, 4);
            dst[k] = mul ? (double)f * scale : (double)f;
        }
    }
    static int cutana_f32_to_f64(const uint8_t* src, double* dst, ptrdiff_t n,
                                 int swap, double scale)
    {
        if (cutana_has_avx2 <= 0) return 0;
        cutana_f32_to_f64_avx2(src, dst, n, swap, scale);
        return 1;
    }
    #else
    static void cutana_bilinear_h_avx2(
        const double* row, const int64_t* i0, const int64_t* i1,
        const double* wa, const double* wb, double* dst, ptrdiff_t n) {}
    static void cutana_bilinear_v_f32_avx2(
        const double* r0, const double* r1, double w0, double w1, float* dst,
        ptrdiff_t n) {}
    static int cutana_bilinear_avx2(void) { return 0; }
    static int cutana_f32_to_f64(const uint8_t* src, double* dst, ptrdiff_t n,
                                 int swap, double scale)
    { (void)src; (void)dst; (void)n; (void)swap; (void)scale; return 0; }
    #endif
    """
    void cutana_bilinear_h_avx2(
        const double* row, const int64_t* i0, const int64_t* i1,
        const double* wa, const double* wb, double* dst, Py_ssize_t n) noexcept nogil
    void cutana_bilinear_v_f32_avx2(
        const double* r0, const double* r1, double w0, double w1, float* dst,
        Py_ssize_t n) noexcept nogil
    int cutana_bilinear_avx2() noexcept nogil
    int cutana_f32_to_f64(
        const uint8_t* src, double* dst, Py_ssize_t n, int swap, double scale
    ) noexcept nogil


cdef enum:
    _RS_NEAREST = 0
    _RS_BILINEAR = 1
    _RS_AREA = 2

cdef enum:
    _KIND_FLOAT = 0
    _KIND_INT = 1
    _KIND_UINT = 2

#: Nearest-neighbour resampling.
RESAMPLE_NEAREST = _RS_NEAREST
#: Bilinear interpolation with the window's edge pixels repeated outward.
RESAMPLE_BILINEAR = _RS_BILINEAR
#: Flux-conserving overlap-weighted sum.
RESAMPLE_AREA = _RS_AREA
#: Data kinds accepted by `resample_windows`.
KIND_FLOAT = _KIND_FLOAT
KIND_INT = _KIND_INT
KIND_UINT = _KIND_UINT


cdef struct _Axis:
    Py_ssize_t n        # input length the table was built for (-1: none)
    Py_ssize_t m        # output length
    Py_ssize_t maxtaps  # stride of ``weight``
    Py_ssize_t* start   # (m,) first input index of each output sample
    Py_ssize_t* second  # (m,) second tap (bilinear)
    Py_ssize_t* count   # (m,) number of taps (area)
    double* weight      # (m, maxtaps) tap weights (area)
    double* wa          # (m,) weights of the first and second bilinear taps
    double* wb


cdef int _axis_alloc(_Axis* ax, Py_ssize_t m, Py_ssize_t maxtaps) noexcept nogil:
    ax.n = -1
    ax.m = m
    ax.maxtaps = maxtaps
    ax.start = <Py_ssize_t*> _rs_malloc(3 * (m + 1) * sizeof(Py_ssize_t))
    ax.weight = <double*> _rs_malloc((m * maxtaps + 2 * m + 1) * sizeof(double))
    if ax.start == NULL or ax.weight == NULL:
        return -1
    ax.wa = ax.weight + m * maxtaps
    ax.wb = ax.wa + m
    ax.second = ax.start + (m + 1)
    ax.count = ax.start + 2 * (m + 1)
    return 0


cdef void _axis_free(_Axis* ax) noexcept nogil:
    _rs_free(ax.start)
    _rs_free(ax.weight)
    ax.start = NULL
    ax.weight = NULL


cdef void _axis_build(_Axis* ax, Py_ssize_t n, int method) noexcept nogil:
    """Sample positions and weights of ``ax.m`` outputs from ``n`` inputs."""
    cdef Py_ssize_t j, i, i0, i1, m = ax.m, k
    cdef double c, t, lo, hi, a, b
    cdef double* w
    if ax.n == n:
        return
    ax.n = n
    for j in range(m):
        if method == _RS_AREA:
            lo = (<double> j) * n / m
            hi = (<double> (j + 1)) * n / m
            i0 = <Py_ssize_t> _rs_floor(lo)
            w = ax.weight + j * ax.maxtaps
            k = 0
            i = i0
            while i < n and i < hi:
                a = lo if lo > i else <double> i
                b = hi if hi < i + 1 else <double> (i + 1)
                if b > a:
                    if k == 0:
                        ax.start[j] = i
                    w[k] = b - a
                    k += 1
                i += 1
            if k == 0:
                ax.start[j] = 0 if i0 >= n else i0
            ax.count[j] = k
        else:
            c = ((j + 0.5) * n) / m - 0.5
            if method == _RS_NEAREST:
                i0 = <Py_ssize_t> _rs_floor(c + 0.5)
                if i0 < 0:
                    i0 = 0
                if i0 > n - 1:
                    i0 = n - 1
                ax.start[j] = i0
                ax.count[j] = 1
            else:
                # taps floor(c) and floor(c) + 1, each clamped to the window
                # (outside it both are the edge pixel, as in scipy)
                i0 = <Py_ssize_t> _rs_floor(c)
                t = c - i0
                i1 = i0 + 1
                if i0 < 0:
                    i0 = 0
                if i0 > n - 1:
                    i0 = n - 1
                if i1 < 0:
                    i1 = 0
                if i1 > n - 1:
                    i1 = n - 1
                ax.start[j] = i0
                ax.second[j] = i1
                ax.count[j] = 2
                ax.wa[j] = 1.0 - t
                ax.wb[j] = t


cdef bint _read_f32_inside(
    const uint8_t[:, :] src, Py_ssize_t src_ny, Py_ssize_t src_nx, int64_t y0,
    int64_t x0, Py_ssize_t ny, Py_ssize_t nx, bint swap, double scale, double* win,
) noexcept nogil:
    """Read a float32 window lying wholly inside the image into float64 ``win``.

    The copy, `_to_double` and `_prepare_window` of such a window in one
    pass per row, with the same operations. Returns `False`, with nothing
    read, for a window not wholly inside or without the AVX2 loop.
    """
    cdef Py_ssize_t r
    if y0 < 0 or x0 < 0 or y0 + ny > src_ny or x0 + nx > src_nx:
        return False
    for r in range(ny):
        if r + _PREFETCH_ROWS < ny:
            cutana_prefetch(&src[y0 + r + _PREFETCH_ROWS, x0 * 4], nx * 4)
        if not cutana_f32_to_f64(&src[y0 + r, x0 * 4], win + r * nx, nx, swap, scale):
            return False  # no AVX2: known at the first row, nothing written
    return True


cdef void _to_double(
    const uint8_t* raw, double* dst, Py_ssize_t n, int kind, int itemsize,
) noexcept nogil:
    """Convert ``n`` native-order items of the given kind to float64."""
    cdef Py_ssize_t k
    if kind == _KIND_FLOAT:
        if itemsize == 4:
            for k in range(n):
                dst[k] = (<const float*> raw)[k]
        else:
            for k in range(n):
                dst[k] = (<const double*> raw)[k]
    elif kind == _KIND_INT:
        if itemsize == 1:
            for k in range(n):
                dst[k] = (<const signed char*> raw)[k]
        elif itemsize == 2:
            for k in range(n):
                dst[k] = (<const short*> raw)[k]
        elif itemsize == 4:
            for k in range(n):
                dst[k] = (<const int*> raw)[k]
        else:
            for k in range(n):
                dst[k] = (<const int64_t*> raw)[k]
    else:
        if itemsize == 1:
            for k in range(n):
                dst[k] = (<const uint8_t*> raw)[k]
        elif itemsize == 2:
            for k in range(n):
                dst[k] = (<const uint16_t*> raw)[k]
        elif itemsize == 4:
            for k in range(n):
                dst[k] = (<const uint32_t*> raw)[k]
        else:
            for k in range(n):
                dst[k] = (<const uint64_t*> raw)[k]


cdef void _mark_blank(
    const uint8_t* raw, double* dst, Py_ssize_t n, int kind, int itemsize,
    int64_t blank,
) noexcept nogil:
    """Set ``dst[k]`` to NaN where native integer item ``k`` equals ``blank``
    (the FITS ``BLANK`` of integer images), comparing the stored integers."""
    cdef Py_ssize_t k
    cdef double nan = NAN
    if kind == _KIND_INT:
        if itemsize == 1:
            for k in range(n):
                if (<const signed char*> raw)[k] == blank:
                    dst[k] = nan
        elif itemsize == 2:
            for k in range(n):
                if (<const short*> raw)[k] == blank:
                    dst[k] = nan
        elif itemsize == 4:
            for k in range(n):
                if (<const int*> raw)[k] == blank:
                    dst[k] = nan
        else:
            for k in range(n):
                if (<const int64_t*> raw)[k] == blank:
                    dst[k] = nan
    elif kind == _KIND_UINT:
        if itemsize == 1:
            for k in range(n):
                if (<const uint8_t*> raw)[k] == blank:
                    dst[k] = nan
        elif itemsize == 2:
            for k in range(n):
                if (<const uint16_t*> raw)[k] == blank:
                    dst[k] = nan
        elif itemsize == 4:
            for k in range(n):
                if (<const uint32_t*> raw)[k] == blank:
                    dst[k] = nan
        else:
            for k in range(n):
                if blank >= 0 and (<const uint64_t*> raw)[k] == <uint64_t> blank:
                    dst[k] = nan


cdef struct _Scaling:
    # physical value of a stored one, as astropy computes it: stored * bscale
    # + bzero, in float32 (``single``) or float64 arithmetic; then * factor
    bint fits
    bint single
    double bscale
    double bzero
    float bscale32
    float bzero32


cdef inline double _physical(double v, const _Scaling* sc) noexcept nogil:
    cdef float f
    if sc.single:
        f = (<float> v) * sc.bscale32
        f = f + sc.bzero32
        return f
    return v * sc.bscale + sc.bzero


cdef void _prepare_window(
    double* win, Py_ssize_t ny, Py_ssize_t nx, int64_t y0, int64_t x0,
    Py_ssize_t src_ny, Py_ssize_t src_nx, int overlap, double scale,
    double fill, const _Scaling* sc,
) noexcept nogil:
    """Scale the pixels inside the image (FITS scaling ``sc``, then
    ``scale``) and write ``fill`` outside it."""
    cdef Py_ssize_t r, c, n = ny * nx
    cdef double* row
    cdef bint row_out
    if overlap == _FULL:
        if sc.fits:
            for c in range(n):
                win[c] = _physical(win[c], sc)
        if scale != 1.0:
            for c in range(n):
                win[c] *= scale
        return
    for r in range(ny):
        row = win + r * nx
        row_out = y0 + r < 0 or y0 + r >= src_ny
        for c in range(nx):
            if row_out or x0 + c < 0 or x0 + c >= src_nx:
                row[c] = fill
            else:
                if sc.fits:
                    row[c] = _physical(row[c], sc)
                if scale != 1.0:
                    row[c] *= scale


cdef void _resample_one(
    const double* win, Py_ssize_t ny, Py_ssize_t nx, _Axis* ay, _Axis* ax,
    int method, double* tmp, uint8_t* have_row, double* acc, floating* out,
) noexcept nogil:
    """Resample one float64 window ``(ny, nx)`` to ``(ay.m, ax.m)``."""
    cdef Py_ssize_t H = ay.m, W = ax.m
    cdef Py_ssize_t j, k, t, r, s, tap, cnt, mt_x = ax.maxtaps, mt_y = ay.maxtaps
    cdef const double* row
    cdef const double* row1
    cdef double* trow
    cdef floating* orow
    cdef double wy0, wy1, v
    cdef const double* wx
    cdef bint vector = method == _RS_BILINEAR and cutana_bilinear_avx2()
    if method == _RS_NEAREST:
        for j in range(H):
            row = win + ay.start[j] * nx
            orow = out + j * W
            for k in range(W):
                orow[k] = <floating> row[ax.start[k]]
        return
    _rs_memset(have_row, 0, ny)
    for j in range(H):
        # horizontal pass on the input rows this output row needs
        s = ay.start[j]
        cnt = 2 if method == _RS_BILINEAR else ay.count[j]
        for t in range(cnt):
            r = (ay.second[j] if t == 1 else s) if method == _RS_BILINEAR else s + t
            if have_row[r]:
                continue
            have_row[r] = 1
            row = win + r * nx
            trow = tmp + r * W
            if vector:
                cutana_bilinear_h_avx2(row, <const int64_t*> ax.start,
                                       <const int64_t*> ax.second, ax.wa, ax.wb,
                                       trow, W)
            elif method == _RS_BILINEAR:
                for k in range(W):
                    trow[k] = (ax.wa[k] * row[ax.start[k]]
                               + ax.wb[k] * row[ax.second[k]])
            else:
                for k in range(W):
                    wx = ax.weight + k * mt_x
                    row1 = row + ax.start[k]
                    v = 0.0
                    for tap in range(ax.count[k]):
                        v += wx[tap] * row1[tap]
                    trow[k] = v
        # vertical pass
        orow = out + j * W
        if method == _RS_BILINEAR:
            wy0 = ay.wa[j]
            wy1 = ay.wb[j]
            row = tmp + ay.start[j] * W
            row1 = tmp + ay.second[j] * W
            if floating is float and vector:
                cutana_bilinear_v_f32_avx2(row, row1, wy0, wy1, orow, W)
            else:
                for k in range(W):
                    orow[k] = <floating> (wy0 * row[k] + wy1 * row1[k])
        else:
            cnt = ay.count[j]
            s = ay.start[j]
            if cnt == 0:
                for k in range(W):
                    orow[k] = 0
                continue
            wy0 = ay.weight[j * mt_y]
            row = tmp + s * W
            for k in range(W):
                acc[k] = wy0 * row[k]
            for t in range(1, cnt):
                wy1 = ay.weight[j * mt_y + t]
                row = tmp + (s + t) * W
                for k in range(W):
                    acc[k] += wy1 * row[k]
            for k in range(W):
                orow[k] = <floating> acc[k]


def resample_windows(
    const uint8_t[:, :] src,
    Py_ssize_t src_nx,
    int itemsize,
    bint swap,
    int kind,
    const int64_t[:, ::1] corners,
    const int64_t[:, ::1] shapes,
    const double[::1] scale,
    double fill,
    int method,
    floating[:, :, ::1] out,
    double bscale=1.0,
    double bzero=0.0,
    blank=None,
    bint single=False,
):
    """Extract N windows of any shapes out of a 2-D image and resample each.

    Parameters
    ----------
    src : memoryview of uint8, shape ``(src_ny, src_nx * itemsize)``
        The image seen as bytes; rows may be strided, the items of a row
        must be adjacent. Read-only buffers (memory maps) are accepted.
    src_nx : int
        Number of pixels per image row.
    itemsize : int
        Bytes per pixel: 1, 2, 4 or 8.
    swap : bool
        Whether the image's byte order differs from the machine's.
    kind : int
        ``KIND_FLOAT`` (itemsize 4 or 8), ``KIND_INT`` or ``KIND_UINT``.
    corners : memoryview of int64, shape ``(N, 2)``
        ``(y0, x0)`` of each window's first pixel; may lie outside the image.
    shapes : memoryview of int64, shape ``(N, 2)``
        ``(ny, nx)`` of each window, each at least 1.
    scale : memoryview of float64, shape ``(N,)`` or ``(0,)``
        Factor applied to each window's pixels inside the image (none if
        empty).
    fill : float
        Value of the window's pixels outside the image (not scaled).
    method : int
        ``RESAMPLE_NEAREST``, ``RESAMPLE_BILINEAR`` or ``RESAMPLE_AREA``.
    out : memoryview of float32 or float64, shape ``(N, H, W)``
        Caller-allocated, C-contiguous output.
    bscale, bzero : float, optional
        FITS scaling of the stored values: a pixel inside the image is
        ``stored * bscale + bzero`` (before ``scale``), computed as astropy
        scales FITS data: in float32 arithmetic with ``single``, else in
        float64.
    blank : int, optional
        FITS ``BLANK`` of an integer image: stored values equal to it are
        NaN.
    single : bool, optional
        See ``bscale``.

    Returns
    -------
    overlap : `~numpy.ndarray` of int8, shape ``(N,)``
        ``OVERLAP_FULL``, ``OVERLAP_PARTIAL`` or ``OVERLAP_NONE`` per window.
    """
    cdef Py_ssize_t n = corners.shape[0]
    cdef Py_ssize_t H = out.shape[1], W = out.shape[2]
    cdef Py_ssize_t src_ny = src.shape[0]
    cdef Py_ssize_t i, ny, nx, max_ny = 1, max_nx = 1, max_px = 1
    cdef Py_ssize_t taps_y, taps_x
    cdef int status = 0, ov
    cdef uint8_t zero[8]
    cdef uint8_t* raw = NULL
    cdef double* win = NULL
    cdef double* tmp = NULL
    cdef double* acc = NULL
    cdef uint8_t* have_row = NULL
    cdef _Axis ay, ax
    cdef _Axis* px  # the x table: ``ax``, or ``ay`` itself when they are equal
    cdef bint has_scale = scale.shape[0] > 0
    cdef _Scaling sc
    cdef bint has_blank = blank is not None and kind != _KIND_FLOAT
    cdef int64_t blank_value = 0
    sc.fits = bscale != 1.0 or bzero != 0.0
    sc.single = single
    sc.bscale = bscale
    sc.bzero = bzero
    sc.bscale32 = <float> bscale
    sc.bzero32 = <float> bzero
    if has_blank:
        blank_value = blank
    if itemsize not in (1, 2, 4, 8):
        msg = f"itemsize must be 1, 2, 4 or 8, got {itemsize}"
        raise ValueError(msg)
    if kind not in (_KIND_FLOAT, _KIND_INT, _KIND_UINT) or (
        kind == _KIND_FLOAT and itemsize not in (4, 8)
    ):
        msg = f"unsupported data kind {kind} with itemsize {itemsize}"
        raise ValueError(msg)
    if method not in (_RS_NEAREST, _RS_BILINEAR, _RS_AREA):
        msg = f"unknown resampling method code {method}"
        raise ValueError(msg)
    if shapes.shape[0] != n or out.shape[0] != n:
        msg = f"corners, shapes and out must all hold {n} windows"
        raise ValueError(msg)
    if has_scale and scale.shape[0] != n:
        msg = f"scale must hold {n} factors or none, got {scale.shape[0]}"
        raise ValueError(msg)
    if src.shape[1] != src_nx * itemsize:
        msg = "src_nx * itemsize does not match the image row length in bytes"
        raise ValueError(msg)
    for i in range(n):
        ny = shapes[i, 0]
        nx = shapes[i, 1]
        if ny < 1 or nx < 1:
            msg = (f"window shapes must be at least 1 pixel, got ({ny}, {nx}) "
                   f"for window {i}")
            raise ValueError(msg)
        if ny > max_ny:
            max_ny = ny
        if nx > max_nx:
            max_nx = nx
        if ny * nx > max_px:
            max_px = ny * nx
    overlap = np.zeros(n, dtype=np.int8)
    cdef signed char[::1] ov_view = overlap
    if n == 0 or H == 0 or W == 0:
        return overlap
    # area taps per output sample: ceil(n / m) + 1 covers every partial
    # overlap (nearest and bilinear keep no tap table)
    taps_y = (max_ny + H - 1) // H + 2 if method == _RS_AREA else 0
    taps_x = (max_nx + W - 1) // W + 2 if method == _RS_AREA else 0
    ay.start = NULL
    ay.weight = NULL
    ax.start = NULL
    ax.weight = NULL
    with nogil:
        _rs_memset(zero, 0, 8)
        raw = <uint8_t*> _rs_malloc(max_px * itemsize)
        win = <double*> _rs_malloc(max_px * sizeof(double))
        tmp = <double*> _rs_malloc(max_ny * W * sizeof(double))
        acc = <double*> _rs_malloc(W * sizeof(double))
        have_row = <uint8_t*> _rs_malloc(max_ny)
        if (raw == NULL or win == NULL or tmp == NULL or acc == NULL
                or have_row == NULL):
            status = -1
        if status == 0:
            status = _axis_alloc(&ay, H, taps_y)
        if status == 0:
            status = _axis_alloc(&ax, W, taps_x)
        if status == 0:
            for i in range(n):
                ny = shapes[i, 0]
                nx = shapes[i, 1]
                if kind == _KIND_FLOAT and itemsize == 4 and not sc.fits and (
                        _read_f32_inside(src, src_ny, src_nx, corners[i, 0],
                                         corners[i, 1], ny, nx, swap,
                                         scale[i] if has_scale else 1.0, win)):
                    ov = _FULL
                else:
                    ov = _extract_one_strided(src, src_ny, src_nx, itemsize,
                                              corners[i, 0], corners[i, 1], ny, nx,
                                              raw, nx * itemsize, zero, itemsize,
                                              swap)
                    _to_double(raw, win, ny * nx, kind, itemsize)
                    if has_blank:
                        _mark_blank(raw, win, ny * nx, kind, itemsize, blank_value)
                    _prepare_window(win, ny, nx, corners[i, 0], corners[i, 1],
                                    src_ny, src_nx, ov,
                                    scale[i] if has_scale else 1.0, fill, &sc)
                ov_view[i] = <signed char> ov
                _axis_build(&ay, ny, method)
                px = &ay  # a square window to a square grid: one table
                if nx != ny or W != H:
                    _axis_build(&ax, nx, method)
                    px = &ax
                _resample_one(win, ny, nx, &ay, px, method, tmp, have_row,
                              acc, &out[i, 0, 0])
        _axis_free(&ay)
        _axis_free(&ax)
        _rs_free(raw)
        _rs_free(win)
        _rs_free(tmp)
        _rs_free(acc)
        _rs_free(have_row)
    if status != 0:
        raise MemoryError("could not allocate scratch memory for resampling")
    return overlap
