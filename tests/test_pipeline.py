# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""End-to-end tests of the pipeline against astropy's own Cutout2D."""

import ast
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D as AstropyCutout2D
from astropy.nddata import NoOverlapError
from astropy.wcs import WCS

import cutana
from cutana._testing import files_bytes
from cutana.bench.synthetic import make_survey
from cutana.catalog import read_catalog
from cutana.exceptions import ConfigError
from cutana.status import Status

BANDS = ("VIS", "NIR-H")


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A small synthetic survey: 2 tiles x 2 bands, 80 sources of every kind."""
    out = tmp_path_factory.mktemp("survey")
    return make_survey(
        out,
        n_tiles=2,
        bands=BANDS,
        tile_size=240,
        n_sources=80,
        overlap_pixels=30,
        edge_fraction=0.1,
        off_tile_fraction=0.05,
        bad_row_fraction=0.05,
        size_range_pixels=(12, 30),
        seed=3,
    )


def _tile_data(path):
    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.data is not None and h.data.ndim == 2)
        return np.array(hdu.data, dtype=np.float64), WCS(hdu.header), hdu.header


def _reference(path, ra, dec, size, mode="partial"):
    data, wcs, header = _tile_data(path)
    pos = SkyCoord(ra, dec, unit="deg")
    return AstropyCutout2D(data, pos, size, wcs=wcs, mode=mode, fill_value=np.nan)


def _tile_paths(archive, i):
    """The tile files row ``i`` was cut from: as a Zarr store lists them, or
    as the ``TILE`` keywords of its FITS file."""
    if hasattr(archive, "tile_files"):
        return archive.tile_files(i)
    return archive.attrs["tiles"][int(archive.tile[i])]["paths"]


@pytest.fixture(scope="module")
def zarr_run(survey, tmp_path_factory):
    """One unresampled float32 run with a fixed size, serial backend."""
    out = tmp_path_factory.mktemp("run") / "cutouts.zarr"
    report = cutana.make_cutouts(survey.catalogue_path, out, size=21, progress=False)
    return out, report


def test_zarr_values_equal_astropy_cutout2d(survey, zarr_run):
    """Test that every cut source equals astropy Cutout2D on its tile, band by band."""
    out, report = zarr_run
    archive = cutana.open(out)
    assert archive.images.shape == (survey.n_sources, len(BANDS), 21, 21)
    assert archive.bands == list(BANDS)
    checked = 0
    for i in range(len(archive)):
        if archive.status[i] not in (Status.OK, Status.PARTIAL_OVERLAP):
            continue
        for c, path in enumerate(_tile_paths(archive, i)):
            ref = _reference(path, archive.ra[i], archive.dec[i], 21)
            got = np.asarray(archive.images[i, c])
            np.testing.assert_array_equal(got, ref.data.astype(np.float32))
            assert os.path.basename(path).split("_")[2].endswith(BANDS[c])
        checked += 1
    assert checked > 40


def test_statuses_match_truth(survey, zarr_run):
    """Test that every row gets the status the survey's truth table expects."""
    out, report = zarr_run
    archive = cutana.open(out)
    truth = survey.truth
    status = np.asarray(archive.status)
    assert len(status) == survey.n_sources
    assert not (status == Status.PENDING).any()
    expected = np.array(truth["expected_status"])
    # --size overrides the size column, so a bad size alone does not make a bad row
    size_only = np.char.find(np.array(truth["bad_kind"], dtype=str), "size") >= 0
    expected[size_only] = truth["category_status_if_valid"][size_only] if (
        "category_status_if_valid" in truth.colnames
    ) else Status.OK
    np.testing.assert_array_equal(status[truth["row"]], expected)
    for name, count in report.counts.items():
        assert np.count_nonzero(status == Status[name]) == count
    assert report.exit_code == 0


def test_wcs_of_output_matches_astropy(survey, zarr_run):
    """Test that cutana.open(...).wcs(i) equals the WCS astropy gives the cutout."""
    out, _ = zarr_run
    archive = cutana.open(out)
    i = int(np.flatnonzero(np.asarray(archive.status) == Status.OK)[0])
    ref = _reference(_tile_paths(archive, i)[0], archive.ra[i], archive.dec[i], 21)
    got = archive.wcs(i)
    pix = np.array([[0, 0], [10, 3], [20, 20]], dtype=float)
    a = got.pixel_to_world_values(pix[:, 0], pix[:, 1])
    b = ref.wcs.pixel_to_world_values(pix[:, 0], pix[:, 1])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_fits_output_matches_zarr(survey, zarr_run, tmp_path):
    """Test that the FITS output holds the same cutouts, ids and an index of
    every row."""
    zout, _ = zarr_run
    zarch = cutana.open(zout)
    out = tmp_path / "fits"
    report = cutana.make_cutouts(
        survey.catalogue_path, out, size=21, format="fits", progress=False
    )
    assert report.exit_code == 0
    from astropy.table import Table

    index = Table.read(out / "index.ecsv")
    assert len(index) == survey.n_sources
    np.testing.assert_array_equal(index["status"], np.asarray(zarch.status))
    for row in index:
        if row["status"] not in (Status.OK, Status.PARTIAL_OVERLAP):
            assert not row["file"] or row["file"] is np.ma.masked
            continue
        path = out / row["file"]
        assert path.resolve().parent == out.resolve()
        with fits.open(path) as hdul:
            images = [h for h in hdul if h.data is not None]
            assert [h.header["EXTNAME"] for h in images] == list(BANDS)
            assert images[0].header["SRCID"] == row["source_id"]
            for c, h in enumerate(images):
                np.testing.assert_array_equal(h.data, zarch.images[row["row"], c])


def test_processes_and_serial_give_identical_bytes(survey, zarr_run, tmp_path):
    """Test that two worker processes write exactly the bytes of a serial run."""
    out, _ = zarr_run
    out2 = tmp_path / "p.zarr"
    cutana.make_cutouts(
        survey.catalogue_path, out2, size=21, workers=2, backend="processes",
        max_sources_per_job=7, progress=False,
    )
    assert files_bytes(out) == files_bytes(out2)


def test_tile_maps_kept_between_jobs_change_no_byte(
    survey, zarr_run, tmp_path, monkeypatch
):
    """Test that tiles kept mapped between jobs give the bytes of fresh maps."""
    import cutana.processing
    from cutana.planner import Plan

    out, _ = zarr_run
    opened = []
    real_open = cutana.processing.open_pixels

    def spy(band, keep_bytes=0):
        px = real_open(band, keep_bytes=keep_bytes)
        opened.append((keep_bytes, px.kept))
        return px

    monkeypatch.setattr(cutana.processing, "open_pixels", spy)
    kept = tmp_path / "kept.zarr"
    cutana.make_cutouts(
        survey.catalogue_path, kept, size=21, max_sources_per_job=7, progress=False,
        memory_limit="2GB",
    )
    # the memory limit leaves room: most opens reuse a kept map
    assert len({k for k, _ in opened}) == 1 and opened[0][0] > 0
    assert sum(k for _, k in opened) > len(opened) // 2
    assert files_bytes(out) == files_bytes(kept)

    opened.clear()
    monkeypatch.setattr(Plan, "spare_worker_bytes", property(lambda self: 0))
    fresh = tmp_path / "fresh.zarr"
    cutana.make_cutouts(
        survey.catalogue_path, fresh, size=21, max_sources_per_job=7, progress=False,
        memory_limit="2GB",
    )
    assert opened and not any(k for _, k in opened)
    assert files_bytes(out) == files_bytes(fresh)


@pytest.mark.parametrize(
    ("backend", "workers"), [("processes", 2), ("serial", 1), ("dask", 2)]
)
def test_workers_keep_tiles_in_half_the_spare_memory(survey, backend, workers):
    """Test that kept tile maps get half of what the limit leaves beside the jobs."""
    from cutana.pipeline import RunOptions, _prepare

    prepared = _prepare(
        survey.catalogue_path,
        RunOptions(size=21, memory_limit="2GB", workers=workers, backend=backend),
    )
    plan = prepared.plan
    largest = max(job.est_bytes for job in plan.jobs)
    per_worker = plan.memory.worker_bytes + largest
    spare = (2 * 10**9 - plan.memory.parent_bytes - workers * per_worker) // workers
    assert plan.n_workers == workers and plan.spare_worker_bytes == spare > 0
    expected = 0 if backend == "dask" else spare // 2
    assert prepared.settings.keep_bytes == expected


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_a_worker_makes_its_images_buffer_once(survey, tmp_path, monkeypatch, fmt):
    """Test that the cut tasks of a run carry its largest images block, and
    that a worker cutting jobs of growing size makes its buffer once, at that
    size (grown job by job, each larger job faulted a new buffer in), with
    the cutouts of a buffer of the job's own size."""
    from cutana import _tasks
    from cutana._tasks import _CutTask, _reserve_blocks
    from cutana.io.fits import fits_filenames
    from cutana.pipeline import RunOptions, _prepare
    from cutana.processing import Scratch, cut_job

    prepared = _prepare(
        survey.catalogue_path,
        RunOptions(size=21, memory_limit="2GB", max_sources_per_job=9, dtype="uint8",
                   normalize="linear"),
    )
    cat = prepared.catalog
    bands = tuple(prepared.index.bands)
    jobs = sorted(prepared.plan.jobs, key=len)  # smallest first: the buffer grows
    assert len(jobs[0]) < len(jobs[-1])
    names = fits_filenames(cat.source_id)
    tasks = []
    for j in jobs:
        task = _CutTask(settings=prepared.settings, tile=prepared.index.tiles[j.tile],
                        job=j, out_dir=str(tmp_path), format=fmt, bands=bands)
        if fmt == "fits":
            task.ids, task.ra, task.dec = (a[j.rows] for a in (cat.source_id, cat.ra,
                                                               cat.dec))
            task.files = names[j.rows]
        tasks.append(task)
    _reserve_blocks(tasks)
    largest = len(jobs[-1]) * len(bands) * 21 * 21  # uint8
    assert [t.block_bytes for t in tasks] == [largest] * len(tasks)
    scratch = Scratch()
    monkeypatch.setattr(_tasks, "_SCRATCH", scratch)
    buffers = set()
    for task in tasks:
        if fmt == "zarr":
            (result,) = _tasks._cut(task, scratch).values()
        else:
            _tasks._run_task_inner(task)  # cuts into the worker's buffer
            result = None
        buffers.add(id(scratch._bufs["images"]))
        if result is not None:
            alone = cut_job(task.settings, task.tile, task.job, scratch=Scratch())
            np.testing.assert_array_equal(result.images, alone.images)
            np.testing.assert_array_equal(result.status, alone.status)
    assert len(buffers) == 1
    assert scratch._bufs["images"].nbytes == largest


@pytest.mark.parametrize("stretch_thread", [False, True])
def test_a_readied_worker_cuts_into_the_buffers_it_wrote(
    survey, tmp_path, monkeypatch, stretch_thread
):
    """Test that `_Runner.ready_workers` asks the workers to write the
    buffers of the largest job (`_ready_worker`, `ready_scratch`), and that
    a worker that did then cuts every job into those very buffers (whose
    pages it has written), with the cutouts of a fresh buffer."""
    from cutana import _tasks
    from cutana.executor import Executor
    from cutana.pipeline import RunOptions, _prepare, _Runner
    from cutana.planner import SUB_BATCH
    from cutana.processing import Scratch, cut_job

    prepared = _prepare(
        survey.catalogue_path,
        RunOptions(size=21, memory_limit="2GB", max_sources_per_job=90,
                   dtype="uint8", normalize="linear"),
    )
    jobs = prepared.plan.jobs
    largest = max(len(j) for j in jobs)
    runner = _Runner(prepared, str(tmp_path / "out.zarr"), False, None)
    runner.stretch = stretch_thread
    asked = []
    monkeypatch.setattr(Executor, "ready_workers",
                        lambda self, func, *args: asked.append((func, args)))
    runner.ready_workers(Executor("processes", 2))
    ((func, args),) = asked
    assert func is _tasks._ready_worker
    n_bands = len(prepared.index.bands)
    assert args == (largest, n_bands, (21, 21), np.dtype("uint8"),
                    np.dtype("float32"), stretch_thread)

    scratch = Scratch()
    monkeypatch.setattr(_tasks, "_SCRATCH", scratch)
    func(*args)  # as a worker runs it
    images = scratch._bufs["images"]
    assert images.nbytes == largest * n_bands * 21 * 21
    names = ["block", "block-2"] if stretch_thread else ["block"]
    assert sorted(scratch._bufs) == sorted(["images", *names])
    blocks = {n: scratch._bufs[n] for n in names}
    sub_batch = min(largest, SUB_BATCH) * 21 * 21 * 4  # float32
    assert all(b.nbytes == sub_batch for b in blocks.values())
    func(*args)  # a second call (two reached this worker) changes nothing
    assert scratch._bufs["images"] is images
    for job in jobs:
        result = cut_job(prepared.settings, prepared.index.tiles[job.tile], job,
                         scratch=scratch, stretch_thread=stretch_thread)
        assert scratch._bufs["images"] is images
        assert np.shares_memory(result.images, images)
        assert all(scratch._bufs[n] is b for n, b in blocks.items())
        alone = cut_job(prepared.settings, prepared.index.tiles[job.tile], job,
                        scratch=Scratch())
        np.testing.assert_array_equal(result.images, alone.images)
        np.testing.assert_array_equal(result.status, alone.status)


def test_scratch_touch_writes_each_page_once():
    """Test that `Scratch.touch` reserves and writes a buffer's first bytes
    once (again only beyond what it wrote), and starts over for a buffer
    made anew."""
    from cutana.processing import Scratch

    scratch = Scratch()
    scratch.touch("a", 10_000)
    buf = scratch._bufs["a"]
    assert buf.nbytes == 10_000 and not buf.any()
    buf[:] = 7
    scratch.touch("a", 6_000)  # written already: left alone
    assert (buf == 7).all()
    scratch.reserve("a", 8_000)  # large enough: kept
    assert scratch._bufs["a"] is buf
    scratch.get("a", (20_000,), np.uint8)[:] = 5  # grown: a new buffer
    new = scratch._bufs["a"]
    assert new is not buf
    scratch.touch("a", 12_000)  # its first 12,000 bytes written anew
    assert not new[:12_000].any() and (new[12_000:] == 5).all()
    scratch.clear()
    scratch.touch("a", 100)
    assert scratch._bufs["a"].nbytes == 100


def test_main_process_memory_is_measured_once_the_catalogue_is_read(
    survey, tmp_path, monkeypatch
):
    """Test that the plan's main-process memory is sampled after the catalogue
    is read (its arrays grow with the catalogue; a sample taken before gave
    the workers room the main process then held), less the columns a Zarr
    run frees, and that only what the run adds per row is estimated on top
    of it."""
    from cutana import pipeline
    from cutana.executor import MemorySampler
    from cutana.planner import FITS_ROW_BYTES, PARENT_ROW_BYTES

    events = []
    real_read, real_plan, real_sample = (
        pipeline.read_catalog, pipeline.make_plan, MemorySampler.sample
    )

    def read(*args, **kwargs):
        cat = real_read(*args, **kwargs)
        events.append(("read", len(cat)))
        return cat

    def sample(self, exclude=()):
        rss = real_sample(self, exclude)
        events.append(("sample", rss))
        return rss

    def plan(*args, **kwargs):
        events.append(("plan", kwargs["parent_bytes"]))
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(pipeline, "read_catalog", read)
    monkeypatch.setattr(pipeline, "make_plan", plan)
    monkeypatch.setattr(MemorySampler, "sample", sample)
    cutana.make_cutouts(
        survey.catalogue_path, tmp_path / "out.zarr", size=21, progress=False,
        memory_limit="2GB",
    )
    kinds = [kind for kind, _ in events]
    assert kinds.index("read") < kinds.index("sample") < kinds.index("plan")
    measured = events[kinds.index("sample")][1]
    # less the catalogue's columns, which a Zarr run frees once its store
    # holds them
    cat = read_catalog(survey.catalogue_path, size=21)
    columns = (cat.source_id, cat.ra, cat.dec, cat.size_pixel, cat.size_arcsec)
    freed = sum(a.nbytes for a in columns) + 8 * len(cat.fits_file_paths)
    assert freed >= 80 * len(cat)
    assert measured > 0 and events[kinds.index("plan")][1] == measured - freed

    # plan_cutouts measures at the same point; the plan adds the rows' bytes
    events.clear()
    measured = []
    monkeypatch.setattr(
        MemorySampler, "tree_rss",
        staticmethod(lambda root: measured.append(1) or 10**8),
    )
    plan = pipeline.plan_cutouts(
        survey.catalogue_path, size=21, memory_limit="2GB", format="fits",
        backend="serial",
    )
    assert measured == [1] and [k for k, _ in events] == ["read", "plan"]
    # (a FITS run's main process also holds each row's file name)
    per_row = PARENT_ROW_BYTES + FITS_ROW_BYTES
    assert plan.memory.parent_bytes == 10**8 + plan.n_rows * per_row
    rows = plan.n_rows * PARENT_ROW_BYTES
    plan = pipeline.plan_cutouts(
        survey.catalogue_path, size=21, memory_limit="2GB", backend="serial"
    )
    assert plan.memory.parent_bytes == 10**8 - freed + rows
    # a run of the processes backend also measures its worker server, which
    # plan_cutouts adds where this process has none
    import psutil

    from cutana.planner import SERVER_BYTES

    for children, server in (([], SERVER_BYTES), ([psutil.Process()], 0)):
        monkeypatch.setattr(
            psutil.Process, "children",
            lambda self, recursive=False, kids=children: kids,
        )
        plan = pipeline.plan_cutouts(
            survey.catalogue_path, size=21, memory_limit="2GB",
            backend="processes", workers=2,
        )
        assert plan.memory.parent_bytes == 10**8 + server - freed + rows


