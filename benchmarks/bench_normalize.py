#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Benchmark: resampled, stretched uint8 cutouts, cutana's fused path against
numpy + scipy + astropy.visualization, in one run on the same data.

The workload is ESA Cutana's published one: many cutouts of ``--size`` pixels
from one big-endian float32 tile (as a FITS file stores it), resampled
bilinearly to ``--target`` pixels with aligned pixel centres, stretched with
``AsinhStretch(a)`` between ``PercentileInterval(P)`` limits and quantised to
uint8.

cutana
    `cutana.resample.extract_resampled` (copy, byte swap, fill and
    bilinear resampling in one compiled pass per cutout) followed by
    `cutana.normalization.normalize` (limits, stretch and quantisation in one
    compiled pass), on blocks of ``--chunk`` cutouts, ``--n-threads`` blocks
    at a time.
reference
    Per cutout: a numpy slice of the tile (converted to native float32, with
    zero fill where the box leaves the tile), ``scipy.ndimage.zoom(...,
    order=1, mode='nearest', grid_mode=True)`` (the same sample grid),
    ``AsinhStretch(a)(PercentileInterval(P)(...))`` and ``np.round(v * 255)``
    to uint8. It runs on one thread, on the first ``--reference-sources``
    cutouts, and its rate is extrapolated per cutout (the work per cutout is
    the same for every cutout).

The two paths take turns in ``--rounds`` rounds (each over its share of the
sources), so that a change in the machine's load affects both alike.

Both write into a preallocated uint8 stack whose memory has been touched
before the clock starts (the cost of the kernel zeroing fresh pages is left
out of both). Both results are compared on the cutouts both computed.

Example (the default workload: 50,000 cutouts of 64 -> 150 pixels from an
8000 x 8000 tile)::

    python benchmarks/bench_normalize.py
    python benchmarks/bench_normalize.py --n-sources 5000 --n-threads 2
