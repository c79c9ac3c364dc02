# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Run ESA Cutana, the peer tool, on the same files as cutana, in its own environment.

ESA Cutana (the package ``cutana`` on the package index, published by ESA)
and this package share a name, so the two can never live in one
environment. The benchmark harness therefore runs ESA Cutana as a separate
program: `write_esa_driver` writes a small standalone driver script, and
`run_esa_cutana` runs it with the Python of an environment where ESA Cutana
is installed (for example ``python -m venv /tmp/esa-cutana-venv &&
/tmp/esa-cutana-venv/bin/pip install cutana==0.4.0``), times the whole run
from outside (including interpreter start-up and imports) and samples the
resident memory of the whole process tree while it runs.

The driver configures ESA Cutana through its public Python API
(``get_default_config`` and ``Orchestrator``), the path its documentation
gives for catalogues written to disk. Options map as follows:

=========================  ===============================================
driver option              ESA Cutana configuration
=========================  ===============================================
``--catalogue``            ``source_catalogue`` (needs the columns
                           ``SourceID``, ``RA``, ``Dec``,
                           ``diameter_pixel`` or ``diameter_arcsec``, and
                           ``fits_file_paths``)
``--output``               ``output_dir`` (one ``batch_*`` folder per worker
                           process, each with ``images.zarr`` and
                           ``images_metadata.parquet``)
``--workers``              ``max_workers``
``--target-size``          ``target_resolution``
``--resample``             ``interpolation``
``--flux-conversion``      ``apply_flux_conversion`` (zero point from the
                           ``--zeropoint-keyword`` header keyword,
                           ``flux_conversion_keywords.AB_zeropoint``)
``--dtype``                ``data_type``
``--format``               ``output_format``
``--normalize``            ``normalisation_method``
``--bands``                ``selected_extensions`` and ``channel_weights``
                           (one output channel per band, in the order given)
``--batch-size``           ``N_batch_cutout_process``
``--sources-per-process``  ``loadbalancer.max_sources_per_process``
=========================  ===============================================

Three settings deviate from ESA Cutana's defaults so that ``--workers N``
really runs N worker processes at once (each can be turned off):

* ESA Cutana caps its worker processes at the number of CPUs minus one, so
  on a two-core machine it never runs two workers. The driver lifts that cap
  to the number of workers asked for (``--respect-cpu-cap`` keeps it).
* ESA Cutana keeps all sources of one tile in one worker process unless the
  tile has more than 12,500 of them. The driver caps the sources per worker
  process at ``ceil(n_sources / workers)`` so that every worker gets a share
  (``--sources-per-process`` sets the cap explicitly).
* ESA Cutana starts its second worker only after the first has reported
  its memory use; the driver sets ESA Cutana's own
  ``loadbalancer.skip_memory_calibration_wait`` (``--calibration-wait``
  keeps the wait).

What to know when comparing with ESA Cutana 0.4.0:

* Before cutting anything it checks a random sample of up to 1,000 rows
  against their tiles and fails the *whole* run if a sampled source lies off
  the tile its row names; with ``--skip-validation`` such sources are
  silently left out of the output. Side-by-side catalogues should hold no
  off-tile or invalid rows (e.g. ``make_survey(..., off_tile_fraction=0,
  bad_row_fraction=0)``).
* Its output is one ``batch_cutout_process_*`` folder per worker process,
  each an ``images.zarr`` group with an ``images`` array of shape
  ``(n, H, W, C)`` (channels last) and an ``images_metadata.parquet`` whose
  row i describes image i; ``source_to_zarr_mapping.parquet`` at the top
  maps ``SourceID`` to its folder. Rows are not in catalogue order and no
  WCS is stored.
* Its orchestrator polls its workers once a second, so whole-run times are
  rounded up to about a second.
"""

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from ._process import last_json_record, run_timed

__all__ = [
    "DEFAULT_ESA_VENV",
    "ESA_DRIVER_SOURCE",
    "find_esa_python",
    "run_esa_cutana",
    "write_esa_driver",
]

logger = logging.getLogger(__name__)

#: Where the benchmark harness looks for an ESA Cutana environment by default.
DEFAULT_ESA_VENV = "/tmp/esa-cutana-venv"

#: Text of the standalone driver script that `write_esa_driver` writes. It is
#: run with an ESA Cutana environment's Python, never imported here.
ESA_DRIVER_SOURCE = r'''#!/usr/bin/env python
"""Run ESA Cutana on one catalogue and print one JSON line with the result.