def test_a_memory_limit_that_holds_fewer_workers_runs_as_many_as_it_holds(
    survey, zarr_run, tmp_path, monkeypatch, caplog
):
    """Test that a processes run whose memory limit holds one of the two
    workers asked for (beside the main process, as measured, and the worker
    server) starts one worker, says so, and writes the same output; it was
    refused as a usage error. With a limit, the workers start once the plan
    is made. A limit that holds no worker process beside them, but the run
    in the main process, runs it there (``serial``), says so, stops the
    worker server and writes the same output; it was refused too. One that
    holds neither is refused."""
    from cutana.executor import Executor, MemorySampler, worker_server_pid
    from cutana.planner import SERVER_BYTES

    monkeypatch.setattr(MemorySampler, "sample", lambda self, exclude=(): 10**8)
    monkeypatch.setattr(MemorySampler, "tree_rss", staticmethod(lambda root: 10**8))
    model = cutana.plan_cutouts(
        survey.catalogue_path, size=21, memory_limit="4GB", backend="serial"
    ).memory
    one = model.worker_bytes + model.working_bytes + model.per_source_bytes
    assert one > SERVER_BYTES
    limit = int(model.parent_bytes + SERVER_BYTES + 1.5 * one)
    pools = []
    new_pool = Executor._new_pool

    def spy(self):
        pools.append(self.n_workers)
        return new_pool(self)

    monkeypatch.setattr(Executor, "_new_pool", spy)
    out = tmp_path / "out.zarr"
    opts = dict(size=21, workers=2, backend="processes", memory_limit=limit,
                progress=False)
    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(survey.catalogue_path, out, **opts)
    assert report.exit_code == 0
    assert "holds 1 of the 2 workers asked for" in caplog.text
    assert pools and set(pools) == {1}
    clean, _ = zarr_run
    assert files_bytes(clean) == files_bytes(out)

    caplog.clear()
    pools.clear()
    alone = tmp_path / "alone.zarr"
    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(survey.catalogue_path, alone, **{
            **opts, "memory_limit": int(model.parent_bytes + 1.2 * one)})
    assert report.exit_code == 0
    assert "holds no worker process beside the main process" in caplog.text
    assert pools == [] and worker_server_pid() is None
    assert files_bytes(clean) == files_bytes(alone)
    # (the memory it names is what the run needs at the least: in the main
    # process, not beside a worker process and the server)
    from cutana.planner import _fmt_bytes

    need = f"at least {_fmt_bytes(int(model.parent_bytes + one))} is needed"
    with pytest.raises(ConfigError, match=f"too small for 1 worker.*{need}"):
        cutana.make_cutouts(survey.catalogue_path, tmp_path / "o2", **{
            **opts, "memory_limit": int(model.parent_bytes + 0.5 * one)})


def test_a_zarr_run_frees_the_catalogue_columns_its_store_holds(
    survey, tmp_path, monkeypatch
):
    """Test that once the store holds ids and positions, a Zarr run's main
    process no longer keeps the catalogue's per-row columns (they grow with
    the catalogue); a FITS run, which names files from them, keeps them."""
    from cutana import pipeline

    seen = {}
    real_run = pipeline._Runner.run

    def run(self, executor):
        cat = self.p.catalog
        seen[self.fmt] = [
            cat.source_id is None, cat.ra is None, cat.size_pixel is None
        ]
        return real_run(self, executor)

    monkeypatch.setattr(pipeline._Runner, "run", run)
    zarr_out, fits_out = tmp_path / "out.zarr", tmp_path / "out_fits"
    for out, fmt in ((zarr_out, "zarr"), (fits_out, "fits")):
        cutana.make_cutouts(
            survey.catalogue_path, out, size=21, format=fmt, progress=False
        )
    assert seen == {"zarr": [True] * 3, "fits": [False] * 3}
    cat = read_catalog(survey.catalogue_path)
    zarr, fits_index = cutana.open(zarr_out), cutana.open(fits_out)
    for archive in (zarr, fits_index):
        np.testing.assert_array_equal(np.asarray(archive.source_id), cat.source_id)
    np.testing.assert_array_equal(np.asarray(zarr.ra), cat.ra)
    np.testing.assert_array_equal(
        np.asarray(zarr.status), np.asarray(fits_index.status)
    )


def test_geometry_kept_in_int32_unless_a_value_needs_int64():
    """Test that the main process keeps written rows' geometry in int32 (half
    the memory per row) and switches to int64 when a value does not fit."""
    from types import SimpleNamespace

    from cutana.pipeline import _Runner

    runner = SimpleNamespace(
        geometry=None, plan=SimpleNamespace(n_rows=6),
        writer=SimpleNamespace(chunk_rows=3), status=np.full(6, -1, dtype=np.int16),
    )
    runner._geometry = lambda: _Runner._geometry(runner)
    small = np.array([[0, 10, 20, 5, 5], [1, -3, 4, 5, 5], [0, 7, 8, 5, 5]])
    _Runner._keep_rows(runner, {1: (np.array([0, 1, 0]), small)})
    assert runner.geometry.dtype == np.int32
    assert runner.geometry[3:].tolist() == small.tolist()
    assert runner.geometry[:3, 0].tolist() == [-1, -1, -1]
    assert runner.status.tolist() == [-1, -1, -1, 0, 1, 0]

    big = np.array([[2, 3 * 2**31, -(2**40), 5, 5]] * 3)
    _Runner._keep_rows(runner, {0: (np.array([1, 1, 1]), big)})
    assert runner.geometry.dtype == np.int64
    assert runner.geometry[:3].tolist() == big.tolist()
    assert runner.geometry[3:].tolist() == small.tolist()


@pytest.mark.parametrize(
    ("backend", "workers", "threads", "cores", "expected"),
    [
        ("serial", 1, 1, 2, True),
        ("serial", 1, 1, 1, False),
        ("serial", 1, 2, 2, False),
        ("processes", 2, 1, 2, False),
        ("processes", 2, 1, 3, True),
        ("processes", 3, 1, 2, False),
        ("dask", 1, 1, 8, False),
    ],
)
def test_background_writes_only_with_a_core_to_spare(
    monkeypatch, backend, workers, threads, cores, expected
):
    """Test the rule for writing chunk files from a background thread: the
    workers times their threads leave a core; never for Dask."""
    from cutana import pipeline
    from cutana.pipeline import RunOptions

    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    options = RunOptions(
        size=21, workers=workers, threads=threads, backend=backend
    ).validate()
    assert pipeline._core_to_spare(options) is expected


@pytest.mark.parametrize(("cores", "backend"), [
    (2, "serial"),  # a core to spare: a second job, the helper's chunks
    (1, "serial"),  # none: the kept tile files only
    (4, "processes"),  # two workers with cores to spare: second sub-batches
])
def test_plan_gives_what_workers_may_hold_beyond_its_estimate(
    survey, monkeypatch, cores, backend
):
    """Test that a plan's `beyond_bytes` is what its workers may hold beyond
    the estimated peak, by hand: each worker's tile files kept mapped (the
    survey's images, as astropy reads them), and with a core to spare a
    second job (a serial Zarr run) or a second sub-batch (worker
    processes) and the compressing helper's chunks; and that ``cutana
    plan``'s summary gives it."""
    from cutana import pipeline
    from cutana.planner import _fmt_bytes

    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    workers = 2 if backend == "processes" else 1
    plan = cutana.plan_cutouts(survey.catalogue_path, size=21, backend=backend,
                               workers=workers, memory_limit="2GB")
    headers = [_tile_data(p)[2] for p in survey.paths]
    tiles = sum(h["NAXIS1"] * h["NAXIS2"] * abs(h["BITPIX"]) // 8 for h in headers)
    assert plan.spare_worker_bytes // 2 > tiles  # all kept
    threads = {
        2: max(j.est_bytes for j in plan.jobs) + pipeline.HELPER_HELD_BYTES,
        1: 0,
        4: plan.memory.working_bytes + pipeline.HELPER_HELD_BYTES,
    }[cores]
    assert plan.beyond_bytes == workers * (tiles + threads)
    line = f"beyond it, up to    {_fmt_bytes(plan.beyond_bytes)} within"
    assert line in plan.summary()


def _little_to_spare(survey, opts):
    """A memory limit of the plan's own estimate for the survey, and half of
    `HELPER_SPARE_BYTES` to spare."""
    from cutana import pipeline

    plan = cutana.plan_cutouts(survey.catalogue_path, memory_limit="2GB", **opts)
    return plan.peak_bytes + pipeline.HELPER_SPARE_BYTES // 2


@pytest.mark.parametrize(("limit", "cores", "expected"), [
    (None, 2, True),  # a core and memory to spare
    (None, 1, False),  # no core to spare
    ("tight", 2, False),  # the limit leaves no room for the helper
])
def test_helper_compresses_only_with_a_core_and_memory_to_spare(
    survey, zarr_run, tmp_path, monkeypatch, limit, cores, expected
):
    """Test that chunks are compressed with a helper thread only when a core
    is spare and the plan leaves each worker HELPER_SPARE_BYTES beyond its
    jobs, and that the store holds the same bytes either way."""
    from cutana import pipeline
    from cutana.io.zarr import ZarrWriter

    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    helpers = []
    real = ZarrWriter.write_chunks

    def spy(self, *args, **kwargs):
        helpers.append(kwargs.get("helper"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ZarrWriter, "write_chunks", spy)
    # (chunks written in a thread while the next job is cut need no helper)
    monkeypatch.setattr(pipeline, "_overlap_fits", lambda *args: False)
    opts = dict(size=21, backend="serial")
    if limit == "tight":
        opts["memory_limit"] = _little_to_spare(survey, opts)
    out = tmp_path / "h.zarr"
    report = cutana.make_cutouts(survey.catalogue_path, out, progress=False, **opts)
    assert report.exit_code == 0
    assert helpers and set(helpers) == {expected}
    base, _ = zarr_run
    assert files_bytes(out / "images") == files_bytes(base / "images")


@pytest.mark.parametrize(("limit", "cores", "expected"), [
    (None, 2, True),  # a core and memory to spare
    (None, 1, False),  # no core to spare
    ("tight", 2, False),  # the limit leaves no room for a second job
])
def test_serial_runs_write_a_job_while_cutting_the_next(
    survey, zarr_run, tmp_path, monkeypatch, limit, cores, expected
):
    """Test that a serial Zarr run with a core and memory to spare writes
    each job's chunks in a thread while it cuts the next job, and that the
    store holds the same bytes either way."""
    import threading

    from cutana import _tasks, pipeline
    from cutana.verify import verify

    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    threads = []
    real = _tasks._write_cut

    def spy(task, results, helper=None):
        threads.append(threading.current_thread().name)
        return real(task, results, helper)

    monkeypatch.setattr(_tasks, "_write_cut", spy)
    opts = dict(size=21, backend="serial", max_sources_per_job=10)
    if limit == "tight":
        opts["memory_limit"] = _little_to_spare(survey, opts)
    out = tmp_path / "o.zarr"
    report = cutana.make_cutouts(survey.catalogue_path, out, progress=False, **opts)
    assert report.exit_code == 0
    assert len(threads) >= 4
    if expected:
        assert all(name.startswith("cutana-write") for name in threads)
    else:
        assert set(threads) == {threading.main_thread().name}
    base, _ = zarr_run
    for name in ("images", "status", "geometry"):
        assert files_bytes(out / name) == files_bytes(base / name)
    assert verify(out) == []


@pytest.mark.parametrize(("backend", "cores", "threaded"), [
    ("serial", 1, False), ("serial", 2, True), ("processes", 2, False),
    ("processes", 3, True),
])
def test_jobs_stretch_in_a_thread_where_a_core_is_spare(
    survey, zarr_run, tmp_path, monkeypatch, backend, cores, threaded
):
    """Test that every cut task (of FITS runs and worker processes too) asks
    `cut_job` for a stretch thread exactly where the workers leave a core
    to spare, and that the FITS files and the store hold the same values
    either way."""
    from cutana import pipeline

    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    flags = []
    real = pipeline._Runner._execute

    def spy(self, executor, tasks, *args):
        for task in tasks:
            members = getattr(task, "members", [task])
            flags.extend(getattr(m, "stretch_thread", None) for m in members)
        return real(self, executor, tasks, *args)

    monkeypatch.setattr(pipeline._Runner, "_execute", spy)
    runs = {}
    for fmt in ("fits", "zarr"):
        out = tmp_path / fmt
        report = cutana.make_cutouts(
            survey.catalogue_path, out, size=21, format=fmt, backend=backend,
            workers=2 if backend == "processes" else 1, progress=False,
            max_sources_per_job=20,
        )
        assert report.exit_code == 0
        runs[fmt] = cutana.open(out)
    cut_flags = [f for f in flags if f is not None]
    assert cut_flags and set(cut_flags) == {threaded}
    base = cutana.open(zarr_run[0])
    status = np.asarray(base.status)
    for arch in runs.values():
        np.testing.assert_array_equal(np.asarray(arch.status), status)
    np.testing.assert_array_equal(runs["zarr"].images[:], base.images[:])
    for i in np.flatnonzero(np.isin(status, (Status.OK, Status.PARTIAL_OVERLAP))):
        np.testing.assert_array_equal(np.asarray(runs["fits"][i]), base.images[i])


@pytest.mark.parametrize("always", [False, True])
def test_a_job_whose_write_fails_in_the_thread_is_retried_then_fails_alone(
    survey, zarr_run, tmp_path, monkeypatch, always
):
    """Test that a job whose chunks fail to be written by the writing thread
    is cut and written again; failing again, only its rows are TILE_ERROR
    (filled, with the error) and the run exits 1."""
    from cutana import _tasks, pipeline

    monkeypatch.setattr(pipeline, "available_cores", lambda: 2)
    real = _tasks._write_cut
    calls = []

    def flaky(task, results, helper=None):
        jobs = tuple(sorted(results))
        calls.append(jobs)
        if jobs == calls[0] and (always or len(calls) == 1):
            msg = "simulated write error"
            raise OSError(msg)
        return real(task, results, helper)

    monkeypatch.setattr(_tasks, "_write_cut", flaky)
    out = tmp_path / "w.zarr"
    report = cutana.make_cutouts(
        survey.catalogue_path, out, size=21, backend="serial",
        max_sources_per_job=10, progress=False,
    )
    assert calls.count(calls[0]) == 2
    base, _ = zarr_run
    archive, expected = cutana.open(out), cutana.open(base)
    if not always:
        assert report.exit_code == 0
        assert files_bytes(out / "images") == files_bytes(base / "images")
        return
    assert report.exit_code == 1
    assert any("simulated write error" in f for f in report.failures)
    plan = cutana.plan_cutouts(
        survey.catalogue_path, size=21, backend="serial", max_sources_per_job=10
    )
    (job,) = [j for j in plan.jobs if j.job_id in calls[0]]
    bad = np.zeros(len(archive), dtype=bool)
    bad[job.rows] = True
    status = np.asarray(archive.status)
    assert (status[bad] == Status.TILE_ERROR).all()
    assert not np.asarray(archive.images[np.flatnonzero(bad)]).any()
    np.testing.assert_array_equal(status[~bad], np.asarray(expected.status)[~bad])
    rest = np.flatnonzero(~bad)
    np.testing.assert_array_equal(archive.images[rest], expected.images[rest])


def test_flux_conversion_and_weights(survey, zarr_run, tmp_path):
    """Test that flux conversion multiplies by 3631 * 10**(-0.4 * MAGZERO) and
    weights apply."""
    out, _ = zarr_run
    base = cutana.open(out)
    out2 = tmp_path / "flux.zarr"
    cutana.make_cutouts(
        survey.catalogue_path, out2, size=21, flux_conversion=True,
        channel_weights=[2.0, 0.5], progress=False,
    )
    conv = cutana.open(out2)
    i = int(np.flatnonzero(np.asarray(base.status) == Status.OK)[0])
    for c, w in enumerate([2.0, 0.5]):
        zp = fits.getheader(_tile_paths(base, i)[c], survey.hdu)["MAGZERO"]
        expect = (
            np.asarray(base.images[i, c], dtype=np.float64)
            * 3631 * 10 ** (-0.4 * zp) * w
        )
        np.testing.assert_allclose(conv.images[i, c], expect, rtol=2e-6)


def test_resampled_bilinear_matches_scipy(survey, zarr_run, tmp_path):
    """Test that bilinear resampling equals scipy map_coordinates on astropy's
    cutout."""
    from scipy.ndimage import map_coordinates

    out = tmp_path / "res.zarr"
    cutana.make_cutouts(
        survey.catalogue_path, out, size=20, target_size=32, resample="bilinear",
        progress=False,
    )
    arch = cutana.open(out)
    ok = np.flatnonzero(np.asarray(arch.status) == Status.OK)[:5]
    for i in ok:
        ref = _reference(_tile_paths(arch, i)[0], arch.ra[i], arch.dec[i], 20)
        coords = (np.arange(32) + 0.5) * 20 / 32 - 0.5
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        expect = map_coordinates(ref.data, [yy, xx], order=1, mode="nearest")
        np.testing.assert_allclose(arch.images[i, 0], expect, rtol=1e-5, atol=1e-4)


def test_asinh_uint8_matches_astropy_visualization(survey, zarr_run, tmp_path):
    """Test that asinh to uint8 equals astropy.visualization on the same cutout."""
    from astropy.visualization import AsinhStretch, PercentileInterval

    out, _ = zarr_run
    base = cutana.open(out)
    out2 = tmp_path / "asinh.zarr"
    cutana.make_cutouts(
        survey.catalogue_path, out2, size=21, normalize="asinh", dtype="uint8",
        progress=False,
    )
    arch = cutana.open(out2)
    assert arch.images.dtype == np.uint8
    for i in np.flatnonzero(np.asarray(base.status) == Status.OK)[:5]:
        img = np.asarray(base.images[i, 1], dtype=np.float64)
        vmin, vmax = PercentileInterval(99.8).get_limits(img[np.isfinite(img)])
        scaled = np.clip((img - vmin) / (vmax - vmin), 0, 1)
        expect = np.round(AsinhStretch(0.1)(scaled) * 255)
        assert np.max(np.abs(arch.images[i, 1].astype(int) - expect)) <= 1


@pytest.mark.parametrize(("cores", "threaded"), [(1, False), (2, True)])
def test_iter_cutouts_yields_same_images(
    survey, zarr_run, monkeypatch, cores, threaded
):
    """Test that the in-memory iterator yields the cutouts the Zarr run wrote,
    stretching in a thread of its own where a core is spare."""
    from cutana import pipeline

    monkeypatch.setattr(pipeline, "available_cores", lambda: cores)
    real, calls = pipeline.cut_job, []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stretch_thread"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "cut_job", spy)
    out, _ = zarr_run
    arch = cutana.open(out)
    seen = 0
    for batch in cutana.iter_cutouts(survey.catalogue_path, size=21):
        assert batch.images.shape[1:] == (len(BANDS), 21, 21)
        for k, r in enumerate(batch.rows):
            np.testing.assert_array_equal(batch.images[k], arch.images[r])
            assert batch.source_id[k] == arch.source_id[r]
        seen += len(batch.rows)
    assert seen == int(np.isin(np.asarray(arch.status), [0, 1]).sum())
    assert calls and set(calls) == {threaded}


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_iter_cutouts_batch_size_gives_batches_of_that_size(
    survey, zarr_run, batch_size
):
    """Test that `iter_cutouts(batch_size=n)` yields the cutouts of the job
    batches, in their order, in batches of exactly n (the last fewer), each
    equal to what the Zarr run wrote."""
    out, _ = zarr_run
    arch = cutana.open(out)
    jobs = list(cutana.iter_cutouts(survey.catalogue_path, size=21))
    assert len({len(b.rows) for b in jobs}) > 1  # the jobs differ in size
    batches = list(cutana.iter_cutouts(survey.catalogue_path, size=21,
                                       batch_size=batch_size))
    total = sum(len(b.rows) for b in jobs)
    sizes = [len(b.rows) for b in batches]
    assert sizes == [batch_size] * (total // batch_size) + (
        [total % batch_size] if total % batch_size else [])
    for name in ("rows", "images", "source_id", "ra", "dec", "status"):
        np.testing.assert_array_equal(
            np.concatenate([getattr(b, name) for b in batches]),
            np.concatenate([getattr(b, name) for b in jobs]),
        )
    for batch in batches:
        assert batch.bands == jobs[0].bands
        assert len(batch.images) == len(batch.rows) == len(batch.status)
        for k, r in enumerate(batch.rows):
            np.testing.assert_array_equal(batch.images[k], arch.images[r])
            assert batch.source_id[k] == arch.source_id[r]


def test_iter_cutouts_of_varying_sizes_asks_for_one_size(survey):
    """Test that iter_cutouts over sources of varying sizes says that a batch
    holds one size (it spoke of the Zarr output and --format fits, though
    it writes nothing), that format='fits' still gives batches of one size
    each, and that batch_size then asks for one size."""
    with pytest.raises(ConfigError, match=r"^cutout sizes vary \(\d+\.\.\d+ px\) but "
                       r"a batch of iter_cutouts holds one size: give target_size=N"):
        cutana.iter_cutouts(survey.catalogue_path)
    batches = list(cutana.iter_cutouts(survey.catalogue_path, format="fits"))
    assert len({b.images.shape[2:] for b in batches}) > 1
    assert all(b.images.shape[2] == b.images.shape[3] for b in batches)
    with pytest.raises(ConfigError, match=r"^batch_size needs cutouts of one size"):
        cutana.iter_cutouts(survey.catalogue_path, format="fits", batch_size=8)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_iter_cutouts_refuses_a_bad_batch_size(survey, bad):
    """Test that a batch size that is not a whole number >= 1 is a
    ConfigError naming it, before anything is read."""
    match = rf"batch_size must be a whole number >= 1, got {bad!r}"
    with pytest.raises(ConfigError, match=match):
        cutana.iter_cutouts(survey.catalogue_path, size=21, batch_size=bad)


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_sip_terms_under_a_plain_tan_ctype_are_astropy_s_and_quiet(tmp_path, fmt):
    """Test a tile whose SIP terms lie under a CTYPE without "-SIP": the
    cutouts and `wcs(i)` are astropy's Cutout2D ones (distortion applied),
    and astropy's note on the header is not printed for the run, nor for
    reading back (the run warns once, with the file's name)."""
    from astropy import log

    header = fits.Header()
    for key, value in dict(
        CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=2.0,
        CRPIX1=40.5, CRPIX2=30.5, CD1_1=-2.8e-5, CD1_2=2e-6, CD2_1=1e-6,
        CD2_2=2.8e-5, A_ORDER=2, B_ORDER=2, A_2_0=4e-5, A_0_2=-1e-5, B_1_1=3e-5,
    ).items():
        header[key] = value
    data = np.random.default_rng(3).normal(size=(60, 80)).astype(">f4")
    tile = tmp_path / "sip.fits"
    fits.PrimaryHDU(data, header).writeto(tile)
    with log.log_to_list():
        wcs = WCS(header)
    assert wcs.sip is not None
    ra, dec = wcs.all_pix2world([20.3, 41.8, 70.2], [15.6, 30.1, 44.4], 0)
    cat = tmp_path / "cat.csv"
    rows = [f"s{i},{float(ra[i])!r},{float(dec[i])!r}\n" for i in range(3)]
    cat.write_text("id,ra,dec\n" + "".join(rows))
    out = tmp_path / ("o.zarr" if fmt == "zarr" else "o")
    with log.log_to_list() as records:
        report = cutana.make_cutouts(cat, out, tiles=[str(tile)], size=9,
                                     format=fmt, progress=False)
        arch = cutana.open(out)
        wcs_back = [arch.wcs(i) for i in range(3)]
    assert report.exit_code == 0
    assert not [r for r in records if "SIP" in str(r.msg)]
    pix = np.array([[0.0, 0.0], [4.0, 4.0], [8.5, 1.25]])
    for i in range(3):
        ref = AstropyCutout2D(data, SkyCoord(ra[i], dec[i], unit="deg"), 9,
                              wcs=wcs, mode="partial", fill_value=np.nan)
        np.testing.assert_array_equal(np.asarray(arch[i])[0], ref.data)
        got = wcs_back[i].pixel_to_world(pix[:, 0], pix[:, 1])
        exp = ref.wcs.pixel_to_world(pix[:, 0], pix[:, 1])
        np.testing.assert_allclose(got.ra.deg, exp.ra.deg, rtol=0, atol=1e-11)
        np.testing.assert_allclose(got.dec.deg, exp.dec.deg, rtol=0, atol=1e-11)


def test_existing_output_refused_then_overwritten(survey, tmp_path):
    """Test that an existing output is refused without --overwrite and replaced
    with it."""
    out = tmp_path / "o.zarr"
    cutana.make_cutouts(survey.catalogue_path, out, size=15, progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        cutana.make_cutouts(survey.catalogue_path, out, size=15, progress=False)
    report = cutana.make_cutouts(
        survey.catalogue_path, out, size=17, overwrite=True, progress=False
    )
    assert cutana.open(out).images.shape[2:] == (17, 17)
    assert report.exit_code == 0


def test_overwrite_replaces_an_output_of_the_other_format(survey, tmp_path):
    """Test that --overwrite replaces a cutana output of the other format
    (a Zarr store by FITS files and back; both were refused as not cutana
    outputs), needs --overwrite to, and refuses a FITS output folder that
    holds files cutana did not write, without removing anything."""
    out = tmp_path / "o"
    cutana.make_cutouts(survey.catalogue_path, out, size=15, progress=False)
    n_rows, n_bands = cutana.open(out).images.shape[:2]
    with pytest.raises(ConfigError, match="already exists"):
        cutana.make_cutouts(survey.catalogue_path, out, size=15, format="fits",
                            progress=False)
    cutana.make_cutouts(survey.catalogue_path, out, size=15, format="fits",
                        overwrite=True, progress=False)
    index = cutana.open(out)
    assert not (out / "zarr.json").exists() and len(index) == n_rows
    files = sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"files cutana did not write \(notes\.txt\)"):
        cutana.make_cutouts(survey.catalogue_path, out, size=15, overwrite=True,
                            progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "notes.txt"])
    (out / "notes.txt").unlink()
    cutana.make_cutouts(survey.catalogue_path, out, size=17, overwrite=True,
                        progress=False)
    assert cutana.open(out).images.shape == (n_rows, n_bands, 17, 17)
    assert not any(p.name.endswith(".fits") for p in out.iterdir())


def test_iter_cutouts_warns_of_rows_of_unreadable_tiles(survey, tmp_path):
    """Test that `iter_cutouts` warns of the rows it does not yield because
    their tile cannot be read (make_cutouts gives them TILE_ERROR and exit
    1): a training loop lost them without a sign."""
    import shutil

    dst = tmp_path / "tiles"
    shutil.copytree(os.path.dirname(survey.tile_paths[0][0]), dst)
    victim = dst / os.path.basename(survey.tile_paths[1][0])
    with open(victim, "r+b") as fh:
        fh.truncate(1000)  # not even a whole header
    opts = dict(size=21, tiles=[str(dst / "*.fits")])
    report = cutana.make_cutouts(survey.catalogue_path, tmp_path / "o.zarr",
                                 progress=False, **opts)
    failed = np.flatnonzero(
        np.asarray(cutana.open(tmp_path / "o.zarr").status) == Status.TILE_ERROR
    )
    assert report.exit_code == 1 and len(failed)
    with pytest.warns(RuntimeWarning) as caught:
        rows = np.concatenate([b.rows for b in cutana.iter_cutouts(
            survey.catalogue_path, **opts)])
    (warning,) = [w for w in caught if "not yielded" in str(w.message)]
    assert str(warning.message).startswith(
        f"{len(failed)} rows are not yielded because their tiles cannot be read, "
        f"e.g. row {failed[0]}: "
    )
    assert not np.isin(failed, rows).any()


def test_iter_cutouts_leaves_out_rows_of_a_tile_failing_as_it_is_cut(survey, tmp_path):
    """Test that `iter_cutouts` does not yield the rows of a tile found
    broken only while it is cut (a band without the zero-point keyword of
    flux conversion), as it does not yield those of a tile that cannot be
    read: it yielded them with zero images and status TILE_ERROR. It warns,
    and the rows it yields equal `make_cutouts`' cutouts of the same
    options."""
    import shutil

    from astropy.io import fits

    dst = tmp_path / "tiles"
    shutil.copytree(os.path.dirname(survey.tile_paths[0][0]), dst)
    victim = dst / os.path.basename(survey.tile_paths[1][1])
    with fits.open(victim, mode="update") as hdul:
        del hdul[0].header["MAGZERO"]
    opts = dict(size=17, tiles=[str(dst / "*.fits")], flux_conversion=True)
    report = cutana.make_cutouts(survey.catalogue_path, tmp_path / "o.zarr",
                                 progress=False, **opts)
    stored = cutana.open(tmp_path / "o.zarr")
    status = np.asarray(stored.status)
    failed = np.flatnonzero(status == Status.TILE_ERROR)
    assert report.exit_code == 1 and len(failed)
    assert "MAGZERO" in report.messages[int(failed[0])]
    for batch_size in (None, 7):
        with pytest.warns(RuntimeWarning) as caught:
            batches = list(cutana.iter_cutouts(survey.catalogue_path,
                                               batch_size=batch_size, **opts))
        (warning,) = [w for w in caught if "not yielded" in str(w.message)]
        assert str(warning.message).startswith(
            f"{len(failed)} rows are not yielded because their tile failed while "
            f"they were cut, e.g. row {failed[0]}: "
        )
        rows = np.concatenate([b.rows for b in batches])
        cut = np.flatnonzero(np.isin(status, (Status.OK, Status.PARTIAL_OVERLAP)))
        np.testing.assert_array_equal(np.sort(rows), cut)
        images = np.concatenate([b.images for b in batches])
        np.testing.assert_array_equal(images, np.asarray(stored.images)[rows])
        np.testing.assert_array_equal(np.concatenate([b.status for b in batches]),
                                      status[rows])


def _stop_at_the_fourth_result(monkeypatch):
    """Make a run stop (KeyboardInterrupt) as it is handed its 4th result."""
    from cutana import pipeline

    calls = {"n": 0}
    original = pipeline._Runner._on_done

    def crashing(self, task, result):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, task, result)

    monkeypatch.setattr(pipeline._Runner, "_on_done", crashing)


