# Licensed under a 3-clause BSD style license - see LICENSE.rst
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# cython: freethreading_compatible=True
"""
Stretch kernels: per-image display limits, stretch and quantisation.

The kernels work on a C-contiguous stack of images ``(N, H, W)`` of float32
or float64 (callers reshape ``(N, C, H, W)`` to ``(N * C, H, W)``). For every
image they compute its display limits over the finite pixels of a region
(astropy's `~astropy.visualization.PercentileInterval` or
`~astropy.visualization.ZScaleInterval`, reproduced exactly), scale the image
to [0, 1] by those limits and clip it, apply a stretch (astropy's linear,
sqrt, log or asinh) and write float32, uint8 or uint16 directly, quantising
in the same pass. Non-finite pixels become 0.

Percentiles are exact order statistics of the finite pixels, interpolated
as `numpy.percentile` does (method ``'linear'``), found without sorting: for
quantiles near both ends (0.1 and 99.9 per cent, say) one pass collects the
few pixels beyond two thresholds placed from a probe of 1024 pixels and the
order statistics are selected among them; otherwise, or when a threshold
turns out too tight, the selection (Floyd & Rivest) runs on a copy of all
finite pixels. The scaling and stretches repeat astropy's operations in
float64. For uint8 output of the log and asinh stretches a lookup table over
the scaled value (built once per call, as it does not depend on the image)
replaces the transcendental function calls; the few pixels whose code the
table cannot decide are evaluated directly, so the result is identical to
the direct evaluation. The per-pixel loops use SSE2 where available.

All loops run without the GIL and use no global mutable state; scratch
memory is allocated inside each call. Callers may run the kernels on
disjoint slices of the stack from several threads at once.
"""

from cython cimport floating
from libc.float cimport DBL_EPSILON, FLT_EPSILON
from libc.math cimport (
    INFINITY, asinh, exp, expm1, fabs, floor, fmax, isfinite, log, log1p, nan, sinh,
    sqrt,
)
from libc.stdint cimport uint8_t, uint16_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy


cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #if defined(__SSE2__) || defined(_M_X64)
    #include <emmintrin.h>
    #define CUTANA_SSE2 1
    #else
    #define CUTANA_SSE2 0
    #endif

    /* u = clip((x - vmin) / div, 0, 1), NaN -> 0, with div = vmax - vmin
       (or 1 when the limits are equal): astropy's operations in float64.
       The SSE2 min/max instructions return their second operand when
       either is NaN, and the scalar version does the same with
       comparisons. */
    static inline double cutana_unit1(double x, double vmin, double div) {
        double v = (x - vmin) / div;
        v = v > 0.0 ? v : 0.0;
        return v < 1.0 ? v : 1.0;
    }

    static void cutana_unit_f32(const float* x, Py_ssize_t n, double vmin,
                                double div, double* u) {
        Py_ssize_t k = 0;
    #if CUTANA_SSE2
        __m128d vm = _mm_set1_pd(vmin), vd = _mm_set1_pd(div);
        __m128d z = _mm_setzero_pd(), one = _mm_set1_pd(1.0);
        for (; k + 2 <= n; k += 2) {
            __m128d v = _mm_cvtps_pd(_mm_castsi128_ps(
                _mm_loadl_epi64((const __m128i*)(x + k))));
            v = _mm_div_pd(_mm_sub_pd(v, vm), vd);
            _mm_storeu_pd(u + k, _mm_min_pd(_mm_max_pd(v, z), one));
        }
    #endif
        for (; k < n; k++) u[k] = cutana_unit1((double)x[k], vmin, div);
    }

    static void cutana_unit_f64(const double* x, Py_ssize_t n, double vmin,
                                double div, double* u) {
        Py_ssize_t k = 0;
    #if CUTANA_SSE2
        __m128d vm = _mm_set1_pd(vmin), vd = _mm_set1_pd(div);
        __m128d z = _mm_setzero_pd(), one = _mm_set1_pd(1.0);
        for (; k + 2 <= n; k += 2) {
            __m128d v = _mm_div_pd(_mm_sub_pd(_mm_loadu_pd(x + k), vm), vd);
            _mm_storeu_pd(u + k, _mm_min_pd(_mm_max_pd(v, z), one));
        }
    #endif
        for (; k < n; k++) u[k] = cutana_unit1(x[k], vmin, div);
    }

    static void cutana_sqrt(double* u, Py_ssize_t n) {
        Py_ssize_t k = 0;
    #if CUTANA_SSE2
        for (; k + 2 <= n; k += 2)
            _mm_storeu_pd(u + k, _mm_sqrt_pd(_mm_loadu_pd(u + k)));
    #endif
        for (; k < n; k++) u[k] = sqrt(u[k]);
    }

    /* rint(u * q) for u in [0, 1]: adding and subtracting 1.5 * 2**52
       rounds to the nearest integer, ties to even (default rounding mode). */
    #define CUTANA_MAGIC 6755399441055744.0
    static void cutana_quant_u8(const double* u, Py_ssize_t n, uint8_t* out) {
        for (Py_ssize_t k = 0; k < n; k++) {
            double v = u[k] * 255.0 + CUTANA_MAGIC;
            out[k] = (uint8_t)(int)(v - CUTANA_MAGIC);
        }
    }
    static void cutana_quant_u16(const double* u, Py_ssize_t n, uint16_t* out) {
        for (Py_ssize_t k = 0; k < n; k++) {
            double v = u[k] * 65535.0 + CUTANA_MAGIC;
            out[k] = (uint16_t)(int)(v - CUTANA_MAGIC);
        }
    }
    /* Linear stretch straight to uint8: rint(255 * clip((x - vmin) / div,
       0, 1)) with a multiplication by 1 / div instead of the division. The
       product is within a few ulp of the quotient, so the code can differ
       only when 255 * u lies within ~1e-13 of a half-integer; if any pixel
       comes within 1e-7 of one, the image is redone with the division.
       Returns whether it was. Only built with AVX2 (chosen at run time):
       without it, the caller takes the division path. */
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    #include <immintrin.h>
    #define CUTANA_HAVE_LINEAR_U8 1
    #define CUTANA_LINEAR_U8_BODY(LOAD8)                                        \
        const __m256d vm = _mm256_set1_pd(vmin), inv = _mm256_set1_pd(1.0 / div); \
        const __m256d zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);    \
        const __m256d q = _mm256_set1_pd(255.0), lim = _mm256_set1_pd(0.4999999); \
        const __m256d absmask = _mm256_castsi256_pd(                            \
            _mm256_set1_epi64x(0x7fffffffffffffffLL));                          \
        __m256d bad = zero, a, b, ra, rb;                                       \
        Py_ssize_t k = 0;                                                       \
        int near_tie;                                                           \
        for (; k + 8 <= n; k += 8) {                                            \
            LOAD8                                                               \
            /* max(v, 0) gives 0 for NaN (second operand) */                    \
            a = _mm256_mul_pd(_mm256_min_pd(_mm256_max_pd(                      \
                _mm256_mul_pd(_mm256_sub_pd(a, vm), inv), zero), one), q);      \
            b = _mm256_mul_pd(_mm256_min_pd(_mm256_max_pd(                      \
                _mm256_mul_pd(_mm256_sub_pd(b, vm), inv), zero), one), q);      \
            ra = _mm256_round_pd(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
            rb = _mm256_round_pd(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
            bad = _mm256_or_pd(bad, _mm256_cmp_pd(                              \
                _mm256_and_pd(_mm256_sub_pd(a, ra), absmask), lim, _CMP_GT_OQ)); \
            bad = _mm256_or_pd(bad, _mm256_cmp_pd(                              \
                _mm256_and_pd(_mm256_sub_pd(b, rb), absmask), lim, _CMP_GT_OQ)); \
            {                                                                   \
                __m128i w = _mm_packs_epi32(_mm256_cvtpd_epi32(ra),             \
                                            _mm256_cvtpd_epi32(rb));            \
                _mm_storel_epi64((__m128i*)(out + k), _mm_packus_epi16(w, w));  \
            }                                                                   \
        }                                                                       \
        near_tie = _mm256_movemask_pd(bad) != 0;                                \
        for (; k < n; k++) {                                                    \
            double v = ((double)x[k] - vmin) * (1.0 / div), t, c;               \
            v = v > 0.0 ? v : 0.0;                                              \
            v = v < 1.0 ? v : 1.0;                                              \
            t = v * 255.0;                                                      \
            c = (t + CUTANA_MAGIC) - CUTANA_MAGIC;                              \
            near_tie |= fabs(t - c) > 0.4999999;                                \
            out[k] = (uint8_t)(int)c;                                           \
        }                                                                       \
        if (near_tie) {                                                         \
            for (k = 0; k < n; k++) {                                           \
                double v = cutana_unit1((double)x[k], vmin, div) * 255.0;       \
                out[k] = (uint8_t)(int)((v + CUTANA_MAGIC) - CUTANA_MAGIC);     \
            }                                                                   \
        }                                                                       \
        return near_tie;
    __attribute__((target("avx2")))
    static int cutana_linear_u8_f32_avx2(const float* x, Py_ssize_t n, double vmin,
                                         double div, uint8_t* out)
    {
        CUTANA_LINEAR_U8_BODY(
            { __m256 f = _mm256_loadu_ps(x + k);
              a = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
              b = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)); })
    }
    __attribute__((target("avx2")))
    static int cutana_linear_u8_f64_avx2(const double* x, Py_ssize_t n, double vmin,
                                         double div, uint8_t* out)
    {
        CUTANA_LINEAR_U8_BODY(
            { a = _mm256_loadu_pd(x + k); b = _mm256_loadu_pd(x + k + 4); })
    }
    /* The same in single precision, 32 pixels at a time (the last few
       exactly), when that is accurate enough: t = (x - (float)vmin) * (float)(255 / div) is within
       delta = 255 / div * |vmin - (float)vmin| + 255 * 4e-7 of the exact
       255 * (x - vmin) / div wherever the result is not clipped. A pixel
       whose t lies within delta (plus a margin) of a half-integer could
       round the other way, so its group is recomputed exactly (the
       division in float64); elsewhere rint(t) is the exact code. Returns 0
       (nothing written) when delta is too large for this to pay off. */
    __attribute__((target("avx2")))
    static int cutana_linear_u8_f32_single(const float* x, Py_ssize_t n,
                                           double vmin, double div, uint8_t* out)
    {
        const double scale = 255.0 / div;
        const float vmf = (float)vmin, sf = (float)scale;
        const double delta = scale * fabs(vmin - (double)vmf) + 255.0 * 4e-7;
        if (!(delta < 1e-3) || !isfinite(vmf) || !(sf > 1e-30f) || !isfinite(sf))
            return 0;
        {
            const __m256 vm = _mm256_set1_ps(vmf), vs = _mm256_set1_ps(sf);
            const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f);
            const __m256 lim = _mm256_set1_ps((float)(0.5 - delta - 1e-6));
            const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            /* the bytes of four packed vectors, in pixel order */
            const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            Py_ssize_t k = 0, j, g;
            /* 32 pixels a step: one 32-byte store and one test of the four
               vectors (the group of 32 is redone when a pixel is near a
               half-integer); max(t, 0) gives 0 for NaN (second operand) */
            for (; k + 32 <= n; k += 32) {
                __m256 t[4], r[4], near = _mm256_setzero_ps();
                __m256i q[4];
                for (g = 0; g < 4; g++) {
                    t[g] = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k + 8 * g), vm), vs);
                    t[g] = _mm256_min_ps(_mm256_max_ps(t[g], zero), top);
                    r[g] = _mm256_round_ps(t[g], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    q[g] = _mm256_cvtps_epi32(r[g]);
                    near = _mm256_or_ps(near, _mm256_cmp_ps(
                        _mm256_and_ps(_mm256_sub_ps(t[g], r[g]), absmask), lim, _CMP_GT_OQ));
                }
                _mm256_storeu_si256((__m256i*)(out + k), _mm256_permutevar8x32_epi32(
                    _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]),
                                        _mm256_packs_epi32(q[2], q[3])), order));
                if (_mm256_movemask_ps(near)) {
                    for (j = k; j < k + 32; j++) {
                        double v = cutana_unit1((double)x[j], vmin, div) * 255.0;
                        out[j] = (uint8_t)(int)((v + CUTANA_MAGIC) - CUTANA_MAGIC);
                    }
                }
            }
            for (; k < n; k++) {  /* the last (under 32) exactly */
                double v = cutana_unit1((double)x[k], vmin, div) * 255.0;
                out[k] = (uint8_t)(int)((v + CUTANA_MAGIC) - CUTANA_MAGIC);
            }
        }
        return 1;
    }
    static int cutana_avx2_state = -1;
    static int cutana_has_avx2(void) {
        if (cutana_avx2_state < 0) {
            __builtin_cpu_init();
            cutana_avx2_state = __builtin_cpu_supports("avx2") ? 1 : 0;
        }
        return cutana_avx2_state;
    }
    /* 1: done (the fast way or redone), 0: not available, use the division */
    static int cutana_linear_u8_f32(const float* x, Py_ssize_t n, double vmin,
                                    double div, uint8_t* out) {
        if (!cutana_has_avx2()) return 0;
        if (!cutana_linear_u8_f32_single(x, n, vmin, div, out))
            cutana_linear_u8_f32_avx2(x, n, vmin, div, out);
        return 1;
    }
    static int cutana_linear_u8_f64(const double* x, Py_ssize_t n, double vmin,
                                    double div, uint8_t* out) {
        if (!cutana_has_avx2()) return 0;
        cutana_linear_u8_f64_avx2(x, n, vmin, div, out);
        return 1;
    }
    #else
    static int cutana_has_avx2(void) { return 0; }
    static int cutana_linear_u8_f32(const float* x, Py_ssize_t n, double vmin,
                                    double div, uint8_t* out)
    { (void)x; (void)n; (void)vmin; (void)div; (void)out; return 0; }
    static int cutana_linear_u8_f64(const double* x, Py_ssize_t n, double vmin,
                                    double div, uint8_t* out)
    { (void)x; (void)n; (void)vmin; (void)div; (void)out; return 0; }
    #endif
    static void cutana_to_f32(const double* u, Py_ssize_t n, float* out) {
        for (Py_ssize_t k = 0; k < n; k++) out[k] = (float)u[k];
    }
    static inline int cutana_quant1(double s, double q) {
        double v = s * q + CUTANA_MAGIC;
        return (int)(v - CUTANA_MAGIC);
    }

    /* uint8 codes through the lookup table `lut` over `n_bins` bins of the
       scaled value u = clip((x - vmin) / div, 0, 1), worked on as
       b = (x - vmin) * scale_b with scale_b = n_bins / div (u * n_bins to
       an ulp or two). An entry holds the code at the bin's lower edge in
       its low byte and, in its high byte, the index k of the one threshold
       in the bin (0 if none), at b = thr_b[k]: the code is the low byte
       plus (b > thr_b[k]). Pixels within eps_b of a
       threshold, or in a bin marked CUTANA_LUT_MULTI (several thresholds),
       are listed in `pending` for direct evaluation; the return value is
       their number. */
    #define CUTANA_LUT_MULTI 0xFFFF
    #define CUTANA_LUT_LOOP(T)                                              \
        Py_ssize_t k, n_pending = 0;                                        \
        double top = (double)n_bins;                                        \
        for (k = 0; k < n; k++) {                                           \
            double b = ((double)x[k] - vmin) * scale_b;                     \
            unsigned int e;                                                 \
            b = b > 0.0 ? b : 0.0;                                          \
            b = b < top ? b : top;                                          \
            e = lut[(Py_ssize_t)b];                                         \
            if (e > 0xFFu) {                                                \
                if (e == CUTANA_LUT_MULTI) {                                \
                    pending[n_pending++] = k;                               \
                } else {                                                    \
                    double t = thr_b[e >> 8];                               \
                    if (fabs(b - t) <= eps_b) pending[n_pending++] = k;     \
                    e = (e & 0xFFu) + (b > t);                              \
                }                                                           \
            }                                                               \
            out[k] = (uint8_t)e;                                            \
        }                                                                   \
        return n_pending;
    static Py_ssize_t cutana_lut_f32_scalar(
            const float* x, Py_ssize_t n, double vmin, double scale_b,
            const uint16_t* lut, Py_ssize_t n_bins, const double* thr_b,
            double eps_b, uint8_t* out, Py_ssize_t* pending) {
        CUTANA_LUT_LOOP(float)
    }
    #if defined(CUTANA_HAVE_LINEAR_U8)
    /* The same, four pixels at a time without a branch per pixel: every
       lane compares with its bin's threshold (thr_b[0] is +inf, so a bin
       without one adds 0), and only lanes near a threshold or in a
       CUTANA_LUT_MULTI bin are listed, in order, as pending. */
    __attribute__((target("avx2")))
    static Py_ssize_t cutana_lut_f32_avx2(
            const float* x, Py_ssize_t n, double vmin, double scale_b,
            const uint16_t* lut, Py_ssize_t n_bins, const double* thr_b,
            double eps_b, uint8_t* out, Py_ssize_t* pending) {
        const __m256d vm = _mm256_set1_pd(vmin), sc = _mm256_set1_pd(scale_b);
        const __m256d zero = _mm256_setzero_pd(), top = _mm256_set1_pd((double)n_bins);
        const __m256d eps = _mm256_set1_pd(eps_b);
        const __m256d absmask = _mm256_castsi256_pd(
            _mm256_set1_epi64x(0x7fffffffffffffffLL));
        const __m256i low32 = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        const __m128i ff = _mm_set1_epi32(0xFF), multi = _mm_set1_epi32(CUTANA_LUT_MULTI);
        Py_ssize_t k = 0, n_pending = 0;
        int idx[4];
        for (; k + 4 <= n; k += 4) {
            __m256d b = _mm256_mul_pd(
                _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + k)), vm), sc);
            b = _mm256_min_pd(_mm256_max_pd(b, zero), top);  /* NaN -> 0 */
            _mm_storeu_si128((__m128i*)idx, _mm256_cvttpd_epi32(b));
            int e0 = lut[idx[0]], e1 = lut[idx[1]], e2 = lut[idx[2]], e3 = lut[idx[3]];
            __m128i e = _mm_setr_epi32(e0, e1, e2, e3);
            __m256d t = _mm256_setr_pd(thr_b[e0 >> 8], thr_b[e1 >> 8], thr_b[e2 >> 8],
                                       thr_b[e3 >> 8]);
            __m256d gt = _mm256_cmp_pd(b, t, _CMP_GT_OQ);
            __m256d near = _mm256_cmp_pd(
                _mm256_and_pd(_mm256_sub_pd(b, t), absmask), eps, _CMP_LE_OQ);
            int pend = _mm256_movemask_pd(near)
                | _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(e, multi)));
            __m128i up = _mm256_castsi256_si128(
                _mm256_permutevar8x32_epi32(_mm256_castpd_si256(gt), low32));
            __m128i code = _mm_sub_epi32(_mm_and_si128(e, ff), up);  /* + (b > t) */
            code = _mm_packus_epi32(code, code);
            int word = _mm_cvtsi128_si32(_mm_packus_epi16(code, code));
            memcpy(out + k, &word, 4);
            for (; pend; pend &= pend - 1)
                pending[n_pending++] = k + __builtin_ctz(pend);
        }
        {   /* the last pixels one by one, their indices made absolute */
            Py_ssize_t i, m = cutana_lut_f32_scalar(
                x + k, n - k, vmin, scale_b, lut, n_bins, thr_b, eps_b, out + k,
                pending + n_pending);
            for (i = 0; i < m; i++) pending[n_pending + i] += k;
            return n_pending + m;
        }
    }
    #endif
    static Py_ssize_t cutana_lut_f32(
            const float* x, Py_ssize_t n, double vmin, double scale_b,
            const uint16_t* lut, Py_ssize_t n_bins, const double* thr_b,
            double eps_b, uint8_t* out, Py_ssize_t* pending) {
    #if defined(CUTANA_HAVE_LINEAR_U8)
        if (cutana_has_avx2())
            return cutana_lut_f32_avx2(x, n, vmin, scale_b, lut, n_bins, thr_b,
                                       eps_b, out, pending);
    #endif
        return cutana_lut_f32_scalar(x, n, vmin, scale_b, lut, n_bins, thr_b,
                                     eps_b, out, pending);
    }
    static Py_ssize_t cutana_lut_f64(
            const double* x, Py_ssize_t n, double vmin, double scale_b,
            const uint16_t* lut, Py_ssize_t n_bins, const double* thr_b,
            double eps_b, uint8_t* out, Py_ssize_t* pending) {
        CUTANA_LUT_LOOP(double)
    }

    /* Number of NaN and infinite values of x[:n]: x - x is NaN exactly for
       those; unordered compares count them four (two) at a time. */
    static Py_ssize_t cutana_nonfinite_f32(const float* x, Py_ssize_t n) {
        Py_ssize_t k = 0, bad = 0;
    #if CUTANA_SSE2
        __m128i acc = _mm_setzero_si128();
        int lanes[4];
        for (; k + 4 <= n; k += 4) {
            __m128 v = _mm_loadu_ps(x + k);
            __m128 d = _mm_sub_ps(v, v);
            acc = _mm_sub_epi32(acc, _mm_castps_si128(_mm_cmpunord_ps(d, d)));
        }
        _mm_storeu_si128((__m128i*)lanes, acc);
        bad = (Py_ssize_t)lanes[0] + lanes[1] + lanes[2] + lanes[3];
    #endif
        for (; k < n; k++) { float d = x[k] - x[k]; bad += d != d; }
        return bad;
    }
    static Py_ssize_t cutana_nonfinite_f64(const double* x, Py_ssize_t n) {
        Py_ssize_t k = 0, bad = 0;
    #if CUTANA_SSE2
        __m128i acc = _mm_setzero_si128();
        long long lanes[2];
        for (; k + 2 <= n; k += 2) {
            __m128d v = _mm_loadu_pd(x + k);
            __m128d d = _mm_sub_pd(v, v);
            acc = _mm_sub_epi64(acc, _mm_castpd_si128(_mm_cmpunord_pd(d, d)));
        }
        _mm_storeu_si128((__m128i*)lanes, acc);
        bad = (Py_ssize_t)(lanes[0] + lanes[1]);
    #endif
        for (; k < n; k++) { double d = x[k] - x[k]; bad += d != d; }
        return bad;
    }

    /* Append the finite values of x[:n] that are <= lo to low[n_low++] and
       those >= hi (hi > lo) to high[-(++n_high)]; NaN compares false. */
    #define CUTANA_FILTER_SCALAR(T)                                         \
        {   T v = x[k];                                                     \
            if (v <= lo) { if (isfinite(v)) low[(*n_low)++] = v; }          \
            else if (v >= hi) { if (isfinite(v)) high[-(++(*n_high))] = v; } }
    static void cutana_filter_f32(const float* x, Py_ssize_t n, float lo,
                                  float hi, float* low, Py_ssize_t* n_low,
                                  float* high, Py_ssize_t* n_high) {
        Py_ssize_t k = 0;
    #if CUTANA_SSE2
        __m128 vlo = _mm_set1_ps(lo), vhi = _mm_set1_ps(hi);
        for (; k + 4 <= n; k += 4) {
            __m128 v = _mm_loadu_ps(x + k);
            int mask = _mm_movemask_ps(_mm_or_ps(_mm_cmple_ps(v, vlo),
                                                 _mm_cmpge_ps(v, vhi)));
            if (mask) {
                Py_ssize_t k0 = k, k1 = k + 4;
                for (k = k0; k < k1; k++) CUTANA_FILTER_SCALAR(float)
                k = k0;
            }
        }
    #endif
        for (; k < n; k++) CUTANA_FILTER_SCALAR(float)
    }
    static void cutana_filter_f64(const double* x, Py_ssize_t n, double lo,
                                  double hi, double* low, Py_ssize_t* n_low,
                                  double* high, Py_ssize_t* n_high) {
        Py_ssize_t k = 0;
    #if CUTANA_SSE2
        __m128d vlo = _mm_set1_pd(lo), vhi = _mm_set1_pd(hi);
        for (; k + 2 <= n; k += 2) {
            __m128d v = _mm_loadu_pd(x + k);
            int mask = _mm_movemask_pd(_mm_or_pd(_mm_cmple_pd(v, vlo),
                                                 _mm_cmpge_pd(v, vhi)));
            if (mask) {
                Py_ssize_t k0 = k, k1 = k + 2;
                for (k = k0; k < k1; k++) CUTANA_FILTER_SCALAR(double)
                k = k0;
            }
        }
    #endif
        for (; k < n; k++) CUTANA_FILTER_SCALAR(double)
    }

    /* cutana_pack_lut[0][m]: the lanes set in the 8-bit mask m, in order,
       then zeros; cutana_pack_lut[1][m]: the same lanes, in order, ending at
       lane 7. Filled once at import (cutana_init_pack_lut). */
    static uint8_t cutana_pack_lut[2][256][8];
    static void cutana_init_pack_lut(void) {
        for (int m = 0; m < 256; m++) {
            int c = 0, i = 0;
            for (int lane = 0; lane < 8; lane++) {
                cutana_pack_lut[0][m][lane] = 0;
                cutana_pack_lut[1][m][lane] = 0;
                c += (m >> lane) & 1;
            }
            for (int lane = 0; lane < 8; lane++) {
                if (m & (1 << lane)) {
                    cutana_pack_lut[0][m][i] = (uint8_t)lane;
                    cutana_pack_lut[1][m][8 - c + i] = (uint8_t)lane;
                    i++;
                }
            }
        }
    }
    /* The filter of one row that also returns the number of non-finite
       values in it: one pass over the pixels instead of two. */
    #define CUTANA_FILTER_COUNT_AVX2(T, VEC, LANES, LOADU, SET1, SUB, CMP,     \
                                     MOVEMASK)                                \
        const VEC vlo = SET1(lo), vhi = SET1(hi);                             \
        Py_ssize_t k = 0, bad = 0, nl = *n_low, nh = *n_high;                 \
        for (; k + LANES <= n; k += LANES) {                                  \
            VEC v = LOADU(x + k), d = SUB(v, v);                              \
            unsigned ml = (unsigned)MOVEMASK(CMP(v, vlo, _CMP_LE_OQ));        \
            unsigned mh = (unsigned)MOVEMASK(CMP(v, vhi, _CMP_GE_OQ));        \
            bad += __builtin_popcount(MOVEMASK(CMP(d, d, _CMP_UNORD_Q)));     \
            /* the lanes flagged, in order (lo < hi: never both) */           \
            for (; ml; ml &= ml - 1) {                                        \
                T w = x[k + __builtin_ctz(ml)];                               \
                if (isfinite(w)) low[nl++] = w;                               \
            }                                                                 \
            for (; mh; mh &= mh - 1) {                                        \
                T w = x[k + __builtin_ctz(mh)];                               \
                if (isfinite(w)) high[-(++nh)] = w;                           \
            }                                                                 \
        }                                                                     \
        *n_low = nl;                                                          \
        *n_high = nh;                                                         \
        for (; k < n; k++) {                                                  \
            T d = x[k] - x[k];                                                \
            bad += d != d;                                                    \
            CUTANA_FILTER_SCALAR(T)                                           \
        }                                                                     \
        return bad;
    #if defined(CUTANA_HAVE_LINEAR_U8)
    __attribute__((target("avx2")))
    static Py_ssize_t cutana_filter_count_f32_avx2(
        const float* x, Py_ssize_t n, float lo, float hi, float* low,
        Py_ssize_t* n_low, float* high, Py_ssize_t* n_high)
    {
        /* the float32 loop of CUTANA_FILTER_COUNT_AVX2 without a branch:
           every step packs the lanes flagged low (high) with a permutation
           and stores all 8 lanes at low[nl] (ending at high[-nh]), then
           advances by the number flagged (testing the lanes first, or
           listing them one by one, mispredicts: 30-40 % slower on the
           paper workload's cutouts). The caller leaves room for a vector
           past each end. NaN and infinities are never collected. */
        const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
        __m256i acc = _mm256_setzero_si256();
        int32_t lanes[8];
        Py_ssize_t k = 0, bad = 0, nl = *n_low, nh = *n_high;
        for (; k + 8 <= n; k += 8) {
            __m256 v = _mm256_loadu_ps(x + k), d = _mm256_sub_ps(v, v);
            __m256 nonfinite = _mm256_cmp_ps(d, d, _CMP_UNORD_Q);
            __m256 fl = _mm256_andnot_ps(nonfinite, _mm256_cmp_ps(v, vlo, _CMP_LE_OQ));
            __m256 fh = _mm256_andnot_ps(nonfinite, _mm256_cmp_ps(v, vhi, _CMP_GE_OQ));
            unsigned ml = (unsigned)_mm256_movemask_ps(fl);
            unsigned mh = (unsigned)_mm256_movemask_ps(fh);
            __m256i pl = _mm256_cvtepu8_epi32(
                _mm_loadl_epi64((const __m128i*)cutana_pack_lut[0][ml]));
            __m256i ph = _mm256_cvtepu8_epi32(
                _mm_loadl_epi64((const __m128i*)cutana_pack_lut[1][mh]));
            acc = _mm256_sub_epi32(acc, _mm256_castps_si256(nonfinite));
            _mm256_storeu_ps(low + nl, _mm256_permutevar8x32_ps(v, pl));
            _mm256_storeu_ps(high - nh - 8, _mm256_permutevar8x32_ps(v, ph));
            nl += __builtin_popcount(ml);
            nh += __builtin_popcount(mh);
        }
        _mm256_storeu_si256((__m256i*)lanes, acc);
        for (int j = 0; j < 8; j++) bad += lanes[j];
        *n_low = nl;
        *n_high = nh;
        for (; k < n; k++) {
            float d = x[k] - x[k];
            bad += d != d;
            CUTANA_FILTER_SCALAR(float)
        }
        return bad;
    }
    __attribute__((target("avx2")))
    static Py_ssize_t cutana_filter_count_f64_avx2(
        const double* x, Py_ssize_t n, double lo, double hi, double* low,
        Py_ssize_t* n_low, double* high, Py_ssize_t* n_high)
    {
        CUTANA_FILTER_COUNT_AVX2(double, __m256d, 4, _mm256_loadu_pd,
                                 _mm256_set1_pd, _mm256_sub_pd, _mm256_cmp_pd,
                                 _mm256_movemask_pd)
    }
    #endif
    #if defined(CUTANA_HAVE_LINEAR_U8)
    #define CUTANA_FILTER_COUNT_VECTOR(SUFFIX)                                    \
        if (cutana_has_avx2())                                                  \
            return cutana_filter_count_##SUFFIX##_avx2(x, n, lo, hi, low, n_low,  \
                                                       high, n_high);
    #else
    #define CUTANA_FILTER_COUNT_VECTOR(SUFFIX)
    #endif
    #define CUTANA_FILTER_COUNT(T, SUFFIX)                                        \
        static Py_ssize_t cutana_filter_count_##SUFFIX(                           \
            const T* x, Py_ssize_t n, T lo, T hi, T* low, Py_ssize_t* n_low,      \
            T* high, Py_ssize_t* n_high)                                          \
        {                                                                         \
            CUTANA_FILTER_COUNT_VECTOR(SUFFIX)                                    \
            cutana_filter_##SUFFIX(x, n, lo, hi, low, n_low, high, n_high);       \
            return cutana_nonfinite_##SUFFIX(x, n);                               \
        }
    CUTANA_FILTER_COUNT(float, f32)
    CUTANA_FILTER_COUNT(double, f64)
    /* Order statistics r and r + 1 (0-based, r + 1 < m) of the finite
       values src[:m], by radix selection on their bits: the values map to
       unsigned keys in the same order (sign bit set: all bits flipped; else
       the sign bit set), one pass finds the keys' range, a second counts
       them in 256 bins spanning it, and only the bin holding rank r is
       kept for the next level (each level narrows the range 256-fold). When
       ranks r and r + 1 fall in different bins, r is the largest value of
       its bin and r + 1 the smallest above it: one more pass. Few values
       are sorted by insertion. O(m) with no data-dependent branch in the
       counting; ``tmp`` holds m values and may be ``src`` itself (which is
       then reordered). Equal values give the same result in any order. */
    #define CUTANA_RADIX_PAIR(T, U, SUFFIX, NBITS)                               \
        static inline U cutana_key_##SUFFIX(T v) {                               \
            U u;                                                                 \
            memcpy(&u, &v, sizeof u);                                            \
            return (u >> (NBITS - 1)) ? ~u : (u | ((U)1 << (NBITS - 1)));        \
        }                                                                        \
        static void cutana_radix_pair_##SUFFIX(const T* src, Py_ssize_t m,        \
                                               Py_ssize_t r, T* tmp, T* first,   \
                                               T* second)                        \
        {                                                                        \
            uint32_t count[256];                                                 \
            const T* a = src;                                                    \
            for (;;) {                                                           \
                Py_ssize_t i, j, before = 0;                                     \
                U lo, hi, span, bin;                                             \
                int shift = 0;                                                   \
                if (m <= 24) {                                                   \
                    for (i = 0; i < m; i++) {                                    \
                        T v = a[i];                                              \
                        for (j = i; j > 0 && tmp[j - 1] > v; j--)               \
                            tmp[j] = tmp[j - 1];                                 \
                        tmp[j] = v;                                              \
                    }                                                            \
                    *first = tmp[r];                                             \
                    *second = tmp[r + 1];                                        \
                    return;                                                      \
                }                                                                \
                lo = hi = cutana_key_##SUFFIX(a[0]);                             \
                for (i = 1; i < m; i++) {                                        \
                    U k = cutana_key_##SUFFIX(a[i]);                             \
                    lo = k < lo ? k : lo;                                        \
                    hi = k > hi ? k : hi;                                        \
                }                                                                \
                if (lo == hi) { *first = *second = a[0]; return; }              \
                span = hi - lo;                                                  \
                while ((span >> shift) > 255) shift++;                           \
                memset(count, 0, sizeof count);                                  \
                for (i = 0; i < m; i++)                                          \
                    count[(cutana_key_##SUFFIX(a[i]) - lo) >> shift]++;          \
                for (bin = 0; before + (Py_ssize_t)count[bin] <= r; bin++)       \
                    before += count[bin];                                        \
                if (before + (Py_ssize_t)count[bin] > r + 1) {                   \
                    for (i = 0, j = 0; i < m; i++)                               \
                        if (((cutana_key_##SUFFIX(a[i]) - lo) >> shift) == bin)  \
                            tmp[j++] = a[i];                                     \
                    a = tmp;                                                     \
                    m = j;                                                       \
                    r -= before;                                                 \
                    continue;                                                    \
                }                                                                \
                {                                                                \
                    int have_first = 0, have_second = 0;                         \
                    T f = a[0], s = a[0];                                        \
                    for (i = 0; i < m; i++) {                                    \
                        U b = (cutana_key_##SUFFIX(a[i]) - lo) >> shift;         \
                        T v = a[i];                                              \
                        if (b == bin) {                                          \
                            if (!have_first || v > f) f = v;                     \
                            have_first = 1;                                      \
                        } else if (b > bin) {                                    \
                            if (!have_second || v < s) s = v;                    \
                            have_second = 1;                                     \
                        }                                                        \
                    }                                                            \
                    *first = f;                                                  \
                    *second = s;                                                 \
                    return;                                                      \
                }                                                                \
            }                                                                    \
        }
    CUTANA_RADIX_PAIR(float, uint32_t, f32, 32)
    CUTANA_RADIX_PAIR(double, uint64_t, f64, 64)
    /* For tests: use (1) or avoid (0) the AVX2 loops; returns the old state. */
    static int cutana_set_vector_loops(int on) {
        int previous = cutana_has_avx2();
    #if defined(CUTANA_HAVE_LINEAR_U8)
        cutana_avx2_state = (on && __builtin_cpu_supports("avx2")) ? 1 : 0;
    #endif
        (void)on;
        return previous;
    }
    """
    double cutana_unit1(double x, double vmin, double div) nogil
    void cutana_unit_f32(const float* x, Py_ssize_t n, double vmin, double div,
                         double* u) nogil
    void cutana_unit_f64(const double* x, Py_ssize_t n, double vmin, double div,
                         double* u) nogil
    void cutana_sqrt(double* u, Py_ssize_t n) nogil
    void cutana_quant_u8(const double* u, Py_ssize_t n, uint8_t* out) nogil
    void cutana_quant_u16(const double* u, Py_ssize_t n, uint16_t* out) nogil
    void cutana_to_f32(const double* u, Py_ssize_t n, float* out) nogil
    int cutana_linear_u8_f32(const float* x, Py_ssize_t n, double vmin, double div,
                             uint8_t* out) nogil
    int cutana_linear_u8_f64(const double* x, Py_ssize_t n, double vmin, double div,
                             uint8_t* out) nogil
    int cutana_quant1(double s, double q) nogil
    enum: CUTANA_LUT_MULTI
    Py_ssize_t cutana_lut_f32(
        const float* x, Py_ssize_t n, double vmin, double scale_b,
        const uint16_t* lut, Py_ssize_t n_bins, const double* thr_b,
        double eps_b, uint8_t* out, Py_ssize_t* pending) nogil
    Py_ssize_t cutana_lut_f64(
        const double* x, Py_ssize_t n, double vmin, double scale_b,
        const uint16_t* lut, Py_ssize_t n_bins, const double* thr_b,
        double eps_b, uint8_t* out, Py_ssize_t* pending) nogil
    Py_ssize_t cutana_nonfinite_f32(const float* x, Py_ssize_t n) nogil
    Py_ssize_t cutana_nonfinite_f64(const double* x, Py_ssize_t n) nogil
    void cutana_filter_f32(const float* x, Py_ssize_t n, float lo, float hi,
                           float* low, Py_ssize_t* n_low, float* high,
                           Py_ssize_t* n_high) nogil
    void cutana_filter_f64(const double* x, Py_ssize_t n, double lo, double hi,
                           double* low, Py_ssize_t* n_low, double* high,
                           Py_ssize_t* n_high) nogil
    Py_ssize_t cutana_filter_count_f32(
        const float* x, Py_ssize_t n, float lo, float hi, float* low,
        Py_ssize_t* n_low, float* high, Py_ssize_t* n_high) nogil
    Py_ssize_t cutana_filter_count_f64(
        const double* x, Py_ssize_t n, double lo, double hi, double* low,
        Py_ssize_t* n_low, double* high, Py_ssize_t* n_high) nogil
    int cutana_set_vector_loops(int on) nogil
    void cutana_init_pack_lut() nogil
    void cutana_radix_pair_f32(const float* src, Py_ssize_t m, Py_ssize_t r,
                               float* tmp, float* first, float* second) nogil
    void cutana_radix_pair_f64(const double* src, Py_ssize_t m, Py_ssize_t r,
                               double* tmp, double* first, double* second) nogil


__all__ = [
    "INTERVAL_PERCENTILE",
    "INTERVAL_ZSCALE",
    "STRETCH_ASINH",
    "STRETCH_LINEAR",
    "STRETCH_LOG",
    "STRETCH_NONE",
    "STRETCH_SQRT",
    "compute_limits",
    "normalize_stack",
]

cdef enum:
    _INTERVAL_PERCENTILE = 0
    _INTERVAL_ZSCALE = 1

cdef enum:
    _STRETCH_NONE = 0
    _STRETCH_LINEAR = 1
    _STRETCH_SQRT = 2
    _STRETCH_LOG = 3
    _STRETCH_ASINH = 4

cutana_init_pack_lut()  # the permutations of the AVX2 percentile filter

#: Limits from `~astropy.visualization.PercentileInterval`.
INTERVAL_PERCENTILE = _INTERVAL_PERCENTILE
#: Limits from `~astropy.visualization.ZScaleInterval`.
INTERVAL_ZSCALE = _INTERVAL_ZSCALE
#: Values passed through unchanged (float output only).
STRETCH_NONE = _STRETCH_NONE
#: `~astropy.visualization.LinearStretch`.
STRETCH_LINEAR = _STRETCH_LINEAR
#: `~astropy.visualization.SqrtStretch`.
STRETCH_SQRT = _STRETCH_SQRT
#: `~astropy.visualization.LogStretch`.
STRETCH_LOG = _STRETCH_LOG
#: `~astropy.visualization.AsinhStretch`.
STRETCH_ASINH = _STRETCH_ASINH

# ZScaleInterval's fixed parameters (astropy's defaults)
cdef enum:
    _ZS_MIN_NPIXELS = 5
    _ZS_MAX_ITERATIONS = 5
cdef double _ZS_MAX_REJECT = 0.5
cdef double _ZS_KREJ = 2.5

# half-width, in scaled units, of the neighbourhood of a quantisation
# threshold in which the lookup table defers to direct evaluation
cdef double _LUT_EPS = 1e-9

ctypedef fused out_t:
    float
    uint8_t
    uint16_t


# --------------------------------------------------------------------------
# selection and percentiles
# --------------------------------------------------------------------------


cdef void _select(
    floating* a, Py_ssize_t left, Py_ssize_t right, Py_ssize_t k
) noexcept nogil:
    """Floyd-Rivest selection: afterwards ``a[k]`` is the k-th smallest of
    ``a[left:right + 1]``, with no larger value before it and no smaller one
    after it (within that range)."""
    cdef Py_ssize_t n, i, j, new_left, new_right
    cdef double z, s, sd, m, dn
    cdef floating t
    while right > left:
        if right - left > 600:
            n = right - left + 1
            dn = <double> n
            m = <double> (k - left + 1)
            z = log(dn)
            s = 0.5 * exp(2.0 * z / 3.0)
            sd = 0.5 * sqrt(z * s * (dn - s) / dn)
            if m - dn / 2.0 < 0:
                sd = -sd
            new_left = <Py_ssize_t> floor(k - m * s / dn + sd)
            new_right = <Py_ssize_t> floor(k + (dn - m) * s / dn + sd)
            if new_left < left:
                new_left = left
            if new_right > right:
                new_right = right
            _select(a, new_left, new_right, k)
        t = a[k]
        i = left
        j = right
        a[left], a[k] = a[k], a[left]
        if a[right] > t:
            a[left], a[right] = a[right], a[left]
        while i < j:
            a[i], a[j] = a[j], a[i]
            i += 1
            j -= 1
            while a[i] < t:
                i += 1
            while a[j] > t:
                j -= 1
        if a[left] == t:
            a[left], a[j] = a[j], a[left]
        else:
            j += 1
            a[j], a[right] = a[right], a[j]
        if j <= k:
            left = j + 1
        if k <= j:
            right = j - 1


cdef Py_ssize_t _pair(
    floating* a, Py_ssize_t left, Py_ssize_t right, Py_ssize_t p,
    floating* first, floating* second,
) noexcept nogil:
    """Order statistics ``p`` and ``p + 1`` (``p + 1 <= right``) of
    ``a[left:right + 1]``, by one selection and a scan of the shorter side.

    Returns the index at which the range was partitioned.
    """
    cdef Py_ssize_t q
    cdef floating v
    if p - left < right - p:
        _select(a, left, right, p + 1)
        second[0] = a[p + 1]
        v = a[left]
        for q in range(left + 1, p + 1):
            if a[q] > v:
                v = a[q]
        first[0] = v
        return p + 1
    _select(a, left, right, p)
    first[0] = a[p]
    v = a[p + 1]
    for q in range(p + 2, right + 1):
        if a[q] < v:
            v = a[q]
    second[0] = v
    return p


cdef inline double _lerp(floating lo, floating hi, double gamma) noexcept nogil:
    """``numpy.percentile``'s interpolation (``_lerp``), with the difference
    taken in the data's own precision as numpy does."""
    cdef floating diff = hi - lo
    if gamma >= 0.5:
        return <double> hi - <double> diff * (1.0 - gamma)
    return <double> lo + <double> diff * gamma


cdef void _percentiles(
    floating* a, Py_ssize_t n, double q_lo, double q_hi,
    double* vmin, double* vmax,
) noexcept nogil:
    """The ``q_lo`` and ``q_hi`` quantiles (fractions, ``q_lo <= q_hi``) of
    ``a[:n]`` (finite, ``n >= 1``; reordered in place), as `numpy.percentile`."""
    cdef double vi_lo = (n - 1) * q_lo
    cdef double vi_hi = (n - 1) * q_hi
    cdef Py_ssize_t p_lo, p_hi, split, q
    cdef floating a0, a1, b0, b1, v
    cdef double g_lo, g_hi
    if n == 1:
        vmin[0] = a[0]
        vmax[0] = a[0]
        return
    # lower quantile
    if vi_lo >= n - 1:
        p_lo = n - 1
        v = a[0]
        for q in range(1, n):
            if a[q] > v:
                v = a[q]
        vmin[0] = v
        vmax[0] = v
        return
    p_lo = <Py_ssize_t> floor(vi_lo)
    g_lo = vi_lo - floor(vi_lo)
    split = _pair(a, 0, n - 1, p_lo, &a0, &a1)
    vmin[0] = _lerp(a0, a1, g_lo)
    # upper quantile: all values after ``split`` are >= a[split]
    if vi_hi >= n - 1:
        v = a[split]
        for q in range(split + 1, n):
            if a[q] > v:
                v = a[q]
        vmax[0] = v
        return
    p_hi = <Py_ssize_t> floor(vi_hi)
    g_hi = vi_hi - floor(vi_hi)
    if p_hi == p_lo:
        b0 = a0
        b1 = a1
    elif p_hi == split:
        # split == p_lo + 1, so a[split] is order statistic p_hi
        b0 = a[split]
        b1 = a[split + 1]
        for q in range(split + 2, n):
            if a[q] < b1:
                b1 = a[q]
    else:
        _pair(a, split + 1, n - 1, p_hi, &b0, &b1)
    vmax[0] = _lerp(b0, b1, g_hi)


cdef inline Py_ssize_t _count_nonfinite(const floating* v, Py_ssize_t n) noexcept nogil:
    """Number of NaN and infinite values in ``v[:n]`` (a vector loop)."""
    if floating is float:
        return cutana_nonfinite_f32(v, n)
    else:
        return cutana_nonfinite_f64(v, n)


cdef Py_ssize_t _gather_finite(
    const floating* img, Py_ssize_t width, Py_ssize_t r0, Py_ssize_t r1,
    Py_ssize_t c0, Py_ssize_t c1, floating* buf,
) noexcept nogil:
    """Copy the finite pixels of ``img[r0:r1, c0:c1]`` (row-major) to ``buf``."""
    cdef Py_ssize_t r, c, n = 0, w = c1 - c0
    cdef const floating* row
    cdef floating v
    for r in range(r0, r1):
        row = img + r * width + c0
        if _count_nonfinite(row, w) == 0:
            memcpy(buf + n, row, w * sizeof(floating))
            n += w
            continue
        for c in range(w):
            v = row[c]
            buf[n] = v
            n += isfinite(v)
    return n


cdef enum:
    # most pixels probed to place the filter thresholds (`_probe_size`)
    _N_PROBE = 1024
    _MIN_PROBE = 128

#: Pixels probed per square root of the region's pixels (`_probe_size`).
cdef double _PROBE_PER_ROOT = 3.5


cdef inline Py_ssize_t _probe_size(Py_ssize_t npix) noexcept nogil:
    """Pixels `_percentiles_filtered` probes in a region of ``npix``, or 0
    when the region is too small for the filter (under 512 pixels: a probe
    of `_MIN_PROBE` needs four pixels of the region each).

    Probing costs in proportion to the probe, selecting among the pixels
    collected in proportion to ``npix`` over the probe (a larger probe
    places tighter thresholds; the pass that collects them costs the same
    either way), so the probe grows as the square root of ``npix``, up to
    `_N_PROBE`: 140 pixels of a 40 x 40 cutout, 224 of a 64 x 64 one, 525
    of the paper workload's 150 x 150 ones, where 7 per root (twice as
    many) took 25 % longer at 40 and 64 pixels and as long at 150 and 300.
    """
    cdef Py_ssize_t k = <Py_ssize_t> (_PROBE_PER_ROOT * sqrt(<double> npix))
    if k > _N_PROBE:
        k = _N_PROBE
    if k > npix // 4:
        k = npix // 4
    return k if k >= _MIN_PROBE else 0


cdef inline Py_ssize_t _probe_rank(
    Py_ssize_t k, Py_ssize_t n, Py_ssize_t m
) noexcept nogil:
    """0-based rank, in a probe of ``m`` of ``n`` values, below which at least
    ``k`` of the ``n`` values almost surely lie (mean plus 3 sigma plus 3)."""
    cdef double f = (<double> k) / n
    return <Py_ssize_t> (m * f + 3.0 * sqrt(m * f * (1.0 - f)) + 3.0)


cdef inline void _insert_low(floating* keep, Py_ssize_t j, floating v) noexcept nogil:
    """Insert ``v`` into ascending ``keep[:j + 1]`` (``keep[j]`` is dropped)."""
    while j > 0 and keep[j - 1] > v:
        keep[j] = keep[j - 1]
        j -= 1
    keep[j] = v


cdef inline void _insert_high(floating* keep, Py_ssize_t j, floating v) noexcept nogil:
    """Insert ``v`` into descending ``keep[:j + 1]`` (``keep[j]`` is dropped)."""
    while j > 0 and keep[j - 1] < v:
        keep[j] = keep[j - 1]
        j -= 1
    keep[j] = v


cdef void _extreme_ranks(
    const floating* a, Py_ssize_t m, Py_ssize_t r_lo, Py_ssize_t r_hi,
    floating* lo, floating* hi,
) noexcept nogil:
    """The ``r_lo``-th smallest and ``r_hi``-th largest (0-based, both < 64,
    both < ``m``) of ``a[:m]``, in one pass that keeps the few extreme
    values in order; past the first values, most are rejected by two
    comparisons with thresholds held in registers."""
    cdef floating small[64]
    cdef floating large[64]
    cdef Py_ssize_t i, start = (r_lo if r_lo > r_hi else r_hi) + 1
    cdef floating v, t_small, t_large
    for i in range(start):  # fill both lists (the longer one decides)
        v = a[i]
        if i <= r_lo:
            _insert_low(small, i, v)
        elif v < small[r_lo]:
            _insert_low(small, r_lo, v)
        if i <= r_hi:
            _insert_high(large, i, v)
        elif v > large[r_hi]:
            _insert_high(large, r_hi, v)
    t_small = small[r_lo]
    t_large = large[r_hi]
    for i in range(start, m):
        v = a[i]
        if v < t_small:
            _insert_low(small, r_lo, v)
            t_small = small[r_lo]
        if v > t_large:
            _insert_high(large, r_hi, v)
            t_large = large[r_hi]
    lo[0] = t_small
    hi[0] = t_large


cdef inline void _radix_pair_of(
    const floating* src, Py_ssize_t m, Py_ssize_t r, floating* tmp,
    floating* first, floating* second,
) noexcept nogil:
    """`cutana_radix_pair_f32` or `cutana_radix_pair_f64`, by the type."""
    if floating is float:
        cutana_radix_pair_f32(src, m, r, tmp, first, second)
    else:
        cutana_radix_pair_f64(src, m, r, tmp, first, second)


cdef bint _percentiles_filtered(
    const floating* img, Py_ssize_t width, Py_ssize_t r0, Py_ssize_t r1,
    Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t* n_finite, double q_lo, double q_hi,
    floating* buf, floating* probe, Py_ssize_t* probe_at, Py_ssize_t* probe_k,
    double* vmin, double* vmax,
) noexcept nogil:
    """`_percentiles` of the finite pixels of a region, for quantiles near
    both ends, without copying the region.

    Thresholds ``t_lo < t_hi`` placed with a probe of `_probe_size` pixels on
    a regular grid are expected to have a few times more pixels below
    (above) them than the order statistics needed; one pass collects those
    pixels into ``buf`` (low ones from the front, high ones from the back)
    and counts the non-finite pixels, and the order statistics are selected
    among the collected ones. The number of finite pixels is estimated from
    the probe to place the thresholds; the pass then counts it exactly, and
    the collected pixels are checked against that count. When a threshold
    turns out too tight (too few pixels collected), the pass is made again
    with that side's probe rank twice as far in (at most twice). When it is
    still too tight, or the quantiles are not extreme enough for this to pay
    off, returns False and leaves the work to `_percentiles`.
    ``n_finite[0]`` is set to the number of finite pixels once the pass has
    been made (and left alone otherwise). ``buf`` holds ``npix + 8`` values,
    ``probe`` `_N_PROBE`; ``probe_at[:probe_k[0]]`` are the offsets from
    ``img`` of the pixels probed, set by the first call of a stack (its
    images share the region and width), ``probe_k[0]`` -1 before.
    """
    cdef Py_ssize_t npix = (r1 - r0) * (c1 - c0), w = c1 - c0
    cdef double vi_lo, vi_hi
    cdef Py_ssize_t p_lo, p_hi, need_lo, need_hi, m = 0, j, pos, r, n, bad = 0
    cdef Py_ssize_t col, step, step_rem, rem, k = _probe_size(npix)
    cdef Py_ssize_t rank_lo, rank_hi, n_low = 0, n_high = 0, attempts = 0
    cdef floating t_lo, t_hi, v, a0, a1, b0, b1
    cdef const floating* row
    cdef floating* high
    if k == 0:
        return False
    if probe_k[0] != k:
        # the probe takes pixel floor((2 j + 1) npix / (2 k)) of the region
        # for j < k, walking it in steps of the quotient with the remainder
        # carried (no division per pixel) and keeping its row and column
        step = (2 * npix) // (2 * k)
        step_rem = (2 * npix) % (2 * k)
        pos = npix // (2 * k)
        rem = npix % (2 * k)
        r = r0 + pos // w
        col = pos % w
        for j in range(k):
            probe_at[j] = r * width + c0 + col
            col += step
            rem += step_rem
            if rem >= 2 * k:
                rem -= 2 * k
                col += 1
            while col >= w:
                col -= w
                r += 1
        probe_k[0] = k
    for j in range(k):
        v = img[probe_at[j]]
        probe[m] = v
        m += isfinite(v)
    if m < k // 4:
        return False
    # finite pixels, as the probe suggests (all of them when it saw no other)
    n = (npix * m) // k
    vi_lo = (n - 1) * q_lo
    vi_hi = (n - 1) * q_hi
    if n < 4 * k or vi_lo >= n - 1 or vi_hi >= n - 1:
        return False
    need_lo = (<Py_ssize_t> floor(vi_lo)) + 2   # order statistics 0 .. p_lo + 1
    need_hi = n - (<Py_ssize_t> floor(vi_hi))   # order statistics p_hi .. n - 1
    if 16 * need_lo > n or 16 * need_hi > n:
        return False
    rank_lo = _probe_rank(need_lo, n, m)
    rank_hi = m - 1 - _probe_rank(need_hi, n, m)
    while True:
        if rank_lo >= rank_hi:
            return False
        if rank_lo < 64 and m - 1 - rank_hi < 64:
            _extreme_ranks(probe, m, rank_lo, m - 1 - rank_hi, &t_lo, &t_hi)
        else:
            _select(probe, 0, m - 1, rank_lo)
            t_lo = probe[rank_lo]
            _select(probe, rank_lo + 1, m - 1, rank_hi)
            t_hi = probe[rank_hi]
        if not t_lo < t_hi:
            return False
        # high values go to buf[npix + 7], buf[npix + 6], ... The AVX2
        # filter stores whole vectors of 8 past the values' ends: the first
        # high store is buf[npix:npix + 8] (room left before the probe),
        # and as at most npix values are collected, each side's 8 lie in
        # the other's free room
        high = buf + npix + 8
        n_low = n_high = bad = 0
        # whole rows are one run of pixels: one pass over them all (the
        # vector loop then has no short tail per row)
        n = 1 if w == width else r1 - r0
        for r in range(n):
            row = img + (r0 + r) * width + c0
            if floating is float:
                bad += cutana_filter_count_f32(row, npix // n, t_lo, t_hi, buf,
                                               &n_low, high, &n_high)
            else:
                bad += cutana_filter_count_f64(row, npix // n, t_lo, t_hi, buf,
                                               &n_low, high, &n_high)
        # the exact count of finite pixels, and what it asks of the collection
        n = npix - bad
        n_finite[0] = n
        if n < 2:
            return False
        vi_lo = (n - 1) * q_lo
        vi_hi = (n - 1) * q_hi
        if vi_lo >= n - 1 or vi_hi >= n - 1:
            return False
        p_lo = <Py_ssize_t> floor(vi_lo)
        p_hi = <Py_ssize_t> floor(vi_hi)
        if n_low >= p_lo + 2 and n_high >= n - p_hi:
            break
        # a threshold too tight (the probe is a sample of pixels that lie
        # together, so its ranks spread more than a random sample's): that
        # side's probe rank goes twice as far in, once or twice
        attempts += 1
        if attempts > 2:
            return False
        if n_low < p_lo + 2:
            rank_lo = 2 * rank_lo + 4
        if n_high < n - p_hi:
            rank_hi = m - 1 - (2 * (m - 1 - rank_hi) + 4)
    # the collected low values hold order statistics 0 .. n_low - 1, the
    # high ones n - n_high .. n - 1
    _radix_pair_of(buf, n_low, p_lo, buf, &a0, &a1)
    vmin[0] = _lerp(a0, a1, vi_lo - floor(vi_lo))
    high = high - n_high
    _radix_pair_of(high, n_high, p_hi - (n - n_high), high, &b0, &b1)
    vmax[0] = _lerp(b0, b1, vi_hi - floor(vi_hi))
    return True


# --------------------------------------------------------------------------
# zscale
# --------------------------------------------------------------------------


cdef void _sift_down(floating* a, Py_ssize_t root, Py_ssize_t n) noexcept nogil:
    """Restore the max-heap property below ``root`` in ``a[:n]``."""
    cdef Py_ssize_t child
    while 2 * root + 1 < n:
        child = 2 * root + 1
        if child + 1 < n and a[child] < a[child + 1]:
            child += 1
        if not a[root] < a[child]:
            return
        a[root], a[child] = a[child], a[root]
        root = child


cdef void _heapsort(floating* a, Py_ssize_t n) noexcept nogil:
    """Sort ``a[:n]`` in place (the fallback of `_sort`)."""
    cdef Py_ssize_t k
    for k in range(n // 2 - 1, -1, -1):
        _sift_down(a, k, n)
    for k in range(n - 1, 0, -1):
        a[0], a[k] = a[k], a[0]
        _sift_down(a, 0, k)


cdef void _sort(floating* a, Py_ssize_t n, int depth) noexcept nogil:
    """Sort ``a[:n]`` (finite values) in place: quicksort with a median-of-3
    pivot and Hoare partition, insertion sort for short runs, heapsort when
    ``depth`` runs out."""
    cdef Py_ssize_t i, j, mid
    cdef floating pivot, tmp
    while n > 16:
        if depth == 0:
            _heapsort(a, n)
            return
        depth -= 1
        mid = n // 2
        if a[mid] < a[0]:
            a[mid], a[0] = a[0], a[mid]
        if a[n - 1] < a[0]:
            a[n - 1], a[0] = a[0], a[n - 1]
        if a[n - 1] < a[mid]:
            a[n - 1], a[mid] = a[mid], a[n - 1]
        pivot = a[mid]
        i = -1
        j = n
        while True:
            i += 1
            while a[i] < pivot:
                i += 1
            j -= 1
            while pivot < a[j]:
                j -= 1
            if i >= j:
                break
            a[i], a[j] = a[j], a[i]
        # a[:j + 1] <= pivot <= a[j + 1:]; recurse on the shorter part
        if j + 1 < n - j - 1:
            _sort(a, j + 1, depth)
            a += j + 1
            n -= j + 1
        else:
            _sort(a + j + 1, n - j - 1, depth)
            n = j + 1
    for i in range(1, n):
        tmp = a[i]
        j = i - 1
        while j >= 0 and tmp < a[j]:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = tmp


cdef void _zscale(
    const floating* img, Py_ssize_t width, Py_ssize_t r0, Py_ssize_t r1,
    Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t n_samples, double contrast,
    floating* samples, uint8_t* bad, uint8_t* grown,
    double* vmin, double* vmax, uint8_t* unsure,
) noexcept nogil:
    """`astropy.visualization.ZScaleInterval.get_limits` on the finite pixels
    of ``img[r0:r1, c0:c1]``; NaN limits when there is no finite pixel.

    ``samples``, ``bad`` and ``grown`` hold at least ``n_samples`` items.
    ``unsure[0]`` is set to 1 when the samples kept in some iteration lie
    exactly on the fitted line (all or most samples equal), or all samples
    lie within a few units of their last place of each other (two values
    one apart, as a 1-pixel box resampled gives): there astropy's
    least-squares fit leaves residuals and a slope of rounding size, and its
    limits (which samples it rejects, often all, falling back to the extreme
    samples; or limits a rounding apart, even inverted) are decided by
    rounding; the caller then asks astropy. 0 otherwise.
    """
    cdef Py_ssize_t r, c, n_finite = 0, stride, counter, npix = 0, i, j, w
    cdef Py_ssize_t minpix, ngrow, half, ngood, last_ngood, lo, hi, center
    cdef Py_ssize_t n_fit
    cdef const floating* row
    cdef floating v, median
    cdef double sx, sy, mx, my, sxx, sxy, slope = 0.0, intercept = 0.0
    cdef double flat, mean, var, threshold
    cdef double lo_lim, hi_lim
    cdef double eps = FLT_EPSILON if floating is float else DBL_EPSILON
    cdef bint have_fit = False

    unsure[0] = 0
    for r in range(r0, r1):
        n_finite += (c1 - c0) - _count_nonfinite(img + r * width + c0, c1 - c0)
    if n_finite == 0:
        vmin[0] = nan("")
        vmax[0] = nan("")
        return
    # stride = int(max(1.0, values.size / n_samples))
    stride = <Py_ssize_t> ((<double> n_finite) / (<double> n_samples))
    if stride < 1:
        stride = 1
    # samples = values[::stride][:n_samples]
    if n_finite == (r1 - r0) * (c1 - c0):
        # all finite: sample j is pixel j * stride of the region
        w = c1 - c0
        while npix < n_samples and npix * stride < n_finite:
            j = npix * stride
            samples[npix] = img[(r0 + j // w) * width + c0 + j % w]
            npix += 1
    else:
        counter = 0  # finite values to skip before the next sample
        for r in range(r0, r1):
            if npix >= n_samples:
                break
            row = img + r * width
            for c in range(c0, c1):
                v = row[c]
                if not isfinite(v):
                    continue
                if counter == 0:
                    samples[npix] = v
                    npix += 1
                    if npix >= n_samples:
                        break
                    counter = stride
                counter -= 1
    _sort(samples, npix, 64)

    vmin[0] = samples[0]
    vmax[0] = samples[npix - 1]
    if vmax[0] - vmin[0] <= 16 * eps * fmax(fabs(vmin[0]), fabs(vmax[0])):
        unsure[0] = 1  # (a spread of rounding size: see above)

    minpix = <Py_ssize_t> (npix * _ZS_MAX_REJECT)
    if minpix < _ZS_MIN_NPIXELS:
        minpix = _ZS_MIN_NPIXELS
    ngrow = <Py_ssize_t> (npix * 0.01)
    if ngrow < 1:
        ngrow = 1
    half = (ngrow - 1) // 2
    for i in range(npix):
        bad[i] = 0
    ngood = npix
    last_ngood = npix + 1

    for _ in range(_ZS_MAX_ITERATIONS):
        if ngood >= last_ngood or ngood < minpix:
            break
        # least-squares line through the good samples (x = index)
        sx = 0.0
        sy = 0.0
        n_fit = 0
        for i in range(npix):
            if not bad[i]:
                sx += i
                sy += samples[i]
                n_fit += 1
        mx = sx / n_fit
        my = sy / n_fit
        sxx = 0.0
        sxy = 0.0
        for i in range(npix):
            if not bad[i]:
                sxx += (i - mx) * (i - mx)
                sxy += (i - mx) * (samples[i] - my)
        slope = sxy / sxx
        intercept = my - slope * mx
        have_fit = True
        # k-sigma threshold from the standard deviation of the good residuals
        mean = 0.0
        for i in range(npix):
            if not bad[i]:
                mean += samples[i] - (slope * i + intercept)
        mean /= n_fit
        var = 0.0
        for i in range(npix):
            if not bad[i]:
                flat = samples[i] - (slope * i + intercept) - mean
                var += flat * flat
        threshold = _ZS_KREJ * sqrt(var / n_fit)
        if var == 0:
            unsure[0] = 1
        for i in range(npix):
            flat = samples[i] - (slope * i + intercept)
            if flat < -threshold or flat > threshold:
                bad[i] = 1
        # grow the rejected samples as np.convolve(bad, ones(ngrow), 'same')
        for i in range(npix):
            grown[i] = 0
        for j in range(npix):
            if bad[j]:
                lo = j - half
                hi = j - half + ngrow
                if lo < 0:
                    lo = 0
                if hi > npix:
                    hi = npix
                for i in range(lo, hi):
                    grown[i] = 1
        for i in range(npix):
            bad[i] = grown[i]
        last_ngood = ngood
        ngood = 0
        for i in range(npix):
            ngood += 1 - bad[i]

    if have_fit and ngood >= minpix:
        if contrast > 0:
            slope = slope / contrast
        center = (npix - 1) // 2
        if npix % 2 == 1:
            median = samples[npix // 2]
        else:
            # np.median: mean of the two middle values in the data's precision
            median = samples[npix // 2 - 1] + samples[npix // 2]
            median = median / 2
        lo_lim = median - (center - 1) * slope
        hi_lim = median + (npix - center) * slope
        if lo_lim > vmin[0]:
            vmin[0] = lo_lim
        if hi_lim < vmax[0]:
            vmax[0] = hi_lim


# --------------------------------------------------------------------------
# limits for a whole stack
# --------------------------------------------------------------------------


cdef struct _Scratch:
    void* values      # finite pixels (percentile) or samples (zscale)
    uint8_t* flags    # rejection flags (zscale), 2 * n_samples
    Py_ssize_t* probe_at  # where the percentile filter probes (`_N_PROBE`)
    Py_ssize_t probe_k    # how many of them are set (-1: none yet)


cdef int _scratch_alloc(
    _Scratch* s, int interval, Py_ssize_t region_npix, Py_ssize_t n_samples,
    Py_ssize_t itemsize,
) noexcept nogil:
    """Allocate the scratch of one call; returns -1 on failure."""
    cdef Py_ssize_t n = region_npix if region_npix > 0 else 1
    s.values = NULL
    s.flags = NULL
    s.probe_at = NULL
    s.probe_k = -1
    if interval == _INTERVAL_ZSCALE:
        if n_samples < n:
            n = n_samples
        s.flags = <uint8_t*> malloc(2 * n)
        if s.flags == NULL:
            return -1
    else:
        # room for the filter's vector stores and the probe of `_percentiles_filtered`
        n += 8 + _N_PROBE
        s.probe_at = <Py_ssize_t*> malloc(_N_PROBE * sizeof(Py_ssize_t))
        if s.probe_at == NULL:
            return -1
    s.values = malloc(n * itemsize)
    if s.values == NULL:
        free(s.flags)
        free(s.probe_at)
        s.flags = NULL
        s.probe_at = NULL
        return -1
    return 0


cdef void _scratch_free(_Scratch* s) noexcept nogil:
    free(s.values)
    free(s.flags)
    free(s.probe_at)
    s.values = NULL
    s.flags = NULL
    s.probe_at = NULL


cdef void _limits_one(
    const floating* img, Py_ssize_t width, int interval, double q_lo,
    double q_hi, Py_ssize_t n_samples, double contrast, Py_ssize_t r0,
    Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t c1, _Scratch* s,
    double* vmin, double* vmax, Py_ssize_t* n_finite, uint8_t* unsure,
) noexcept nogil:
    """Limits of one image (NaN when it has no finite pixel in the region).

    ``n_finite[0]`` is set to the number of finite pixels of the region when
    it was counted on the way (percentile limits), to -1 otherwise;
    ``unsure[0]`` as `_zscale` sets it (0 for percentile limits).
    """
    cdef Py_ssize_t n = -1, r, cap = (r1 - r0) * (c1 - c0)
    n_finite[0] = -1
    unsure[0] = 0
    if interval == _INTERVAL_PERCENTILE:
        if _percentiles_filtered(
            img, width, r0, r1, c0, c1, &n, q_lo, q_hi, <floating*> s.values,
            (<floating*> s.values) + cap + 8, s.probe_at, &s.probe_k, vmin, vmax,
        ):
            n_finite[0] = n
            return
        if n < 0:  # the filter gave up before counting the finite pixels
            n = 0
            for r in range(r0, r1):
                n += (c1 - c0) - _count_nonfinite(img + r * width + c0, c1 - c0)
        n_finite[0] = n
        if n == 0:
            vmin[0] = nan("")
            vmax[0] = nan("")
        else:
            n = _gather_finite(img, width, r0, r1, c0, c1, <floating*> s.values)
            _percentiles(<floating*> s.values, n, q_lo, q_hi, vmin, vmax)
    else:
        if n_samples < cap:
            cap = n_samples
        _zscale(img, width, r0, r1, c0, c1, n_samples, contrast,
                <floating*> s.values, s.flags, s.flags + cap, vmin, vmax, unsure)


def _extreme_values(const double[::1] a, Py_ssize_t r_lo, Py_ssize_t r_hi):
    """``(r_lo-th smallest, r_hi-th largest)`` of ``a`` by the one-pass
    helper that places the percentile filter's thresholds (0-based ranks
    below 62); for tests."""
    cdef double lo, hi
    if not (0 <= r_lo < 62 and 0 <= r_hi < 62 and a.shape[0] >= 64):
        raise ValueError("ranks must be in [0, 62) and a hold at least 64 values")
    _extreme_ranks(&a[0], a.shape[0], r_lo, r_hi, &lo, &hi)
    return lo, hi


def _radix_pair(const floating[::1] a, Py_ssize_t r):
    """``(r-th smallest, r + 1-th smallest)`` (0-based) of the finite values
    ``a`` by the radix selection of the percentile filter; for tests."""
    cdef Py_ssize_t m = a.shape[0]
    cdef floating first, second
    cdef floating* tmp
    if not 0 <= r < m - 1:
        raise ValueError("r must be in [0, len(a) - 1)")
    tmp = <floating*> malloc(m * sizeof(floating))
    if tmp == NULL:
        raise MemoryError()
    _radix_pair_of(&a[0], m, r, tmp, &first, &second)
    free(tmp)
    return first, second


def _set_vector_loops(bint enabled):
    """Use (or stop using) the AVX2 loops (percentile filter, uint8 linear
    stretch); for tests. Results are the same either way.

    Parameters
    ----------
    enabled : bool
        Whether to use the AVX2 loops when the CPU has AVX2.

    Returns
    -------
    previous : bool
        Whether they were in use before the call.
    """
    return bool(cutana_set_vector_loops(enabled))


def _check_region(data, r0, r1, c0, c1):
    if not (0 <= r0 < r1 <= data.shape[1] and 0 <= c0 < c1 <= data.shape[2]):
        msg = (f"region rows {r0}:{r1}, columns {c0}:{c1} does not lie inside "
               f"images of shape {tuple(data.shape[1:])}")
        raise ValueError(msg)


def compute_limits(
    const floating[:, :, ::1] data,
    int interval,
    double q_lo,
    double q_hi,
    Py_ssize_t n_samples,
    double contrast,
    Py_ssize_t r0,
    Py_ssize_t r1,
    Py_ssize_t c0,
    Py_ssize_t c1,
    double[::1] vmin,
    double[::1] vmax,
    uint8_t[::1] unsure=None,
):
    """Per-image display limits of a stack.

    Parameters
    ----------
    data : memoryview of float32 or float64, shape ``(N, H, W)``
        The images, C-contiguous.
    interval : int
        ``INTERVAL_PERCENTILE`` or ``INTERVAL_ZSCALE``.
    q_lo, q_hi : float
        Lower and upper quantiles as fractions in [0, 1] (percentile only),
        ``q_lo <= q_hi``.
    n_samples : int
        Maximum number of samples (zscale only), at least 1.
    contrast : float
        The zscale contrast (zscale only).
    r0, r1, c0, c1 : int
        The region ``[r0:r1, c0:c1]`` of every image whose finite pixels
        determine the limits.
    vmin, vmax : memoryview of float64, shape ``(N,)``
        Output: the limits; NaN for an image without finite pixels.
    unsure : memoryview of uint8, shape ``(N,)``, optional
        Output: 1 for the images whose zscale limits astropy's rounding
        decides (see `_zscale`), else 0.
    """
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t i, width = data.shape[2], finite
    cdef int status = 0
    cdef _Scratch scratch
    cdef uint8_t flag
    cdef bint flags = unsure is not None
    if vmin.shape[0] != n or vmax.shape[0] != n:
        msg = f"vmin and vmax must have {n} items"
        raise ValueError(msg)
    if flags and unsure.shape[0] != n:
        msg = f"unsure must have {n} items"
        raise ValueError(msg)
    if interval not in (_INTERVAL_PERCENTILE, _INTERVAL_ZSCALE):
        msg = f"unknown interval code {interval}"
        raise ValueError(msg)
    if not (0.0 <= q_lo <= q_hi <= 1.0):
        msg = f"quantiles must satisfy 0 <= q_lo <= q_hi <= 1, got {q_lo}, {q_hi}"
        raise ValueError(msg)
    if n_samples < 1:
        msg = f"n_samples must be at least 1, got {n_samples}"
        raise ValueError(msg)
    if n == 0:
        return
    _check_region(data, r0, r1, c0, c1)
    with nogil:
        status = _scratch_alloc(&scratch, interval, (r1 - r0) * (c1 - c0),
                                n_samples, sizeof(floating))
        if status == 0:
            for i in range(n):
                _limits_one(&data[i, 0, 0], width, interval, q_lo, q_hi,
                            n_samples, contrast, r0, r1, c0, c1, &scratch,
                            &vmin[i], &vmax[i], &finite, &flag)
                if flags:
                    unsure[i] = flag
            _scratch_free(&scratch)
    if status != 0:
        raise MemoryError("could not allocate scratch memory for the limits")


# --------------------------------------------------------------------------
# stretch and quantisation
# --------------------------------------------------------------------------


cdef inline double _stretch(
    double u, int stretch, double a, double norm
) noexcept nogil:
    """astropy's stretch of ``u`` in [0, 1], operation by operation."""
    if stretch == _STRETCH_SQRT:
        return sqrt(u)
    if stretch == _STRETCH_LOG:
        return log(u * a + 1.0) / norm
    if stretch == _STRETCH_ASINH:
        return asinh(u / a) / norm
    return u


cdef inline double _inverse(
    double s, int stretch, double a, double norm
) noexcept nogil:
    """Inverse of `_stretch` (to place the quantisation thresholds)."""
    if stretch == _STRETCH_SQRT:
        return s * s
    if stretch == _STRETCH_LOG:
        return expm1(s * log1p(a)) / a
    if stretch == _STRETCH_ASINH:
        return a * sinh(s * norm)
    return s


cdef inline void _store(out_t* dst, double s) noexcept nogil:
    """Write a stretched value in [0, 1] to the output type."""
    if out_t is float:
        dst[0] = <float> s
    elif out_t is uint8_t:
        dst[0] = <uint8_t> cutana_quant1(s, 255.0)
    else:
        dst[0] = <uint16_t> cutana_quant1(s, 65535.0)


cdef void _build_lut(
    uint16_t* lut, double* thr_b, Py_ssize_t n_bins, int stretch, double a,
    double norm,
) noexcept nogil:
    """The lookup table of ``cutana_lut_f32`` for uint8 output.

    Code ``k`` starts where ``stretch(u) * 255`` reaches ``k - 0.5``. The
    thresholds ``thr_b[k]`` (in units of bins, ``u * n_bins``) are placed
    with the inverse stretch, which agrees with the forward one far more
    closely than ``_LUT_EPS`` for the parameters that `_use_lut` admits.
    Bin ``b`` covers ``[b, b + 1)`` (bin ``n_bins`` holds ``u = 1``); every
    threshold within ``_LUT_EPS * n_bins`` of a bin is recorded in it.
    """
    cdef Py_ssize_t b, lo, hi, k
    cdef double eps_b = _LUT_EPS * n_bins
    thr_b[0] = INFINITY
    for k in range(1, 256):
        thr_b[k] = _inverse((k - 0.5) / 255.0, stretch, a, norm) * n_bins
    # code at the lower edge of bin b = number of thresholds below b, i.e.
    # thresholds with floor(thr_b) < b
    lo = 0
    for k in range(1, 256):
        hi = <Py_ssize_t> floor(thr_b[k]) + 1
        if hi > n_bins + 1:
            hi = n_bins + 1
        for b in range(lo, hi):
            lut[b] = <uint16_t> (k - 1)
        if hi > lo:
            lo = hi
    for b in range(lo, n_bins + 1):
        lut[b] = 255
    for k in range(1, 256):
        lo = <Py_ssize_t> floor(thr_b[k] - eps_b)
        hi = <Py_ssize_t> floor(thr_b[k] + eps_b)
        if lo < 0:
            lo = 0
        if hi > n_bins:
            hi = n_bins
        for b in range(lo, hi + 1):
            if lut[b] > 0xFF:
                lut[b] = CUTANA_LUT_MULTI
            else:
                # the lower-edge code of a bin holding threshold k is k - 1
                # unless the threshold lies (within eps) below the edge
                lut[b] = <uint16_t> ((k << 8) | (k - 1)) if thr_b[k] >= b else (
                    CUTANA_LUT_MULTI)


cdef bint _use_lut(int stretch, double a, Py_ssize_t npix) noexcept nogil:
    """Whether the lookup table pays off and is known to be exact."""
    if npix < 1024:
        return False
    if stretch == _STRETCH_SQRT:  # the inverse, s * s, is exact to an ulp
        return True
    if stretch == _STRETCH_LOG:
        return 1e-3 <= a <= 1e12
    if stretch == _STRETCH_ASINH:
        return 1e-8 <= a <= 1e8
    return False


cdef void _stretch_lut(
    const floating* img, Py_ssize_t npix, double vmin, double div,
    int stretch, double a, double norm, uint8_t* out, uint16_t* lut,
    Py_ssize_t n_bins, const double* thr_b, Py_ssize_t* pending,
) noexcept nogil:
    """uint8 codes through the lookup table (built by `_build_lut`),
    straight from the pixels.

    A pixel in a bin holding one threshold gets its code by comparing its
    scaled value with the threshold; only pixels within ``_LUT_EPS`` of a
    threshold, or in a bin holding several, are evaluated directly. Either
    way the code is the one direct evaluation gives.
    """
    cdef Py_ssize_t k, n_pending
    cdef double eps_b = _LUT_EPS * n_bins
    cdef double scale_b = n_bins * (1.0 / div)
    if floating is float:
        n_pending = cutana_lut_f32(img, npix, vmin, scale_b, lut, n_bins, thr_b,
                                   eps_b, out, pending)
    else:
        n_pending = cutana_lut_f64(img, npix, vmin, scale_b, lut, n_bins, thr_b,
                                   eps_b, out, pending)
    for k in range(n_pending):
        out[pending[k]] = <uint8_t> cutana_quant1(
            _stretch(cutana_unit1(img[pending[k]], vmin, div), stretch, a, norm),
            255.0)


cdef void _stretch_image(
    const floating* img, Py_ssize_t npix, double vmin, double vmax,
    int stretch, double a, double norm, out_t* out, double* u, uint16_t* lut,
    Py_ssize_t n_bins, const double* thr_b, bint fast_linear, bint all_finite,
) noexcept nogil:
    """Scale, clip, stretch and quantise one image of ``npix`` pixels
    (``all_finite``: the image is known to hold no NaN or infinity).

    ``u`` is scratch for ``npix`` doubles: the image scaled to [0, 1] by the
    limits and clipped (astropy's ``BaseInterval.__call__`` operation by
    operation, in float64: no division when the limits are equal), then
    stretched in place; the lookup-table path uses it for its list of
    pixels to evaluate directly.
    """
    cdef Py_ssize_t k
    cdef double div
    cdef bint wide
    if stretch == _STRETCH_NONE:
        if out_t is float:
            for k in range(npix):
                out[k] = <float> img[k]
        return
    if not (isfinite(vmin) and isfinite(vmax)):
        for k in range(npix):
            out[k] = 0
        return
    # astropy divides by vmax - vmin unless it is 0
    div = vmax - vmin
    if div == 0:
        div = 1.0
    # the fast paths scale by 1 / div (times the table's bins): not for limits
    # so close (below ~1e-300 apart) that this overflows
    wide = isfinite(32768.0 / div)
    if (out_t is uint8_t and stretch == _STRETCH_LINEAR and fast_linear and wide
            and _linear_u8(img, npix, vmin, div, out)):
        pass
    elif out_t is uint8_t and lut != NULL and wide:
        _stretch_lut(img, npix, vmin, div, stretch, a, norm, out, lut, n_bins,
                     thr_b, <Py_ssize_t*> u)
    else:
        if floating is float:
            cutana_unit_f32(img, npix, vmin, div, u)
        else:
            cutana_unit_f64(img, npix, vmin, div, u)
        if stretch == _STRETCH_SQRT:
            cutana_sqrt(u, npix)
        elif stretch == _STRETCH_LOG:
            for k in range(npix):
                u[k] = log(u[k] * a + 1.0) / norm
        elif stretch == _STRETCH_ASINH:
            for k in range(npix):
                u[k] = asinh(u[k] / a) / norm
        if out_t is float:
            cutana_to_f32(u, npix, out)
        elif out_t is uint8_t:
            cutana_quant_u8(u, npix, out)
        else:
            cutana_quant_u16(u, npix, out)
    # non-finite pixels become 0 (an infinite one was scaled like any other)
    if not all_finite and _count_nonfinite(img, npix):
        for k in range(npix):
            if not isfinite(img[k]):
                out[k] = 0


cdef inline bint _linear_u8(
    const floating* img, Py_ssize_t npix, double vmin, double div, out_t* out
) noexcept nogil:
    """The uint8 linear fast path; False when the CPU cannot run it."""
    if out_t is not uint8_t:
        return False
    elif floating is float:
        return cutana_linear_u8_f32(img, npix, vmin, div, out)
    else:
        return cutana_linear_u8_f64(img, npix, vmin, div, out)


cdef double _norm_of(int stretch, double a) noexcept nogil:
    if stretch == _STRETCH_LOG:
        return log(a + 1.0)
    if stretch == _STRETCH_ASINH:
        return asinh(1.0 / a)
    return 1.0


def normalize_stack(
    const floating[:, :, ::1] data,
    out_t[:, :, ::1] out,
    int stretch,
    double a,
    double[::1] vmin,
    double[::1] vmax,
    bint compute,
    int interval=_INTERVAL_PERCENTILE,
    double q_lo=0.0,
    double q_hi=1.0,
    Py_ssize_t n_samples=1000,
    double contrast=0.25,
    Py_ssize_t r0=0,
    Py_ssize_t r1=-1,
    Py_ssize_t c0=0,
    Py_ssize_t c1=-1,
    bint allow_lut=True,
    const Py_ssize_t[::1] rows=None,
    uint8_t[::1] unsure=None,
):
    """Stretch every image of a stack into ``out``, image by image.

    Parameters
    ----------
    data : memoryview of float32 or float64, shape ``(N, H, W)``
        The images, C-contiguous.
    out : memoryview of float32, uint8 or uint16, shape ``(N, H, W)``
        Output; stretched values in [0, 1] for float32, times 255 or 65535
        rounded to nearest (half to even) for uint8 and uint16; 0 for
        non-finite pixels and for images whose limits are not finite.
        With ``rows``, shape ``(M, H, W)``.
    stretch : int
        One of the ``STRETCH_*`` codes. ``STRETCH_NONE`` copies the values
        (float32 output only; limits are neither computed nor used).
    a : float
        The log or asinh parameter (ignored otherwise), > 0.
    vmin, vmax : memoryview of float64, shape ``(N,)``
        The limits: input when ``compute`` is false, else output.
    compute : bool
        Whether to compute the limits (as `compute_limits`, with the
        remaining parameters) before stretching each image.
    interval, q_lo, q_hi, n_samples, contrast, r0, r1, c0, c1
        As in `compute_limits`; negative ``r1`` / ``c1`` mean the full
        height / width.
    allow_lut : bool, optional
        Use the exact fast paths for uint8 output: the lookup table for log
        and asinh, a multiplication checked for near-ties instead of the
        division for linear (testing switch; the result is the same either
        way).
    rows : memoryview of intp, shape ``(N,)``, optional
        Write image ``i`` into ``out[rows[i]]`` (each in ``[0, M)``)
        instead of ``out[i]``: e.g. straight into the rows of a larger
        output, without a copy.
    unsure : memoryview of uint8, shape ``(N,)``, optional
        As in `compute_limits` (when ``compute``): the caller stretches
        these images again with astropy's limits.
    """
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t npix = data.shape[1] * data.shape[2]
    cdef Py_ssize_t i, n_bins = 0, width = data.shape[2]
    cdef double norm
    cdef int status = 0
    cdef uint16_t* lut = NULL
    cdef double thr_b[256]
    cdef double* u = NULL
    cdef _Scratch scratch
    cdef bint do_limits = compute and stretch != _STRETCH_NONE
    cdef Py_ssize_t finite, dest
    cdef bint whole
    cdef uint8_t flag = 0
    cdef bint flags = unsure is not None
    if flags and unsure.shape[0] != n:
        msg = f"unsure must have {n} items"
        raise ValueError(msg)
    if rows is not None:
        if rows.shape[0] != n:
            msg = f"rows must have {n} items, got {rows.shape[0]}"
            raise ValueError(msg)
        for i in range(n):
            if not 0 <= rows[i] < out.shape[0]:
                msg = f"rows[{i}] = {rows[i]} is not a row of out (0 to {out.shape[0] - 1})"
                raise ValueError(msg)
    if ((out.shape[0] != n and rows is None) or out.shape[1] != data.shape[1]
            or out.shape[2] != data.shape[2]):
        msg = "out must have the shape of data"
        raise ValueError(msg)
    if vmin.shape[0] != n or vmax.shape[0] != n:
        msg = f"vmin and vmax must have {n} items"
        raise ValueError(msg)
    if stretch not in (_STRETCH_NONE, _STRETCH_LINEAR, _STRETCH_SQRT, _STRETCH_LOG,
                       _STRETCH_ASINH):
        msg = f"unknown stretch code {stretch}"
        raise ValueError(msg)
    if stretch == _STRETCH_NONE and out_t is not float:
        msg = "stretch 'none' needs float32 output"
        raise ValueError(msg)
    if stretch in (_STRETCH_LOG, _STRETCH_ASINH) and not a > 0:
        msg = f"a must be > 0, got {a}"
        raise ValueError(msg)
    if r1 < 0:
        r1 = data.shape[1]
    if c1 < 0:
        c1 = data.shape[2]
    if compute and stretch != _STRETCH_NONE:
        if interval not in (_INTERVAL_PERCENTILE, _INTERVAL_ZSCALE):
            msg = f"unknown interval code {interval}"
            raise ValueError(msg)
        if not (0.0 <= q_lo <= q_hi <= 1.0):
            msg = f"quantiles must satisfy 0 <= q_lo <= q_hi <= 1, got {q_lo}, {q_hi}"
            raise ValueError(msg)
        if n_samples < 1:
            msg = f"n_samples must be at least 1, got {n_samples}"
            raise ValueError(msg)
    if n == 0 or npix == 0:
        return
    if do_limits:
        _check_region(data, r0, r1, c0, c1)
    # limits from the whole image count its finite pixels on the way
    whole = r0 == 0 and c0 == 0 and r1 == data.shape[1] and c1 == data.shape[2]
    norm = _norm_of(stretch, a)
    if out_t is uint8_t and allow_lut and _use_lut(stretch, a, npix):
        n_bins = 1024
        while n_bins < npix and n_bins < 32768:
            n_bins *= 2
    with nogil:
        if do_limits:
            status = _scratch_alloc(&scratch, interval, (r1 - r0) * (c1 - c0),
                                    n_samples, sizeof(floating))
        if status == 0 and stretch != _STRETCH_NONE:
            u = <double*> malloc(npix * sizeof(double))
            if u == NULL:
                status = -1
        if status == 0 and n_bins > 0:
            lut = <uint16_t*> malloc((n_bins + 1) * sizeof(uint16_t))
            if lut == NULL:
                status = -1
            else:
                # the table covers the scaled value in [0, 1]: it does not
                # depend on the image, so one serves the whole call
                _build_lut(lut, thr_b, n_bins, stretch, a, norm)
        if status == 0:
            for i in range(n):
                finite = -1
                if do_limits:
                    _limits_one(&data[i, 0, 0], width, interval, q_lo, q_hi,
                                n_samples, contrast, r0, r1, c0, c1, &scratch,
                                &vmin[i], &vmax[i], &finite, &flag)
                if flags:
                    unsure[i] = flag
                dest = i if rows is None else rows[i]
                _stretch_image(&data[i, 0, 0], npix, vmin[i], vmax[i], stretch,
                               a, norm, &out[dest, 0, 0], u, lut, n_bins, thr_b,
                               allow_lut, whole and finite == npix)
        free(u)
        free(lut)
        if do_limits:
            _scratch_free(&scratch)
    if status != 0:
        raise MemoryError("could not allocate scratch memory for the stretch")
