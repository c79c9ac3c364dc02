# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The ``cutana`` command.

Usage::

    cutana run CATALOGUE --output OUT [--tiles PATH_OR_GLOB ...] [options]
    cutana plan CATALOGUE [--tiles ...] [options]
    cutana demo --output OUT
    cutana verify OUT
    cutana bench [--quick]

Every ``run`` option maps one-to-one onto a keyword of
`cutana.pipeline.make_cutouts`; a TOML file given with ``--config`` supplies
defaults for the same options (keys are the option names, with ``-`` or
``_``), and flags on the command line win over it.

Exit codes: 0 when every catalogue row got its final status (bad rows and
sources off every tile are results, not failures), 1 when a tile or job
failed so that some sources could not be cut, 2 for a usage or
configuration error; 130 when stopped by Ctrl-C (SIGINT) and 143 when
stopped by SIGTERM, after its workers are stopped: ``--resume`` then
finishes the run.
"""

import argparse
import difflib
import errno
import gc
import json
import logging
import os
import signal
import sys

from . import _stop

__all__ = ["main", "build_parser"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a run stops as on Ctrl-C."""


def _on_stop_signal(signum, frame):
    """Handler of SIGTERM (and SIGINT) while the ``cutana`` command runs.

    It raises `_Terminated` (`KeyboardInterrupt`) in the main thread and
    records the request in `cutana._stop`: an exception raised while Python
    runs a finaliser or compiles a module being imported is lost, and
    `_import_pipeline` and the executor, between tasks, then raise it again.

    A second signal (Ctrl-C pressed twice) raises nothing: raised in the
    first one's clean-up, it broke that off, and the workers, the pool's
    queues and their semaphores were left to the end of the process
    (multiprocessing's resource tracker then warned of "5 leaked semaphore
    objects"; in `_stopped`, it gave a traceback). The clean-up hurries
    instead (`cutana._stop.hurried`: the workers are terminated without
    their grace); a third signal of the same kind ends the process at once.
    """
    stop = _Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    again = _stop.requested()
    _stop.request(stop)
    if again:
        signal.signal(signum, signal.SIG_DFL)
        return
    raise stop


def _raise_if_stopped():
    """Raise the stop a signal asked for if it got lost (see `_on_stop_signal`)."""
    _stop.raise_requested()


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _float_type(allow_zero):
    """An argparse type: a finite number > 0, or >= 0 with ``allow_zero``."""
    expected = "a number >= 0" if allow_zero else "a positive number"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
            msg = f"expected {expected}, got {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


_positive_float = _float_type(allow_zero=False)
_non_negative_float = _float_type(allow_zero=True)