def test_resume_after_interruption_is_byte_identical(
    survey, zarr_run, tmp_path, monkeypatch
):
    """Test that a run interrupted mid-way and resumed equals an uninterrupted run."""
    clean, _ = zarr_run
    out = tmp_path / "r.zarr"
    _stop_at_the_fourth_result(monkeypatch)  # (as if the process died after 3)
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(
            survey.catalogue_path, out, size=21, max_sources_per_job=5, progress=False
        )
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="already exists"):
        cutana.make_cutouts(survey.catalogue_path, out, size=21, progress=False)
    # other output options are refused, naming them
    with pytest.raises(ConfigError, match=r"options: normalize 'none' \(now 'asinh'\)"):
        cutana.make_cutouts(
            survey.catalogue_path, out, size=21, normalize="asinh", resume=True,
            progress=False,
        )
    # resuming with other execution options keeps the interrupted run's jobs
    report = cutana.make_cutouts(
        survey.catalogue_path, out, size=21, resume=True, workers=2, progress=False
    )
    assert report.exit_code == 0
    assert files_bytes(clean) == files_bytes(out)


@pytest.mark.parametrize("staged", [True, False])
def test_resume_keeps_the_fits_files_of_jobs_not_recorded(survey, tmp_path, monkeypatch,
                                                          staged):
    """Test that a FITS run stopped after a job's files were written, but
    before the run recorded the job (staged or not yet), is resumed without
    writing those files again (same inode and time): their rows keep them,
    with the status of their headers, and only the rest is cut, also a file
    of that job removed since; the result equals an uninterrupted run."""
    import json

    opts = dict(size=21, format="fits", max_sources_per_job=5, progress=False)
    clean = tmp_path / "clean"
    cutana.make_cutouts(survey.catalogue_path, clean, **opts)
    out = tmp_path / "r"
    _stop_at_the_fourth_result(monkeypatch)  # its job's files written, not recorded
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(survey.catalogue_path, out, **opts)
    monkeypatch.undo()
    text = (out / ".cutana" / "ledger.jsonl").read_text()
    events = [json.loads(line) for line in text.splitlines()]
    recorded = {e["job_id"] for e in events if e["event"] == "job_staged"}
    unrecorded = [p for p in (out / ".cutana" / "staging").iterdir()
                  if int(p.name.split("-")[1]) not in recorded]
    assert len(unrecorded) == 1
    job_rows = np.load(unrecorded[0] / "rows.npy")
    if not staged:  # (stopped before staging it)
        import shutil

        shutil.rmtree(unrecorded[0])
    archive = cutana.open(clean)
    index = dict(zip(archive.rows.tolist(), archive.files.tolist(), strict=True))
    theirs = [out / index[r] for r in job_rows.tolist() if index[r]]
    assert len(theirs) >= 2 and all(p.exists() for p in theirs)
    theirs[0].unlink()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.fits")}
    assert set(theirs[1:]) <= set(before)
    cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    assert files_bytes(clean) == files_bytes(out)
    for path, (ino, mtime) in before.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (ino, mtime), path.name


def test_resume_keeps_the_chunks_a_stopped_job_wrote(tmp_path, monkeypatch):
    """Test that a Zarr run stopped while a job wrote its chunks (here after
    2 of them; a band of chunks is one task, the whole catalogue here) is
    resumed without writing those chunks again (same inode and time) and
    without cutting their rows again, ending equal to an uninterrupted run:
    the worker records each chunk as it writes it."""
    from cutana import _tasks, pipeline
    from cutana.io import zarr as zarr_io

    survey = make_survey(tmp_path / "s", n_tiles=1, bands=("VIS",), tile_size=300,
                         n_sources=1200, off_tile_fraction=0.0, bad_row_fraction=0.0,
                         seed=4)
    opts = dict(size=21, target_size=64, progress=False)
    clean = tmp_path / "clean.zarr"
    cutana.make_cutouts(survey.catalogue_path, clean, **opts)
    n_chunks = len(list((clean / "images").glob("c.*")))
    assert n_chunks >= 4
    monkeypatch.setattr(pipeline, "available_cores", lambda: 1)  # (no writing thread)
    monkeypatch.setattr(zarr_io, "_MAX_RUN_BYTES", 1)  # a chunk at a time
    calls = {"n": 0}
    write_block = zarr_io.ZarrWriter._write_block

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # (as if killed: the task is not recorded)
        return write_block(self, *args, **kwargs)

    monkeypatch.setattr(zarr_io.ZarrWriter, "_write_block", dying)
    out = tmp_path / "r.zarr"
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(survey.catalogue_path, out, **opts)
    monkeypatch.setattr(zarr_io.ZarrWriter, "_write_block", write_block)
    chunk_files = (out / "images").glob("c.*")
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in chunk_files}
    assert len(kept) == 2
    cut = []
    cut_job = _tasks.cut_job
    monkeypatch.setattr(_tasks, "cut_job", lambda s, t, job, **k: (
        cut.append(len(job)) or cut_job(s, t, job, **k)))
    cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    assert files_bytes(clean) == files_bytes(out)
    for path, (ino, mtime) in kept.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (ino, mtime), path.name
    chunk_rows = cutana.open(out).images.chunks[0]
    status = np.asarray(cutana.open(clean).status)
    n_cut = int(np.count_nonzero(status <= Status.PARTIAL_OVERLAP))
    assert sum(cut) == n_cut - 2 * chunk_rows


def _survey_without_a_band_file(survey, tmp_path):
    """The survey's tiles in a folder of their own, one band file moved away."""
    import shutil

    dst = tmp_path / "tiles"
    shutil.copytree(os.path.dirname(survey.tile_paths[0][0]), dst)
    victim = dst / os.path.basename(survey.tile_paths[1][0])
    kept = tmp_path / "kept.fits"
    shutil.move(victim, kept)
    return dst, victim, kept


@pytest.mark.parametrize(("fmt", "backend"), [
    ("zarr", "serial"), ("zarr", "processes"), ("fits", "serial"),
])
def test_resume_cuts_a_finished_runs_failed_rows_once_their_tile_is_back(
    survey, tmp_path, caplog, fmt, backend
):
    """Test that --resume of a finished run whose tile could not be read cuts
    the TILE_ERROR rows once the tile is back, as a run that had the tile
    from the start cuts them (values as astropy's Cutout2D, WCS, status),
    leaves every other row as it was, and gives a store that verifies;
    while the tile is still missing it says so and changes nothing."""
    import shutil

    dst, victim, kept = _survey_without_a_band_file(survey, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], max_sources_per_job=5,
                progress=False, format=fmt, backend=backend,
                workers=2 if backend == "processes" else 1)
    out = tmp_path / "out"
    assert cutana.make_cutouts(survey.catalogue_path, out, **opts).exit_code == 1
    before = np.asarray(cutana.open(out).status)
    failed = before == Status.TILE_ERROR
    assert failed.any()

    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    assert report.exit_code == 1
    assert f"its {int(failed.sum())} TILE_ERROR rows still cannot be cut" in caplog.text
    np.testing.assert_array_equal(cutana.open(out).status, before)
    cut = np.isin(before, (Status.OK, Status.PARTIAL_OVERLAP))
    old = cutana.open(out)
    old_images = {i: np.array(old[i]) for i in np.flatnonzero(cut)}

    shutil.copy(kept, victim)  # the tile is back
    caplog.clear()
    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    assert report.exit_code == 0, report.failures
    assert "cutting the" in caplog.text
    clean = tmp_path / "clean"
    cutana.make_cutouts(survey.catalogue_path, clean, **opts)
    a, b = cutana.open(clean), cutana.open(out)
    np.testing.assert_array_equal(b.status, a.status)
    assert not (np.asarray(b.status) == Status.TILE_ERROR).any()
    for i in np.flatnonzero(np.isin(a.status, (Status.OK, Status.PARTIAL_OVERLAP))):
        np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(a[i]))
    for i in old_images:  # rows cut then are as they were
        np.testing.assert_array_equal(np.asarray(b[i]), old_images[i])
    cat = read_catalog(survey.catalogue_path)
    repaired = np.flatnonzero(failed & (np.asarray(b.status) == Status.OK))
    assert len(repaired)
    c = [band in victim.name for band in b.bands].index(True)
    for i in repaired[:5]:  # against astropy: the band of the file put back
        ref = _reference(victim, cat.ra[i], cat.dec[i], 21)
        np.testing.assert_array_equal(np.asarray(b[i])[c], ref.data.astype(np.float32))
        if fmt == "zarr":  # the tile it names is the one put back (listed anew)
            assert _tile_paths(b, i)[c] == str(victim)
            np.testing.assert_allclose(b.wcs(i).wcs.crpix, ref.wcs.wcs.crpix)
    from cutana.verify import verify

    assert verify(out, survey.catalogue_path) == []
    caplog.clear()
    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    assert report.exit_code == 0 and "cutting" not in caplog.text
    np.testing.assert_array_equal(cutana.open(out).status, a.status)


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory):
    """The survey of `survey` with tiles that overlap by 100 of 240 pixels:
    many cutouts lie whole on both tiles."""
    return make_survey(
        tmp_path_factory.mktemp("overlapping"), n_tiles=2, bands=BANDS,
        tile_size=240, n_sources=80, overlap_pixels=100, edge_fraction=0.1,
        off_tile_fraction=0.05, bad_row_fraction=0.05, size_range_pixels=(12, 30),
        seed=3,
    )


