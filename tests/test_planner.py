# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of how the planner slices sources into jobs and bands; runs in bands."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cutana
from cutana import _tasks, pipeline
from cutana._testing import files_bytes
from cutana.bench.synthetic import make_survey
from cutana.catalog import read_catalog
from cutana.planner import make_plan, parse_memory, split_rows
from cutana.status import Status
from cutana.tiles import TileIndex
from cutana.verify import verify


@st.composite
def _split_case(draw):
    n = draw(st.integers(1, 400))
    # increasing rows with gaps, as a tile's share of a catalogue
    gaps = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    rows = np.cumsum(gaps) - 1
    max_part = draw(st.integers(1, n))
    n_parts = draw(st.integers(-(-n // max_part), n))
    chunk_rows = draw(st.sampled_from([None, 1, 2, 7, 32, 186]))
    return rows, n_parts, max_part, chunk_rows


@settings(max_examples=300, deadline=None)
@given(_split_case())
def test_split_rows_keeps_rows_and_bounds(case):
    """Parts cover the rows in order, are non-empty, and none exceeds the bound."""
    rows, n_parts, max_part, chunk_rows = case
    parts = split_rows(rows, n_parts, max_part, chunk_rows)
    assert len(parts) == n_parts
    assert all(1 <= len(p) <= max_part for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), rows)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.integers(1, 30))
def test_split_rows_without_chunks_is_array_split(n, n_parts):
    """Without chunk rows the parts are exactly numpy's."""
    rows = np.arange(n) * 3
    n_parts = min(n_parts, n)
    expected = np.array_split(rows, n_parts)
    got = split_rows(rows, n_parts, n)
    assert [p.tolist() for p in got] == [e.tolist() for e in expected]


@pytest.mark.parametrize(
    ("n", "n_parts", "max_part", "chunk_rows"),
    [(50_000, 24, 4096, 186), (50_000, 13, 4096, 186), (10_000, 7, 2000, 100),
     (999, 4, 400, 33)],
)
def test_split_rows_cuts_on_chunk_boundaries(n, n_parts, max_part, chunk_rows):
    """Contiguous rows with room to move are cut only at multiples of the chunk rows."""
    parts = split_rows(np.arange(n), n_parts, max_part, chunk_rows)
    firsts = [int(p[0]) for p in parts]
    assert all(f % chunk_rows == 0 for f in firsts)
    # and stay near numpy's balanced cuts (within half a chunk)
    balanced = [int(p[0]) for p in np.array_split(np.arange(n), n_parts)]
    assert (max(abs(a - b) for a, b in zip(firsts, balanced, strict=True))
            <= chunk_rows // 2 + 1)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.05, 20.0), min_size=1, max_size=12),
    st.integers(1, 600),
    st.sampled_from([None, 1, 8, 50]),
)
def test_split_rows_aims_at_the_weights(weights, n, chunk_rows):
    """With weights each cut aims at its share of the rows: exactly there
    without chunks, else on a chunk boundary less than a chunk away (the
    bound being all the rows); the parts cover the rows in order."""
    rows = np.arange(n) * 2 + 5
    k = len(weights)
    parts = split_rows(rows, k, n, chunk_rows, weights)
    np.testing.assert_array_equal(np.concatenate(parts), rows)
    if k > n:  # one row per part: nothing to aim at
        assert len(parts) == n
        return
    assert len(parts) == k
    assert all(len(p) for p in parts)
    cuts = np.cumsum([len(p) for p in parts])[:-1]
    aims = [round(n * sum(weights[:i]) / sum(weights)) for i in range(1, k)]
    prev = 0
    for i, (c, a) in enumerate(zip(cuts.tolist(), aims, strict=True), start=1):
        # the aim, moved only as far as keeps every part non-empty
        clamped = min(max(a, prev + 1), n - (k - i))
        if chunk_rows in (None, 1):
            assert c == clamped
        else:  # or the nearest chunk boundary, less than a chunk away
            on_boundary = rows[c] // chunk_rows != rows[c - 1] // chunk_rows
            assert c == clamped or (on_boundary and abs(c - a) <= chunk_rows)
        prev = c


def test_split_rows_falls_back_when_no_boundary_fits():
    """A bound too tight for any chunk boundary gives numpy's cuts, clipped to
    the bound."""
    parts = split_rows(np.arange(1000), 3, 340, chunk_rows=100)
    assert [len(p) for p in parts] == [334, 333, 333]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """One tile, one band, 600 sources of one size."""
    return make_survey(
        tmp_path_factory.mktemp("survey"),
        n_tiles=1,
        bands=("VIS",),
        tile_size=300,
        n_sources=600,
        edge_fraction=0.0,
        off_tile_fraction=0.0,
        bad_row_fraction=0.0,
        size_range_pixels=(10, 10),
        seed=5,
    )


def _plan(survey, **kwargs):
    cat = read_catalog(survey.catalogue_path, size=10)
    index = TileIndex.from_file_lists(cat.fits_file_paths)
    diameters = np.full(len(cat), 10.0)
    assignment, _ = index.assign_by_files(cat.fits_file_paths, cat.ra, cat.dec,
                                          diameters)
    kwargs.setdefault("memory_limit", parse_memory("2GB"))
    return make_plan(index, assignment, diameters, cat.status, cat.messages,
                     out_shape=(10, 10), out_itemsize=4, **kwargs)


@pytest.mark.parametrize("asked", [2, 3, 5])
def test_make_plan_fits_as_many_workers_as_the_memory_limit_holds(survey, asked):
    """Test that with ``fit_workers`` a memory limit that holds only k of the
    workers asked for (each with its base, working memory and one source,
    beside the main process) gives a plan for k workers whose estimated
    peak is within the limit, and says so; that without it, such a limit is
    an error; and that a limit too small for one worker is an error that
    does not suggest fewer workers."""
    given = dict(n_workers=asked, parent_bytes=100 * 2**20)
    m = _plan(survey, **given).memory
    one = m.worker_bytes + m.working_bytes + m.per_source_bytes
    for holds in range(1, asked + 1):
        limit = m.parent_bytes + holds * one + one // 2  # not holds + 1
        plan = _plan(survey, memory_limit=limit, fit_workers=True, **given)
        assert plan.n_workers == holds
        assert plan.peak_bytes <= limit
        assert plan.n_sources == 600
        if holds < asked:
            assert plan.workers_asked == asked
            assert f"workers             {holds} ({asked} asked" in plan.summary()
            with pytest.raises(ValueError, match=f"too small for {asked} worker"):
                _plan(survey, memory_limit=limit, **given)
        else:
            assert plan.workers_asked is None
    with pytest.raises(ValueError, match=r"too small for 1 worker\(s\): .* needed; "
                       r"raise --memory-limit$"):
        _plan(survey, memory_limit=m.parent_bytes + one // 2, fit_workers=True, **given)


def test_make_plan_aligns_jobs_with_chunks(survey):
    """Jobs of one tile start on chunk boundaries; the output is the same plan."""
    plain = _plan(survey, max_sources_per_job=130)
    aligned = _plan(survey, max_sources_per_job=130, chunk_rows=64)
    assert len(aligned.jobs) == len(plain.jobs) == 5
    assert all(len(j) <= 130 for j in aligned.jobs)
    assert all(int(j.rows[0]) % 64 == 0 for j in aligned.jobs)
    assert any(int(j.rows[0]) % 64 for j in plain.jobs)
    assert aligned.output_fingerprint() == plain.output_fingerprint()
    np.testing.assert_array_equal(
        np.sort(np.concatenate([j.rows for j in aligned.jobs])),
        np.flatnonzero(plain.base_status == Status.PENDING),
    )


def test_plan_summary_gives_what_workers_may_hold_beyond_its_estimate(survey):
    """Test that the summary gives `Plan.beyond_bytes` on a line of its own
    (`cutana.pipeline` sets it), and no such line when it is 0."""
    from cutana.planner import _fmt_bytes

    plan = _plan(survey, n_workers=2, parent_bytes=100 * 2**20)
    assert plan.beyond_bytes == 0 and "beyond it" not in plan.summary()
    plan.beyond_bytes = 3 * 10**8
    assert f"beyond it, up to    {_fmt_bytes(3 * 10**8)} within the limit" in (
        plan.summary()
    )


def test_balanced_jobs_may_use_the_memory_bound_to_align(survey):
    """With several workers jobs aim at a balanced size but may grow to a boundary."""
    plan = _plan(survey, n_workers=2, chunk_rows=25)
    sizes = [len(j) for j in plan.jobs]
    assert all(int(j.rows[0]) % 25 == 0 for j in plan.jobs)
    assert max(sizes) - min(sizes) <= 25


def test_last_bands_are_cut_smaller_with_several_workers(survey):
    """With 2 workers the last 2 bands of whole chunks are each cut into
    `TAPER` parts (so that the workers end together); with 1 worker all
    bands are of one size. Both plans cut every row once."""
    from cutana.planner import TAPER

    opts = dict(chunk_rows=10, max_sources_per_job=100)
    one = _plan(survey, n_workers=1, **opts)
    two = _plan(survey, n_workers=2, **opts)
    for plan in (one, two):
        assert all(int(j.rows[0]) % 10 == 0 for j in plan.jobs)
        np.testing.assert_array_equal(
            np.concatenate([j.rows for j in plan.jobs]),
            np.flatnonzero(plan.base_status == Status.PENDING),
        )
    sizes = [len(j) for j in one.jobs]
    assert len(sizes) == 7 and max(sizes) - min(sizes) <= 10
    tapered = [len(j) for j in two.jobs]
    assert len(tapered) == 7 - 2 + 2 * TAPER
    head, tail = tapered[:5], tapered[5:]
    assert min(head) >= 80 and max(tail) <= 30
    # the tail holds the rows of 2 bands
    assert abs(sum(tail) - 2 * 600 / 7) <= 10


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_fits_runs_count_the_file_names_per_row(survey, monkeypatch, fmt):
    """Test that a FITS run's plan counts FITS_ROW_BYTES per row in the main
    process beside PARENT_ROW_BYTES (a Zarr run's does not), and that the
    parent's estimate grows by that much per row."""
    from cutana import pipeline
    from cutana.planner import FITS_ROW_BYTES, PARENT_ROW_BYTES

    seen = {}
    real = pipeline.make_plan

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "make_plan", spy)
    cutana.plan_cutouts(survey.catalogue_path, size=10, format=fmt, memory_limit="2GB")
    expected = PARENT_ROW_BYTES + (FITS_ROW_BYTES if fmt == "fits" else 0)
    assert seen["parent_row_bytes"] == expected
    given = 10**8
    plan = _plan(survey, parent_bytes=given, parent_row_bytes=expected)
    assert plan.memory.parent_bytes == given + 600 * expected


def test_single_tile_zarr_run_stages_nothing(survey, tmp_path, monkeypatch):
    """Every chunk of a one-tile catalogue is written whole by the job that cuts it."""
    staged = []
    real = _tasks.stage_job
    monkeypatch.setattr(_tasks, "stage_job",
                        lambda *a, **k: staged.append(1) or real(*a, **k))
    out = tmp_path / "out.zarr"
    # 64 KiB rows: 64 rows per 4 MiB chunk, about two chunks per job
    report = cutana.make_cutouts(survey.catalogue_path, out, size=10, target_size=128,
                                 resample="bilinear", progress=False,
                                 max_sources_per_job=130)
    assert report.exit_code == 0
    assert staged == []
    archive = cutana.open(out)
    assert archive.images.chunks[0] == 64
    assert (archive.status == Status.OK).all()
    assert verify(out) == []


# ----------------------------------------------------------------------------
# bands: several tiles filling the same chunks
# ----------------------------------------------------------------------------

BAND_PLAN = {"size": 10, "target_size": 64, "resample": "bilinear",
             "max_sources_per_job": 600}  # 16 KiB rows: 256 rows per chunk
BAND_RUN = {**BAND_PLAN, "progress": False}


@pytest.fixture(scope="module")
def two_tiles(tmp_path_factory):
    """Two tiles, one band, 1200 sources of one size in catalogue order."""
    return make_survey(
        tmp_path_factory.mktemp("two"),
        n_tiles=2,
        bands=("VIS",),
        tile_size=300,
        n_sources=1200,
        overlap_pixels=20,
        edge_fraction=0.05,
        off_tile_fraction=0.02,
        bad_row_fraction=0.02,
        size_range_pixels=(10, 10),
        seed=9,
    )


def test_band_plan_fills_whole_chunks(two_tiles):
    """Each band's jobs (one per tile) hold whole chunks that no other band touches."""
    plan = cutana.plan_cutouts(two_tiles.catalogue_path, **BAND_PLAN)
    cr = 256
    bands = {}
    for job in plan.jobs:
        bands.setdefault(job.est_bytes, []).append(job)
    chunk_band = {}
    for job in plan.jobs:
        for k in np.unique(job.rows // cr):
            chunk_band.setdefault(int(k), set()).add(job.est_bytes)
    # jobs of one band share their estimate: that of the whole band
    assert all(len(v) == 1 for v in chunk_band.values())
    assert len({job.tile for job in plan.jobs}) == 2
    for est, jobs in bands.items():
        n = sum(len(j) for j in jobs)
        assert est == plan.memory.job_bytes(n)
        assert n <= 600
        assert len({j.tile for j in jobs}) == len(jobs)  # one job per tile
    pending = np.flatnonzero(plan.base_status == Status.PENDING)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([j.rows for j in plan.jobs])), pending
    )