def _crop(text):
    """``--crop``: a whole number stays an int (pixels), as in a config file
    or a keyword (``crop=1`` is one pixel, ``crop=1.0`` the whole image)."""
    try:
        value = int(text)
    except ValueError:
        return _positive_float(text)
    if value < 1:
        msg = f"expected a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_run_options(p, *, with_output=True):
    """Options shared by ``run`` and ``plan``."""
    from ._choices import DTYPES, FORMATS, NORMALIZATIONS, RESAMPLE

    # both may come from --config instead (checked once it is read)
    p.add_argument("catalogue", nargs="?", metavar="CATALOGUE",
                   help="source catalogue (CSV, ECSV, FITS, Parquet, VOTable)")
    if with_output:
        p.add_argument("--output", "-o", metavar="OUT", help="output folder")
    g = p.add_argument_group("tiles and sizes")
    g.add_argument(
        "--tiles", nargs="+", metavar="PATH_OR_GLOB",
        help="tile FITS files or glob patterns (default: the catalogue's "
        "fits_file_paths column)",
    )
    g.add_argument("--bands", nargs="+", metavar="BAND",
                   help="bands to cut, in channel order (default: all; with "
                   "--tiles in the order of their file names, else of each row's "
                   "fits_file_paths)")
    g.add_argument("--size", type=_positive_float, metavar="N",
                   help="cutout size in pixels for every source (overrides "
                   "diameter_pixel / diameter_arcsec columns)")
    g.add_argument("--target-size", type=_positive_int, metavar="N",
                   help="resample every cutout to N x N pixels")
    g.add_argument("--resample", choices=RESAMPLE,
                   help="resampling to --target-size (default: bilinear with "
                   "--target-size, else none)")
    g = p.add_argument_group("catalogue columns (default: the usual names, any case)")
    g.add_argument("--id-column", metavar="NAME",
                   help="source id column (default: SourceID, source_id, "
                   "object_id, objectid or id)")
    g.add_argument("--ra-column", metavar="NAME",
                   help="right ascension column: degrees, its own unit or "
                   "sexagesimal hours (10:00:00.5), or a SkyCoord column "
                   "(default: RA, RA_deg, RAJ2000, ALPHA_J2000, ..., else the "
                   "only SkyCoord column)")
    g.add_argument("--dec-column", metavar="NAME",
                   help="declination column: degrees, its own unit or "
                   "sexagesimal degrees (-02:10:00) (default: Dec, Dec_deg, "
                   "DEJ2000, DELTA_J2000, ...)")
    g = p.add_argument_group("values")
    g.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="stretch applied per cutout and band (default: none)")
    g.add_argument("--dtype", choices=DTYPES,
                   help="output data type (default: float32)")
    g.add_argument("--percentile", type=_non_negative_float, metavar="P",
                   help="percentile clip of the stretch, in [0, 100] (default: 99.8)")
    g.add_argument("--stretch-a", type=_positive_float, metavar="A",
                   help="softening of log (default 1000) and asinh (default 0.1)")
    g.add_argument("--zscale-contrast", type=_non_negative_float, metavar="C",
                   help="zscale contrast (default: 0.25)")
    g.add_argument("--zscale-samples", type=_positive_int, metavar="N",
                   help="zscale samples (default: 1000)")
    g.add_argument("--crop", type=_crop, metavar="F",
                   help="compute stretch limits on the central crop (a fraction "
                   "<= 1 of the size such as 0.5, or a whole number of pixels: "
                   "1.0 is the whole image, 1 one pixel)")
    g.add_argument("--flux-conversion", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="convert pixel values to Jansky with the header zero point "
                   "(not those of flag, mask and PSF planes); --no-flux-conversion "
                   "turns off a --config file's flux_conversion = true")
    g.add_argument("--zeropoint-keyword", metavar="KEY",
                   help="header keyword of the AB zero point (default: MAGZERO)")
    g.add_argument("--channel-weights", nargs="+", type=float, metavar="W",
                   help="one multiplicative weight per band")
    g = p.add_argument_group("output and execution")
    g.add_argument("--format", choices=FORMATS, help="output format (default: zarr)")
    g.add_argument("--workers", type=_positive_int, metavar="N",
                   help="worker processes (default: 1)")
    g.add_argument("--threads", type=_positive_int, metavar="N",
                   help="kernel threads per worker (default: 1)")
    g.add_argument("--memory-limit", metavar="SIZE",
                   help="memory budget of the whole run, e.g. 4GB (10^9 bytes) or "
                   "4GiB (default: half the available memory, within a container's "
                   "memory limit)")
    g.add_argument("--backend", choices=("serial", "processes", "dask"),
                   help="where jobs run (default: serial for 1 worker, else processes)")
    g.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler address")
    g.add_argument("--max-sources-per-job", type=_positive_int, metavar="N",
                   help="cap on sources per job")
    g.add_argument("--config", metavar="FILE.toml",
                   help="TOML file with defaults for these options")


_RUN_KEYS = (
    "tiles", "bands", "size", "target_size", "resample", "normalize", "dtype",
    "percentile", "stretch_a", "zscale_contrast", "zscale_samples", "crop",
    "flux_conversion", "zeropoint_keyword", "channel_weights", "format", "workers",
    "threads", "memory_limit", "backend", "scheduler", "max_sources_per_job",
    "id_column", "ra_column", "dec_column",
)
_CONFIG_ONLY = ("catalogue", "output", "resume", "overwrite")