def _survey_with_an_unreadable_tile(survey, tmp_path):
    """The survey's tiles in a folder of their own, with every band file of
    the second tile unreadable: its sources lie on no tile, or at the edge
    of the first. Returns the folder and a function that mends the tile."""
    import shutil

    dst = tmp_path / "tiles"
    shutil.copytree(os.path.dirname(survey.tile_paths[0][0]), dst)
    broken = [dst / os.path.basename(f) for f in survey.tile_paths[1]]
    for path in broken:
        path.write_bytes(b"x" * 2880 * 3)

    def mend():
        for f, path in zip(survey.tile_paths[1], broken, strict=True):
            shutil.copy(f, path)

    return dst, broken, mend


@pytest.mark.parametrize(("fmt", "backend"), [
    ("zarr", "serial"), ("zarr", "processes"), ("fits", "serial"),
])
def test_resume_cuts_rows_again_from_a_tile_readable_since(
    overlapping, tmp_path, caplog, fmt, backend
):
    """Test that --resume of a finished run that could not read a tile (so
    that the sources it holds best were cut from the neighbouring tile,
    partly or completely) cuts those rows again once that tile can be read,
    so that the output equals a run that had the tile from the start
    (statuses, values, and the tile each row names), and that every other
    row keeps its cutout. Before, a PARTIAL_OVERLAP row kept the cutout from
    the neighbour's edge."""
    from cutana.verify import verify

    dst, broken, mend = _survey_with_an_unreadable_tile(overlapping, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], max_sources_per_job=5,
                progress=False, format=fmt, backend=backend,
                workers=2 if backend == "processes" else 1)
    out = tmp_path / "out"
    assert cutana.make_cutouts(overlapping.catalogue_path, out, **opts).exit_code == 1
    old = cutana.open(out)
    before = np.asarray(old.status)
    cut = np.flatnonzero(np.isin(before, (Status.OK, Status.PARTIAL_OVERLAP)))
    then = {i: np.array(old[i]) for i in cut}
    mend()
    clean = tmp_path / "clean"
    assert cutana.make_cutouts(overlapping.catalogue_path, clean, **opts).exit_code == 0
    a = cutana.open(clean)

    def tile_of(archive, i):
        return sorted(_tile_paths(archive, i))

    mended = sorted(str(p) for p in broken)
    moved = [i for i in cut if tile_of(a, i) == mended]
    # the case under test happens on this survey: rows cut partly and
    # completely from the neighbour
    assert {int(before[i]) for i in moved} == {Status.OK, Status.PARTIAL_OVERLAP}

    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(
            overlapping.catalogue_path, out, resume=True, **opts
        )
    assert report.exit_code == 0, report.failures
    assert "rows that a tile new to the output holds" in caplog.text
    b = cutana.open(out)
    np.testing.assert_array_equal(b.status, a.status)
    cat = read_catalog(overlapping.catalogue_path)
    for i in np.flatnonzero(np.isin(a.status, (Status.OK, Status.PARTIAL_OVERLAP))):
        np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(a[i]))
        assert tile_of(b, i) == tile_of(a, i)
    for i in moved:  # against astropy, on the tile mended
        for path in broken:
            c = [band in path.name for band in b.bands].index(True)
            ref = _reference(path, cat.ra[i], cat.dec[i], 21, mode="strict")
            np.testing.assert_array_equal(
                np.asarray(b[i])[c], ref.data.astype(np.float32)
            )
    for i in set(cut) - set(moved):  # the other rows cut then are as they were
        np.testing.assert_array_equal(np.asarray(b[i]), then[i])
    assert verify(out, overlapping.catalogue_path) == []
    caplog.clear()
    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(
            overlapping.catalogue_path, out, resume=True, **opts
        )
    assert report.exit_code == 0 and "cutting" not in caplog.text


@pytest.mark.parametrize(("fmt", "where"), [
    ("zarr", "run"), ("zarr", "finish"), ("fits", "finish"),
])
def test_a_stopped_repair_of_rows_on_a_new_tile_is_finished_by_the_next_resume(
    overlapping, tmp_path, monkeypatch, fmt, where
):
    """Test that a --resume that cuts rows again from a tile readable since
    and is stopped (before it cuts, once it has listed the tile in the
    store; or after it rewrote the chunks, before it stored the statuses)
    is finished by the next --resume as a run that had the tile from the
    start: the tile listed already (Zarr), or the file written again before
    the index (FITS), does not hide the rows still to cut."""
    from cutana import pipeline
    from cutana.verify import verify

    dst, broken, mend = _survey_with_an_unreadable_tile(overlapping, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], max_sources_per_job=5,
                progress=False, format=fmt)
    out = tmp_path / "out"
    cat = overlapping.catalogue_path
    assert cutana.make_cutouts(cat, out, **opts).exit_code == 1
    mend()
    original = getattr(pipeline._Repair, where)

    def stopped(self, *args, **kwargs):
        if where == "run":  # the store lists the new tile, nothing is cut
            self.r._open_writer().start_repair(
                [pipeline._tile_record(t) for t in self.r.p.index.tiles]
            )
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._Repair, where, stopped)
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(cat, out, resume=True, **opts)
    monkeypatch.setattr(pipeline._Repair, where, original)
    assert cutana.make_cutouts(cat, out, resume=True, **opts).exit_code == 0
    clean = tmp_path / "clean"
    cutana.make_cutouts(cat, clean, **opts)
    a, b = cutana.open(clean), cutana.open(out)
    np.testing.assert_array_equal(b.status, a.status)
    for i in np.flatnonzero(np.isin(a.status, (Status.OK, Status.PARTIAL_OVERLAP))):
        np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(a[i]))
        assert _tile_paths(b, i) == _tile_paths(a, i)
    assert verify(out, cat) == []


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_a_row_keeps_its_cutout_when_cutting_it_again_fails(
    overlapping, tmp_path, monkeypatch, fmt
):
    """Test that when the job that cuts rows again from a tile readable
    since fails twice, the rows cut then keep their status and the cutout
    they had, the rows that had none are TILE_ERROR naming the error, and
    the run exits 1."""
    from cutana import _tasks

    dst, broken, mend = _survey_with_an_unreadable_tile(overlapping, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], progress=False, format=fmt)
    out = tmp_path / "out"
    assert cutana.make_cutouts(overlapping.catalogue_path, out, **opts).exit_code == 1
    old = cutana.open(out)
    before = np.asarray(old.status)
    partial = np.flatnonzero(np.isin(before, (Status.OK, Status.PARTIAL_OVERLAP)))
    images = {i: np.array(old[i]) for i in partial}
    mend()
    original = _tasks.cut_job

    def failing(settings, tile, job, **kwargs):
        if any(b is not None and b.path == str(broken[0]) for b in tile.bands):
            msg = "disk error (injected)"
            raise OSError(msg)
        return original(settings, tile, job, **kwargs)

    monkeypatch.setattr(_tasks, "cut_job", failing)
    report = cutana.make_cutouts(overlapping.catalogue_path, out, resume=True, **opts)
    assert report.exit_code == 1
    assert any("disk error (injected)" in f for f in report.failures)
    b = cutana.open(out)
    status = np.asarray(b.status)
    np.testing.assert_array_equal(status[partial], before[partial])
    for i in partial:
        np.testing.assert_array_equal(np.asarray(b[i]), images[i])
        assert "injected" not in report.messages.get(int(i), "")
    errors = np.flatnonzero(status == Status.TILE_ERROR)
    assert len(errors)
    assert (before[errors] == Status.NO_OVERLAP).all()
    assert all("disk error (injected)" in report.messages[int(i)] for i in errors)


@pytest.mark.parametrize("where", ["finish", "finalize"])
def test_a_stopped_repair_is_finished_by_the_next_resume(
    survey, tmp_path, monkeypatch, where
):
    """Test that a --resume that cuts a finished run's failed rows again and
    is stopped after rewriting the chunks, before storing the new statuses
    (``finish``) or after storing them, before the checksums (``finalize``),
    leaves a store that says it is unfinished, and that the next --resume
    finishes it as a run that had every tile from the start."""
    import shutil

    from cutana import pipeline
    from cutana.verify import verify

    dst, victim, kept = _survey_without_a_band_file(survey, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], max_sources_per_job=5,
                progress=False)
    out = tmp_path / "out.zarr"
    assert cutana.make_cutouts(survey.catalogue_path, out, **opts).exit_code == 1
    shutil.copy(kept, victim)
    owner = pipeline._Repair if where == "finish" else pipeline.ZarrWriter
    original = getattr(owner, where)

    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, where, stopped)
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    monkeypatch.setattr(owner, where, original)
    assert cutana.open(out).attrs.get("repairing") is True
    problems = verify(out, survey.catalogue_path)
    assert any("has not been finalised" in p for p in problems)

    report = cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    assert report.exit_code == 0
    clean = tmp_path / "clean.zarr"
    cutana.make_cutouts(survey.catalogue_path, clean, **opts)
    a, b = cutana.open(clean), cutana.open(out)
    np.testing.assert_array_equal(b.status, a.status)
    np.testing.assert_array_equal(b.images[:], a.images[:])
    assert verify(out, survey.catalogue_path) == []


def test_resume_of_a_finished_run_keeps_final_rows_of_a_tile_broken_since(
    survey, tmp_path
):
    """Test that --resume of a finished run whose tile cannot be read now
    changes no row (a NO_OVERLAP row of that tile became TILE_ERROR) and
    exits 0: every row has its final status."""
    import shutil

    from cutana._testing import files_bytes

    src = os.path.dirname(survey.tile_paths[0][0])
    dst = tmp_path / "tiles"
    shutil.copytree(src, dst)
    cat = tmp_path / "cat.csv"
    text = Path(survey.catalogue_path).read_text()
    cat.write_text(text.replace(src, str(dst)))
    for fmt in ("zarr", "fits"):
        out = tmp_path / fmt
        opts = dict(size=21, format=fmt, progress=False)
        assert cutana.make_cutouts(cat, out, **opts).exit_code == 0
        status = np.asarray(cutana.open(out).status)
        assert (status == Status.NO_OVERLAP).any()
        before = files_bytes(out)
        tile = dst / os.path.basename(survey.tile_paths[1][0])
        data = tile.read_bytes()
        tile.write_bytes(b"not a FITS header" + data[17:])
        try:
            report = cutana.make_cutouts(cat, out, resume=True, **opts)
        finally:
            tile.write_bytes(data)
        assert report.exit_code == 0
        np.testing.assert_array_equal(cutana.open(out).status, status)
        assert files_bytes(out) == before


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_file_lists_none_of_which_can_be_read_are_tile_errors(survey, tmp_path, fmt):
    """Test that when no tile file that the rows' file lists name can be
    read, their rows are TILE_ERROR naming the file and the run exits 1
    (it stopped with a usage error and no output), in an output whose
    cutouts have the rows' size in pixels; and that --resume cuts them, as a
    run with the files does, once the files are there."""
    import shutil

    from astropy.table import Table

    from cutana.verify import verify

    src = os.path.dirname(survey.tile_paths[0][0])
    dst = tmp_path / "tiles"  # not there yet
    table = Table.read(survey.catalogue_path, format="ascii.csv")
    table["fits_file_paths"] = [str(v).replace(src, str(dst))
                                for v in table["fits_file_paths"]]
    table["diameter_pixel"] = 19
    del table["diameter_arcsec"]
    cat = tmp_path / "cat.csv"
    table.write(cat, format="ascii.csv")
    out = tmp_path / "out"
    report = cutana.make_cutouts(cat, out, format=fmt, progress=False)
    assert report.exit_code == 1
    got = cutana.open(out)
    status = np.asarray(got.status)
    assert set(status.tolist()) == {Status.TILE_ERROR, Status.BAD_ROW}
    first = int(np.flatnonzero(status == Status.TILE_ERROR)[0])
    assert str(dst) in report.messages[first]
    assert "does not exist" in report.messages[first]
    if fmt == "zarr":
        assert got.images.shape[2:] == (19, 19)
    assert verify(out, cat) == []

    shutil.copytree(src, dst)
    assert cutana.make_cutouts(cat, out, format=fmt, progress=False,
                               resume=True).exit_code == 0
    clean = tmp_path / "clean"
    assert cutana.make_cutouts(cat, clean, format=fmt, progress=False).exit_code == 0
    a, b = cutana.open(clean), cutana.open(out)
    np.testing.assert_array_equal(b.status, a.status)
    for i in np.flatnonzero(np.isin(a.status, (Status.OK, Status.PARTIAL_OVERLAP))):
        np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(a[i]))
    assert verify(out, cat) == []


@pytest.mark.parametrize("bands", [None, "last"])
def test_a_file_list_shorter_than_the_bands_is_a_bad_row(survey, tmp_path, bands):
    """Test that a row whose file list names fewer files than the bands need
    (no file for the last band) is a bad row naming the column, and the run
    exits 0: it was a TILE_ERROR ("a band file could not be indexed" with
    --bands) that exited 1 though every file can be read, and that no
    --resume could mend. The other rows are as in a run without that row's
    fault."""
    from astropy.table import Table

    table = Table.read(survey.catalogue_path, format="ascii.csv")
    lists = [str(v) for v in table["fits_file_paths"]]
    good = [i for i, v in enumerate(lists) if v.startswith("[")]
    r = good[3]
    paths = ast.literal_eval(lists[r])
    table["fits_file_paths"] = lists
    table["fits_file_paths"][r] = str(paths[:-1])
    cat = tmp_path / "cat.csv"
    table.write(cat, format="ascii.csv")
    opts = dict(size=15, progress=False)
    if bands:
        opts["bands"] = [BANDS[-1]]
    report = cutana.make_cutouts(cat, tmp_path / "out.zarr", **opts)
    assert report.exit_code == 0
    got = cutana.open(tmp_path / "out.zarr")
    assert got.status[r] == Status.BAD_ROW
    why = (f"none for band {BANDS[-1]} (the bands are {', '.join(BANDS)})"
           if bands is None else f"none for the bands asked ({BANDS[-1]})")
    assert report.messages[r] == (
        f"{cat} row {r} column 'fits_file_paths': it lists {len(paths) - 1} "
        f"file(s), {why}"
    )
    ref = cutana.make_cutouts(survey.catalogue_path, tmp_path / "ref.zarr", **opts)
    assert ref.exit_code == 0
    want = np.asarray(cutana.open(tmp_path / "ref.zarr").status).copy()
    assert want[r] in (Status.OK, Status.PARTIAL_OVERLAP)
    want[r] = Status.BAD_ROW
    np.testing.assert_array_equal(got.status, want)
    from cutana.verify import verify

    assert verify(tmp_path / "out.zarr") == []  # the tiles tell why it is bad


def test_a_file_list_longer_than_most_does_not_add_a_band(survey, tmp_path, caplog):
    """Test that one row listing a file more than every other row does not
    make that file a band: the bands are the positions at least half the
    rows list, the row is cut from its first files, with a warning naming
    it, and the run equals one without the extra file. Before, the extra
    file was a band and every other row a bad row ("none for band
    NIR-H[2]"). Naming that band with ``bands`` still cuts it."""
    import logging

    from astropy.table import Table

    table = Table.read(survey.catalogue_path, format="ascii.csv")
    lists = [str(v) for v in table["fits_file_paths"]]
    good = [i for i, v in enumerate(lists) if v.startswith("[")]
    r, other = good[3], good[-1]
    paths = ast.literal_eval(lists[r])
    extra = ast.literal_eval(lists[other])[-1]  # a file of another row, band NIR-H
    lists[r] = str([*paths, extra])
    table["fits_file_paths"] = lists
    cat = tmp_path / "cat.csv"
    table.write(cat, format="ascii.csv")
    opts = dict(size=15, progress=False)
    with caplog.at_level(logging.WARNING, logger="cutana"):
        report = cutana.make_cutouts(cat, tmp_path / "out.zarr", **opts)
    assert report.exit_code == 0
    assert f"(e.g. row {r}: 3 files)" in caplog.text
    assert "NIR-H[2]" in caplog.text
    ref = cutana.make_cutouts(survey.catalogue_path, tmp_path / "ref.zarr", **opts)
    assert ref.exit_code == 0
    got, want = cutana.open(tmp_path / "out.zarr"), cutana.open(tmp_path / "ref.zarr")
    assert got.bands == want.bands == list(BANDS)
    assert want.status[r] in (Status.OK, Status.PARTIAL_OVERLAP)
    np.testing.assert_array_equal(got.status, want.status)
    np.testing.assert_array_equal(np.asarray(got.images), np.asarray(want.images))

    asked = cutana.make_cutouts(cat, tmp_path / "asked.zarr",
                                bands=[*BANDS, "NIR-H[2]"], **opts)
    three = cutana.open(tmp_path / "asked.zarr")
    # (its third file lies on another tile: the box reaches outside it)
    assert three.status[r] in (Status.OK, Status.PARTIAL_OVERLAP)
    np.testing.assert_array_equal(np.asarray(three[r])[:2], np.asarray(want[r]))
    cut = np.isin(np.asarray(want.status), (Status.OK, Status.PARTIAL_OVERLAP))
    rest = np.setdiff1d(np.flatnonzero(cut), [r])  # (off-tile rows stay so)
    assert len(rest) > 10
    assert (np.asarray(three.status)[rest] == Status.BAD_ROW).all()
    assert "none for band NIR-H[2]" in asked.messages[int(rest[0])]


def test_angular_sizes_of_rows_of_unreadable_tiles_need_a_size(survey, tmp_path):
    """Test that a Zarr run whose rows cannot be cut, because their tiles
    cannot be read, and whose sizes are angles (the tile's pixel scale
    would give their size in pixels), asks for --size: the store would
    hold cutouts of a size no --resume could fill."""
    from astropy.table import Table

    table = Table.read(survey.catalogue_path, format="ascii.csv")
    table["fits_file_paths"] = [str(tmp_path / "absent.fits")] * len(table)
    del table["diameter_pixel"]
    cat = tmp_path / "cat.csv"
    table.write(cat, format="ascii.csv")
    with pytest.raises(ConfigError, match=r"the cutout size is not known: .*"
                       r"absent\.fits: file does not exist.*give --size N"):
        cutana.make_cutouts(cat, tmp_path / "out.zarr", progress=False)
    report = cutana.make_cutouts(cat, tmp_path / "out.zarr", size=15, progress=False)
    assert report.exit_code == 1


def test_resume_of_a_finished_run_keeps_the_messages_of_the_rows_it_keeps(
    survey, tmp_path
):
    """Test that the index of a repaired FITS output keeps the message of a
    row that is not cut again, rather than the new plan's (here: the rows
    of a tile broken since, which keep their OK without a message)."""
    import shutil

    from astropy.table import Table

    dst, victim, kept = _survey_without_a_band_file(survey, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], format="fits", progress=False)
    out = tmp_path / "out"
    assert cutana.make_cutouts(survey.catalogue_path, out, **opts).exit_code == 1
    before = Table.read(out / "index.ecsv")
    shutil.copy(kept, victim)  # the tile is back, another one breaks
    other = dst / os.path.basename(survey.tile_paths[0][1])
    other.write_bytes(b"broken")
    report = cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    after = Table.read(out / "index.ecsv")
    unchanged = np.asarray(before["status"]) != Status.TILE_ERROR
    assert report.exit_code == 0
    for name in ("status", "message"):
        a = before[name][unchanged]
        b = after[name][unchanged]
        assert [str(v) for v in a] == [str(v) for v in b], name
    assert (np.asarray(after["status"])[~unchanged] == Status.OK).any()


