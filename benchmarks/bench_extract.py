#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Benchmark `cutana.BatchCutout2D` and its kernel against astropy and numpy.

One run, one tile, one catalogue: an N x N big-endian float32 FITS tile is
written once and memory-mapped; the sources are random positions, a given
fraction of them overlapping the tile edge, cut in ``mode='partial'``. The
script reports, side by side:

1. `cutana.BatchCutout2D` with pixel positions against a loop of
   `astropy.nddata.Cutout2D` calls with the same pixel positions;
2. the same with `~astropy.coordinates.SkyCoord` positions and the tile's
   WCS;
3. the bytes per second of the kernel (`cutana.cutout.extract_stack`, the
   allocation of its output included) against numpy copying the same number
   of bytes into a fresh array.

The astropy loops may be timed on a subset of the sources
(``--astropy-subset``); their rate is per cutout, so the ratio is fair.

Usage::

    python benchmarks/bench_extract.py
    python benchmarks/bench_extract.py --n-sources 50000 --size 64 --tile 8000 \\
        --edge-fraction 0.05 --n-threads 1 2
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_helpers import (  # noqa: E402
    format_rate,
    make_tile,
    markdown_table,
    print_environment,
    time_best,
)

from cutana import BatchCutout2D  # noqa: E402
from cutana._geometry import compute_boxes  # noqa: E402
from cutana.cutout import extract_stack  # noqa: E402


def tile_wcs_header(size):
    """A TAN WCS header with 0.1 arcsec pixels (Euclid-like), centred on the tile."""
    header = fits.Header()
    header["CTYPE1"] = "RA---TAN"
    header["CTYPE2"] = "DEC--TAN"
    header["CRPIX1"] = size / 2 + 0.5
    header["CRPIX2"] = size / 2 + 0.5
    header["CRVAL1"] = 52.9
    header["CRVAL2"] = -28.1
    header["CD1_1"] = -0.1 / 3600
    header["CD1_2"] = 0.0
    header["CD2_1"] = 0.0
    header["CD2_2"] = 0.1 / 3600
    header["CUNIT1"] = "deg"
    header["CUNIT2"] = "deg"
    header["RADESYS"] = "ICRS"
    return header


def make_positions(n, tile, size, edge_fraction, seed=1):
    """Pixel positions ``(x, y)``, shape ``(n, 2)``; some boxes cross the edge.

    Interior boxes lie wholly inside the tile; a fraction ``edge_fraction``
    of the boxes straddle one of the four edges (inside and outside pixels),
    chosen at random.
    """
    rng = np.random.default_rng(seed)
    half = size / 2
    xy = rng.uniform(half, tile - half - 1, size=(n, 2))
    n_edge = int(round(edge_fraction * n))
    idx = rng.choice(n, n_edge, replace=False)
    axis = rng.integers(0, 2, n_edge)
    high = rng.integers(0, 2, n_edge).astype(bool)
    # offset of the centre from the edge, so that the box straddles it
    offset = rng.uniform(-half + 1.5, half - 1.5, n_edge)
    edge_coord = np.where(high, tile - 0.5 + offset, -0.5 + offset)
    xy[idx, axis] = edge_coord
    return xy