Written by cutana.bench.esa.write_esa_driver; run it with the Python of an
environment where ESA Cutana (the package index's ``cutana``) is installed::

    python esa_driver.py --catalogue CAT --output OUT --workers 2

The JSON line holds ``seconds`` (whole run of this script, imports
included), ``run_seconds`` (the Orchestrator run alone), ``n_cutouts``
(cutouts found in the output afterwards) and the settings used. The exit
code is 0 when ESA Cutana reports the run as completed, 1 otherwise, and 2
on a usage error.
"""

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_NORMALIZATIONS = ("none", "linear", "log", "asinh", "zscale")
_RESAMPLINGS = ("nearest", "bilinear", "bicubic", "lanczos")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description="Run ESA Cutana on a catalogue.")
    add = parser.add_argument
    add("--catalogue", required=True, help="ESA Cutana-style CSV or Parquet.")
    add("--output", required=True, help="Output folder (absent or empty).")
    add("--workers", type=int, default=1, help="Worker processes.")
    add("--target-size", type=int, default=150, help="Output size in pixels.")
    add("--resample", choices=_RESAMPLINGS, default="bilinear")
    flux = parser.add_mutually_exclusive_group()
    flux.add_argument(
        "--flux-conversion", dest="flux_conversion", action="store_true"
    )
    flux.add_argument(
        "--no-flux-conversion", dest="flux_conversion", action="store_false"
    )
    parser.set_defaults(flux_conversion=False)
    add("--zeropoint-keyword", default="MAGZERO")
    add("--dtype", choices=("uint8", "float32"), default="uint8")
    add("--format", choices=("zarr", "fits"), default="zarr")
    add("--normalize", choices=_NORMALIZATIONS, default="none")
    add(
        "--bands",
        default=None,
        help="Comma-separated band names (default: those of the first catalogue row).",
    )
    add("--fits-extension", default="PRIMARY", help="HDU of the tiles.")
    add("--batch-size", type=int, default=None, help="N_batch_cutout_process.")
    add(
        "--sources-per-process",
        type=int,
        default=None,
        help="Most sources per worker process (default: ceil(n_sources / workers), "
        "at most ESA Cutana's own default).",
    )
    add(
        "--respect-cpu-cap",
        action="store_true",
        help="Keep ESA Cutana's cap of CPUs - 1 worker processes.",
    )
    add(
        "--calibration-wait",
        action="store_true",
        help="Keep ESA Cutana's wait for the first worker's memory report.",
    )
    add(
        "--skip-validation",
        action="store_true",
        help="Skip ESA Cutana's catalogue and FITS checks.",
    )
    add("--log-level", default="WARNING", help="ESA Cutana's log_level.")
    add(
        "--verbose",
        action="store_true",
        help="Also log the driver process (orchestrator) at --log-level, to stderr.",
    )
    return parser.parse_args(argv)


def _read_catalogue(path):
    import pandas as pd

    if str(path).lower().endswith((".parquet", ".pq")):
        return pd.read_parquet(path, columns=["fits_file_paths"])
    return pd.read_csv(path, usecols=["fits_file_paths"])


def _paths_of(value):
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return [str(v) for v in value]


def _count_outputs(output_dir, output_format):
    output_dir = Path(output_dir)
    if output_format == "fits":
        return sum(1 for _ in output_dir.rglob("*.fits")), []
    import zarr

    n_cutouts = 0
    archives = []
    for store in sorted(output_dir.rglob("images.zarr")):
        group = zarr.open_group(str(store), mode="r")
        shape = tuple(group["images"].shape)
        n_cutouts += shape[0]
        archives.append({"path": str(store), "shape": list(shape)})
    return n_cutouts, archives


def main(argv=None):
    args = _parse_args(argv)
    if args.workers < 1:
        print(f"--workers must be at least 1, got {args.workers}", file=sys.stderr)
        return 2
    output_dir = Path(args.output).resolve()
    if output_dir.exists() and any(output_dir.iterdir()):
        print(f"output folder {output_dir} is not empty", file=sys.stderr)
        return 2
    catalogue = str(Path(args.catalogue).resolve())

    t_import = time.perf_counter()
    import cutana

    if not hasattr(cutana, "Orchestrator"):
        print(
            f"the cutana imported from {cutana.__file__} is not ESA Cutana "
            "(check PYTHONPATH and the working folder)",
            file=sys.stderr,
        )
        return 2
    from cutana import Orchestrator, get_default_config
    from cutana.catalogue_preprocessor import extract_filter_name

    import_seconds = time.perf_counter() - t_import

    column = _read_catalogue(catalogue)["fits_file_paths"]
    n_sources = len(column)
    if args.bands:
        bands = [b.strip() for b in args.bands.split(",") if b.strip()]
    else:
        bands = [extract_filter_name(p) for p in _paths_of(column.iloc[0])]

    config = get_default_config()
    config.source_catalogue = catalogue
    config.output_dir = str(output_dir)
    config.output_format = args.format
    config.data_type = args.dtype
    config.target_resolution = args.target_size
    config.interpolation = args.resample
    config.normalisation_method = args.normalize
    config.apply_flux_conversion = args.flux_conversion
    config.flux_conversion_keywords.AB_zeropoint = args.zeropoint_keyword
    config.max_workers = args.workers
    config.fits_extensions = [args.fits_extension]
    config.selected_extensions = [
        {"name": b, "ext": args.fits_extension} for b in bands
    ]
    # One output channel per band, in the order given.
    config.channel_weights = {
        b: [1.0 if j == i else 0.0 for j in range(len(bands))]
        for i, b in enumerate(bands)
    }
    config.log_level = args.log_level
    config.console_log_level = "WARNING" if args.log_level != "ERROR" else "ERROR"
    if args.batch_size is not None:
        config.N_batch_cutout_process = args.batch_size
    # ESA Cutana's own default: 12,500 sources per process below 10**6 sources.
    own_default = 12500 if n_sources < 1_000_000 else 100_000
    if args.sources_per_process is not None:
        per_process = args.sources_per_process
    else:
        per_process = min(own_default, max(1, math.ceil(n_sources / args.workers)))
    config.loadbalancer.max_sources_per_process = int(per_process)
    config.loadbalancer.skip_memory_calibration_wait = not args.calibration_wait
    if args.skip_validation:
        config.skip_catalogue_validation = True
        config.skip_fits_check = True

    if args.verbose:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level=args.log_level, colorize=False)
        logger.enable("cutana")
    orchestrator = Orchestrator(config)
    if not args.respect_cpu_cap:
        monitor = orchestrator.load_balancer.system_monitor
        real_count = monitor.get_cpu_count()
        lifted = max(real_count, args.workers + 1)
        monitor.get_cpu_count = lambda: lifted

    t_run = time.perf_counter()
    result = orchestrator.run()
    t_end = time.perf_counter()

    n_cutouts, archives = _count_outputs(output_dir, args.format)
    if not isinstance(result, dict):
        result = {}
    status = result.get("status")
    record = {
        "tool": "esa-cutana",
        "version": getattr(cutana, "__version__", None),
        "seconds": t_end - _T_START,
        "run_seconds": t_end - t_run,
        "import_seconds": import_seconds,
        "n_sources": n_sources,
        "n_cutouts": n_cutouts,
        "status": status,
        "error": result.get("error"),
        "completed_batches": result.get("completed_batches"),
        "workers": args.workers,
        # Set by ESA Cutana's load balancer; absent if the run failed early.
        "max_workers_effective": config.loadbalancer.get("max_workers"),
        "sources_per_process": int(per_process),
        "bands": bands,
        "archives": archives,
        "config": {
            "target_resolution": config.target_resolution,
            "interpolation": config.interpolation,
            "normalisation_method": config.normalisation_method,
            "data_type": config.data_type,
            "output_format": config.output_format,
            "apply_flux_conversion": config.apply_flux_conversion,
            "N_batch_cutout_process": int(config.N_batch_cutout_process),
            "skip_memory_calibration_wait": bool(
                config.loadbalancer.skip_memory_calibration_wait
            ),
            "cpu_cap_lifted": not args.respect_cpu_cap,
        },
    }
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    if status != "completed":
        print(f"ESA Cutana run {status}: {record['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''

_WORKER_MARKER = "cutana.cutout_process"


def find_esa_python(venv=None):
    """Return the Python of an ESA Cutana environment, if there is one.

    Parameters
    ----------
    venv : str or path-like, optional
        The virtual environment to look in; `DEFAULT_ESA_VENV` by default.

    Returns
    -------
    python : str or None
        The path of the environment's ``bin/python`` if it exists and is
        executable, else `None`. Whether ESA Cutana is installed there is not
        checked (that would need to start the interpreter).

    Examples
    --------
    >>> from cutana.bench.esa import find_esa_python
    >>> find_esa_python("/nonexistent/venv") is None
    True
    """
    root = Path(DEFAULT_ESA_VENV if venv is None else venv)
    for name in ("bin/python", "bin/python3", "Scripts/python.exe"):
        candidate = root / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def write_esa_driver(path):
    """Write the standalone ESA Cutana driver script.

    The script (`ESA_DRIVER_SOURCE`) runs in an ESA Cutana environment, not
    in cutana's: it configures ESA Cutana's ``Orchestrator`` from its
    command-line options, runs it on a catalogue, counts the cutouts written
    and prints one JSON line. Run ``python driver.py --help`` for the options.

    Parameters
    ----------
    path : str or path-like
        File to write; its parent folder must exist. An existing file is
        replaced.

    Returns
    -------
    path : str
        The path written.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from cutana.bench.esa import write_esa_driver
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     driver = write_esa_driver(Path(tmp) / "esa_driver.py")
    ...     code = compile(Path(driver).read_text(), driver, "exec")
    """
    path = Path(path)
    path.write_text(ESA_DRIVER_SOURCE, encoding="utf-8")
    return str(path)


def _clean_environment(tmpdir):
    """Return the current environment without what would shadow ESA Cutana.

    ``PYTHONPATH`` pointing at this package's source tree would make the ESA
    Cutana interpreter import *this* ``cutana``; the variables that change
    how Python starts are dropped for the same reason. ``TMPDIR`` is set to
    a folder of the run, because ESA Cutana leaves its per-worker progress
    files (``cutana_progress_*.json``) in the temporary folder.

    Parameters
    ----------
    tmpdir : str
        Temporary folder for the run, deleted afterwards.

    Returns
    -------
    env : dict
        A copy of `os.environ` without those variables, with ``TMPDIR``.
    """
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
        env.pop(name, None)
    env["TMPDIR"] = str(tmpdir)
    return env


def _is_esa_worker(proc):
    """Whether a process is an ESA Cutana worker (runs ``cutana.cutout_process``).

    Only a positive answer counts: just after fork, before exec, a worker
    still shows the driver's command line.
    """
    return _WORKER_MARKER in " ".join(proc.cmdline())


def run_esa_cutana(
    cutana_python,
    catalogue,
    output,
    *,
    workers,
    target_size=150,
    resample="bilinear",
    flux_conversion=True,
    dtype="uint8",
    output_format="zarr",
    normalize="none",
    bands=None,
    extra_args=(),
    overwrite=False,
    sample_interval=0.1,
    timeout=None,
    driver_path=None,
    env=None,
):
    """Run ESA Cutana on a catalogue in its own environment, timed and sampled.

    The driver of `write_esa_driver` is run as a subprocess with
    ``cutana_python``. The wall time is measured from outside, from just
    before the subprocess starts until it has exited, so it includes the
    interpreter start-up, ESA Cutana's imports, catalogue validation, its
    worker processes and the writing of the output. While it runs, the
    resident set size (RSS) of the whole process tree (driver and every
    worker) is summed every ``sample_interval`` seconds.

    Parameters
    ----------
    cutana_python : str or path-like
        Python interpreter of an environment where ESA Cutana is installed,
        e.g. from `find_esa_python`.
    catalogue : str or path-like
        ESA Cutana-style catalogue (CSV or Parquet with ``SourceID``, ``RA``,
        ``Dec``, ``diameter_pixel`` or ``diameter_arcsec`` and
        ``fits_file_paths``).
    output : str or path-like
        Output folder. It must be absent or empty unless ``overwrite``.
    workers : int
        Number of ESA Cutana worker processes.
    target_size : int, optional
        Output cutout size in pixels (``target_resolution``).
    resample : {'bilinear', 'nearest', 'bicubic', 'lanczos'}, optional
        ESA Cutana's ``interpolation``.
    flux_conversion : bool, optional
        Apply ESA Cutana's flux conversion from the ``MAGZERO`` zero point.
    dtype : {'uint8', 'float32'}, optional
        Output data type.
    output_format : {'zarr', 'fits'}, optional
        Output format.
    normalize : {'none', 'linear', 'log', 'asinh', 'zscale'}, optional
        ESA Cutana's ``normalisation_method``.
    bands : sequence of str, optional
        Band names to use as output channels, in order; by default the bands
        of the first catalogue row's ``fits_file_paths``.
    extra_args : sequence of str, optional
        Further driver options, e.g. ``["--respect-cpu-cap"]``.
    overwrite : bool, optional
        Delete ``output`` first if it exists.
    sample_interval : float, optional
        Seconds between memory samples.
    timeout : float, optional
        Seconds after which the process tree is killed (``timed_out`` is
        then `True` in the result).
    driver_path : str or path-like, optional
        Where to write the driver; a temporary file by default.
    env : dict, optional
        Environment of the subprocess; by default the current one without
        ``PYTHONPATH`` and the other variables that could make the ESA
        Cutana interpreter import this package instead, and with ``TMPDIR``
        set to a temporary folder deleted after the run (ESA Cutana leaves
        progress files in the temporary folder). The subprocess runs
        in a temporary working folder, because ESA Cutana starts its workers
        with ``python -m``, which puts the working folder first on the
        module path (a working folder holding this package's source would
        shadow ESA Cutana in its workers).

    Returns
    -------
    result : dict
        ``seconds`` (wall time from outside), ``n_cutouts`` (cutouts found
        in the output, from the driver; 0 if it printed nothing),
        ``n_sources`` (catalogue rows, from the driver; `None` if it printed
        nothing),
        ``cutouts_per_second`` (``n_cutouts / seconds``), ``peak_memory``
        (largest sampled tree RSS, bytes), ``memory_samples`` (list of
        ``(t, bytes)``, ``t`` in seconds since the start),
        ``max_worker_processes`` (most ESA Cutana worker processes seen at
        once), ``returncode``, ``timed_out``, ``stderr_tail`` (last 4000
        characters of the driver's standard error), ``driver`` (the JSON
        record the driver printed, or `None`) and ``command``.

    Raises
    ------
    ValueError
        If ``workers`` is less than 1, or ``output`` is not empty and
        ``overwrite`` is `False`.
    FileNotFoundError
        If ``cutana_python`` or ``catalogue`` does not exist.

    Examples
    --------
    >>> from cutana.bench.esa import find_esa_python, run_esa_cutana
    >>> python = find_esa_python()
    >>> if python is not None:  # doctest: +SKIP
    ...     result = run_esa_cutana(python, "survey/catalogue.csv", "esa_out",
    ...                             workers=2, overwrite=True)
    ...     print(f"{result['cutouts_per_second']:.0f} cutouts/s")
    """
    if int(workers) < 1:
        msg = f"workers must be at least 1, got {workers!r}"
        raise ValueError(msg)
    cutana_python = str(cutana_python)
    if not Path(cutana_python).exists():
        msg = f"ESA Cutana Python {cutana_python!r} does not exist"
        raise FileNotFoundError(msg)
    catalogue = Path(catalogue).resolve()
    if not catalogue.is_file():
        msg = f"catalogue {str(catalogue)!r} does not exist"
        raise FileNotFoundError(msg)
    output = Path(output).resolve()
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            msg = (
                f"output folder {str(output)!r} is not empty; "
                "pass overwrite=True to replace it"
            )
            raise ValueError(msg)
        shutil.rmtree(output)

    with tempfile.TemporaryDirectory(prefix="cutana-esa-") as tmp:
        driver = write_esa_driver(driver_path or os.path.join(tmp, "esa_driver.py"))
        command = [
            cutana_python,
            driver,
            "--catalogue", str(catalogue),
            "--output", str(output),
            "--workers", str(int(workers)),
            "--target-size", str(int(target_size)),
            "--resample", resample,
            "--flux-conversion" if flux_conversion else "--no-flux-conversion",
            "--dtype", dtype,
            "--format", output_format,
            "--normalize", normalize,
        ]  # fmt: skip
        if bands:
            command += ["--bands", ",".join(bands)]
        command += [str(a) for a in extra_args]
        if env is None:
            run_tmp = os.path.join(tmp, "tmp")
            os.mkdir(run_tmp)
            env = _clean_environment(run_tmp)
        logger.info("running ESA Cutana: %s", " ".join(command))
        run = run_timed(
            command, env=env, cwd=tmp, timeout=timeout, interval=sample_interval,
            is_worker=_is_esa_worker,
        )
    stdout, stderr = run["stdout"], run["stderr"]
    seconds, returncode = run["seconds"], run["returncode"]

    record = last_json_record(stdout, "esa-cutana")
    n_cutouts = int(record["n_cutouts"]) if record else 0
    samples = run["memory_samples"]
    if returncode != 0:
        logger.warning("ESA Cutana exited with code %s: %s", returncode, stderr[-1000:])
    return {
        "seconds": seconds,
        "n_cutouts": n_cutouts,
        "n_sources": int(record["n_sources"]) if record else None,
        "cutouts_per_second": n_cutouts / seconds if seconds > 0 else math.nan,
        "peak_memory": max((b for _, b in samples), default=0),
        "memory_samples": samples,
        "max_worker_processes": run["max_workers"],
        "returncode": returncode,
        "timed_out": run["timed_out"],
        "stderr_tail": stderr[-4000:],
        "driver": record,
        "command": command,
    }