def test_repair_gives_the_wcs_of_a_tile_replaced_with_another_header(
    survey, tmp_path
):
    """Test that rows cut by --resume from a tile file put back with another
    header (CRPIX moved) get that header's WCS, while rows cut before keep
    theirs (the store lists the tile's new header as a tile of its own: the
    tile's key and paths are those of the broken tile it had listed)."""
    dst, victim, kept = _survey_without_a_band_file(survey, tmp_path)
    with fits.open(kept) as hdul:  # no zero point: a tile error at cutting
        del hdul[survey.hdu].header["MAGZERO"]
        hdul.writeto(victim)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], flux_conversion=True,
                progress=False)
    out = tmp_path / "out.zarr"
    assert cutana.make_cutouts(survey.catalogue_path, out, **opts).exit_code == 1
    failed = np.asarray(cutana.open(out).status) == Status.TILE_ERROR
    assert failed.any()
    sibling = dst / os.path.basename(survey.tile_paths[1][1])
    for src, path in ((kept, victim), (sibling, sibling)):  # both bands of it
        with fits.open(src) as hdul:
            hdu = hdul[survey.hdu]
            hdu.header["CRPIX1"] += 7
            hdu.header["CRPIX2"] += 3
            hdul.writeto(path, overwrite=True)
    assert cutana.make_cutouts(
        survey.catalogue_path, out, resume=True, **opts
    ).exit_code == 0
    b = cutana.open(out)
    cat = read_catalog(survey.catalogue_path)
    c = [band in victim.name for band in b.bands].index(True)
    repaired = np.flatnonzero(failed & (np.asarray(b.status) == Status.OK))
    assert len(repaired)
    jy = 3631.0 * 10 ** (-0.4 * fits.getheader(victim, survey.hdu)["MAGZERO"])
    for i in repaired[:5]:
        ref = _reference(victim, cat.ra[i], cat.dec[i], 21)
        np.testing.assert_allclose(np.asarray(b[i])[c], ref.data * jy, rtol=1e-6)
        np.testing.assert_allclose(b.wcs(i).wcs.crpix, ref.wcs.wcs.crpix)


def test_resume_of_a_finished_run_with_another_catalogue_is_refused(
    survey, zarr_run, tmp_path
):
    """Test that --resume of a finished output with a catalogue of the same
    length but other ids or positions is a usage error (it overwrote the
    stored ids and positions and cut the failed rows at the new ones)."""
    import shutil

    out = tmp_path / "out.zarr"
    shutil.copytree(zarr_run[0], out)
    text = Path(survey.catalogue_path).read_text()
    line = text.splitlines()[1]
    first, ra = line.split(",")[:2]
    moved = line.replace(f",{ra},", f",{float(ra) + 1e-4!r},", 1)
    for changed in (text.replace(first, first + "x", 1), text.replace(line, moved, 1)):
        cat = tmp_path / "other.csv"
        cat.write_text(changed)
        with pytest.raises(ConfigError, match="finished with another catalogue"):
            cutana.make_cutouts(cat, out, resume=True, size=21, progress=False)
    cat.write_text("\n".join(text.splitlines()[:-1]) + "\n")  # a row less
    with pytest.raises(ConfigError, match="finished with a catalogue of 80 rows"):
        cutana.make_cutouts(cat, out, resume=True, size=21, progress=False)
    assert list(cutana.open(out).source_id) == list(cutana.open(zarr_run[0]).source_id)


def test_a_stopped_repair_whose_tile_broke_again_drops_what_it_wrote(
    survey, tmp_path, monkeypatch
):
    """Test that when a repair is stopped after rewriting chunks and the
    tile breaks again before the next --resume, the rows it could not cut
    now hold no pixels (as any TILE_ERROR row), not those written then."""
    import shutil

    from cutana import pipeline
    from cutana.verify import verify

    dst, victim, kept = _survey_without_a_band_file(survey, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], max_sources_per_job=5,
                progress=False)
    out = tmp_path / "out.zarr"
    assert cutana.make_cutouts(survey.catalogue_path, out, **opts).exit_code == 1
    failed = np.asarray(cutana.open(out).status) == Status.TILE_ERROR
    shutil.copy(kept, victim)

    def stopped(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._Repair, "finish", stopped)
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    monkeypatch.undo()
    assert np.nansum(np.abs(cutana.open(out).images[:][failed])) > 0  # written then
    os.remove(victim)  # broken again
    report = cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    assert report.exit_code == 1
    a = cutana.open(out)
    np.testing.assert_array_equal(np.asarray(a.status) == Status.TILE_ERROR, failed)
    assert not np.any(a.images[:][failed])
    assert verify(out, survey.catalogue_path) == []


def test_a_stopped_fits_repair_says_so_and_is_finished_by_the_next_resume(
    survey, tmp_path, monkeypatch
):
    """Test that a FITS output whose repair (--resume of its finished run)
    was stopped before its index was written fails `cutana verify` (it
    passed, with files the index did not list), and that the next --resume,
    with the tile broken again, removes the files written then."""
    import shutil

    from cutana import pipeline
    from cutana.verify import verify

    dst, victim, kept = _survey_without_a_band_file(survey, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], format="fits", progress=False)
    out = tmp_path / "out"
    assert cutana.make_cutouts(survey.catalogue_path, out, **opts).exit_code == 1
    listed = {f for f in os.listdir(out) if f.endswith(".fits")}
    shutil.copy(kept, victim)

    def stopped(self):
        raise KeyboardInterrupt

    def stopped_run(self, executor):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._Repair, "finish", stopped)
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    monkeypatch.undo()
    assert {f for f in os.listdir(out) if f.endswith(".fits")} > listed
    assert any("was stopped" in p for p in verify(out, survey.catalogue_path))
    os.remove(victim)
    monkeypatch.setattr(pipeline._Repair, "run", stopped_run)  # stopped again, early
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    monkeypatch.undo()
    assert any("was stopped" in p for p in verify(out, survey.catalogue_path))
    assert cutana.make_cutouts(
        survey.catalogue_path, out, resume=True, **opts
    ).exit_code == 1
    assert {f for f in os.listdir(out) if f.endswith(".fits")} == listed
    assert verify(out, survey.catalogue_path) == []


def test_a_repair_whose_chunk_writing_fails_leaves_the_store_unfinished(
    survey, tmp_path, monkeypatch
):
    """Test that when the task that writes a repair's chunks fails after
    writing one (twice: it is retried), the store is left unfinished, not
    finalised with that chunk's old checksum (verify failed for good), and
    the next --resume finishes it as a clean run."""
    import shutil

    from cutana.io.zarr import ZarrWriter
    from cutana.verify import verify

    dst, victim, kept = _survey_without_a_band_file(survey, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], progress=False)
    out = tmp_path / "out.zarr"
    assert cutana.make_cutouts(survey.catalogue_path, out, **opts).exit_code == 1
    shutil.copy(kept, victim)
    original = ZarrWriter._write_block

    def written_then_failed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        msg = "disk trouble"
        raise OSError(msg)

    monkeypatch.setattr(ZarrWriter, "_write_block", written_then_failed)
    report = cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    monkeypatch.undo()
    assert report.exit_code == 1
    assert cutana.open(out).attrs.get("repairing") is True
    problems = verify(out, survey.catalogue_path)
    assert any("has not been finalised" in p for p in problems)
    assert cutana.make_cutouts(
        survey.catalogue_path, out, resume=True, **opts
    ).exit_code == 0
    clean = tmp_path / "clean.zarr"
    cutana.make_cutouts(survey.catalogue_path, clean, **opts)
    np.testing.assert_array_equal(cutana.open(out).status, cutana.open(clean).status)
    a, b = cutana.open(out), cutana.open(clean)
    np.testing.assert_array_equal(a.images[:], b.images[:])
    assert verify(out, survey.catalogue_path) == []


def _interrupted(monkeypatch, after, *args, **kwargs):
    """Run `cutana.make_cutouts` and stop it (KeyboardInterrupt) once it has
    handled ``after`` results."""
    from cutana import pipeline

    calls = {"n": 0}
    original = pipeline._Runner._on_done

    def crashing(self, task, result):
        calls["n"] += 1
        if calls["n"] == after + 1:
            raise KeyboardInterrupt  # the process dies
        return original(self, task, result)

    monkeypatch.setattr(pipeline._Runner, "_on_done", crashing)
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(*args, **kwargs)
    monkeypatch.setattr(pipeline._Runner, "_on_done", original)


@pytest.mark.parametrize(("given", "fmt"), [
    ("tiles", "zarr"), ("files", "zarr"), ("files", "fits"),
])
def test_resume_of_an_interrupted_run_cuts_the_rows_of_a_tile_back_since(
    survey, tmp_path, monkeypatch, caplog, given, fmt
):
    """Test that --resume of an interrupted run whose tile could not be read
    then and can now finishes the run and cuts that tile's rows too, as a
    run that had the tile from the start (status, values, WCS), and gives an
    output that verifies. It was refused, and only --overwrite, which cuts
    every row again, could cut them. With catalogue file lists the tiles are
    numbered otherwise once the tile is back (it is the first named)."""
    import shutil

    from cutana.verify import verify

    src = os.path.dirname(survey.tile_paths[0][0])
    dst = tmp_path / "tiles"
    shutil.copytree(src, dst)
    # the tile the catalogue names first, or the tile of the first file:
    # the index numbers it 0 when its files can be read
    listed = next(f for f in read_catalog(survey.catalogue_path).fits_file_paths if f)
    first = listed[0] if given == "files" else sorted(os.listdir(dst))[0]
    victim = dst / os.path.basename(first)
    kept = tmp_path / "kept.fits"
    shutil.move(victim, kept)
    cat = tmp_path / "cat.csv"
    cat.write_text(Path(survey.catalogue_path).read_text().replace(src, str(dst)))
    opts = dict(size=21, max_sources_per_job=5, progress=False, format=fmt)
    if given == "tiles":
        opts["tiles"] = [str(dst / "*.fits")]
    out = tmp_path / "out"
    _interrupted(monkeypatch, 2, cat, out, **opts)

    shutil.copy(kept, victim)  # the tile is back
    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(cat, out, resume=True, **opts)
    assert report.exit_code == 0, report.failures
    said = "that the interrupted run could not read (or did not have) can be read now"
    assert said in caplog.text
    clean = tmp_path / "clean"
    assert cutana.make_cutouts(cat, clean, **opts).counts == report.counts
    a, b = cutana.open(clean), cutana.open(out)
    np.testing.assert_array_equal(b.status, a.status)
    assert not (np.asarray(b.status) == Status.TILE_ERROR).any()
    cut = np.flatnonzero(np.isin(a.status, (Status.OK, Status.PARTIAL_OVERLAP)))
    for i in cut:
        np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(a[i]))
        if fmt == "zarr":
            np.testing.assert_array_equal(b.wcs(i).wcs.crpix, a.wcs(i).wcs.crpix)
    rows = read_catalog(cat)
    c = [band in victim.name for band in b.bands].index(True)
    if given == "files":  # each source is cut from its own files
        on_victim = [i for i in cut if str(victim) in rows.fits_file_paths[i]]
    else:  # from the tile it lies deepest in
        on_victim = [i for i in cut if _tile_paths(b, i)[c] == str(victim)]
    assert on_victim
    for i in on_victim[:5]:  # against astropy: the band of the file put back
        ref = _reference(victim, rows.ra[i], rows.dec[i], 21)
        np.testing.assert_array_equal(np.asarray(b[i])[c], ref.data.astype(np.float32))
    assert verify(out, cat) == []


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_resume_of_an_interrupted_run_cuts_the_rows_of_a_tile_unreadable_then(
    overlapping, tmp_path, monkeypatch, caplog, fmt
):
    """Test that --resume of an interrupted run, one of whose tiles (all its
    band files, matched by --tiles) could not be read, so that its sources
    lay on no tile or on another, finishes the run once the tile can be read
    and cuts those rows from it, as a run that had the tile from the start
    (status, values, the tile each row names). It was refused as a run with
    other tiles."""
    from cutana.verify import verify

    dst, broken, mend = _survey_with_an_unreadable_tile(overlapping, tmp_path)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], max_sources_per_job=5,
                progress=False, format=fmt)
    out = tmp_path / "out"
    _interrupted(monkeypatch, 2, overlapping.catalogue_path, out, **opts)
    mend()
    with caplog.at_level("WARNING", logger="cutana.pipeline"):
        report = cutana.make_cutouts(
            overlapping.catalogue_path, out, resume=True, **opts
        )
    assert report.exit_code == 0, report.failures
    assert "can be read now" in caplog.text
    clean = tmp_path / "clean"
    assert cutana.make_cutouts(overlapping.catalogue_path, clean, **opts).exit_code == 0
    a, b = cutana.open(clean), cutana.open(out)
    np.testing.assert_array_equal(b.status, a.status)
    mended = 0
    for i in np.flatnonzero(np.isin(a.status, (Status.OK, Status.PARTIAL_OVERLAP))):
        np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(a[i]))
        then, now = _tile_paths(b, i), _tile_paths(a, i)
        assert then == now
        mended += str(broken[0]) in then
    assert mended
    assert verify(out, overlapping.catalogue_path) == []


@pytest.mark.parametrize("back", [False, True])
def test_resume_of_an_interrupted_run_whose_tile_changed_since_is_refused(
    survey, tmp_path, monkeypatch, back
):
    """Test that --resume of an interrupted run is refused, naming the file,
    when a band file (not the first) of a tile it cut from has another
    header since (here another MAGZERO, with --flux-conversion), also when
    a band file it could not read is put back at the same time: it cut on,
    mixing two zero points in one tile's cutouts. The output is unchanged."""
    import shutil

    from cutana._testing import files_bytes

    dst = tmp_path / "tiles"
    shutil.copytree(os.path.dirname(survey.tile_paths[0][0]), dst)
    names = sorted(n for n in os.listdir(dst) if n.endswith(".fits"))
    kept = tmp_path / "kept.fits"
    if back:  # the first file of one tile is missing, and put back later
        shutil.move(dst / names[0], kept)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], max_sources_per_job=5,
                progress=False, flux_conversion=True)
    out = tmp_path / "out.zarr"
    _interrupted(monkeypatch, 2, survey.catalogue_path, out, **opts)
    if back:
        shutil.move(kept, dst / names[0])
    changed = dst / names[-1]  # the last band of the other tile
    with fits.open(changed, mode="update") as hdul:
        hdul[0].header["MAGZERO"] = hdul[0].header["MAGZERO"] + 1
    before = files_bytes(out)
    with pytest.raises(ConfigError) as exc:
        cutana.make_cutouts(survey.catalogue_path, out, resume=True, **opts)
    assert f"({changed} has changed since (its header differs))" in str(exc.value)
    # the file put back is not given as a reason
    assert "can now" not in str(exc.value)
    assert files_bytes(out) == before


def test_resume_of_an_interrupted_run_whose_tile_broke_since_names_the_rows(
    survey, tmp_path, monkeypatch
):
    """Test that --resume of an interrupted run whose tile could be read
    then and cannot now is refused, naming the rows whose tiles changed (it
    said only that the catalogue, tiles or options differ)."""
    import shutil

    dst = tmp_path / "tiles"
    shutil.copytree(os.path.dirname(survey.tile_paths[0][0]), dst)
    opts = dict(size=21, tiles=[str(dst / "*.fits")], max_sources_per_job=5,
                progress=False)
    done = tmp_path / "done.zarr"
    assert cutana.make_cutouts(survey.catalogue_path, done, **opts).exit_code == 0
    stopped = tmp_path / "stopped.zarr"
    _interrupted(monkeypatch, 1, survey.catalogue_path, stopped, **opts)

    victim = dst / os.path.basename(survey.tile_paths[1][0])
    victim.unlink()  # the tile is gone since
    broken = tmp_path / "broken.zarr"
    assert cutana.make_cutouts(survey.catalogue_path, broken, **opts).exit_code == 1
    failed = np.asarray(cutana.open(broken).status) == Status.TILE_ERROR
    first = int(np.flatnonzero(failed)[0])
    with pytest.raises(ConfigError) as exc:
        cutana.make_cutouts(survey.catalogue_path, stopped, resume=True, **opts)
    assert (
        f"(tiles: the tiles of {int(failed.sum())} rows (row {first}, ...) could "
        "be read then and cannot now)" in str(exc.value)
    )
    assert f"({victim} cannot be read now)" in str(exc.value)


def test_verify_of_an_interrupted_run_says_it_is_unfinished(
    survey, zarr_run, tmp_path, monkeypatch
):
    """Test that `cutana verify` of an interrupted run says that the run is
    not finished, and checks its written chunks against the ledger's
    statuses: it reported every written chunk as not matching its
    checksum (the store's statuses are written only at the end)."""
    from cutana import pipeline
    from cutana.verify import verify

    # chunks of one row, written by the job that cuts it: some are written
    # before the interruption
    monkeypatch.setattr(pipeline, "choose_chunk_rows", lambda n, row_bytes: 1)
    calls = {"n": 0}
    original = pipeline._Runner._on_done

    def crashing(self, task, result):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # the process dies after 5 results
        return original(self, task, result)

    monkeypatch.setattr(pipeline._Runner, "_on_done", crashing)
    out = tmp_path / "r.zarr"
    with pytest.raises(KeyboardInterrupt):
        cutana.make_cutouts(
            survey.catalogue_path, out, size=21, max_sources_per_job=4, progress=False
        )
    monkeypatch.setattr(pipeline._Runner, "_on_done", original)
    assert any(name.startswith("c.") for name in os.listdir(out / "images"))
    problems = verify(out)
    assert any("has not been finalised" in p and "--resume" in p for p in problems)
    assert not any("do not match their checksum" in p for p in problems), problems
    # a written chunk that changes since is still caught
    chunk = sorted(n for n in os.listdir(out / "images") if n.startswith("c."))[0]
    data = bytearray((out / "images" / chunk).read_bytes())
    data[-1] ^= 0xFF
    (out / "images" / chunk).write_bytes(bytes(data))
    assert any("1 chunks do not match their checksum" in p for p in verify(out))
    (out / "images" / chunk).unlink()
    report = cutana.make_cutouts(
        survey.catalogue_path, out, size=21, resume=True, progress=False
    )
    assert report.exit_code == 0
    assert verify(out) == []