def time_numpy_copy(n_bytes, repeat):
    """Best time of numpy copying ``n_bytes`` into a fresh array (two ways)."""
    src = np.random.default_rng(3).standard_normal(n_bytes // 4, dtype=np.float32)
    t_array = time_best(lambda: np.array(src, copy=True), repeat=repeat)
    t_copyto = time_best(lambda: np.copyto(np.empty_like(src), src), repeat=repeat)
    return min(t_array, t_copyto)


def main(argv=None):
    """Run the benchmark and print Markdown tables.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default: `sys.argv`).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-sources", type=int, default=50000)
    parser.add_argument("--size", type=int, default=64, help="cutout side in pixels")
    parser.add_argument("--tile", type=int, default=8000, help="tile side in pixels")
    parser.add_argument("--edge-fraction", type=float, default=0.05)
    parser.add_argument(
        "--n-threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="thread counts of the cutana runs (one row each)",
    )
    parser.add_argument(
        "--astropy-subset",
        type=int,
        default=2000,
        help="number of sources of the astropy loops (0: all)",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed runs (best is kept)"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="directory for the tile (default: a temporary directory, deleted)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        path = make_tile(
            workdir / f"tile_{args.tile}.fits",
            args.tile,
            wcs_header=tile_wcs_header(args.tile),
        )
        run(args, path)


def run(args, path):
    """Time everything on the tile at ``path`` and print the tables."""
    n, size = args.n_sources, args.size
    print("## Environment\n")
    print_environment()
    hdul = fits.open(path, memmap=True)
    data = hdul[0].data
    wcs = WCS(hdul[0].header)
    assert data.dtype == np.dtype(">f4")

    xy = make_positions(n, args.tile, size, args.edge_fraction)
    sky = wcs.pixel_to_world(xy[:, 0], xy[:, 1])
    m = n if args.astropy_subset <= 0 else min(n, args.astropy_subset)
    # the subset for astropy: the same mix of interior and edge sources
    sub = np.random.default_rng(2).choice(n, m, replace=False)
    sub_xy = [tuple(p) for p in xy[sub]]
    sub_sky = [sky[i] for i in sub]  # built outside the timed loop
    boxes = compute_boxes(data.shape, (size, size), xy[:, ::-1], "partial")
    frac_edge = boxes.is_partial.mean()
    out_bytes = n * size * size * 4

    # touch the tile once so that every run reads it from the page cache
    np.asarray(data).view(np.uint8).reshape(-1)[::4096].sum()

    # -- astropy baselines (per cutout) ------------------------------------
    def astropy_pixel():
        for p in sub_xy:
            Cutout2D(data, p, size, mode="partial")

    def astropy_pixel_copy():
        out = np.empty((m, size, size), dtype=np.float32)
        for i, p in enumerate(sub_xy):
            out[i] = Cutout2D(data, p, size, mode="partial").data
        return out

    def astropy_sky():
        for c in sub_sky:
            Cutout2D(data, c, size, wcs=wcs, mode="partial")

    t_ast_pix = time_best(astropy_pixel, repeat=args.repeat) / m
    t_ast_pix_copy = time_best(astropy_pixel_copy, repeat=args.repeat) / m
    t_ast_sky = time_best(astropy_sky, repeat=max(1, args.repeat // 2)) / m

    t_numpy = time_numpy_copy(out_bytes, args.repeat)

    rows = []
    kernel_rows = []
    starts = boxes.start
    for n_threads in args.n_threads:

        def batch_pixel(n_threads=n_threads):
            return BatchCutout2D(data, xy, size, mode="partial", n_threads=n_threads)

        def batch_sky(n_threads=n_threads):
            return BatchCutout2D(
                data, sky, size, wcs=wcs, mode="partial", n_threads=n_threads
            )

        def kernel(n_threads=n_threads):
            return extract_stack(
                data, starts, (size, size), np.nan, n_threads=n_threads
            )

        t_pix = time_best(batch_pixel, repeat=args.repeat) / n
        t_sky = time_best(batch_sky, repeat=args.repeat) / n
        t_kernel = time_best(kernel, repeat=args.repeat)
        rows += [
            (
                f"BatchCutout2D, pixel positions, {n_threads} thread(s)",
                format_rate(1 / t_pix, "cutouts/s"),
                f"{t_ast_pix / t_pix:.1f}x",
                f"{t_ast_pix_copy / t_pix:.1f}x",
                "≥ 20x",
            ),
            (
                f"BatchCutout2D, SkyCoord + WCS, {n_threads} thread(s)",
                format_rate(1 / t_sky, "cutouts/s"),
                f"{t_ast_sky / t_sky:.1f}x",
                "",
                "≥ 200x",
            ),
        ]
        kernel_rows.append(
            (
                f"extract_stack, {n_threads} thread(s)",
                format_rate(out_bytes / t_kernel, "B/s"),
                f"{t_numpy / t_kernel:.0%}",
                "≥ 50%",
            )
        )

    print(
        f"\n## Workload\n\n{n} sources, {size}x{size}, mode='partial', from a "
        f"{args.tile}x{args.tile} big-endian float32 FITS tile, memory-mapped; "
        f"{frac_edge:.1%} of the boxes overlap the edge. astropy loops timed on "
        f"{m} of the sources (same mix), reported per cutout. Best of "
        f"{args.repeat} runs.\n"
    )
    print("## Cutouts\n")
    baseline = [
        (
            "astropy Cutout2D loop, pixel positions (views, nothing copied)",
            format_rate(1 / t_ast_pix, "cutouts/s"),
            "1x",
            "",
            "",
        ),
        (
            "astropy Cutout2D loop, pixel positions, copied into an (N, ny, nx) array",
            format_rate(1 / t_ast_pix_copy, "cutouts/s"),
            "",
            "1x",
            "",
        ),
        (
            "astropy Cutout2D loop, SkyCoord + WCS",
            format_rate(1 / t_ast_sky, "cutouts/s"),
            "1x",
            "",
            "",
        ),
    ]
    print(
        markdown_table(
            ["run", "rate", "vs astropy loop", "vs astropy loop + copy", "target"],
            baseline + rows,
        )
    )
    print("\n## Kernel bandwidth (output allocation included)\n")
    print(
        markdown_table(
            ["run", "bytes/s", "vs numpy copy", "target"],
            [
                (
                    f"numpy copy of {out_bytes / 1e6:.0f} MB into a fresh array "
                    "(best of np.array(copy=True), np.empty + np.copyto)",
                    format_rate(out_bytes / t_numpy, "B/s"),
                    "100%",
                    "",
                ),
                *kernel_rows,
            ],
        )
    )
    per_cutout_numpy = t_numpy / n  # numpy copying one cutout's bytes into fresh memory
    print(
        "\nBound: a batch that only had to copy the cutouts' bytes into a fresh "
        "array, at numpy's speed, would reach "
        f"{t_ast_pix / per_cutout_numpy:.1f}x the astropy pixel loop and "
        f"{t_ast_sky / per_cutout_numpy:.0f}x the SkyCoord loop on this machine."
    )
    print(f"\ncommand: {' '.join(['python', *sys.argv])}")
    hdul.close()


if __name__ == "__main__":
    main()
