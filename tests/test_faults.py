# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Fault drills: every fault is injected for real and the guarantees checked.

* ``kill -9`` of the main process at seeded random moments and at chosen
  phases (start, creation of the output, cutting, chunk assembly, clean-up),
  then ``--resume``: the output must be byte-identical to a clean run.
* ``kill -9`` of a worker process mid-run: the run completes, exit code 0,
  output identical to a clean run.
* Damaged tiles (truncated, corrupt bytes, deleted before or after
  indexing, no or broken WCS, unreadable extension, no zero point): only
  the sources that need the tile get ``TILE_ERROR`` with a message naming
  the file and the reason, everything else equals the clean run, exit 1.
* A full disk (a 3 MB tmpfs, where the machine allows mounting one): a
  clear error, an output that ``cutana verify`` reports as incomplete, and
  a ``--resume`` once there is space that ends byte-identical.
* Hostile source ids with ``--format fits``: nothing is written outside
  the output folder and file names are unique.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from astropy.io import fits
from astropy.table import Table

import cutana
from cutana._testing import files_bytes
from cutana.bench.synthetic import make_survey
from cutana.cli import main
from cutana.status import Status

BANDS = ("VIS", "NIR-H")
SURVEY = {
    "n_tiles": 2,
    "bands": BANDS,
    "tile_size": 200,
    "n_sources": 80,
    "overlap_pixels": 20,
    "edge_fraction": 0.1,
    "off_tile_fraction": 0.05,
    "bad_row_fraction": 0.05,
    "size_range_pixels": (10, 20),
    "seed": 11,
}
# 2 workers, jobs of 5 sources; 181-pixel nearest-neighbour cutouts make
# rows of 2 x 181 x 181 float32, so the store has 10 chunks of 8 rows that
# mix jobs: both the direct chunk writes and the assembly path are used
RUN_ARGS = [
    "--workers",
    "2",
    "--max-sources-per-job",
    "5",
    "--size",
    "15",
    "--target-size",
    "181",
    "--resample",
    "nearest",
    "--no-progress",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cutana.__file__)))
RNG_SEED = 20260501


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _cli(args):
    """Run ``cutana`` in this process; return (exit code, stderr text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def _assert_identical(out, clean):
    """Assert that two outputs hold the same files with the same bytes."""
    got, ref = files_bytes(out), files_bytes(clean)
    assert sorted(got) == sorted(ref), set(got) ^ set(ref)
    differ = [name for name in ref if got[name] != ref[name]]
    assert not differ, f"files differ from the clean run: {differ[:10]}"


def _finalised(out):
    """Whether an output was finished: a Zarr store said complete, or a FITS
    folder's index written (the last step of a run)."""
    meta = os.path.join(out, "zarr.json")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as fh:
            return bool(json.load(fh).get("attributes", {}).get("complete"))
    return os.path.isfile(os.path.join(out, "index.ecsv"))


def _ledger_events(out):
    """The events of the ledger of a running output (None if there is none)."""
    path = os.path.join(out, ".cutana", "ledger.jsonl")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    events = []
    for line in data.split(b"\n"):
        try:
            events.append(json.loads(line)["event"])
        except (ValueError, KeyError, TypeError):
            continue  # the line being written
    return events


def _spawn(args, log):
    """Start ``python -m cutana.cli run ...`` as a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "cutana.cli", "run", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
        cwd=ROOT,
    )


def _wait_for(proc, condition, timeout=60.0):
    """Poll until ``condition()`` holds; return False if the run ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    msg = f"condition not met within {timeout} s"
    raise AssertionError(msg)