"""

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def print_environment():
    """Print the versions and machine the figures were measured with."""
    import astropy
    import scipy

    import cutana

    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"scipy {scipy.__version__}, astropy {astropy.__version__}, "
        f"cutana {cutana.__version__}"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    )


def make_tile(size, n_sources, rng):
    """A big-endian float32 sky tile: background noise plus Gaussian galaxies."""
    tile = rng.standard_normal((size, size), dtype=np.float32)
    tile *= 0.05
    # one galaxy at each of n_sources random positions, 9 x 9 stamps
    ys = rng.integers(4, size - 4, n_sources)
    xs = rng.integers(4, size - 4, n_sources)
    flux = rng.lognormal(2.0, 1.5, n_sources).astype(np.float32)
    sigma = rng.uniform(0.8, 2.5, n_sources).astype(np.float32)
    dy, dx = np.mgrid[-4:5, -4:5].astype(np.float32)
    for k in range(0, n_sources, 10000):
        sl = slice(k, k + 10000)
        prof = np.exp(
            -(dy[None] ** 2 + dx[None] ** 2) / (2 * sigma[sl, None, None] ** 2)
        )
        prof *= (flux[sl] / (2 * np.pi * sigma[sl] ** 2))[:, None, None]
        np.add.at(
            tile,
            (
                ys[sl, None, None] + dy.astype(int)[None],
                xs[sl, None, None] + dx.astype(int)[None],
            ),
            prof,
        )
    return tile.astype(">f4")


def run_cutana(tile, starts, size, target, percentile, a, chunk, n_threads, out):
    """The fused cutana path, into the (N, target, target) uint8 ``out``."""
    from cutana.normalization import normalize
    from cutana.resample import extract_resampled

    n = len(starts)
    bounds = list(range(0, n, chunk)) + [n]
    blocks = list(zip(bounds[:-1], bounds[1:], strict=True))

    def work(block_ids):
        buf = np.empty((chunk, target, target), dtype=np.float32)
        for b in block_ids:
            lo, hi = blocks[b]
            extract_resampled(
                tile,
                starts[lo:hi],
                (size, size),
                (target, target),
                "bilinear",
                0.0,
                out=buf[: hi - lo],
            )
            normalize(
                buf[: hi - lo],
                "asinh",
                percentile=percentile,
                a=a,
                dtype="uint8",
                out=out[lo:hi],
            )

    if n_threads == 1:
        work(range(len(blocks)))
    else:
        with ThreadPoolExecutor(n_threads) as pool:
            parts = [range(t, len(blocks), n_threads) for t in range(n_threads)]
            for future in [pool.submit(work, p) for p in parts]:
                future.result()
    return out


def run_reference(tile, starts, size, target, percentile, a, out):
    """numpy + scipy + astropy.visualization, one cutout at a time, into ``out``."""
    from astropy.visualization import AsinhStretch, PercentileInterval
    from scipy import ndimage

    stretch = AsinhStretch(a)
    interval = PercentileInterval(percentile)
    ny, nx = tile.shape
    for i, (y0, x0) in enumerate(starts):
        y1, x1 = y0 + size, x0 + size
        if 0 <= y0 and 0 <= x0 and y1 <= ny and x1 <= nx:
            window = tile[y0:y1, x0:x1].astype(np.float32)
        else:
            window = np.zeros((size, size), dtype=np.float32)
            sy0, sx0 = max(y0, 0), max(x0, 0)
            sy1, sx1 = min(y1, ny), min(x1, nx)
            if sy1 > sy0 and sx1 > sx0:
                window[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0:sy1, sx0:sx1
                ]
        zoomed = ndimage.zoom(
            window, target / size, order=1, mode="nearest", grid_mode=True
        )
        values = stretch(interval(zoomed))
        out[i] = np.round(np.nan_to_num(values, nan=0.0) * 255)
    return out


def main(args=None):
    """Run the benchmark and print cutouts per second of both paths."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--n-sources",
        type=int,
        default=50_000,
        help="number of cutouts (default 50000)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=64,
        help="cutout size in pixels before resampling (default 64)",
    )
    parser.add_argument(
        "--target",
        type=int,
        default=150,
        help="cutout size after resampling (default 150)",
    )
    parser.add_argument(
        "--n-threads",
        type=int,
        default=1,
        help="threads of the cutana path (default 1; the reference is serial)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        default=8000,
        help="side of the square tile in pixels (default 8000)",
    )
    parser.add_argument(
        "--reference-sources",
        type=int,
        default=1000,
        help="cutouts the reference path is timed on (default 1000)",
    )
    parser.add_argument(
        "--chunk", type=int, default=16, help="cutouts per cutana call (default 16)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="rounds in which the two paths take turns (default 5)",
    )
    parser.add_argument("--percentile", type=float, default=99.8)
    parser.add_argument("--a", type=float, default=0.1, help="asinh softening")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(args)
    if (
        min(
            opts.n_sources,
            opts.n_threads,
            opts.chunk,
            opts.rounds,
            opts.reference_sources,
        )
        < 1
    ):
        parser.error(
            "--n-sources, --n-threads, --chunk, --rounds and "
            "--reference-sources must be positive"
        )
    opts.rounds = min(opts.rounds, opts.n_sources, opts.reference_sources)

    print_environment()
    rng = np.random.default_rng(opts.seed)
    t0 = time.perf_counter()
    tile = make_tile(opts.tile_size, max(1, opts.n_sources), rng)
    centres = rng.uniform(0, opts.tile_size, (opts.n_sources, 2))
    # first pixel as astropy's Cutout2D rounds it; boxes may leave the tile
    starts = np.ceil(centres - opts.size / 2).astype(np.int64)
    print(
        f"tile {tile.shape} {tile.dtype.str} ({tile.nbytes / 2**20:.0f} MiB) and "
        f"{opts.n_sources} boxes made in {time.perf_counter() - t0:.1f} s"
    )
    print(
        f"workload: {opts.n_sources} cutouts {opts.size} -> {opts.target} px, "
        f"bilinear, asinh(a={opts.a}) between {opts.percentile} percentile "
        f"limits, uint8"
    )

    # Both paths write into preallocated outputs whose pages are touched
    # beforehand, so that neither is charged for the kernel zeroing memory.
    n_ref = min(opts.reference_sources, opts.n_sources)
    fused = np.ones((opts.n_sources, opts.target, opts.target), dtype=np.uint8)
    ref = np.ones((n_ref, opts.target, opts.target), dtype=np.uint8)

    # warm up (imports, first calls)
    run_cutana(
        tile,
        starts[:64],
        opts.size,
        opts.target,
        opts.percentile,
        opts.a,
        opts.chunk,
        1,
        fused[:64],
    )
    run_reference(
        tile, starts[:8], opts.size, opts.target, opts.percentile, opts.a, ref[:8]
    )
    # The two paths take turns, in --rounds rounds each over its share of the
    # sources, so that both see the same machine load over the run.
    t_fused = t_ref = 0.0
    fused_bounds = np.linspace(0, opts.n_sources, opts.rounds + 1).astype(int)
    ref_bounds = np.linspace(0, n_ref, opts.rounds + 1).astype(int)
    for r in range(opts.rounds):
        lo, hi = fused_bounds[r], fused_bounds[r + 1]
        t0 = time.perf_counter()
        run_cutana(
            tile,
            starts[lo:hi],
            opts.size,
            opts.target,
            opts.percentile,
            opts.a,
            opts.chunk,
            opts.n_threads,
            fused[lo:hi],
        )
        t_fused += time.perf_counter() - t0
        lo, hi = ref_bounds[r], ref_bounds[r + 1]
        t0 = time.perf_counter()
        run_reference(
            tile,
            starts[lo:hi],
            opts.size,
            opts.target,
            opts.percentile,
            opts.a,
            ref[lo:hi],
        )
        t_ref += time.perf_counter() - t0
    rate_fused = opts.n_sources / t_fused
    rate_ref = n_ref / t_ref

    diff = np.abs(fused[:n_ref].astype(int) - ref.astype(int))
    print(
        f"cutana    ({opts.n_threads} thread(s)): {opts.n_sources} cutouts in "
        f"{t_fused:.2f} s = {rate_fused:,.0f} cutouts/s "
        f"({1e6 / rate_fused:.1f} us per cutout)"
    )
    extrapolated = ""
    if n_ref < opts.n_sources:
        extrapolated = (
            f"; timed on the first {n_ref} cutouts, extrapolated to "
            f"{opts.n_sources}: {opts.n_sources / rate_ref:.1f} s"
        )
    print(
        f"reference (1 thread): {n_ref} cutouts in {t_ref:.2f} s = "
        f"{rate_ref:,.0f} cutouts/s ({1e6 / rate_ref:.1f} us per cutout){extrapolated}"
    )
    print(f"speed-up: {rate_fused / rate_ref:.1f}x")
    print(
        f"agreement on {n_ref} cutouts: {np.mean(diff == 0) * 100:.4f}% of pixels "
        f"identical, max |difference| {diff.max()} (uint8 codes; the reference "
        "works in float32)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