def build_parser():
    """Build the argument parser of the ``cutana`` command.

    Returns
    -------
    parser : `argparse.ArgumentParser`
        The parser with its sub-commands.

    Examples
    --------
    >>> from cutana.cli import build_parser
    >>> ns = build_parser().parse_args(
    ...     ["run", "catalogue.csv", "--output", "out.zarr", "--size", "16"])
    >>> ns.command, ns.catalogue, ns.output, ns.size
    ('run', 'catalogue.csv', 'out.zarr', 16.0)
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="cutana",
        description="Exact, fast, memory-bounded astronomical image cutouts at "
        "survey scale.",
        epilog="Exit codes: 0 every row has its final status; 1 a tile or job failed; "
        "2 usage or configuration error; 130 stopped by Ctrl-C, 143 by SIGTERM "
        "(finish the run with --resume).",
    )
    parser.add_argument("--version", action="version", version=f"cutana {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("run", help="cut every catalogue source out of the tiles",
                       usage="cutana run CATALOGUE --output OUT [options]",
                       description="Cut every catalogue source out of the tiles and "
                       "write one Zarr store or a folder of FITS files. CATALOGUE "
                       "and OUT may come from the --config file instead.")
    _add_run_options(p)
    p.add_argument("--resume", action="store_true", default=None,
                   help="finish an interrupted run into --output; of a finished "
                   "run, cut the sources it could not cut (TILE_ERROR) whose tiles "
                   "can be read now")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-json", metavar="FILE",
                   help="also write the run report as JSON")

    p = sub.add_parser("plan", help="print the plan and memory estimate, cut nothing",
                       usage="cutana plan CATALOGUE [options]",
                       description="Read the catalogue and tile headers, plan the jobs "
                       "and print the plan with its memory estimate.")
    _add_run_options(p, with_output=False)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar while a large catalogue or many tile "
                   "headers are read")

    p = sub.add_parser("demo", help="generate a small synthetic survey and run on it",
                       description="Generate a small synthetic Euclid-like survey "
                       "(2 x 2 tiles, 4 bands) in OUTPUT/survey and cut it into "
                       "OUTPUT/cutouts: 64 x 64 pixels (bilinear), flux conversion, "
                       "asinh stretch, uint8.")
    p.add_argument("--output", "-o", default="cutana-demo",
                   help="output folder (default: cutana-demo)")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="worker processes (default: 1)")
    p.add_argument("--format", choices=("zarr", "fits"), default="zarr",
                   help="output format (default: zarr)")
    p.add_argument("--n-sources", type=_positive_int, default=400, metavar="N",
                   help="sources in the catalogue (default: 400)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo")

    p = sub.add_parser("verify",
                       help="check an output against its catalogue and ledger",
                       description="Check an output: every row accounted for, statuses "
                       "consistent, chunks present and matching their checksums.")
    p.add_argument("output", help="output folder of a run")
    p.add_argument("--catalogue", help="catalogue to check against (default: the "
                   "one recorded in the output)")

    p = sub.add_parser("preview", help="draw cutouts of an output in a grid (a PNG)",
                       description="Draw cutouts of an output in a grid, one panel per "
                       "catalogue row, titled with the source id (and the status of a "
                       "row without a complete cutout), and save it as an image. "
                       "Float cutouts are shown over a zscale interval, integer ones "
                       "(already stretched by the run) as they are. Needs matplotlib.")
    p.add_argument("output", help="output folder of a run (Zarr store or FITS folder)")
    p.add_argument("--rows", nargs="+", metavar="ROWS", default=None,
                   help="catalogue rows to show: START:STOP (a Python slice, e.g. "
                   "100:132) or row numbers (default: the first 32)")
    p.add_argument("--band", default="0",
                   help="band to show, by name or index (default: the first)")
    p.add_argument("--columns", type=_positive_int, default=8, metavar="N",
                   help="panels per line (default: 8)")
    p.add_argument("-o", "--out", metavar="FILE", default=None,
                   help="image file to write, format by extension "
                   "(default: OUTPUT.preview.png beside the output)")

    p = sub.add_parser("bench", help="run the benchmark harness",
                       description="Run benchmark scenarios against Astropy (and ESA "
                       "Cutana when --cutana-python is given).")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the harness")
    # -v after the sub-command too (``cutana run ... -v``); not defaulted there,
    # so that one given before it counts
    for name in ("run", "plan", "demo", "verify", "preview"):
        sub.choices[name].add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS,
            help="log more (-v info, -vv debug)",
        )
    return parser


def _load_config(path, parser):
    """Read a TOML config file; unknown keys are errors with a suggestion."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        parser.error(f"config file {path!r} does not exist")
    except tomllib.TOMLDecodeError as exc:
        parser.error(f"config file {path!r} is not valid TOML: {exc}")
    # (label, key, value): keys of a [run] table are labelled run.KEY
    table = data.get("run") if isinstance(data.get("run"), dict) else None
    items = [(k, k, v) for k, v in data.items() if table is None or k != "run"]
    items += [(f"run.{k}", k, v) for k, v in (table or {}).items()]
    known = set(_RUN_KEYS) | set(_CONFIG_ONLY)
    out = {}
    given = {}  # option -> the label of the key that set it
    for label, key, value in items:
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            parser.error(f"config file {path!r}: unknown key {key!r}{hint}")
        if name in given:
            parser.error(
                f"config file {path!r}: keys {given[name]!r} and {label!r} both "
                f"set {name!r}; keep one"
            )
        given[name] = label
        out[name] = value
    return out


