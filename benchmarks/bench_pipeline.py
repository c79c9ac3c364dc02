#!/usr/bin/env python
# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Benchmark: the whole pipeline on the ESA Cutana paper's workload, full size.

50,000 sources of 32-128 pixels on one 8000 x 8000 big-endian float32 tile
(one band, TAN WCS at 0.1"/pixel, ``MAGZERO``), resampled to 150 x 150
pixels (bilinear), flux-converted and written as uint8 Zarr. This script is
a thin shell around ``cutana bench`` (`cutana.bench.harness`): it runs the
``paper-workload`` scenario at full size with the Astropy ``Cutout2D``
baseline, cutana at 1 and 2 workers and, when found, ESA Cutana at the same
worker counts, whole runs timed from outside, and writes ``results.json``,
``results.md`` and the plots to ``--out`` (default ``bench-pipeline``).

Every option of ``cutana bench`` is accepted and passed on, e.g.::

    python benchmarks/bench_pipeline.py --cutana-python /tmp/esa-cutana-venv/bin/python
    python benchmarks/bench_pipeline.py --workers 1 2 --repeat 3 --keep-data

Without ``--scenario`` the scenario is ``paper-workload``; without
``--cutana-python`` ESA Cutana is looked for in ``/tmp/esa-cutana-venv``
(``--cutana-python auto``).
"""

import sys

from cutana.bench.harness import main as bench_main


def main(argv=None):
    """Run the full-size paper workload with ``cutana bench`` options.

    Parameters
    ----------
    argv : list of str, optional
        Options of ``cutana bench`` (default: ``sys.argv[1:]``).

    Returns
    -------
    exit_code : int
        The harness's exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = ["--out", "bench-pipeline"]
    if not any(a == "--scenario" or a.startswith("--scenario=") for a in argv):
        defaults += ["--scenario", "paper-workload"]
    if not any(
        a == "--cutana-python" or a.startswith("--cutana-python=") for a in argv
    ):
        defaults += ["--cutana-python", "auto"]
    return bench_main([*defaults, *argv])


if __name__ == "__main__":
    sys.exit(main())