def test_corrupt_tile_marks_only_its_sources(survey, tmp_path):
    """Test that a truncated tile fails only its own sources, with TILE_ERROR
    and exit 1, each saying that the file is truncated (it said the tile had
    no file for that band)."""
    import shutil

    src = os.path.dirname(survey.tile_paths[0][0])
    dst = tmp_path / "tiles"
    shutil.copytree(src, dst)
    victim = dst / os.path.basename(survey.tile_paths[1][1])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as fh:
        fh.truncate(size // 2)
    out = tmp_path / "c.zarr"
    report = cutana.make_cutouts(
        survey.catalogue_path, out, size=21, tiles=[str(dst / "*.fits")], progress=False
    )
    arch = cutana.open(out)
    status = np.asarray(arch.status)
    assert report.exit_code == 1
    assert len(status) == survey.n_sources
    assert not (status == Status.PENDING).any()
    assert report.failures
    failed = np.flatnonzero(status == Status.TILE_ERROR)
    assert len(failed) > 0
    for r in failed:
        assert f"{victim}: file is truncated" in report.messages[int(r)]
    truth = survey.truth
    # sources that the truth puts on the intact tile are unaffected
    on0 = (truth["tile"] == 0) & (truth["expected_status"] == Status.OK)
    assert np.all(status[truth["row"][on0]] == Status.OK)


def test_sources_on_a_truncated_tile_are_tile_errors_with_tiles(survey, tmp_path):
    """Test that with --tiles the sources on a tile whose every band file is
    truncated (headers whole: the index leaves the files out) are
    TILE_ERROR naming the file, not NO_OVERLAP ("source lies on no tile"):
    each such row's box meets the tile's image (astropy's Cutout2D on its
    header's WCS), and every NO_OVERLAP row meets no tile."""
    import shutil

    dst = tmp_path / "tiles"
    shutil.copytree(os.path.dirname(survey.tile_paths[0][0]), dst)
    broken = [dst / os.path.basename(p) for p in survey.tile_paths[1]]
    wcs = WCS(fits.getheader(broken[0]))
    shape = fits.getdata(broken[0]).shape
    for path in broken:
        os.truncate(path, os.path.getsize(path) // 2)
    report = cutana.make_cutouts(survey.catalogue_path, tmp_path / "o.zarr", size=21,
                                 tiles=[str(dst / "*.fits")], progress=False)
    assert report.exit_code == 1
    status = np.asarray(cutana.open(tmp_path / "o.zarr").status)
    cat = read_catalog(survey.catalogue_path)
    sky = SkyCoord(cat.ra, cat.dec, unit="deg")
    zeros = np.zeros(shape)

    def meets(data, w, k):
        try:
            AstropyCutout2D(data, sky[k], 21, wcs=w, mode="partial")
        except (NoOverlapError, ValueError):
            return False
        return True

    failed = np.flatnonzero(status == Status.TILE_ERROR)
    assert len(failed) > 5
    for k in failed:
        assert meets(zeros, wcs, k)
        assert "file is truncated" in report.messages[int(k)]
    intact = WCS(fits.getheader(survey.tile_paths[0][0]))
    for k in np.flatnonzero(status == Status.NO_OVERLAP):
        assert not meets(zeros, wcs, k) and not meets(zeros, intact, k)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"resample": "cubic"}, "invalid resample"),
        ({"target_size": 0}, "invalid target_size"),
        ({"dtype": "uint8"}, "needs a stretch"),
        ({"resample": "bilinear"}, "needs target_size"),
        ({"memory_limit": "lots"}, "cannot parse memory size"),
        ({"workers": 0}, "invalid workers"),
        ({"memory_limit": "1MB", "size": 21}, "too small"),
        ({"normalize": "asinh", "stretch_a": -1.0}, "a must be a finite number > 0"),
        ({"normalize": "zscale", "zscale_samples": 0}, "invalid zscale_samples: 0"),
        ({"size": 21, "channel_weights": [1.0, float("nan")]}, "finite numbers"),
        ({"normalize": "linear", "size": 21, "crop": 2.5}, "crop must be a fraction"),
        (
            {"normalize": "linear", "size": 21, "crop": 30},
            "smallest cutouts are 21 x 21"
        ),
        (
            {"normalize": "log", "target_size": 16, "crop": 17},
            r"crop of 17 pixels is larger than the image \(16 pixels\)",
        ),
    ],
)
def test_bad_options_are_clear_errors(survey, tmp_path, options, match):
    """Test that invalid options raise ConfigError naming the option, before
    anything is written."""
    out = tmp_path / "x"
    with pytest.raises((ConfigError, ValueError), match=match):
        cutana.make_cutouts(survey.catalogue_path, out, progress=False, **options)
    assert not out.exists()


def test_dask_backend_gives_identical_bytes(survey, zarr_run, tmp_path):
    """Test that a Dask LocalCluster run writes exactly the bytes of a serial run."""
    pytest.importorskip("distributed")
    out, _ = zarr_run
    out2 = tmp_path / "d.zarr"
    report = cutana.make_cutouts(
        survey.catalogue_path, out2, size=21, workers=2, backend="dask",
        max_sources_per_job=9, progress=False,
    )
    assert report.exit_code == 0
    assert files_bytes(out) == files_bytes(out2)


def test_unreachable_dask_scheduler_is_a_usage_error(survey, tmp_path):
    """Test that a --scheduler that cannot be reached is a ConfigError (exit
    2) before anything is written: it was a traceback with exit 1, and a
    half-made store that a plain rerun refused."""
    pytest.importorskip("distributed")
    import dask

    out = tmp_path / "o.zarr"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConfigError, match="cannot reach the Dask scheduler"):
            cutana.make_cutouts(
                survey.catalogue_path, out, size=21, backend="dask",
                scheduler="tcp://127.0.0.1:1", progress=False,
            )
    assert not out.exists()


def test_relative_output_and_tiles_reach_workers_in_another_folder(
    survey, tmp_path, monkeypatch
):
    """Test that a relative output and relative --tiles are made absolute
    before tasks go to workers, which may run in another working folder (a
    Dask cluster's): workers there staged their jobs in their own folder,
    and the run failed. Here the main process changes folder once the
    tasks are made, as the workers' folder would differ."""
    import shutil

    from cutana import pipeline

    here = tmp_path / "here"
    shutil.copytree(os.path.dirname(survey.tile_paths[0][0]), here / "tiles")
    clean = tmp_path / "clean.zarr"
    cutana.make_cutouts(
        survey.catalogue_path, clean, size=21, tiles=[str(here / "tiles" / "*.fits")],
        progress=False,
    )
    monkeypatch.chdir(here)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    original = pipeline._Runner.run

    def run_elsewhere(self, executor):
        os.chdir(elsewhere)  # as a worker in another folder
        return original(self, executor)

    monkeypatch.setattr(pipeline._Runner, "run", run_elsewhere)
    report = cutana.make_cutouts(
        survey.catalogue_path, "o.zarr", size=21, tiles=["tiles/*.fits"],
        max_sources_per_job=9, progress=False,
    )
    assert report.exit_code == 0
    assert os.listdir(elsewhere) == []
    got, ref = cutana.open(here / "o.zarr"), cutana.open(clean)
    np.testing.assert_array_equal(got.images[:], ref.images[:])
    np.testing.assert_array_equal(got.status[:], ref.status[:])


@pytest.mark.parametrize("dtype", [">f8", ">i4"])
def test_wide_tiles_are_stretched_from_their_own_values(tmp_path, dtype):
    """Test that float64 and int32 tiles are cut and stretched from their
    values as astropy reads them (float64), not rounded to float32 first:
    log to uint16 equals astropy.visualization on astropy's Cutout2D."""
    from astropy.visualization import LogStretch, PercentileInterval

    wide = make_survey(
        tmp_path / "survey", n_tiles=1, bands=["VIS"], tile_size=160,
        n_sources=30, edge_fraction=0.0, off_tile_fraction=0.0,
        bad_row_fraction=0.0, size_range_pixels=(12, 20), dtype=dtype, seed=8,
    )
    # values that float32 cannot hold: full float64 mantissas, or 30-bit integers
    rng = np.random.default_rng(9)
    with fits.open(wide.tile_paths[0][0], mode="update") as hdul:
        hdu = next(h for h in hdul if h.data is not None)
        shape = hdu.data.shape
        if dtype == ">f8":
            hdu.data = rng.lognormal(0.0, 1.0, shape).astype(dtype)
        else:
            hdu.data = rng.integers(2**29, 2**30, shape).astype(dtype)
    out = tmp_path / "log.zarr"
    cutana.make_cutouts(
        wide.catalogue_path, out, size=17, normalize="log", dtype="uint16",
        progress=False,
    )
    arch = cutana.open(out)
    ok = np.flatnonzero(np.asarray(arch.status) == Status.OK)
    assert len(ok) > 20
    for i in ok:
        ref = _reference(_tile_paths(arch, i)[0], arch.ra[i], arch.dec[i], 17).data
        vmin, vmax = PercentileInterval(99.8).get_limits(ref)
        scaled = np.clip((ref - vmin) / (vmax - vmin), 0, 1)
        expect = np.round(LogStretch(1000.0)(scaled) * 65535)
        np.testing.assert_array_equal(arch.images[i, 0], expect.astype(np.uint16))


def _blank_tile(path, bscale, bzero):
    """An int16 tile with BSCALE/BZERO and a block of BLANK pixels (raw values
    written as they are), and its header."""
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = 150.0, 2.0
    header["CRPIX1"], header["CRPIX2"] = 30.5, 30.5
    header["CDELT1"], header["CDELT2"] = -0.1 / 3600, 0.1 / 3600
    header["BAND"], header["MAGZERO"] = "X", 24.0
    raw = np.random.default_rng(5).integers(-32767, 32767, (60, 60)).astype(">i2")
    raw[25:33, 20:31] = -32768
    fits.PrimaryHDU(raw, header).writeto(path)
    with fits.open(path, mode="update", do_not_scale_image_data=True) as hdul:
        if bscale != 1.0 or bzero != 0.0:
            hdul[0].header["BSCALE"] = bscale
            hdul[0].header["BZERO"] = bzero
        hdul[0].header["BLANK"] = -32768
    return header


def _cut_as_cutout2d(tmp_path, cat, tile, data, positions, size, wcs):
    """Cut ``cat`` from ``tile`` unresampled, assert that every cutout
    equals astropy's Cutout2D of ``data`` (as float32), and return them."""
    plain = tmp_path / "plain.zarr"
    cutana.make_cutouts(cat, plain, tiles=[str(tile)], size=size, progress=False)
    got = cutana.open(plain).images[:, 0]
    for k in range(len(positions)):
        ref = AstropyCutout2D(data, positions[k], size, wcs=wcs, mode="partial",
                              fill_value=np.nan).data
        np.testing.assert_array_equal(got[k], ref.astype(np.float32))
    return got


@pytest.mark.parametrize(
    ("bscale", "bzero"), [(1.0, 0.0), (0.01, 100.0), (1.0, 32768.0)]
)
def test_integer_tiles_are_scaled_as_astropy_reads_them(tmp_path, bscale, bzero):
    """Test that BLANK pixels of integer tiles are NaN and BSCALE/BZERO are
    applied as astropy applies them: unresampled cutouts equal astropy's
    Cutout2D; resampled and flux-converted ones equal BatchCutout2D.resample
    of astropy's values."""
    from cutana import BatchCutout2D
    from cutana.processing import flux_factor

    tile = tmp_path / "tile.fits"
    header = _blank_tile(tile, bscale, bzero)
    wcs = WCS(header)
    pix = np.array([[25.0, 29.0], [30.2, 26.7], [3.0, 57.0], [45.5, 12.5]])
    ra, dec = wcs.all_pix2world(pix, 0).T
    cat = tmp_path / "cat.csv"
    rows = "".join(f"s{k},{float(ra[k])!r},{float(dec[k])!r}\n" for k in range(len(ra)))
    cat.write_text("SourceID,RA,Dec\n" + rows)
    with fits.open(tile) as hdul:
        data = hdul[0].data  # astropy's values: float32, NaN where BLANK
    # astropy reads pseudo-unsigned data (BZERO 32768) as uint16, BLANK kept
    unsigned = bzero == 32768.0
    assert data.dtype == (np.uint16 if unsigned else np.float32)
    assert np.isnan(data).sum() == (0 if unsigned else 88)
    positions = SkyCoord(ra, dec, unit="deg")
    data = data.astype(np.float32)  # exact; Cutout2D fills NaN in floats only

    got = _cut_as_cutout2d(tmp_path, cat, tile, data, positions, 9, wcs)
    assert np.isnan(got[0]).sum() == (0 if unsigned else 72)

    factor = flux_factor(24.0)
    batch = BatchCutout2D(data, positions, 9, wcs=wcs, mode="partial",
                          fill_value=np.nan)
    for method, target in (
        ("bilinear", 13), ("area", 5), ("nearest", 9), ("bilinear", 9), ("area", 9)
    ):
        out = tmp_path / f"{method}{target}.zarr"
        cutana.make_cutouts(
            cat, out, tiles=[str(tile)], size=9, target_size=target,
            resample=method, flux_conversion=True, progress=False,
        )
        expect = batch.resample(target, method, scale=factor)
        np.testing.assert_array_equal(cutana.open(out).images[:, 0], expect)


@pytest.mark.parametrize(
    "keywords",
    [{"BLANK": -(2**63)}, {"BZERO": 2**63, "BLANK": -(2**63) + 3}],
    ids=["blank", "unsigned"],
)
def test_64_bit_integer_tiles_are_read_as_astropy_reads_them(tmp_path, keywords):
    """Test that int64 tiles whose stored values lie beyond 2**53 are cut as
    astropy reads them: stored values next to BLANK stay values (in floats
    they rounded to BLANK and became NaN), and small values of a
    pseudo-unsigned tile stay themselves (stored near -2**63, they rounded
    to multiples of 1024 before the offset); unresampled and resampled."""
    from cutana import BatchCutout2D

    low = -(2**63)
    raw = np.random.default_rng(8).integers(0, 5000, (40, 40)) + low
    raw[10:14, 10:14] = low  # BLANK of the first tile; 0 of the second
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = 150.0, 2.0
    header["CRPIX1"], header["CRPIX2"] = 20.5, 20.5
    header["CDELT1"], header["CDELT2"] = -0.1 / 3600, 0.1 / 3600
    tile = tmp_path / "tile.fits"
    fits.PrimaryHDU(raw.astype(">i8"), header).writeto(tile)
    with fits.open(tile, mode="update", do_not_scale_image_data=True) as hdul:
        hdul[0].header.update(keywords)
    data = fits.getdata(tile).astype(np.float64)  # astropy's values
    assert np.isnan(data).sum() == (16 if "BZERO" not in keywords else 0)
    wcs = WCS(fits.getheader(tile))
    pix = np.array([[12.0, 11.0], [20.3, 25.6], [1.0, 38.5]])
    ra, dec = wcs.all_pix2world(pix, 0).T
    cat = tmp_path / "cat.csv"
    cat.write_text("SourceID,RA,Dec\n" + "".join(
        f"s{k},{float(ra[k])!r},{float(dec[k])!r}\n" for k in range(len(ra))))
    positions = SkyCoord(ra, dec, unit="deg")

    _cut_as_cutout2d(tmp_path, cat, tile, data, positions, 7, wcs)
    resampled = tmp_path / "bilinear.zarr"
    cutana.make_cutouts(cat, resampled, tiles=[str(tile)], size=7, target_size=9,
                        progress=False)
    expect = BatchCutout2D(data, positions, 7, wcs=wcs, mode="partial").resample(9)
    np.testing.assert_array_equal(cutana.open(resampled).images[:, 0], expect)


def test_file_lists_are_ignored_with_tiles(survey, tmp_path):
    """Test that with --tiles the catalogue's file-list column is neither
    used nor checked (empty or invalid cells do not make bad rows, and
    `verify` agrees), and that without tiles a column naming no file at all
    is a usage error saying so."""
    from astropy.table import Table

    from cutana.verify import verify

    table = Table.read(survey.catalogue_path, format="ascii.csv")
    table["fits_file_paths"] = ["", "[]", "()"] * (len(table) // 3) + [""] * (
        len(table) % 3
    )
    cat = tmp_path / "no_files.csv"
    table.write(cat, format="ascii.csv")
    tiles = [p for paths in survey.tile_paths for p in paths]
    ref = tmp_path / "ref.zarr"
    cutana.make_cutouts(
        survey.catalogue_path, ref, tiles=tiles, size=15, progress=False
    )
    out = tmp_path / "out.zarr"
    cutana.make_cutouts(cat, out, tiles=tiles, size=15, progress=False)
    np.testing.assert_array_equal(cutana.open(out).status, cutana.open(ref).status)
    np.testing.assert_array_equal(cutana.open(out).images, cutana.open(ref).images)
    assert verify(out) == []
    with pytest.raises(ConfigError, match=r"no row of .*no_files.csv names a tile"):
        cutana.make_cutouts(cat, tmp_path / "none.zarr", size=15, progress=False)


def test_flux_conversion_leaves_flag_planes_as_stored(tmp_path):
    """Test that --flux-conversion converts a tile's science and RMS planes
    (each with its own zero point) to Jansky and cuts its flag plane, which
    has no zero point, as stored: each equals astropy's Cutout2D of its
    file, times the factor of its zero point for the fluxes."""
    from cutana.processing import flux_factor

    rng = np.random.default_rng(11)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [30.5, 30.5]
    wcs.wcs.cdelt = [-0.1 / 3600, 0.1 / 3600]
    planes = {  # band: (values, zero point or None)
        "VIS": (rng.normal(10.0, 3.0, (60, 60)).astype(np.float32), 24.5),
        "VIS-RMS": (rng.uniform(0.5, 2.0, (60, 60)).astype(np.float32), 23.0),
        "VIS-FLAG": (rng.integers(0, 2**20, (60, 60)).astype(np.int32), None),
    }
    for band, (values, zp) in planes.items():
        header = wcs.to_header()
        header["FILTER"] = "VIS"
        if zp is not None:
            header["MAGZERO"] = zp
        name = f"EUC_MER_BGSUB-MOSAIC-{band}_TILE5-x.fits"
        fits.PrimaryHDU(values, header=header).writeto(tmp_path / name)
    pix = np.array([[20.0, 31.0], [40.4, 27.6], [3.0, 55.0]])
    ra, dec = wcs.all_pix2world(pix, 0).T
    cat = tmp_path / "cat.csv"
    rows = "".join(f"s{k},{float(ra[k])!r},{float(dec[k])!r}\n" for k in range(len(ra)))
    cat.write_text("SourceID,RA,Dec\n" + rows)
    out = tmp_path / "out.zarr"
    report = cutana.make_cutouts(
        cat, out, tiles=[str(tmp_path / "*.fits")], size=11, flux_conversion=True,
        progress=False,
    )
    assert report.exit_code == 0
    archive = cutana.open(out)
    assert sorted(archive.bands) == sorted(planes)
    positions = SkyCoord(ra, dec, unit="deg")
    for c, band in enumerate(archive.bands):
        values, zp = planes[band]
        data = values.astype(np.float32)
        for k in range(len(ra)):
            ref = AstropyCutout2D(data, positions[k], 11, wcs=wcs, mode="partial",
                                  fill_value=np.nan).data
            if zp is not None:
                ref = (ref.astype(np.float64) * flux_factor(zp)).astype(np.float32)
            np.testing.assert_array_equal(archive.images[k, c], ref, err_msg=band)


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_run_where_no_source_is_cut(survey, tmp_path, fmt):
    """Test that a run in which no source can be cut (all off the tiles) is a
    finished run with every row's status, in both formats, not a crash."""
    from astropy.table import Table

    far = tmp_path / "far.csv"
    far_away = {"SourceID": ["a", "b"], "RA": [200.0, 201.0], "Dec": [10.0, 11.0]}
    Table(far_away).write(far)
    tiles = [p for paths in survey.tile_paths for p in paths]
    out = tmp_path / f"none_{fmt}"
    report = cutana.make_cutouts(
        far, out, tiles=tiles, size=8, format=fmt, progress=False
    )
    assert report.exit_code == 0
    assert report.counts == {"NO_OVERLAP": 2}
    arch = cutana.open(out)
    assert np.asarray(arch.status).tolist() == [Status.NO_OVERLAP] * 2
    from cutana.io import verify_output

    assert verify_output(out) == []