def _options(args, config):
    """Merge config-file values and flags (flags win) into make_cutouts kwargs."""
    opts = {}
    for key in _RUN_KEYS:
        value = getattr(args, key, None)
        if value is None:
            value = config.get(key)
        if value is not None:
            opts[key] = value
    if isinstance(opts.get("tiles"), str):
        opts["tiles"] = [opts["tiles"]]
    if isinstance(opts.get("bands"), str):
        opts["bands"] = [opts["bands"]]
    return opts


def _setup_logging(verbose):
    level = logging.WARNING - 10 * min(verbose, 2)
    root = logging.getLogger()
    before = set(root.handlers)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # the handler made here also filters what libraries log at levels of
    # their own (dask's distributed logs a local cluster's start at INFO)
    for handler in set(root.handlers) - before:
        handler.setLevel(level)


def main(args=None):
    """Run the ``cutana`` command.

    Parameters
    ----------
    args : list of str, optional
        Command-line arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    code : int
        The exit code: 0, 1 or 2 (see the module's documentation), 130 if
        stopped by Ctrl-C (`KeyboardInterrupt`), 143 if stopped by SIGTERM
        (when run by `run_command`).

    Examples
    --------
    Run on a small synthetic survey, then check the output (the reports go
    to standard error):

    >>> import os
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.cli import main
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> out = os.path.join(tempfile.mkdtemp(), "out.zarr")
    >>> main(["run", survey.catalogue_path, "--output", out, "--size", "16",
    ...       "--memory-limit", "2GB", "--no-progress"])
    0
    >>> main(["verify", out])
    0
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["bench"]:
        # the harness has its own parser (and options starting with '-')
        from .bench.harness import main as bench_main

        return bench_main(argv[1:])
    ns = None
    try:  # a Ctrl-C may come at any time, also while modules are imported
        parser = build_parser()
        ns = parser.parse_args(argv)
        _setup_logging(ns.verbose)
        # this process reads the catalogue: what that frees goes back at once
        from .executor import return_freed_memory

        return_freed_memory()
        return _checked_command(ns, parser)
    except (KeyboardInterrupt, _Terminated) as exc:
        return _stopped(ns, exc)
    except Exception as exc:
        # an error raised because of the stop (Python wraps one raised in a
        # class body being made while a module is imported): a stop still
        stop = _stop.behind(exc)
        if not isinstance(stop, KeyboardInterrupt | _Terminated):
            raise
        return _stopped(ns, stop)


def _checked_command(ns, parser):
    """`_command`, with its usage errors and a full disk reported in one line."""
    from .exceptions import CatalogError, ConfigError

    try:
        return _command(ns, parser)
    except (ConfigError, CatalogError) as exc:
        print(f"cutana: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        # a full disk stops the run; what was done is kept for --resume
        text = str(exc) if "--resume" in str(exc) else (
            f"{exc}; free some space, then finish the run with --resume"
        )
        print(f"cutana: error: {text}", file=sys.stderr)
        return EXIT_FAILED


def _command(ns, parser):
    """Run the command of parsed arguments ``ns``; return its exit code."""
    if ns.command == "run":
        return _cmd_run(ns, parser)
    if ns.command == "plan":
        return _cmd_plan(ns, parser)
    if ns.command == "demo":
        return _cmd_demo(ns)
    if ns.command == "verify":
        return _cmd_verify(ns)
    if ns.command == "preview":
        return _cmd_preview(ns)
    if ns.command == "bench":
        from .bench.harness import main as bench_main

        return bench_main(ns.args)
    return EXIT_USAGE  # pragma: no cover


def _stopped(ns, exc):
    """Report a command stopped by Ctrl-C or SIGTERM; return its exit code."""
    terminated = isinstance(exc, _Terminated)
    text = "terminated (SIGTERM)" if terminated else "interrupted"
    if getattr(ns, "command", None) == "run":
        text += (
            "; the cutouts written so far are kept: run the same command with "
            "--resume to finish the run"
        )
    print(f"cutana: {text}", file=sys.stderr)
    # free the stopped pool's queues (held by the frames of the tracebacks,
    # of this exception and of those it was raised while handling), so
    # that their semaphores are released before the process exits
    for raised in _stop.chain(exc):
        raised.__traceback__ = None
    gc.collect()
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def _import_pipeline():
    """Import `cutana.pipeline` (and astropy and zarr with it) for a command.

    The imports make some 150,000 objects and no garbage: the cyclic
    collector is paused meanwhile, which saves about 50 ms of the 0.5 s.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        from . import pipeline
    finally:
        if enabled:
            gc.enable()
    _raise_if_stopped()
    return pipeline