def test_small_bands_fall_back_to_tiles(two_tiles, monkeypatch):
    """When a band's jobs would be tiny, the plan goes tile by tile."""
    from cutana import planner

    monkeypatch.setattr(planner, "MIN_BAND_JOB", 10_000)
    plan = cutana.plan_cutouts(two_tiles.catalogue_path, **BAND_PLAN)
    assert [j.tile for j in plan.jobs] == sorted(j.tile for j in plan.jobs)
    assert all(j.est_bytes == plan.memory.job_bytes(len(j)) for j in plan.jobs)


def test_bands_that_mix_tiles_take_the_band_cap(survey, two_tiles, monkeypatch):
    """Bands mixing tiles hold up to MAX_SOURCES_PER_BAND sources; one-tile
    bands (jobs) stay within MAX_SOURCES_PER_JOB."""
    from cutana import planner

    monkeypatch.setattr(planner, "MAX_SOURCES_PER_JOB", 150)
    monkeypatch.setattr(planner, "MAX_SOURCES_PER_BAND", 300)
    opts = {"size": 10, "target_size": 128, "resample": "bilinear"}  # 64-row chunks
    mixed = cutana.plan_cutouts(two_tiles.catalogue_path, **opts)
    bands = {}
    for job in mixed.jobs:
        bands.setdefault(job.est_bytes, []).append(job)
    sizes = [sum(len(j) for j in jobs) for jobs in bands.values()]
    assert all(len(jobs) == 2 for jobs in bands.values())  # both tiles in each
    assert max(sizes) > 150 and max(sizes) <= 300
    single = cutana.plan_cutouts(survey.catalogue_path, **opts)
    assert len({j.tile for j in single.jobs}) == 1
    assert max(len(j) for j in single.jobs) <= 150
    assert sum(len(j) for j in single.jobs) == 600