def _scaled_tile(path, scale_arcsec, n, seed=0):
    """A float32 TAN tile of ``n`` x ``n`` pixels of ``scale_arcsec``, centred
    on (150, 2); returns its data and WCS."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    w.wcs.cdelt = [-scale_arcsec / 3600, scale_arcsec / 3600]
    header = w.to_header()
    header["BAND"] = "r"
    data = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32)
    fits.writeto(path, data, header)
    return data, w


@pytest.mark.parametrize("lists", [False, True], ids=["tiles", "file-lists"])
def test_arcsec_sizes_place_sources_by_each_tiles_scale(tmp_path, lists):
    """Test sizes in arcsec with tiles of different pixel scales: a source is
    placed by the box it gets in each tile (6" is 6 pixels of a coarse tile,
    60 of a fine one), and its status and pixels are astropy's ``Cutout2D``
    with ``6 * u.arcsec`` on the tile chosen."""
    from astropy import units as u
    from astropy.nddata import NoOverlapError
    from astropy.table import Table

    coarse = _scaled_tile(tmp_path / "coarse.fits", 1.0, 110)
    fine = _scaled_tile(tmp_path / "fine.fits", 0.1, 1000, seed=1)
    paths = [str(tmp_path / "coarse.fits"), str(tmp_path / "fine.fits")]
    cosd = np.cos(np.deg2rad(2.0))
    # C: whole in both (the fine one, deeper, wins); A: whole in the coarse
    # tile only; B: beyond both
    dra = np.array([1.0, 48.0, -60.0])  # (B: 5" beyond the coarse tile's edge)
    ra = 150.0 + dra / 3600 / cosd
    names = ["C", "A", "B"]
    columns = {"SourceID": names, "RA": ra, "Dec": [2.0] * 3,
               "diameter_arcsec": [6.0] * 3}  # fmt: skip
    options = {"format": "fits", "progress": False}
    if lists:  # (one band: a list names one file)
        columns["fits_file_paths"] = [str(paths[1:]), str(paths[:1]), str(paths[:1])]
    else:
        options["tiles"] = paths
    Table(columns).write(tmp_path / "c.csv")
    out = tmp_path / "out"
    cutana.make_cutouts(tmp_path / "c.csv", out, **options)
    arch = cutana.open(out)
    want_tile = ["fine", "coarse", None]
    for i, name in enumerate(names):
        sky = SkyCoord(ra[i], 2.0, unit="deg")
        refs = {}
        for label, (data, w) in (("coarse", coarse), ("fine", fine)):
            try:
                refs[label] = AstropyCutout2D(
                    data, sky, 6 * u.arcsec, wcs=w, mode="partial", fill_value=np.nan
                )
            except NoOverlapError:
                pass
        if want_tile[i] is None:
            assert not refs, name
            assert arch.status[i] == Status.NO_OVERLAP, name
            continue
        ref = refs[want_tile[i]]
        assert arch.status[i] == Status.OK, name
        np.testing.assert_array_equal(arch[i][0], ref.data)


def test_cut_job_marks_a_box_that_misses_its_tile(tmp_path):
    """Test that a source whose box does not meet its tile (which the planner
    does not give a job) gets NO_OVERLAP, with its row zeroed, not OK."""
    from cutana.planner import Job
    from cutana.processing import CutSettings, cut_job
    from cutana.tiles import TileIndex

    _scaled_tile(tmp_path / "t.fits", 1.0, 40)
    index = TileIndex.from_paths(str(tmp_path / "t.fits"))
    job = Job(
        job_id=0, tile=0, rows=np.array([7, 9]), x=np.array([20.0, 90.0]),
        y=np.array([20.0, 20.0]), box=np.array([[6, 6], [6, 6]]),
    )  # fmt: skip
    result = cut_job(CutSettings(out_shape=(6, 6)), index.tiles[0], job)
    assert result.status.tolist() == [Status.OK, Status.NO_OVERLAP]
    assert not result.images[1].any()
    assert "does not overlap" in result.messages[9]


def _many_sources_job(tmp_path, n_tile=200, n=300, sizes=(5, 21), seed=4):
    """A tile (its data, WCS and index) and a job of ``n`` sources over it and
    its edges (five sub-batches and more), with box sizes drawn from ``sizes``."""
    from cutana.planner import Job
    from cutana.tiles import TileIndex

    data, w = _scaled_tile(tmp_path / "t.fits", 1.0, n_tile, seed=seed)
    index = TileIndex.from_paths(str(tmp_path / "t.fits"))
    rng = np.random.default_rng(seed)
    size = rng.integers(*sizes, n) if sizes[0] != sizes[1] else np.full(n, sizes[0])
    job = Job(
        job_id=0, tile=0, rows=np.arange(n), x=rng.uniform(-4, n_tile + 4, n),
        y=rng.uniform(-4, n_tile + 4, n), box=np.column_stack([size, size]),
    )
    return data, index.tiles[0], job


@pytest.mark.parametrize(("resample", "normalize", "dtype", "size"), [
    ("none", "none", "float32", 11),
    ("bilinear", "asinh", "uint8", 16),
    ("nearest", "zscale", "uint16", 12),
])
def test_cut_job_stretching_in_a_thread_gives_the_same_cutouts(
    tmp_path, resample, normalize, dtype, size
):
    """Test that `cut_job` with ``stretch_thread`` (each sub-batch stretched
    in a second thread while the next is resampled) gives the cutouts and
    statuses it gives without, which for unresampled float32 are astropy's
    ``Cutout2D`` (partial, NaN outside the tile)."""
    from cutana.processing import CutSettings, cut_job

    sizes = (size, size) if resample == "none" else (5, 30)
    data, tile, job = _many_sources_job(tmp_path, sizes=sizes)
    settings = CutSettings(
        out_shape=(size, size), resample=resample, normalize=normalize, dtype=dtype
    )
    plain = cut_job(settings, tile, job)
    threaded = cut_job(settings, tile, job, stretch_thread=True)
    np.testing.assert_array_equal(threaded.status, plain.status)
    np.testing.assert_array_equal(threaded.images, plain.images)
    assert set(plain.status.tolist()) >= {Status.OK, Status.PARTIAL_OVERLAP}
    if resample != "none":
        return
    compared = 0
    for i in range(len(job)):
        try:
            ref = AstropyCutout2D(data, (job.x[i], job.y[i]), size, mode="partial")
        except NoOverlapError:
            assert threaded.status[i] == Status.NO_OVERLAP
            continue
        np.testing.assert_array_equal(threaded.images[i, 0], ref.data)
        compared += 1
    assert compared > 250


def test_an_error_stretching_in_a_thread_is_a_tile_error_of_the_job(
    tmp_path, monkeypatch
):
    """Test that an error raised by the stretch of a sub-batch in the stretch
    thread fails the job as it does without the thread: every source
    TILE_ERROR with the reason, every row zero."""
    from cutana.normalization import Normalizer
    from cutana.processing import CutSettings, cut_job

    _, tile, job = _many_sources_job(tmp_path, sizes=(8, 20))
    real, calls = Normalizer.__call__, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            msg = "simulated stretch failure"
            raise ValueError(msg)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Normalizer, "__call__", failing)
    settings = CutSettings(out_shape=(10, 10), resample="bilinear",
                           normalize="asinh", dtype="uint8")  # fmt: skip
    result = cut_job(settings, tile, job, stretch_thread=True)
    assert (result.status == Status.TILE_ERROR).all()
    assert not result.images.any()
    assert "simulated stretch failure" in result.messages[0]
    assert 3 <= len(calls) <= 4  # (the sub-batch after it may be stretched too)


def test_verify_accepts_fits_cutouts_of_catalogue_sizes(tmp_path):
    """Test that ``verify`` passes a FITS output whose cutouts have the sizes
    of the catalogue's size column (they differ from row to row)."""
    from astropy.table import Table

    from cutana.io import verify_output

    data, w = _scaled_tile(tmp_path / "t.fits", 0.1, 100)
    Table({"SourceID": ["a", "b"], "RA": [150.0, 150.0], "Dec": [2.0, 2.0],
           "diameter_pixel": [9.0, 15.0]}).write(tmp_path / "c.csv")  # fmt: skip
    out = tmp_path / "out"
    cutana.make_cutouts(tmp_path / "c.csv", out, tiles=[str(tmp_path / "t.fits")],
                        format="fits", progress=False)  # fmt: skip
    arch = cutana.open(out)
    for i, size in enumerate([9, 15]):
        ref = AstropyCutout2D(data, SkyCoord(150, 2, unit="deg"), size, wcs=w)
        np.testing.assert_array_equal(arch[i][0], ref.data)
    assert verify_output(out) == []


def _sip_tile(path, shape=(260, 310)):
    """A float32 tile with a SIP-distorted TAN WCS (with inverse terms)."""
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    h["CRVAL1"], h["CRVAL2"] = 10.0, 40.0
    h["CRPIX1"], h["CRPIX2"] = shape[1] / 2 + 0.5, shape[0] / 2 - 0.25
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -5e-5, 1e-6, 2e-6, 5e-5
    h["A_ORDER"] = h["B_ORDER"] = h["AP_ORDER"] = h["BP_ORDER"] = 2
    h["A_2_0"], h["A_0_2"], h["A_1_1"] = 2e-5, -1e-5, 3e-6
    h["B_2_0"], h["B_0_2"], h["B_1_1"] = -1e-5, 2e-5, 4e-6
    h["AP_2_0"], h["AP_0_2"], h["AP_1_1"] = -2e-5, 1e-5, -3e-6
    h["BP_2_0"], h["BP_0_2"], h["BP_1_1"] = 1e-5, -2e-5, -4e-6
    data = np.random.default_rng(0).normal(size=shape).astype(">f4")
    fits.PrimaryHDU(data, header=h).writeto(path)
    return data, WCS(h)


def test_sip_tile_boxes_and_resampled_wcs_equal_astropy(tmp_path):
    """Test that on a SIP tile the pipeline's boxes are astropy's also for
    sources whose box limit lies on a rounding boundary (where a vectorised
    solution of the distortion can differ in the last bits), and that the
    WCS of a resampled cutout places the sky where the tile's WCS does."""
    from astropy.table import Table

    data, wcs = _sip_tile(tmp_path / "t.fits")
    rng = np.random.default_rng(4)
    # sources at exact half-pixel positions, and random ones
    xs = np.r_[np.arange(40.5, 270, 23.0), rng.uniform(20, 290, 20)]
    ys = np.r_[np.arange(30.0, 240, 21.0)[: len(np.arange(40.5, 270, 23.0))],
               rng.uniform(20, 240, 20)]
    sky = wcs.pixel_to_world(xs, ys)
    Table({"SourceID": [f"s{i}" for i in range(len(xs))], "RA": sky.ra.deg,
           "Dec": sky.dec.deg}).write(tmp_path / "c.csv")
    tiles = [str(tmp_path / "t.fits")]
    out = tmp_path / "o.zarr"
    cutana.make_cutouts(tmp_path / "c.csv", out, tiles=tiles, size=14, progress=False)
    arch = cutana.open(out)
    for i in np.flatnonzero(np.asarray(arch.status) == Status.OK):
        ref = AstropyCutout2D(
            data, SkyCoord(arch.ra[i], arch.dec[i], unit="deg"), 14, wcs=wcs,
            mode="partial", fill_value=np.nan,
        )
        assert tuple(arch.origin[i]) == ref.origin_original, i
        np.testing.assert_array_equal(arch.images[i, 0], ref.data)
    resampled = tmp_path / "r.zarr"
    cutana.make_cutouts(tmp_path / "c.csv", resampled, tiles=tiles, size=14,
                        target_size=10, progress=False)
    arch = cutana.open(resampled)
    for i in np.flatnonzero(np.asarray(arch.status) == Status.OK)[:10]:
        x0, y0 = arch.origin[i]
        q = np.arange(10.0)
        p = (q + 0.5) * 1.4 - 0.5  # 14 input pixels over 10 output pixels
        got = arch.wcs(i).pixel_to_world_values(q, q[::-1])
        want = wcs.pixel_to_world_values(x0 + p, y0 + p[::-1])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_tile_without_a_band_names_it(survey, tmp_path):
    """Test that the sources of a tile lacking one band's file are TILE_ERROR,
    filled in every band, with a message naming the band, and the others cut."""
    copy = make_survey(tmp_path / "s", n_tiles=2, bands=BANDS, tile_size=120,
                       n_sources=40, edge_fraction=0.0, off_tile_fraction=0.0,
                       bad_row_fraction=0.0, size_range_pixels=(8, 12), seed=5)
    gone = copy.tile_paths[1][1]
    os.remove(gone)
    tiles = [p for paths in copy.tile_paths for p in paths if p != gone]
    plan = cutana.plan_cutouts(copy.catalogue_path, tiles=tiles, size=9)
    out = tmp_path / "o.zarr"
    report = cutana.make_cutouts(copy.catalogue_path, out, tiles=tiles, size=9,
                                 progress=False)
    arch = cutana.open(out)
    status = np.asarray(arch.status)
    failed = np.flatnonzero(status == Status.TILE_ERROR)
    assert len(failed) and report.exit_code == 1
    # the plan knows them already: no job cuts them
    np.testing.assert_array_equal(
        np.flatnonzero(plan.base_status == Status.TILE_ERROR), failed
    )
    assert not set(failed) & {int(r) for job in plan.jobs for r in job.rows}
    assert (status[status != Status.TILE_ERROR] <= Status.PARTIAL_OVERLAP).all()
    for r in failed:
        assert f"has no file for band {BANDS[1]}" in report.messages[int(r)]
        assert not np.any(arch.images[r])


def test_crop_of_one_or_two_pixels_warns(caplog):
    """Test that a whole-number crop of 1 or 2 pixels, which takes the
    stretch limits from as many pixels (``1.0`` is the whole cutout), is
    warned of; other crops are not."""
    from cutana.pipeline import RunOptions

    for crop, warned in ((1, True), (2, True), (1.0, False), (0.5, False), (5, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="cutana.pipeline"):
            options = RunOptions(size=16, normalize="linear", crop=crop)
            options.memory_limit = "1GB"
            options.validate()
        assert ("give 1.0 for the whole cutout" in caplog.text) is warned, crop


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_a_tile_header_with_a_card_astropy_cannot_parse_is_cut_quietly(
    tmp_path, fmt
):
    """Test that a tile whose header holds a card astropy warns about (no
    value indicator) is cut by worker processes under ``-W error`` as
    without it (its header was parsed again, unguarded, in each worker:
    every job failed), with no warning printed, and that the output's WCS
    reads back quietly (pytest turns warnings into errors here)."""
    import subprocess
    import sys

    from astropy.table import Table

    data, w = _scaled_tile(tmp_path / "t.fits", 0.1, 100)
    raw = bytearray((tmp_path / "t.fits").read_bytes())
    with fits.open(tmp_path / "t.fits") as hdul:
        header = hdul[0].header
        header["MAGZERO"] = 25.0
        header["PLACEHOL"] = "x"
        hdul.writeto(tmp_path / "t2.fits")
    raw = bytearray((tmp_path / "t2.fits").read_bytes())
    at = raw.index(b"PLACEHOL")
    raw[at : at + 80] = b"NOEQUALS  a card with no value indicator".ljust(80)
    (tmp_path / "t.fits").write_bytes(bytes(raw))
    ra, dec = [150.0, 150.0005, 149.9995], [2.0, 2.0003, 1.9996]
    Table({"SourceID": ["a", "b", "c"], "RA": ra, "Dec": dec}).write(tmp_path / "c.csv")
    out = tmp_path / "out"
    cat = str(tmp_path / "c.csv")
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-m", "cutana.cli", "run", cat,
         "--output", str(out), "--tiles", str(tmp_path / "t.fits"), "--size", "9",
         "--workers", "2", "--format", fmt, "--flux-conversion", "--no-progress"],
        capture_output=True, text=True, check=False, timeout=300, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr
    archive = cutana.open(out)
    jy = 3631.0 * 10 ** (-0.4 * 25.0)
    for i in range(3):
        ref = AstropyCutout2D(data, SkyCoord(ra[i], dec[i], unit="deg"), 9, wcs=w)
        np.testing.assert_allclose(np.asarray(archive[i])[0], ref.data * jy, rtol=1e-6)
        np.testing.assert_allclose(archive.wcs(i).wcs.crpix, ref.wcs.wcs.crpix)


def test_fits_images_have_a_shape_and_read_rows_without_a_cutout_as_zeros(
    survey, zarr_run, tmp_path
):
    """Test that ``cutana.open(FITS).images`` of cutouts of one size has the
    ``shape`` and ``dtype`` of the Zarr store of the same run and reads the
    same rows, zeros for rows without a cutout (``.shape`` failed, and a
    slice over such a row raised), while cutouts of catalogue sizes have no
    common shape."""
    out = tmp_path / "fits"
    cutana.make_cutouts(
        survey.catalogue_path, out, size=21, format="fits", progress=False
    )
    z, f = cutana.open(zarr_run[0]), cutana.open(out)
    assert f.images.shape == z.images.shape
    assert f.images.dtype == z.images.dtype
    no_cutout = np.flatnonzero(~np.isin(f.status, (Status.OK, Status.PARTIAL_OVERLAP)))
    assert len(no_cutout)
    np.testing.assert_array_equal(f.images[0 : len(f)], z.images[:])
    np.testing.assert_array_equal(f.images[int(no_cutout[0])], 0)
    with pytest.raises(ValueError, match="has no cutout file"):
        f[int(no_cutout[0])]
    from astropy.table import Table

    Table({"SourceID": ["a", "b"], "RA": [0.0, 1.0], "Dec": [0.0, 0.0]}).write(
        tmp_path / "off.csv"
    )  # on no tile: no file at all
    off = tmp_path / "off"
    cutana.make_cutouts(tmp_path / "off.csv", off, size=21, format="fits",
                        tiles=[survey.tile_paths[0][0]], progress=False)  # fmt: skip
    empty = cutana.open(off).images
    assert empty.shape == (2, 1, 21, 21) and empty.dtype == np.float32
    np.testing.assert_array_equal(empty[0:2], 0)
    varied = tmp_path / "varied"
    cutana.make_cutouts(survey.catalogue_path, varied, format="fits", progress=False)
    with pytest.raises(AttributeError, match="no common shape"):
        cutana.open(varied).images.shape  # noqa: B018