def _writable_file(path, option):
    """A usage error unless a file can be written at ``path`` (checked
    before the run, so that the report is not lost after it)."""
    folder = os.path.dirname(os.path.abspath(path))
    writable = os.path.isdir(folder) and os.access(folder, os.W_OK)
    if os.path.isdir(path) or not writable:
        from .exceptions import ConfigError

        msg = f"{option} {path!r}: cannot write a file there"
        raise ConfigError(msg)


#: Main process bytes while a catalogue file is read, beyond the imports,
#: per byte of the file: an ESA Cutana-style CSV of 2,000,000 rows (526 MB)
#: peaked at 525-542 MB, one of 200,000 rows (52 MB) at about 165 MB;
#: with a margin.
_READ_BYTES_PER_FILE_BYTE = 1.5
_READ_BASE_BYTES = 150 * 10**6


def _server_fits_while_reading(memory_limit, catalogue):
    """Whether the worker server may start before the catalogue is read
    (to import while this process does): without a memory limit, or where
    the limit holds it (`cutana.planner.SERVER_BYTES`) beside this process
    reading the file, as estimated from its size. Otherwise the run starts
    it once the plan holds workers (a 2,000,000-row catalogue at 600MB
    peaked at 629 MB, the server and the reading together)."""
    if memory_limit is None:
        return True
    from .planner import SERVER_BYTES, parse_memory

    try:
        limit = parse_memory(memory_limit)
        size = os.path.getsize(catalogue)
    except (ValueError, TypeError, OSError):
        return False  # (the run reports a bad value)
    need = SERVER_BYTES + _READ_BASE_BYTES + _READ_BYTES_PER_FILE_BYTE * size
    return limit >= need


def _cmd_run(ns, parser):
    config = _load_config(ns.config, parser) if ns.config else {}
    opts = _options(ns, config)
    catalogue = _required(ns, config, "catalogue")
    output = _required(ns, config, "output")
    if ns.report_json:
        _writable_file(ns.report_json, "--report-json")
    from .executor import default_backend, start_forkserver, worker_preload

    backend = opts.get("backend") or default_backend(
        opts.get("workers", 1), opts.get("scheduler")
    )
    if backend == "processes" and _server_fits_while_reading(
        opts.get("memory_limit"), catalogue
    ):
        # worker processes import cutana while this process does the same
        start_forkserver(worker_preload(opts.get("format")))
    make_cutouts = _import_pipeline().make_cutouts

    # (make_cutouts refuses what is not true or false: "no" is not false)
    resume, overwrite = (
        getattr(ns, name) if getattr(ns, name) is not None else config.get(name, False)
        for name in ("resume", "overwrite")
    )
    report = make_cutouts(
        catalogue,
        output,
        resume=resume,
        overwrite=overwrite,
        progress=False if ns.no_progress else None,
        **opts,
    )
    print(report.summary(), file=sys.stderr)
    if ns.report_json:
        with open(ns.report_json, "w") as fh:
            json.dump(report.to_dict(), fh, indent=1, default=str)
    return report.exit_code


def _required(ns, config, name):
    """The catalogue or output: from the command line, else the config file."""
    from .exceptions import ConfigError

    value = getattr(ns, name, None) or config.get(name)
    if not value:
        flag = "CATALOGUE" if name == "catalogue" else "--output OUT"
        msg = f"the {name} is required: give {flag}, or {name!r} in the --config file"
        raise ConfigError(msg)
    if not isinstance(value, str):  # (a TOML list or number)
        msg = f"invalid {name} in the --config file: {value!r}; expected a path"
        raise ConfigError(msg)
    return value


def _cmd_plan(ns, parser):
    plan_cutouts = _import_pipeline().plan_cutouts

    config = _load_config(ns.config, parser) if ns.config else {}
    catalogue = _required(ns, config, "catalogue")
    plan = plan_cutouts(
        catalogue, progress=False if ns.no_progress else None, **_options(ns, config)
    )
    print(plan.summary())
    return EXIT_OK