def test_bands_that_mix_tiles_aim_at_fewer_per_worker_than_jobs(
    survey, two_tiles, monkeypatch
):
    """With 2 workers, bands mixing tiles aim at ``BANDS_PER_WORKER`` bands
    per worker (each maps every tile it touches once), a single tile's
    jobs at ``JOBS_PER_WORKER`` jobs per worker (the last bands, cut
    smaller, aside)."""
    from cutana import planner

    monkeypatch.setattr(planner, "MIN_SOURCES_PER_JOB", 1)
    monkeypatch.setattr(planner, "MIN_BAND_JOB", 1)
    cr = 16  # rows per chunk of 256 x 256 float32 cutouts
    opts = {"size": 10, "target_size": 256, "resample": "bilinear", "workers": 2,
            "backend": "processes", "memory_limit": "2GB"}
    mixed = cutana.plan_cutouts(two_tiles.catalogue_path, **opts)
    bands, last = [], -1  # sources per band: jobs in band order, whole chunks
    for job in mixed.jobs:
        if int(job.rows[0]) // cr > last:  # past the band's chunks: the next
            bands.append(0)
        bands[-1] += len(job)
        last = max(last, int(job.rows[-1]) // cr)
    aim = mixed.n_sources / (2 * planner.BANDS_PER_WORKER)
    whole = [n for n in bands if n > aim / 2]
    assert len(whole) == 2 * planner.BANDS_PER_WORKER - 2
    assert all(abs(n - aim) <= cr for n in whole)
    assert len({j.tile for j in mixed.jobs}) == 2
    single = cutana.plan_cutouts(survey.catalogue_path, **opts)
    aim = single.n_sources / (2 * planner.JOBS_PER_WORKER)
    assert len(single.jobs) >= 2 * planner.JOBS_PER_WORKER - 2
    assert max(len(j) for j in single.jobs) <= aim + cr


@pytest.fixture(scope="module")
def tile_by_tile(two_tiles, tmp_path_factory):
    """The same run planned tile by tile (staged and assembled)."""
    from cutana import planner

    out = tmp_path_factory.mktemp("tiles") / "tiles.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(planner, "MIN_BAND_JOB", 10_000)
        report = cutana.make_cutouts(two_tiles.catalogue_path, out, **BAND_RUN)
    assert report.exit_code == 0
    return out


def test_bands_are_written_from_memory_and_equal_staged_run(
    two_tiles, tile_by_tile, tmp_path, monkeypatch
):
    """A band run stages nothing and writes the same bytes as the staged run."""
    staged, groups = [], []
    stage, cut = _tasks.stage_job, _tasks._cut
    monkeypatch.setattr(_tasks, "stage_job",
                        lambda *a, **k: staged.append(1) or stage(*a, **k))

    def spy(task, *args):
        if isinstance(task, _tasks._GroupTask):
            groups.append(task)
        return cut(task, *args)

    monkeypatch.setattr(_tasks, "_cut", spy)
    out = tmp_path / "bands.zarr"
    report = cutana.make_cutouts(two_tiles.catalogue_path, out, **BAND_RUN)
    assert report.exit_code == 0
    assert staged == []
    assert len(groups) >= 2 and all(len(g.members) == 2 for g in groups)
    assert files_bytes(out) == files_bytes(tile_by_tile)
    assert verify(out) == []


def test_failed_band_runs_its_jobs_alone(
    two_tiles, tile_by_tile, tmp_path, monkeypatch
):
    """A band whose cutting raises is split: only the bad job's rows fail."""
    plan = cutana.plan_cutouts(two_tiles.catalogue_path, **BAND_PLAN)
    bad = plan.jobs[1]
    cut = _tasks.cut_job

    def flaky(settings, tile, job, *args, **kwargs):
        if np.array_equal(job.rows, bad.rows):
            msg = "simulated crash in the kernel"
            raise RuntimeError(msg)
        return cut(settings, tile, job, *args, **kwargs)

    monkeypatch.setattr(_tasks, "cut_job", flaky)
    out = tmp_path / "failed.zarr"
    report = cutana.make_cutouts(two_tiles.catalogue_path, out, **BAND_RUN)
    assert report.exit_code == 1
    assert any("simulated crash" in f for f in report.failures)
    got, ref = cutana.open(out), cutana.open(tile_by_tile)
    status = np.asarray(got.status)
    assert (status[bad.rows] == Status.TILE_ERROR).all()
    others = np.setdiff1d(np.arange(len(status)), bad.rows)
    np.testing.assert_array_equal(status[others], np.asarray(ref.status)[others])
    np.testing.assert_array_equal(got.images[others], ref.images[others])
    assert verify(out) == []


def _cgroup(folder, limit, usage, stat):
    """Fake cgroup files; `None` leaves a file out."""
    paths = []
    for name, text in (("max", limit), ("current", usage), ("stat", stat)):
        path = folder / name
        if text is not None:
            path.write_text(text)
        paths.append(str(path))
    return tuple(paths)


@pytest.mark.parametrize(
    ("limit", "usage", "stat", "expected"),
    [
        # no limit ("max"), or no cgroup files at all: the system's figure
        ("max\n", "5000\n", "inactive_file 1000\n", "system"),
        (None, None, None, "system"),
        # a limit: less the working set (usage without reclaimable file pages)
        ("8000000\n", "3000000\n", "anon 1\ninactive_file 1000000\n", 6_000_000),
        # no statistics: the limit alone (usage may be mostly page cache)
        ("8000000\n", "3000000\n", None, 8_000_000),
        # working set beyond the limit: nothing left
        ("8000000\n", "9000000\n", "inactive_file 0\n", 0),
    ],
)
def test_available_memory_respects_a_container_limit(
    tmp_path, monkeypatch, limit, usage, stat, expected
):
    """Test that a memory cgroup's limit caps the memory the planner assumes."""
    import psutil

    from cutana import planner

    files = (*_cgroup(tmp_path, limit, usage, stat), "inactive_file")
    missing = tuple(str(tmp_path / f"none{i}") for i in range(3)) + ("x",)
    monkeypatch.setattr(planner, "_CGROUP_FILES", (files, missing))
    system = psutil.virtual_memory().available
    got = planner.available_memory()
    if expected == "system":
        assert abs(got - system) < 256 * 2**20  # sampled twice
    else:
        assert got == expected


def test_default_memory_limit_is_half_of_the_available_memory(monkeypatch):
    """Test that the default --memory-limit is half of what the planner finds."""
    monkeypatch.setattr(pipeline, "available_memory", lambda: 3_000_000_000)
    options = pipeline.RunOptions(size=8)
    options.validate()
    assert options.memory_limit == 1_500_000_000


def test_write_buffers_match_the_writer():
    """Test that the memory model counts the writer thread's buffers."""
    from cutana.io._writeback import DEPTH
    from cutana.planner import WRITE_BUFFERS

    assert WRITE_BUFFERS == DEPTH