def _kill_tree(proc):
    """SIGKILL the main process; return its descendants as they were."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return kids


def _run_killed(args, condition, log_path, attempts=3):
    """Start ``cutana run ARGS``, SIGKILL it once ``condition()`` holds (or it
    ends), and wait for its workers; return whether the condition was met.

    A run that ends before the condition was seen (on a busy machine the
    polling can miss the moment: the run finishes its last jobs between two
    polls) is started again on a clean output, up to ``attempts`` times.
    """
    out = args[list(args).index("-o") + 1]
    for attempt in range(attempts):
        if attempt:
            shutil.rmtree(out, ignore_errors=True)
        with open(log_path, "wb") as log:
            proc = _spawn(args, log)
            try:
                hit = _wait_for(proc, condition)
            finally:
                kids = _kill_tree(proc)
        _reap(kids)
        if hit:
            return True
    return False


def _reap(kids, timeout=20.0):
    """Wait for orphaned workers to exit by themselves; kill and fail if not."""
    _, alive = psutil.wait_procs(kids, timeout=timeout)
    for p in alive:  # pragma: no cover - only when the guarantee is broken
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not alive, f"{len(alive)} worker processes outlived the killed run"


def _status(out):
    return np.asarray(cutana.open(out).status)


# ----------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """2 tiles x 2 bands of 200 px, 80 sources of every kind, ESA-style catalogue."""
    return make_survey(tmp_path_factory.mktemp("survey"), **SURVEY)


@pytest.fixture(scope="module")
def clean(survey, tmp_path_factory):
    """Uninterrupted runs: Zarr and FITS with RUN_ARGS, and a plain serial Zarr."""
    root = tmp_path_factory.mktemp("clean")
    outs = {
        "zarr": root / "c.zarr",
        "fits": root / "c_fits",
        "serial": root / "s.zarr",
    }
    for fmt in ("zarr", "fits"):
        code, err = _cli(
            ["run", survey.catalogue_path, "-o", outs[fmt], *RUN_ARGS, "--format", fmt]
        )
        assert code == 0, err
    code, err = _cli(
        [
            "run",
            survey.catalogue_path,
            "-o",
            outs["serial"],
            "--size",
            "15",
            "--no-progress",
        ]
    )
    assert code == 0, err
    # every row as the truth expects (--size overrides a bad size column)
    truth = survey.truth
    check = np.char.find(np.array(truth["bad_kind"], dtype=str), "size") < 0
    status = _status(outs["zarr"])
    np.testing.assert_array_equal(
        status[truth["row"][check]], truth["expected_status"][check]
    )
    return outs


# ----------------------------------------------------------------------------
# kill -9 of the main process, then --resume
# ----------------------------------------------------------------------------


def _progress(out):
    """Records of finished work (staged jobs, written chunks) in the ledger."""
    return len([e for e in _ledger_events(out) or [] if e != "run_started"])


def _trigger(kind, out, rng, n_chunks):
    """The kill condition of one drill (a callable) and its description."""
    if kind == "start":
        return (lambda: True), "right after start"
    if kind == "creation":
        return (lambda: os.path.exists(out)), "as the output is created"
    if kind == "cutting":
        k = int(rng.integers(1, 4))
        return (lambda: _progress(out) >= k), f"after {k} ledger record(s)"
    if kind == "assembly":
        k = int(rng.integers(1, n_chunks))
        return (lambda: (_ledger_events(out) or []).count("chunk_written") >= k), (
            f"after {k} of {n_chunks} chunks were written"
        )
    if kind == "cleanup":
        return (lambda: "run_finished" in (_ledger_events(out) or [])), "at clean-up"
    delay = float(rng.uniform(0.0, 1.5))
    state = {}

    def after_delay():
        if _ledger_events(out) is None:
            return False
        state.setdefault("t0", time.monotonic())
        return time.monotonic() - state["t0"] >= delay

    return after_delay, f"{delay:.3f} s after the run started"


ZARR_DRILLS = [
    "start",
    "creation",
    "cutting",
    "assembly",
    "random",
    "random",
    "cleanup",
]


def test_resume_after_kill_inside_zarr_metadata_write(survey, clean, tmp_path):
    """Test the deterministic form of the 'creation' drill: killed while zarr
    wrote the group's metadata, the output holds only zarr's temporary file;
    --resume (and --overwrite) start afresh, and nothing else is deleted."""
    out = tmp_path / "killed_zarr"
    out.mkdir()
    leftover = out / "zarr.0123456789abcdef0123456789abcdef.partial"
    leftover.write_bytes(b'{"zarr_format": 3, "node_')
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS, "--format", "zarr"]
    code, err = _cli(["run", *args, "--resume"])
    assert code == 0, err
    assert not leftover.exists()
    _assert_identical(out, clean["zarr"])
    # a folder holding anything else is not taken for an interrupted creation
    other = tmp_path / "other"
    other.mkdir()
    (other / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b"x")
    (other / "notes.txt").write_text("mine")
    for flag in ("--resume", "--overwrite"):
        code, err = _cli(["run", survey.catalogue_path, "-o", other, *RUN_ARGS, flag])
        assert code == 2, err
        assert (other / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("fmt", "kind", "k"),
    [("zarr", kind, k) for k, kind in enumerate(ZARR_DRILLS)]
    + [("fits", kind, k) for k, kind in enumerate(["creation", "cutting", "random"])],
)
def test_kill_main_process_then_resume(survey, clean, tmp_path, fmt, kind, k):
    """Test that a SIGKILLed run, once resumed, is byte-identical to a clean run."""
    rng = np.random.default_rng([RNG_SEED, k, len(fmt)])
    out = tmp_path / f"killed_{fmt}"
    images = cutana.open(clean["zarr"]).images
    n_chunks = -(-images.shape[0] // images.chunks[0])
    condition, when = _trigger(kind, str(out), rng, n_chunks)
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS, "--format", fmt]
    must_hit = kind in ("start", "creation", "cutting", "assembly")
    hit = _run_killed(args, condition, tmp_path / "killed.log",
                      attempts=3 if must_hit else 1)
    events = _ledger_events(str(out)) or []
    print(
        f"killed {when}: hit={hit}, ledger {len(events)} records, "
        f"{events.count('job_staged')} jobs staged, "
        f"{events.count('chunk_written')} chunks written"
    )
    if must_hit:
        assert hit, f"the run ended before the kill ({when})"
    # the interrupted output is reported as incomplete, without a traceback
    code, err = _cli(["verify", out])
    assert "Traceback" not in err
    if kind != "cleanup" and hit:
        # killed before the end: verify reports it incomplete (a random kill
        # can also land after the output was finalised, as the process ends)
        assert code == 1 or _finalised(str(out))
    code, err = _cli(["run", *args, "--resume"])
    assert code == 0, f"resume after a kill {when} failed: {err}"
    assert "Traceback" not in err
    _assert_identical(out, clean[fmt])
    status = _status(out)
    assert len(status) == survey.n_sources
    assert not (status == Status.PENDING).any()
    code, err = _cli(["verify", out])
    assert code == 0, err


def test_kill_worker_process(survey, clean, tmp_path):
    """Test that a worker SIGKILLed mid-run is replaced and the run completes."""
    out = tmp_path / "w.zarr"
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = _spawn([survey.catalogue_path, "-o", out, *RUN_ARGS], log)
        try:
            started = _wait_for(
                proc, lambda: (_ledger_events(str(out)) or []).count("job_staged") >= 1
            )
            assert started, "the run ended before a worker could be killed"
            main_proc = psutil.Process(proc.pid)
            workers = [
                p for p in main_proc.children(recursive=True) if p.ppid() != proc.pid
            ]
            assert workers, "no worker processes found"
            rng = np.random.default_rng(RNG_SEED)
            victim = workers[int(rng.integers(len(workers)))]
            victim.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:  # pragma: no cover - only on failure
                _reap(_kill_tree(proc))
    log_text = log_path.read_text(errors="replace")
    assert code == 0, log_text
    assert "worker process died" in log_text  # the fault did hit the run
    assert "Traceback" not in log_text
    _assert_identical(out, clean["zarr"])


@pytest.mark.parametrize(
    ("sig", "expected", "group", "twice"),
    [
        (signal.SIGINT, 130, True, False),
        (signal.SIGTERM, 143, False, False),
        (signal.SIGINT, 130, True, True),
        (signal.SIGTERM, 143, False, True),
    ],
    ids=["ctrl-c", "sigterm", "ctrl-c-twice", "sigterm-twice"],
)
def test_stopped_run_says_how_to_resume(
    survey, clean, tmp_path, sig, expected, group, twice
):
    """Test that Ctrl-C (SIGINT to the whole process group, as a terminal
    sends it) or SIGTERM to the main process stops a run: its exit code,
    one line naming --resume and no traceback, no worker left; the resumed
    run is byte-identical to a clean one. A second signal soon after (Ctrl-C
    pressed twice) changes none of it: it had left multiprocessing's
    resource tracker to warn of leaked semaphores, or a traceback."""
    out = tmp_path / "stopped.zarr"
    log_path = tmp_path / "run.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cutana.cli", "run", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # its own group, as a terminal's job
            # a shell's background job would ignore SIGINT: undo that
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        kids = []
        try:
            hit = _wait_for(proc, lambda: _progress(str(out)) >= 1)
            assert hit, "the run ended before it could be stopped"
            kids = psutil.Process(proc.pid).children(recursive=True)
            for _ in range(2 if twice else 1):
                if proc.poll() is not None:
                    break
                if group:
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
                time.sleep(0.05)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:  # pragma: no cover - only on failure
                kids = _kill_tree(proc)
    _reap(kids)
    log_text = log_path.read_text(errors="replace")
    assert code == expected, log_text
    assert "Traceback" not in log_text
    assert "the same command with --resume" in log_text
    # the workers ended their tasks and exited: nothing of theirs is left
    assert "leaked" not in log_text, log_text
    assert _cli(["verify", out])[0] == 1  # incomplete
    code, err = _cli(["run", *args, "--resume"])
    assert code == 0, err
    _assert_identical(out, clean["zarr"])


@pytest.mark.parametrize("state", ["killed", "finished"])
def test_resume_of_store_with_array_metadata_removed(survey, clean, tmp_path, state):
    """Test that --resume of a Zarr store whose array metadata was removed
    (``images/zarr.json``) stops with exit 2 naming the file, without a
    traceback, and changes nothing."""
    out = tmp_path / f"{state}.zarr"
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS]
    if state == "killed":
        condition, when = _trigger("cutting", str(out), np.random.default_rng(7), 10)
        assert _run_killed(args, condition, tmp_path / "killed.log"), when
    else:
        shutil.copytree(clean["zarr"], out)
    (out / "images" / "zarr.json").unlink()
    before = files_bytes(out)
    code, err = _cli(["run", *args, "--resume"])
    assert code == 2, err
    assert "images/zarr.json" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert files_bytes(out) == before


def test_second_run_on_an_output_being_written_is_refused(survey, clean, tmp_path):
    """Test that --resume or --overwrite of an output that another run is
    still writing stops with a usage error and leaves that run alone: it
    finishes byte-identical to a clean run."""
    out = tmp_path / "busy.zarr"
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS]
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = _spawn(args, log)
        try:
            assert _wait_for(proc, lambda: _progress(str(out)) >= 1), "run ended early"
            for flag in ("--resume", "--overwrite"):
                code, err = _cli(["run", *args, flag])
                assert code == 2, err
                assert "being written by another cutana run" in err
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:  # pragma: no cover - only on failure
                _reap(_kill_tree(proc))
    assert code == 0, log_path.read_text(errors="replace")
    _assert_identical(out, clean["zarr"])


def test_rerun_without_resume_refuses_and_keeps_output(survey, clean, tmp_path):
    """Test that running again into an existing output is refused, changing nothing."""
    out = tmp_path / "again.zarr"
    shutil.copytree(clean["serial"], out)
    before = files_bytes(out)
    code, err = _cli(
        ["run", survey.catalogue_path, "-o", out, "--size", "15", "--no-progress"]
    )
    assert code == 2
    assert "already exists" in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert files_bytes(out) == before


# ----------------------------------------------------------------------------
# damaged tiles
# ----------------------------------------------------------------------------


def _truncate(path, rng):
    size = os.path.getsize(path)
    os.truncate(path, int(rng.integers(2880 * 2, size - 2880)))


def _corrupt_header(path, rng):
    with open(path, "r+b") as fh:
        fh.seek(320)
        fh.write(rng.integers(0, 256, 1200, dtype=np.uint8).tobytes())


def _no_wcs(path, rng):
    with fits.open(path, mode="update") as hdul:
        header = hdul[0].header
        for key in list(header):
            if key.startswith(
                (
                    "CTYPE",
                    "CRVAL",
                    "CRPIX",
                    "CD1_",
                    "CD2_",
                    "CDELT",
                    "PC1_",
                    "PC2_",
                    "CUNIT",
                )
            ):
                del header[key]


def _broken_wcs(path, rng):
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["CTYPE1"] = "RA---XYZ"


def _no_zeropoint(path, rng):
    with fits.open(path, mode="update") as hdul:
        del hdul[0].header["MAGZERO"]


# name: (damage, when, reason in the message, extra options)
# when: "before" the run, or "after" indexing (between plan and cut)
TILE_FAULTS = {
    "truncated": (_truncate, "before", "truncated", []),
    "truncated_after_indexing": (_truncate, "after", "truncated", []),
    "corrupt_header": (_corrupt_header, "before", "", []),
    "deleted": (lambda p, rng: os.remove(p), "before", "does not exist", []),
    "deleted_after_indexing": (
        lambda p, rng: os.remove(p),
        "after",
        "does not exist",
        [],
    ),
    "no_wcs": (_no_wcs, "before", "no celestial WCS", []),
    "broken_wcs": (_broken_wcs, "before", "invalid WCS", []),
    "no_zeropoint": (_no_zeropoint, "before", "MAGZERO", ["--flux-conversion"]),
}


def _report(path):
    with open(path) as fh:
        return json.load(fh)


@pytest.mark.parametrize("fault", sorted(TILE_FAULTS))
def test_damaged_tile_fails_only_its_sources(
    survey, clean, tmp_path, monkeypatch, fault
):
    """Test that a damaged tile fails its own sources only, naming file and reason."""
    from cutana import pipeline

    damage, when, reason, extra = TILE_FAULTS[fault]
    rng = np.random.default_rng([RNG_SEED, len(fault)])
    copy = make_survey(tmp_path / "survey", **SURVEY)
    victim_tile, victim_band = 1, int(rng.integers(len(BANDS)))
    victim = copy.tile_paths[victim_tile][victim_band]
    if when == "before":
        damage(victim, rng)
    else:
        original = pipeline._Runner.run

        def damaged_run(self, *args, **kwargs):
            damage(victim, rng)  # the plan is made; the tile breaks before cutting
            return original(self, *args, **kwargs)

        monkeypatch.setattr(pipeline._Runner, "run", damaged_run)

    out = tmp_path / "o.zarr"
    report_path = tmp_path / "report.json"
    base = ["--size", "15", "--no-progress"]
    if extra:  # the reference must use the same options
        ref = tmp_path / "ref.zarr"
        fresh = make_survey(tmp_path / "intact", **SURVEY)
        assert _cli(["run", fresh.catalogue_path, "-o", ref, *base, *extra])[0] == 0
    else:
        ref = clean["serial"]
    code, err = _cli(
        [
            "run",
            copy.catalogue_path,
            "-o",
            out,
            *base,
            *extra,
            "--report-json",
            report_path,
        ]
    )
    _check_only_victim(
        code, err, out, ref, copy, victim, victim_tile, report_path, reason
    )


def _check_only_victim(
    code, err, out, ref, copy, victim, victim_tile, report_path, reason
):
    """Assert that a run lost exactly the sources of the damaged tile file."""
    assert code == 1, err
    assert "Traceback" not in err
    got, want = cutana.open(out), cutana.open(ref)
    status, ref_status = np.asarray(got.status), np.asarray(want.status)
    assert len(status) == len(ref_status) and not (status == Status.PENDING).any()
    # the sources the clean run cut from the damaged tile, and (when the tile
    # cannot even be indexed, so that its footprint is unknown) the off-tile
    # rows whose own list of files names it
    cut_there = np.isin(ref_status, [Status.OK, Status.PARTIAL_OVERLAP]) & (
        np.asarray(want.tile) == victim_tile
    )
    names_it = np.array([victim in paths for paths in _listed_files(copy)])
    may_fail = cut_there | (names_it & (ref_status == Status.NO_OVERLAP))
    affected = status == Status.TILE_ERROR
    assert np.all(affected[cut_there]), "a source of the damaged tile was not failed"
    assert not np.any(affected & ~may_fail), "a source elsewhere was failed"
    messages = _report(report_path)["messages"]
    for r in np.flatnonzero(affected):
        text = messages[str(r)]
        assert os.path.basename(victim) in text, text
        assert reason in text, text
        assert "\n" not in text
        # not cut: filled in every band, also those the tile could give
        assert not np.any(got.images[r]), f"row {r} has pixels"
    # everything else is exactly the clean run
    rest = ~affected
    np.testing.assert_array_equal(status[rest], ref_status[rest])
    for i in np.flatnonzero(rest):
        np.testing.assert_array_equal(got.images[i], want.images[i])
    assert _cli(["verify", out])[0] == 0  # a consistent output, failures recorded


def _listed_files(survey):
    from cutana.catalog import read_catalog

    return read_catalog(survey.catalogue_path, size=15).fits_file_paths


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """The survey again, with GZIP-compressed tiles (image in HDU 1)."""
    return make_survey(tmp_path_factory.mktemp("gz"), compress=True, **SURVEY)


def test_compressed_tiles_equal_uncompressed(compressed, clean, tmp_path):
    """Test that losslessly compressed tiles give exactly the cutouts of plain ones."""
    out = tmp_path / "gz.zarr"
    code, err = _cli(
        ["run", compressed.catalogue_path, "-o", out, "--size", "15", "--no-progress"]
    )
    assert code == 0, err
    got, want = cutana.open(out), cutana.open(clean["serial"])
    np.testing.assert_array_equal(got.status, want.status)
    np.testing.assert_array_equal(got.images[:], want.images[:])


@pytest.mark.parametrize("fault", ["corrupt_data", "unreadable_extension"])
def test_damaged_compressed_tile(compressed, clean, tmp_path, fault):
    """Test that corrupt compressed data or a bad extension fails only that tile."""
    copy = make_survey(tmp_path / "gz", compress=True, **SURVEY)
    victim = copy.tile_paths[1][0]
    rng = np.random.default_rng([RNG_SEED, 7])
    with open(victim, "r+b") as fh:
        if fault == "corrupt_data":
            size = os.path.getsize(victim)
            fh.seek(size - 60_000)
            fh.write(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        else:  # the header of extension 1, which holds the image
            fh.seek(2880 + 80)
            fh.write(rng.integers(0, 256, 1500, dtype=np.uint8).tobytes())
    out = tmp_path / "o.zarr"
    report_path = tmp_path / "r.json"
    code, err = _cli(
        [
            "run",
            copy.catalogue_path,
            "-o",
            out,
            "--size",
            "15",
            "--no-progress",
            "--report-json",
            report_path,
        ]
    )
    reason = ""
    _check_only_victim(
        code, err, out, clean["serial"], copy, victim, 1, report_path, reason
    )


# ----------------------------------------------------------------------------
# full disk
# ----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MB tmpfs (skipped where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_full_disk_is_clear_error_then_resume(survey, clean, small_fs, fmt):
    """Test that a full disk stops the run clearly and --resume then finishes it."""
    out = small_fs / "out"
    args = ["run", survey.catalogue_path, "-o", out, *RUN_ARGS, "--format", fmt]
    code, err = _cli(args)
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("cutana: error:")]
    assert len(lines) == 1 and "no space left" in lines[0].lower(), err
    assert "--resume" in lines[0]
    # the interrupted output is reported incomplete, not complete and not corrupt
    code, verr = _cli(["verify", out])
    assert code == 1
    assert "Traceback" not in verr
    subprocess.run(["mount", "-o", "remount,size=64M", str(small_fs)], check=True)
    code, err = _cli([*args, "--resume"])
    assert code == 0, err
    _assert_identical(out, clean[fmt])
    assert _cli(["verify", out])[0] == 0


# ----------------------------------------------------------------------------
# hostile ids
# ----------------------------------------------------------------------------

HOSTILE_IDS = [
    "../../x",
    "/abs",
    "a/b",
    "a_b",
    "A_B",
    "",
    "nul\x00byte",
    "x" * 5000,
    "..",
    ".",
    "CON",
    "con.txt",
    "a\\b",
    "~",
    "~/y",
    "$(touch pwn)",
    "`id`",
    "ünïcödé",
    "日本語",
    "-rf",
    ".hidden",
    "a b",
    "a\tb",
    "a;b",
    "dup",
    "dup",
    "../" * 40 + "etc/passwd",
    "C:\\Windows\\x",
    "file.fits",
    "file",
    "FILE.FITS",
    "%2e%2e%2f",
    "\u202eevil",
]


def test_hostile_ids_stay_inside_output(tmp_path):
    """Test that ids with separators, '..', NUL, unicode or 5000 chars stay in OUT."""
    rng = np.random.default_rng(RNG_SEED)
    survey = make_survey(
        tmp_path / "s",
        n_tiles=1,
        bands=("VIS",),
        tile_size=150,
        n_sources=60,
        edge_fraction=0.0,
        off_tile_fraction=0.0,
        size_range_pixels=(10, 14),
        seed=4,
        cutana_style=False,
    )
    table = Table.read(survey.catalogue_path, format="ascii.csv")
    alphabet = list("/\\.._-~:;*?<>|\"' \u00e9\u0000") + ["..", "../"]
    ids = list(HOSTILE_IDS)
    while len(ids) < len(table):
        # (astropy's ASCII readers strip blanks around a field)
        ids.append("".join(rng.choice(alphabet, size=int(rng.integers(1, 12)))).strip())
    table["SourceID"] = ids[: len(table)]
    cat = tmp_path / "work" / "hostile.ecsv"
    cat.parent.mkdir()
    table.write(cat, format="ascii.ecsv")
    out = tmp_path / "work" / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    code, err = _cli(
        [
            "run",
            cat,
            "--tiles",
            survey.paths[0],
            "-o",
            out,
            "--size",
            "12",
            "--format",
            "fits",
            "--no-progress",
        ]
    )
    assert code == 0, err
    new = {p for p in tmp_path.rglob("*")} - before
    inside = {out.resolve(), *out.resolve().parents}  # OUT and the folders made for it
    outside = [
        p
        for p in new
        if p.resolve() not in inside and out.resolve() not in p.resolve().parents
    ]
    assert not outside, outside
    written = [p for p in out.iterdir() if p.suffix == ".fits"]
    assert all(p.resolve().parent == out.resolve() for p in written)
    assert len({p.name.lower() for p in written}) == len(written)
    archive = cutana.open(out)
    assert len(archive) == len(table)
    assert list(archive.source_id) == [str(v) for v in table["SourceID"]]
    status = np.asarray(archive.status)
    files = list(archive.files)
    cut = np.isin(status, [Status.OK, Status.PARTIAL_OVERLAP])
    assert len({f.lower() for f, c in zip(files, cut, strict=True) if c}) == cut.sum()
    # empty and repeated ids are bad rows, with a message naming row and column
    assert status[ids.index("")] == Status.BAD_ROW
    assert status[len(ids) - ids[::-1].index("dup") - 1] == Status.BAD_ROW
    for i in np.flatnonzero(cut)[:10]:
        with fits.open(out / files[i]) as hdul:
            assert hdul[1].header["ROW"] == i


# ----------------------------------------------------------------------------
# runs in bands (several tiles per chunk, chunks written from memory)
# ----------------------------------------------------------------------------

# 2 tiles in catalogue order, 16 KiB rows: 256-row chunks, each filled by
# the two jobs (one per tile) of its band, cut and written by one worker
BAND_ARGS = ["--workers", "2", "--size", "12", "--target-size", "64",
             "--resample", "bilinear", "--no-progress"]


@pytest.fixture(scope="module")
def band_survey(tmp_path_factory):
    """2 tiles x 1 band, 1200 sources."""
    return make_survey(
        tmp_path_factory.mktemp("band_survey"),
        **{**SURVEY, "bands": ("VIS",), "tile_size": 300, "n_sources": 1200},
    )


@pytest.fixture(scope="module")
def band_clean(band_survey, tmp_path_factory):
    out = tmp_path_factory.mktemp("band_clean") / "c.zarr"
    code, err = _cli(["run", band_survey.catalogue_path, "-o", out, *BAND_ARGS])
    assert code == 0, err
    return out


@pytest.mark.parametrize("k", [0, 1])
def test_kill_band_run_then_resume(band_survey, band_clean, tmp_path, k):
    """Test that a run in bands killed between chunk writes resumes byte-identical."""
    rng = np.random.default_rng([RNG_SEED, k, 7])
    images = cutana.open(band_clean).images
    n_chunks = -(-images.shape[0] // images.chunks[0])
    assert n_chunks >= 3
    out = tmp_path / "killed_bands"
    condition, when = _trigger("assembly", str(out), rng, n_chunks)
    args = [band_survey.catalogue_path, "-o", out, *BAND_ARGS]
    hit = _run_killed(args, condition, tmp_path / "killed.log")
    events = _ledger_events(str(out)) or []
    assert hit, f"the run ended before the kill ({when})"
    assert "job_staged" not in events  # nothing staged: bands write chunks
    code, err = _cli(["run", *args, "--resume"])
    assert code == 0, f"resume after a kill {when} failed: {err}"
    _assert_identical(out, band_clean)
    code, err = _cli(["verify", out])
    assert code == 0, err


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
@pytest.mark.parametrize("ledger_text", [b"", b'{"event": "run_sta'])
def test_resume_after_kill_before_the_run_was_recorded(
    survey, clean, tmp_path, monkeypatch, fmt, ledger_text
):
    """Test the deterministic form of a kill between creating the ledger and
    recording the run's start (an empty or cut-short ledger): --resume starts
    afresh and ends byte-identical to a clean run."""
    from cutana.io import Ledger

    out = tmp_path / f"unrecorded_{fmt}"
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS, "--format", fmt]

    class Killed(BaseException):
        """Stands for SIGKILL (which the command, unlike Ctrl-C, cannot catch)."""

    def killed(self, fingerprint, **info):
        raise Killed  # right before the record

    monkeypatch.setattr(Ledger, "run_started", killed)
    with pytest.raises(Killed):
        _cli(["run", *args])
    monkeypatch.undo()
    ledger = out / ".cutana" / "ledger.jsonl"
    ledger.write_bytes(ledger_text)
    code, err = _cli(["run", *args, "--resume"])
    assert code == 0, err
    _assert_identical(out, clean[fmt])


def test_resume_recuts_removed_fits_files(survey, clean, tmp_path):
    """Test that --resume cuts again the FITS files of finished jobs that were
    removed after the kill (the ledger still records their jobs), and ends
    byte-identical to a clean run."""
    out = tmp_path / "killed_fits"
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS, "--format", "fits"]
    condition, when = _trigger("cutting", str(out), np.random.default_rng(5), 10)
    assert _run_killed(args, condition, tmp_path / "killed.log"), when
    written = sorted(p for p in out.glob("*.fits"))
    assert written, "no file was written before the kill"
    removed = written[:: max(1, len(written) // 3)]
    for path in removed:
        path.unlink()
    code, err = _cli(["run", *args, "--resume"])
    assert code == 0, err
    assert all(path.exists() for path in removed)
    _assert_identical(out, clean["fits"])
    assert _cli(["verify", out])[0] == 0


def test_resume_rewrites_removed_catalogue_columns(survey, clean, tmp_path):
    """Test that --resume of a killed Zarr run writes the ids and positions
    again when their chunks were removed after the kill (they are written
    once, when the store is made, and missing chunks read as fill values),
    and ends byte-identical to a clean run."""
    out = tmp_path / "killed_zarr"
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS]
    condition, when = _trigger("cutting", str(out), np.random.default_rng(6), 10)
    assert _run_killed(args, condition, tmp_path / "killed.log"), when
    removed = [out / "ra" / "c.0", out / "dec" / "c.0", out / "source_id" / "c.0"]
    for path in removed:
        path.unlink()
    code, err = _cli(["run", *args, "--resume"])
    assert code == 0, err
    _assert_identical(out, clean["zarr"])
    assert _cli(["verify", out])[0] == 0


def test_finished_store_with_removed_row_chunks(survey, clean, tmp_path):
    """Test that `cutana verify` names the per-row arrays of a finished Zarr
    store whose chunks were removed (they would read as fill values: NaN
    positions, empty ids, no tile); that --resume writes ids and positions
    again (byte-identical to the clean run), and refuses, changing nothing,
    when the geometry, which only the run knew, is gone."""
    out = tmp_path / "done.zarr"
    shutil.copytree(clean["zarr"], out)
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS, "--resume"]
    for name in ("ra", "source_id"):
        (out / name / "c.0").unlink()
    assert _cli(["verify", out])[0] == 1
    problems = _verify_text(out)
    assert "array 'ra': 1 of its 1 chunks are missing" in problems
    assert "array 'source_id'" in problems
    code, err = _cli(["run", *args])
    assert code == 0, err
    _assert_identical(out, clean["zarr"])
    (out / "geometry" / "c.0.0").unlink()
    assert "array 'geometry'" in _verify_text(out)
    before = files_bytes(out)
    code, err = _cli(["run", *args])
    assert code == 2
    assert "'geometry'" in err and "--overwrite" in err
    assert files_bytes(out) == before


def _verify_text(out):
    """The problems `cutana verify` prints (standard output)."""
    from cutana.verify import verify

    return "\n".join(verify(out))


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_resume_of_finished_output_with_other_options(clean, survey, tmp_path, fmt):
    """Test that --resume of a finished output with options that change what
    is written, or in the other format, is a clear error that touches
    nothing; execution options (workers, job size) may differ."""
    out = tmp_path / f"done_{fmt}"
    shutil.copytree(clean[fmt], out)
    before = files_bytes(out)
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS, "--format", fmt]
    other = "zarr" if fmt == "fits" else "fits"
    for extra, words in (
        (["--normalize", "asinh", "--dtype", "uint8"], ["dtype", "normalize"]),
        (["--bands", "VIS"], ["bands"]),
        (["--format", other], [f"finished {fmt.upper()} output"]),
    ):
        code, err = _cli(["run", *args, *extra, "--resume"])
        assert code == 2, err
        assert all(w in err for w in words) and "--overwrite" in err, err
        assert files_bytes(out) == before
    assert _cli(["run", *args, "--workers", "1", "--resume"])[0] == 0
    assert files_bytes(out) == before


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_resume_of_finished_output_with_files_removed(clean, survey, tmp_path, fmt):
    """Test that --resume of a finished output whose files were removed since
    is a clear error (its run state is gone, so they cannot be redone), not
    a success, and that it touches nothing."""
    out = tmp_path / f"done_{fmt}"
    shutil.copytree(clean[fmt], out)
    args = [survey.catalogue_path, "-o", out, *RUN_ARGS, "--format", fmt]
    assert _cli(["run", *args, "--resume"])[0] == 0  # intact: nothing to do
    victim = sorted(out.glob("*.fits") if fmt == "fits" else out.glob("images/c*"))[1]
    victim.unlink()
    before = files_bytes(out)
    code, err = _cli(["run", *args, "--resume"])
    assert code == 2, err
    assert "were removed since" in err and "--overwrite" in err
    assert files_bytes(out) == before