def test_size_columns_are_read_in_their_own_units(tmp_path):
    """Test that a size column's unit (ECSV, FITS, VOTable) is honoured: a
    ``diameter_arcsec`` in arcmin and a ``diameter_pixel`` in arcsec give the
    cutouts astropy's ``Cutout2D`` gives for those angular sizes (the values
    were taken as arcsec and pixels: 2 x 2 cutouts for 0.2')."""
    from astropy import units as u
    from astropy.table import QTable

    data, w = _scaled_tile(tmp_path / "t.fits", 0.1, 300)
    ra, dec = [150.0, 150.0003], [2.0, 1.9998]
    for column, size in (("diameter_arcsec", 0.2 * u.arcmin),
                         ("diameter_pixel", 7.0 * u.arcsec)):  # fmt: skip
        cat = tmp_path / f"{column}.ecsv"
        QTable({"SourceID": ["a", "b"], "RA": ra, "Dec": dec,
                column: [size.value] * 2 * size.unit}).write(cat)  # fmt: skip
        out = tmp_path / column
        report = cutana.make_cutouts(
            cat, out, tiles=[str(tmp_path / "t.fits")], format="fits", progress=False
        )
        assert report.counts == {"OK": 2}
        archive = cutana.open(out)
        for i in range(2):
            pos = SkyCoord(ra[i], dec[i], unit="deg")
            ref = AstropyCutout2D(data, pos, size, wcs=w)
            np.testing.assert_array_equal(np.asarray(archive[i])[0], ref.data)


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_an_angle_of_too_many_pixels_is_a_bad_row(tmp_path, fmt):
    """Test that a row whose angle is more pixels of its tile than a size may
    be is a bad row naming its column and value, the other rows are cut as
    astropy cuts them, and the output verifies (the run stopped with a
    memory error); and that a size the memory limit cannot hold names the
    row, column and value, or --size (an execution option must not change
    what is written, so that is no bad row)."""
    from astropy.table import Table

    from cutana.verify import verify

    data, wcs = _scaled_tile(tmp_path / "t.fits", 0.1, 200)
    Table({"SourceID": ["a", "huge", "b"], "RA": [150.0] * 3,
           "Dec": [2.0, 2.0, 2.0003], "diameter_arcsec": [3.0, 30000.0, 2.4],
           }).write(tmp_path / "c.csv")  # fmt: skip
    opts = dict(tiles=[str(tmp_path / "t.fits")], format=fmt, progress=False,
                memory_limit="2GB", target_size=24 if fmt == "zarr" else None)
    report = cutana.make_cutouts(tmp_path / "c.csv", tmp_path / "out", **opts)
    assert report.exit_code == 0
    assert report.counts == {"OK": 2, "BAD_ROW": 1}
    assert report.messages[1] == (
        f"{tmp_path / 'c.csv'} row 1 column 'diameter_arcsec' (value 30000): 300000 "
        "pixels of its tile, more than 100000"
    )
    assert verify(tmp_path / "out") == []
    if fmt == "fits":  # unresampled: astropy's cutouts
        out = cutana.open(tmp_path / "out")
        for i, size in ((0, 30), (2, 24)):
            ref = AstropyCutout2D(data, SkyCoord(150.0, [2.0, 2.0, 2.0003][i],
                                                 unit="deg"), size, wcs=wcs,
                                  mode="partial", fill_value=np.nan)
            np.testing.assert_array_equal(np.asarray(out[i])[0], ref.data)
    Table({"SourceID": ["a", "big"], "RA": [150.0] * 2, "Dec": [2.0] * 2,
           "diameter_arcsec": [3.0, 8000.0]}).write(tmp_path / "c2.csv")  # fmt: skip
    with pytest.raises(ConfigError, match=r"memory limit 2\.0 GB is too small .* "
                       r"\(the largest cutout is 80000 pixels, from .*c2\.csv row 1 "
                       r"column 'diameter_arcsec' \(value 8000\)\)"):
        cutana.make_cutouts(tmp_path / "c2.csv", tmp_path / "o2", **opts)
    with pytest.raises(ConfigError, match=r"memory limit 2\.0 GB is too small .* "
                       r"\(the largest cutout is 80000 pixels, from --size\)"):
        cutana.make_cutouts(tmp_path / "c.csv", tmp_path / "o3", **{
            **opts, "size": 80000})


def test_messages_of_a_size_under_a_pixel_and_of_numpy_printed_file_lists(tmp_path):
    """Test that a row whose size in arcsec is under half a pixel of its tile
    says so, with the scale (it said only "no usable size"), and that a
    catalogue none of whose file-list cells can be read says why for its
    first row (numpy's print of an array has no commas)."""
    from astropy.table import Table

    _scaled_tile(tmp_path / "t.fits", 0.1, 200)
    Table({"SourceID": ["a", "b"], "RA": [150.0, 150.0], "Dec": [2.0, 2.0003],
           "diameter_arcsec": [0.04, 3.0]}).write(tmp_path / "tiny.csv")  # fmt: skip
    report = cutana.make_cutouts(
        tmp_path / "tiny.csv", tmp_path / "out", tiles=[str(tmp_path / "t.fits")],
        format="fits", progress=False,
    )
    assert report.counts == {"OK": 1, "BAD_ROW": 1}
    assert (
        "a diameter of 0.04 arcsec is 0.4 pixels of its tile (0.1 arcsec/pixel), "
        "which rounds to 0" in report.messages[0]
    )
    lists = str(np.array([str(tmp_path / "t.fits"), str(tmp_path / "t.fits")]))
    Table({"SourceID": ["a"], "RA": [150.0], "Dec": [2.0], "diameter_pixel": [9],
           "fits_file_paths": [lists]}).write(tmp_path / "np.csv")  # fmt: skip
    with pytest.raises(ConfigError, match=r"\(row 0: .*has no comma between its paths"):
        cutana.make_cutouts(tmp_path / "np.csv", tmp_path / "o2", progress=False)


def _two_grid_tile(tmp_path, seed=0):
    """One tile in two band files on different pixel grids: VIS at 0.1″ per
    pixel (300 x 300) and NIR-H at 0.3″ (90 x 90, rotated 7°, offset so that
    part of VIS lies outside it). Returns ``{band: (path, data, wcs)}``, the
    WCS read back from the file."""
    rng = np.random.default_rng(seed)
    out = {}
    for band, scale, n, crval, rot in (
        ("VIS", 0.1, 300, (150.0, 2.0), 0.0),
        ("NIR-H", 0.3, 90, (150.0008, 2.0003), 7.0),
    ):
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = crval
        w.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
        c, s = np.cos(np.radians(rot)), np.sin(np.radians(rot))
        w.wcs.cd = np.array([[-c, s], [s, c]]) * scale / 3600
        data = (rng.normal(size=(n, n)) * 10 + 100).astype(">f4")
        header = w.to_header()
        header["BAND"], header["TILEID"] = band, "5"
        path = tmp_path / f"T5_{band}.fits"
        fits.PrimaryHDU(data, header=header).writeto(path)
        # the WCS as read back (the header's numbers, as any reader gets them)
        out[band] = (str(path), data, WCS(fits.getheader(path)))
    return out


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_bands_on_their_own_pixel_grids(tmp_path, fmt):
    """Test that a band on another pixel grid than the reference band's is
    cut at each source's own position in its file, with the reference
    band's size in pixels (as ESA Cutana cuts every file of a source): every
    band's cutout and WCS equal astropy's Cutout2D of that band's file, a
    source leaving one band's file is PARTIAL_OVERLAP, also one that misses
    the reference band's file but not the other's (it was NO_OVERLAP, the
    other band's cutout lost), and 2 worker processes write the same bytes
    as 1."""
    bands = _two_grid_tile(tmp_path)
    rng = np.random.default_rng(1)
    vis_wcs = bands["VIS"][2]
    # (60 over VIS and its edges; 6 left of VIS, where only NIR-H reaches)
    pix = np.r_[rng.uniform(-5, 305, (60, 2)), [[x, y] for x in (-10, -12)
                                                for y in (100, 150, 200)]]
    sky = vis_wcs.pixel_to_world(*pix.T)
    n = len(sky)
    from astropy.table import Table

    Table({"id": np.arange(n), "ra": sky.ra.deg, "dec": sky.dec.deg}).write(
        tmp_path / "cat.csv"
    )
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.{fmt}"
        cutana.make_cutouts(
            tmp_path / "cat.csv", out, tiles=str(tmp_path / "T5_*.fits"),
            bands=["VIS", "NIR-H"], size=15, format=fmt, workers=workers,
            backend="serial" if workers == 1 else "processes", progress=False,
        )
        outs.append(out)
    assert files_bytes(outs[0]) == files_bytes(outs[1])
    result = cutana.open(outs[0])
    status = np.asarray(result.status)
    n_partial_nir = n_nir_only = 0
    for i in range(n):
        refs = []
        if i >= 60:  # (these miss VIS, as meant)
            with pytest.raises(NoOverlapError):
                AstropyCutout2D(bands["VIS"][1], sky[i], 15, wcs=vis_wcs)
        for c, band in enumerate(("VIS", "NIR-H")):
            _, data, w = bands[band]
            try:
                ref = AstropyCutout2D(data, sky[i], 15, wcs=w, mode="partial",
                                      fill_value=np.nan)
            except NoOverlapError:  # off this band's file: all filled
                ref = None
            inside = ref is not None and np.isfinite(ref.data).all()
            refs.append(inside)
            n_partial_nir += c == 1 and not inside
            if fmt == "zarr":
                got, got_wcs = np.asarray(result[i])[c], result.wcs(i, c)
            else:
                with fits.open(Path(outs[0]) / result.files[i]) as hdul:
                    got, got_wcs = hdul[c + 1].data, WCS(hdul[c + 1].header)
            if ref is None:
                assert np.isnan(got).all()
                continue
            n_nir_only += c == 1 and i >= 60
            np.testing.assert_array_equal(got, ref.data)
            corners = ([0, 14, 3], [0, 14, 9])
            np.testing.assert_allclose(
                got_wcs.pixel_to_world_values(*corners),
                ref.wcs.pixel_to_world_values(*corners), rtol=0, atol=1e-10,
            )
        ok = all(refs)
        assert status[i] == (Status.OK if ok else Status.PARTIAL_OVERLAP), i
    assert 0 < n_partial_nir < 60  # the test covers both cases
    assert n_nir_only == 6


def test_plan_of_bands_on_their_own_grids_saves_their_positions(tmp_path):
    """Test that the jobs of a tile with a band on a grid of its own carry
    each source's position in that band's file (its WCS's), and that a saved
    plan gives them back."""
    from astropy.table import Table

    from cutana.pipeline import plan_cutouts
    from cutana.planner import Plan

    bands = _two_grid_tile(tmp_path)
    ra, dec = np.array([150.0, 150.0003]), np.array([2.0, 2.0001])
    Table({"id": [1, 2], "ra": ra, "dec": dec}).write(tmp_path / "cat.csv")
    plan = plan_cutouts(tmp_path / "cat.csv", tiles=str(tmp_path / "T5_*.fits"),
                        bands=["VIS", "NIR-H"], size=9, progress=False)
    (job,) = plan.jobs
    x, y = bands["NIR-H"][2].all_world2pix(ra[job.rows], dec[job.rows], 0)
    np.testing.assert_allclose(job.band_xy[:, 1], np.c_[x, y], rtol=0, atol=1e-9)
    assert np.isnan(job.band_xy[:, 0]).all()
    assert "own pixel grid      NIR-H (cut at each source's" in plan.summary()
    plan.save(tmp_path / "plan.npz")
    again = Plan.load(tmp_path / "plan.npz")
    np.testing.assert_array_equal(again.jobs[0].band_xy, job.band_xy)
    assert again.fingerprint() == plan.fingerprint()
    again.jobs[0].band_xy[0, 1, 0] += 1.0  # another position: another output
    assert again.fingerprint() != plan.fingerprint()


def test_angular_sizes_on_bands_of_their_own_grids_warn(tmp_path, caplog):
    """Test that sizes in arcseconds on a tile with a band on a grid of its
    own warn, when the cutouts are not resampled, that the band is cut with
    the reference band's pixels (another angle), naming the scales; that
    resampled ones cut each band's own number of pixels (no warning); and
    that sizes in pixels do not warn."""
    import logging

    from astropy.table import Table

    from cutana.pipeline import plan_cutouts
    from cutana.planner import Plan

    _two_grid_tile(tmp_path)
    Table({"id": [1], "ra": [150.0], "dec": [2.0], "diameter_arcsec": [1.5]}).write(
        tmp_path / "cat.csv"
    )
    tiles = str(tmp_path / "T5_*.fits")
    with caplog.at_level(logging.WARNING, logger="cutana.pipeline"):
        plan = plan_cutouts(tmp_path / "cat.csv", tiles=tiles,
                            bands=["VIS", "NIR-H"], progress=False)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "band VIS (0.1 arcsec/pixel)" in text
    assert "band NIR-H (0.3 arcsec/pixel" in text and "span 3 times the angle" in text
    assert "--target-size N" in text
    assert plan.jobs[0].band_box is None and plan.jobs[0].box.tolist() == [[15, 15]]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cutana.pipeline"):
        plan = plan_cutouts(tmp_path / "cat.csv", tiles=tiles,
                            bands=["VIS", "NIR-H"], target_size=16, progress=False)
    assert "arcseconds" not in " ".join(r.getMessage() for r in caplog.records)
    # 1.5 arcsec: 15 pixels of 0.1 arcsec in VIS, 5 of 0.3 arcsec in NIR-H
    assert plan.jobs[0].band_box.tolist() == [[[15, 15], [5, 5]]]
    assert "NIR-H (cut at each source's position in its own file, sizes in " \
        "arcsec at its own pixel scale)" in plan.summary()
    plan.save(tmp_path / "plan.npz")
    again = Plan.load(tmp_path / "plan.npz")
    assert again.jobs[0].band_box.tolist() == [[[15, 15], [5, 5]]]
    assert again.fingerprint() == plan.fingerprint()
    assert again.jobs[0].subset([0]).band_box.tolist() == [[[15, 15], [5, 5]]]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cutana.pipeline"):
        plan_cutouts(tmp_path / "cat.csv", tiles=tiles, bands=["VIS", "NIR-H"],
                     size=15, progress=False)
    assert "arcseconds" not in " ".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_angular_sizes_on_bands_of_their_own_grids_resampled(tmp_path, fmt):
    """Test that, resampled to one size, a band on a pixel grid of its own
    is cut with the angle of the size column at its own pixel scale (as ESA
    Cutana converts per file): each band's cutout equals scipy's bilinear
    map_coordinates of astropy's Cutout2D with that angle on that band's
    file, and each band's WCS (Zarr: rebuilt by cutana.open; FITS: the
    band's HDU) maps output pixels where Cutout2D's WCS maps the
    corresponding input pixels; 2 worker processes write the same bytes."""
    import astropy.units as u
    from astropy.table import Table
    from scipy.ndimage import map_coordinates

    bands = _two_grid_tile(tmp_path)
    rng = np.random.default_rng(3)
    n_src, target = 40, 16
    sky = bands["VIS"][2].pixel_to_world(*rng.uniform(40, 260, (n_src, 2)).T)
    diameter = np.round(rng.uniform(0.9, 3.0, n_src), 2)  # 9-30 VIS, 3-10 NIR px
    Table({"id": np.arange(n_src), "ra": sky.ra.deg, "dec": sky.dec.deg,
           "diameter_arcsec": diameter}).write(tmp_path / "cat.csv")
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.{fmt}"
        cutana.make_cutouts(
            tmp_path / "cat.csv", out, tiles=str(tmp_path / "T5_*.fits"),
            bands=["VIS", "NIR-H"], target_size=target, resample="bilinear",
            format=fmt, workers=workers, progress=False,
            backend="serial" if workers == 1 else "processes",
        )
        outs.append(out)
    assert files_bytes(outs[0]) == files_bytes(outs[1])
    result = cutana.open(outs[0])
    status = np.asarray(result.status)
    sides = {"VIS": set(), "NIR-H": set()}
    n_compared = 0
    for i in range(n_src):
        inside = []
        for c, band in enumerate(("VIS", "NIR-H")):
            _, data, w = bands[band]
            ref = AstropyCutout2D(data, sky[i], diameter[i] * u.arcsec, wcs=w,
                                  mode="partial", fill_value=np.nan)
            n = ref.data.shape[0]
            sides[band].add(n)
            inside.append(bool(np.isfinite(ref.data).all()))
            if fmt == "zarr":
                got, got_wcs = np.asarray(result[i])[c], result.wcs(i, c)
            else:
                with fits.open(Path(outs[0]) / result.files[i]) as hdul:
                    got, got_wcs = hdul[c + 1].data, WCS(hdul[c + 1].header)
            coords = (np.arange(target) + 0.5) * n / target - 0.5
            if inside[-1]:
                yy, xx = np.meshgrid(coords, coords, indexing="ij")
                expect = map_coordinates(ref.data.astype(np.float64), [yy, xx],
                                         order=1, mode="nearest")
                np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-4)
                n_compared += 1
            out_px = np.array([0, target - 1, 5.0])
            np.testing.assert_allclose(
                got_wcs.pixel_to_world_values(out_px, out_px[::-1]),
                ref.wcs.pixel_to_world_values(
                    (out_px + 0.5) * n / target - 0.5,
                    (out_px[::-1] + 0.5) * n / target - 0.5,
                ),
                rtol=0, atol=1e-10,
            )
        assert status[i] == (Status.OK if all(inside) else Status.PARTIAL_OVERLAP), i
    # each band had its own pixel count (an angle of 3 VIS pixels per NIR one)
    assert min(sides["VIS"]) >= 9 and max(sides["NIR-H"]) <= 10
    assert n_compared > n_src



@pytest.mark.parametrize("fmt", ["zarr", "fits"])
def test_the_output_keeps_every_rows_message(survey, tmp_path, fmt):
    """Test that the output keeps the message of every row that has one
    (bad rows, off-tile sources, with the file, row, column and value): a
    Zarr store kept none (the command printed ten, and the rest were lost
    without ``--report-json``); a FITS output keeps them in its index. Rows
    without a message read as none."""
    out = tmp_path / f"out.{fmt}"
    report = cutana.make_cutouts(survey.catalogue_path, out, format=fmt, size=13,
                                 progress=False)
    got = cutana.open(out)
    status = np.asarray(got.status)
    assert (status == Status.BAD_ROW).sum() >= 2
    assert (status == Status.NO_OVERLAP).any()
    assert got.messages == {int(r): text for r, text in report.messages.items()}
    bad = int(np.flatnonzero(status == Status.BAD_ROW)[0])
    name = os.path.basename(survey.catalogue_path)
    assert got.messages[bad].startswith(f"{name} row {bad} column ")
    without = np.flatnonzero(status >= Status.NO_OVERLAP).tolist()
    assert set(got.messages) >= set(without)
    # the run report lists a few and says where they all are
    last = report.summary(max_messages=1).splitlines()[-1]
    assert last.endswith(f"(all of them: cutana.open({str(out)!r}).messages)")