def _cmd_demo(ns):
    make_cutouts = _import_pipeline().make_cutouts
    from .bench.synthetic import make_demo_survey

    survey_dir = os.path.join(ns.output, "survey")
    out_dir = os.path.join(ns.output, "cutouts")
    if os.path.exists(ns.output) and not os.path.isdir(ns.output):
        print(f"cutana: error: {ns.output!r} is a file, not a folder", file=sys.stderr)
        return EXIT_USAGE
    if os.path.exists(ns.output) and os.listdir(ns.output) and not ns.overwrite:
        print(f"cutana: error: {ns.output!r} exists; pass --overwrite to replace it",
              file=sys.stderr)
        return EXIT_USAGE
    survey = make_demo_survey(survey_dir, n_sources=ns.n_sources)
    print(f"synthetic survey: {len(survey.tile_paths)} tiles x {len(survey.bands)} "
          f"bands, {survey.n_sources} sources in {survey_dir}", file=sys.stderr)
    report = make_cutouts(
        survey.catalogue_path,
        out_dir,
        overwrite=True,
        target_size=64,
        resample="bilinear",
        normalize="asinh",
        dtype="uint8",
        flux_conversion=True,
        format=ns.format,
        workers=ns.workers,
    )
    print(report.summary(), file=sys.stderr)
    print(f"read it back with: python -c \"import cutana; "
          f"a = cutana.open('{out_dir}'); print(a.images.shape)\"", file=sys.stderr)
    print(f"look at them with: cutana preview {out_dir}  (needs matplotlib)",
          file=sys.stderr)
    return report.exit_code


def _preview_rows(values):
    """``--rows`` of ``cutana preview``: one ``START:STOP`` slice or row
    numbers; None for the default."""
    if values is None:
        return None
    if len(values) == 1 and ":" in values[0]:
        parts = values[0].split(":")
        try:
            bounds = [int(v) if v.strip() else None for v in parts]
        except ValueError:
            bounds = None
        if bounds is None or len(bounds) > 3:
            msg = f"--rows {values[0]!r} is not a START:STOP slice of row numbers"
            raise ValueError(msg)
        return slice(*bounds)
    try:
        return [int(v) for v in values]
    except ValueError:
        got = " ".join(values)
        msg = f"--rows takes row numbers or one START:STOP slice, got {got!r}"
        raise ValueError(msg) from None


def _cmd_preview(ns):
    from .preview import plot_cutouts

    band = int(ns.band) if ns.band.lstrip("-").isdigit() else ns.band
    out = ns.out or os.path.normpath(ns.output) + ".preview.png"
    try:
        rows = _preview_rows(ns.rows)
        plot_cutouts(ns.output, rows, band=band, columns=ns.columns, path=out)
    except (ValueError, IndexError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"cutana preview: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"cutana preview: wrote {out}", file=sys.stderr)
    return EXIT_OK


def _cmd_verify(ns):
    from .verify import verify

    problems = verify(ns.output, ns.catalogue)
    for p in problems:
        print(p)
    if problems:
        print(f"cutana verify: {len(problems)} problem(s) in {ns.output}",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"cutana verify: {ns.output} is complete and consistent", file=sys.stderr)
    return EXIT_OK


def run_command(argv=None):
    """Run the ``cutana`` command and end the process with its exit code.

    The entry point of the installed ``cutana`` script and of ``python -m
    cutana.cli``. Once `main` has returned, everything the command wrote is
    closed; the output streams and logging are flushed and the process
    exits at once, without the interpreter's teardown of every imported
    module (~0.15 s with astropy and zarr loaded). Call `main` instead to
    run the command inside a Python process.

    Parameters
    ----------
    argv : list of str, optional
        Arguments (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        # like its workers, the process of a run needs no BLAS thread per
        # core (idle ones spin and take CPU) and no huge pages for its
        # reused buffers; numpy, which reads these, is not imported yet
        from .executor import WORKER_ENVIRONMENT

        for key, value in WORKER_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
    # SIGTERM (a batch system's time limit, say) stops a run as Ctrl-C does
    signal.signal(signal.SIGTERM, _on_stop_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_stop_signal)  # (not if ignored)
    code = main(argv)
    # the command has ended: a stop now would only break off the flushing
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing to flush
            pass
    logging.shutdown()
    os._exit(int(code or 0))


if __name__ == "__main__":  # pragma: no cover
    run_command()
