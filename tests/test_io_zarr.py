# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of staging, the Zarr writer and `cutana.io.open_output` on Zarr stores."""

import hashlib
import itertools
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest
import zarr
from astropy.nddata import Cutout2D as AstropyCutout2D
from astropy.wcs import WCS

from cutana import Status
from cutana.io import (
    ChunksWritten,
    JobResult,
    Ledger,
    ZarrWriter,
    choose_chunk_rows,
    clean_staging,
    list_staged,
    load_staged,
    open_output,
    remove_run_state,
    stage_job,
    staging_dir,
    verify_output,
    verify_staged,
)
from cutana.io._writeback import FileSeries

BANDS = ["g", "r"]
OUT_SHAPE = (5, 4)

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _fake_run(n=40, seed=0, dtype="float32", job_size=4):
    """A seeded fake run: catalogue arrays and per-tile jobs of random cutouts."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(-1, 3, size=n)  # -1: on no tile
    base = np.full(n, Status.PENDING, dtype=np.int16)
    base[tile < 0] = Status.NO_OVERLAP
    bad = rng.random(n) < 0.1
    base[bad] = Status.BAD_ROW
    tile[bad] = -1
    jobs = []
    for t in range(3):
        rows = np.flatnonzero(tile == t)
        for start in range(0, len(rows), job_size):
            r = rows[start : start + job_size]
            m = len(r)
            if np.dtype(dtype).kind == "f":
                images = rng.normal(size=(m, len(BANDS), *OUT_SHAPE)).astype(dtype)
            else:
                images = rng.integers(
                    0,
                    np.iinfo(dtype).max,
                    size=(m, len(BANDS), *OUT_SHAPE),
                    endpoint=True,
                ).astype(dtype)
            jobs.append(
                JobResult(
                    job_id=len(jobs),
                    rows=r.astype(np.int64),
                    images=images,
                    status=rng.choice(
                        [Status.OK, Status.PARTIAL_OVERLAP, Status.TILE_ERROR], size=m
                    ).astype(np.int16),
                    tile=t,
                    origin=rng.integers(-3, 100, size=(m, 2)),
                    box_shape=rng.integers(3, 9, size=(m, 2)),
                    messages={int(r[0]): f"message for row {int(r[0])}"},
                )
            )
    catalogue = {
        "source_id": np.array([f"SRC-{i:04d}" for i in range(n)]),
        "ra": rng.uniform(0, 360, n),
        "dec": rng.uniform(-90, 90, n),
    }
    return catalogue, jobs, base


def _mapping(n, jobs):
    """Row -> (job id, position in job) arrays."""
    job_of_row = np.full(n, -1, dtype=np.int64)
    pos_of_row = np.zeros(n, dtype=np.int64)
    for job in jobs:
        job_of_row[job.rows] = job.job_id
        pos_of_row[job.rows] = np.arange(len(job.rows))
    return job_of_row, pos_of_row


def _expected(n, jobs, base, dtype):
    """The arrays a correct store holds."""
    images = np.zeros((n, len(BANDS), *OUT_SHAPE), dtype=dtype)
    status = base.copy()
    tile = np.full(n, -1, dtype=np.int32)
    origin = np.zeros((n, 2), dtype=np.int64)
    box = np.zeros((n, 2), dtype=np.int32)
    for job in jobs:
        images[job.rows] = job.images
        status[job.rows] = job.status
        tile[job.rows] = job.tile
        origin[job.rows] = job.origin
        box[job.rows] = job.box_shape
    return images, status, tile, origin, box


def _tiles():
    """Three tile records with a simple TAN header each."""
    tiles = []
    for t in range(3):
        w = _tile_wcs(ra=10.0 + t)
        tiles.append(
            {
                "key": f"tile{t}",
                "paths": [f"/data/t{t}_{b}.fits" for b in BANDS],
                "header": w.to_header().tostring(),
            }
        )
    return tiles


def _tile_wcs(ra=10.0, dec=-5.0):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [50.5, 40.0]
    w.wcs.cd = [[-2.0e-5, 3.0e-6], [2.5e-6, 2.1e-5]]
    return w


def _run(
    path,
    *,
    n=40,
    seed=0,
    dtype="float32",
    chunk_rows=6,
    chunk_order=None,
    stage_order=None,
):
    """Create a store, stage every job, write every chunk; return the writer."""
    catalogue, jobs, base = _fake_run(n=n, seed=seed, dtype=dtype)
    writer = ZarrWriter.create(
        path,
        n_rows=n,
        bands=BANDS,
        out_shape=OUT_SHAPE,
        dtype=dtype,
        config={"size": 5, "resample": "none"},
        tiles=_tiles(),
        chunk_rows=chunk_rows,
        **catalogue,
    )
    ledger = Ledger(path)
    ledger.run_started("fp")
    for job in jobs if stage_order is None else [jobs[i] for i in stage_order]:
        ledger.job_staged(stage_job(path, job))
    chunks = range(writer.n_chunks) if chunk_order is None else chunk_order
    checksums = writer.write_chunks(chunks, _mapping(n, jobs), base)
    ledger.chunks_written(checksums, rows=checksums.rows)
    ledger.close()
    return writer, catalogue, jobs, base, checksums


@pytest.mark.parametrize("with_ledger", [True, False])
def test_write_chunks_records_each_chunk_as_it_goes(tmp_path, monkeypatch, with_ledger):
    """Test that ``write_chunks(record=True)`` appends each chunk's record
    (checksum, and its rows' status and geometry) to the run's ledger before
    the chunk is written, as the parent would record them; without a ledger
    (no run state) it records nothing and says so (``recorded`` false)."""
    from cutana.io import zarr as zarr_io

    n = 40
    catalogue, jobs, base = _fake_run(n=n, seed=3)
    writer = ZarrWriter.create(
        tmp_path / "s", n_rows=n, bands=BANDS, out_shape=OUT_SHAPE, dtype="float32",
        config={"size": 5, "resample": "none"}, tiles=_tiles(), chunk_rows=6,
        **catalogue,
    )
    ledger = Ledger(tmp_path / "s")
    if with_ledger:
        ledger.run_started("fp")
    for job in jobs:
        stage_job(tmp_path / "s", job)
    monkeypatch.setattr(zarr_io, "_MAX_RUN_BYTES", 1)  # (a chunk at a time)
    seen = []
    write_direct = zarr_io.ZarrWriter._write_direct

    def writing(self, name, run, *args):
        if name == "images":  # the records of the run are there already
            seen.append((tuple(run), set(Ledger(tmp_path / "s").read().chunks)))
        return write_direct(self, name, run, *args)

    monkeypatch.setattr(zarr_io.ZarrWriter, "_write_direct", writing)
    checksums = writer.write_chunks(range(writer.n_chunks), _mapping(n, jobs), base,
                                    record=True)
    state = ledger.read()
    assert checksums.recorded == with_ledger
    if not with_ledger:
        assert state.chunks == {}
        return
    assert state.chunks == dict(checksums)
    for k, (status, geometry) in checksums.rows.items():
        np.testing.assert_array_equal(state.chunk_rows[k][0], status)
        np.testing.assert_array_equal(state.chunk_rows[k][1], geometry)
    assert [run for run, _ in seen] == [(k,) for k in range(writer.n_chunks)]
    assert all(run[0] in recorded for run, recorded in seen)


def _old_layout(path, version):
    """Turn a new, empty store into one of format 1, 2 or 3: the per-row
    arrays chunked as ``images``, uncompressed, written with each chunk."""
    group = zarr.open_group(path, mode="r+")
    attrs = group.attrs.asdict()
    n, cr = attrs["n_rows"], attrs["chunk_rows"]
    if version < 3:
        del attrs["chunk_checksum"]  # before format 3: SHA-256
    del group["status"]
    del group["geometry"]
    arrays = [("status", (n,), "int16", -1)]
    if version == 1:
        arrays += [("tile", (n,), "int32", -1), ("origin", (n, 2), "int64", 0),
                   ("box_shape", (n, 2), "int32", 0)]
    else:
        arrays += [("geometry", (n, 5), "int64", -1)]
    for name, shape, dt, fill in arrays:
        group.create_array(
            name, shape=shape, chunks=(cr, *shape[1:]), dtype=dt, fill_value=fill,
            compressors=None, config={"write_empty_chunks": True},
            chunk_key_encoding={"name": "default", "separator": "."},
        )
    group.attrs.put({**attrs, "cutana_format": version})


def _tree(path, skip=(".cutana",)):
    """Relative path -> bytes of every file under ``path``."""
    files = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                files[os.path.relpath(full, path)] = fh.read()
    return files


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "uint8", "uint16"])
def test_round_trip_row_order(tmp_path, dtype):
    """Test that row i of the store is catalogue row i, whatever job staged it."""
    path = tmp_path / "out.zarr"
    writer, catalogue, jobs, base, checksums = _run(
        path, dtype=dtype, chunk_order=[6, 0, 3, 1, 2, 5, 4]
    )
    writer.finalize(checksums)
    images, status, tile, origin, box = _expected(40, jobs, base, dtype)
    out = open_output(path)
    assert len(out) == 40
    assert out.images.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.images[:], images)
    np.testing.assert_array_equal(out[7], images[7])
    np.testing.assert_array_equal(out.status, status)
    assert writer.read_status().dtype == np.int16
    np.testing.assert_array_equal(writer.read_status(), status)
    np.testing.assert_array_equal(out.tile, tile)
    np.testing.assert_array_equal(out.origin, origin)
    np.testing.assert_array_equal(out.box_shape, box)
    np.testing.assert_array_equal(out.source_id, catalogue["source_id"])
    np.testing.assert_array_equal(out.ra, catalogue["ra"])
    np.testing.assert_array_equal(out.dec, catalogue["dec"])
    assert out.bands == BANDS
    assert out.config == {"size": 5, "resample": "none"}
    assert out.attrs["status_codes"]["BAD_ROW"] == 3
    assert out.attrs["complete"] is True
    table = out.to_table()
    assert list(table["source_id"]) == list(catalogue["source_id"])
    assert table["status_name"][0] == Status(int(status[0])).name
    # rows without a job are empty and say why
    no_job = tile < 0
    assert np.all(out.images[:][no_job] == 0)
    assert set(out.status[no_job].tolist()) <= {Status.NO_OVERLAP, Status.BAD_ROW}
    assert verify_output(path) == []


@pytest.mark.parametrize("version", [1, 2, 3])
def test_format_1_store_still_written_read_and_verified(tmp_path, version):
    """Test that stores of format 1 (tile, origin and box_shape as three
    arrays) and 2 (one geometry array), both with SHA-256 chunk checksums,
    and 3 (CRC-32C), all three writing the per-row arrays with each chunk,
    are still written (a resumed run), read and verified."""
    path = tmp_path / f"v{version}.zarr"
    n = 40
    catalogue, jobs, base = _fake_run(n=n)
    ZarrWriter.create(
        path, n_rows=n, bands=BANDS, out_shape=OUT_SHAPE, dtype="float32",
        config={"size": 5, "resample": "none"}, tiles=_tiles(), chunk_rows=6,
        **catalogue,
    )
    _old_layout(path, version)
    for job in jobs:
        stage_job(path, job)
    resumed = ZarrWriter.open(path)
    assert resumed.rows_in_chunks
    checksums = resumed.write_chunks(range(resumed.n_chunks), _mapping(n, jobs), base)
    assert all(resumed.chunk_exists(k) for k in range(resumed.n_chunks))
    # each chunk's rows are in the store as soon as it is written
    images, status, tile, origin, box = _expected(n, jobs, base, "float32")
    np.testing.assert_array_equal(resumed.read_status(), status)
    assert len(os.listdir(path / "status")) == 1 + resumed.n_chunks
    with pytest.raises(ValueError, match="stores status and geometry with each"):
        resumed.write_rows(status, np.zeros((n, 5)))
    resumed.finalize(checksums)
    remove_run_state(path)
    stored = zarr.open_group(path, mode="r")
    assert ("geometry" not in stored) == (version == 1)
    if version == 1:
        np.testing.assert_array_equal(stored["origin"][:], origin)
    # the tiles of the rows alone, as the whole geometry gives them
    numbers = open_output(path).tile_numbers()
    assert numbers.dtype == np.int32
    np.testing.assert_array_equal(numbers, tile)
    if version == 3:
        assert "chunk_sha256" not in stored
        assert verify_output(path) == []
        return
    assert "chunk_crc32c" not in stored
    digests = stored["chunk_sha256"][:]
    assert digests.shape == (resumed.n_chunks, 32)
    for k in range(resumed.n_chunks):  # SHA-256 of the chunk's bytes, by hashlib
        parts = (images[6 * k : 6 * k + 6], status[6 * k : 6 * k + 6].astype("<i2"),
                 tile[6 * k : 6 * k + 6].astype("<i4"), origin[6 * k : 6 * k + 6],
                 box[6 * k : 6 * k + 6].astype("<i4"))
        expected = hashlib.sha256(
            b"".join(np.ascontiguousarray(p).tobytes() for p in parts)
        )
        assert bytes(digests[k]) == expected.digest()
    out = open_output(path)
    np.testing.assert_array_equal(out.images[:], images)
    np.testing.assert_array_equal(out.tile, tile)
    np.testing.assert_array_equal(out.origin, origin)
    np.testing.assert_array_equal(out.box_shape, box)
    assert verify_output(path) == []
    row = int(np.flatnonzero(tile >= 0)[0])
    assert out.wcs(row) is not None


@pytest.mark.parametrize(
    ("n_rows", "row_bytes", "expected"),
    [
        (1000, 3 * 150 * 150, 62),  # 3-band 150 px uint8: 62 rows ~ 4 MiB
        (1000, 4 * 64 * 64 * 4, 64),  # float32, 4 bands: 64 rows = 4 MiB
        (1000, 8 * 1024 * 1024, 1),  # huge rows: one per chunk
        (5, 1000, 5),  # small catalogue: one chunk
        (0, 1000, 1),
    ],
)
def test_choose_chunk_rows(n_rows, row_bytes, expected):
    """Test that chunks hold 2-4 MiB of whole cutouts (or one cutout, or all)."""
    rows = choose_chunk_rows(n_rows, row_bytes)
    assert rows == expected
    if row_bytes <= 4 * 1024 * 1024 and n_rows >= 1000:
        assert 2 * 1024 * 1024 <= rows * row_bytes <= 4 * 1024 * 1024


def test_chunking(tmp_path):
    """Test that a chunk of cutouts is one file, and that status and geometry
    are written once, at the end, in large chunks (format 4)."""
    path = tmp_path / "out.zarr"
    writer, *_, checksums = _run(path, n=40, chunk_rows=6)
    group = zarr.open_group(path, mode="r")
    assert writer.n_chunks == 7
    assert group["images"].chunks[0] == 6
    assert group.attrs["cutana_format"] == 4 and not writer.rows_in_chunks
    for name in ("status", "geometry"):
        assert group[name].chunks[0] == 40  # one chunk of up to 65,536 rows
        assert sorted(os.listdir(path / name)) == ["zarr.json"]  # not yet
    assert sorted(os.listdir(path / "images")) == sorted(
        ["zarr.json"] + [f"c.{k}.0.0.0" for k in range(7)]
    )
    writer.finalize(checksums)
    assert group["geometry"].shape == (40, 5)
    assert sorted(os.listdir(path / "geometry")) == ["c.0.0", "zarr.json"]
    assert sorted(os.listdir(path / "status")) == ["c.0", "zarr.json"]
    assert group["images"].chunks == (6, len(BANDS), *OUT_SHAPE)
    assert writer.chunk_range(6) == (36, 40)
    np.testing.assert_array_equal(writer.chunk_of_row([0, 5, 6, 39]), [0, 0, 1, 6])
    with pytest.raises(ValueError, match="chunk must be an integer in"):
        writer.chunk_range(7)


def test_default_chunk_rows(tmp_path):
    """Test that the default chunking follows choose_chunk_rows."""
    writer = ZarrWriter.create(
        tmp_path / "s.zarr",
        n_rows=100,
        bands=["a", "b", "c"],
        out_shape=(150, 150),
        dtype="uint8",
        source_id=[str(i) for i in range(100)],
        ra=np.zeros(100),
        dec=np.zeros(100),
    )
    assert writer.chunk_rows == choose_chunk_rows(100, 3 * 150 * 150) == 62
    assert zarr.open_group(tmp_path / "s.zarr")["images"].chunks == (62, 3, 150, 150)


def test_two_runs_byte_identical(tmp_path):
    """Test that two runs, staged and written in other orders, give identical bytes."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    wa, *_, ca = _run(a)
    wb, _, jobs, _, cb = _run(
        b,
        chunk_order=[5, 3, 1, 6, 0, 2, 4],
        stage_order=list(range(len(_fake_run()[1])))[::-1],
    )
    assert ca == cb
    wa.finalize(ca)
    state = Ledger(b).read()  # as a resumed run: rows from the ledger
    wb.finalize(state.chunks, rows=state.chunk_rows)
    remove_run_state(a)
    remove_run_state(b)
    tree_a, tree_b = _tree(a, skip=()), _tree(b, skip=())
    assert sorted(tree_a) == sorted(tree_b)
    for name in tree_a:
        assert tree_a[name] == tree_b[name], name
    assert not any(name.endswith(".partial") for name in tree_a)
    # a finished store is a plain Zarr store: listing it warns about nothing
    names = sorted(name for name, _ in zarr.open_group(a, mode="r").members())
    assert "images" in names and ".cutana" not in names


def _same_encoder(a, b):
    """Whether two `ZarrWriter._encoder` results encode alike."""
    if a is None or isinstance(a, str):
        return a == b
    settings = ("cname", "clevel", "shuffle", "typesize")
    return type(a) is type(b) and all(getattr(a, s) == getattr(b, s) for s in settings)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_metadata_read_without_zarr_equals_zarrs(tmp_path, dtype):
    """Test that what a worker reads from the ``zarr.json`` files (the
    group's attributes, each array's chunk keys, fill value and encoder)
    equals what zarr reads from them, for a store as cutana creates it and
    for arrays of other encodings, fill values and codecs; what the plain
    reading does not know it leaves to zarr (None)."""
    from zarr.codecs import ZstdCodec

    from cutana.io.zarr import (
        _group_attributes,
        _plain_chunk_key,
        _plain_encoder,
        _plain_fill,
    )

    path = tmp_path / "s.zarr"
    writer = _run(path, dtype=dtype)[0]
    assert _group_attributes(path) == zarr.open_group(path, mode="r").attrs.asdict()
    group = zarr.open_group(path, mode="r+")
    others = {
        "slash": dict(chunk_key_encoding={"name": "default", "separator": "/"}),
        "v2": dict(chunk_key_encoding={"name": "v2", "separator": "."}),
        "nan": dict(fill_value=np.nan),
        "inf": dict(fill_value=-np.inf),
        "zstd": dict(compressors=ZstdCodec(level=1)),
        "raw": dict(compressors=None),
        "big": dict(compressors=None, serializer={"name": "bytes",
                                                  "configuration": {"endian": "big"}}),
    }
    for name, kwargs in others.items():
        group.create_array(name, shape=(7, 3), chunks=(2, 3), dtype="float32", **kwargs)
    fresh = ZarrWriter.open(path)
    plain = {"images", "raw"}  # (the others have zarr's default codecs: zstd)
    for name in ("images", "status", "geometry", "source_id", "ra", "dec", *others):
        meta = fresh._metadata(name)
        arr = zarr.open_array(path / name, mode="r")
        for k in range(3):
            coords = (k,) + (0,) * (arr.ndim - 1)
            key = _plain_chunk_key(meta["chunk_key_encoding"], coords)
            assert key == arr.metadata.encode_chunk_key(coords), name
        fill = _plain_fill(meta["fill_value"])
        if name == "source_id":
            assert fill is None
        else:
            np.testing.assert_array_equal(
                np.array(fill, dtype=arr.dtype), np.array(arr.metadata.fill_value)
            )
        encoder = _plain_encoder(meta["codecs"])
        assert (encoder is not None) == (name in plain), name
        if encoder is not None:
            assert _same_encoder(encoder, writer._zarr_encoder(name)), name
            assert _same_encoder(fresh._encoder(name), encoder), name
    assert not fresh._v1 and fresh.attrs == writer.attrs
    assert fresh._opened is None  # all of it read without zarr
    for name in ("source_id", *others):  # the rest through zarr, as before
        assert _same_encoder(fresh._encoder(name), writer._zarr_encoder(name)), name
    assert fresh._opened is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (-1, -1), (2.5, 2.5), ("NaN", np.nan), ("Infinity", np.inf),
     ("-Infinity", -np.inf), ("0x7fc00000", None), (True, None), ([0, 1], None),
     (None, None)],
)
def test_plain_fill_reads_numbers_and_leaves_the_rest_to_zarr(value, expected):
    """Test that a ``fill_value`` of ``zarr.json`` is read where it is a
    number or a named non-finite float, and left to zarr (None) where it is
    anything else: a hexadecimal float, a boolean, a structured value."""
    from cutana.io.zarr import _plain_fill

    got = _plain_fill(value)
    if expected is None:
        assert got is None
    else:
        np.testing.assert_array_equal(got, expected)


_WORKER_WRITE = """
import sys
import numpy as np
from cutana.io.zarr import ZarrWriter
path, arrays = sys.argv[1], np.load(sys.argv[2])
writer = ZarrWriter.open(path)
checksums = writer.write_chunks(range(writer.n_chunks), (arrays["job"], arrays["pos"]),
                                arrays["base"])
print(sorted(checksums) == list(range(writer.n_chunks)), "zarr" in sys.modules)
"""


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_a_worker_writes_chunks_without_zarr(tmp_path, dtype):
    """Test that a writer opened as a worker opens it (`ZarrWriter.open`),
    in a fresh interpreter, writes the chunk files of a store without
    importing zarr, byte for byte as the writer that created the store."""
    import subprocess
    import sys

    import cutana

    n = 40
    catalogue, jobs, base = _fake_run(n=n, dtype=dtype)
    made = {}
    for name in ("parent", "worker"):
        path = tmp_path / f"{name}.zarr"
        made[name] = ZarrWriter.create(
            path, n_rows=n, bands=BANDS, out_shape=OUT_SHAPE, dtype=dtype,
            config={"size": 5}, tiles=_tiles(), chunk_rows=6, **catalogue,
        )
        for job in jobs:
            stage_job(path, job)
    job_of_row, pos_of_row = _mapping(n, jobs)
    parent = made["parent"]
    parent.write_chunks(range(parent.n_chunks), (job_of_row, pos_of_row), base)
    np.savez(tmp_path / "rows.npz", job=job_of_row, pos=pos_of_row, base=base)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cutana.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", _WORKER_WRITE, str(tmp_path / "worker.zarr"),
         str(tmp_path / "rows.npz")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
    parent, worker = _tree(tmp_path / "parent.zarr"), _tree(tmp_path / "worker.zarr")
    assert sorted(parent) == sorted(worker)
    chunks = [name for name in parent if name.startswith("images" + os.sep + "c.")]
    assert len(chunks) == made["parent"].n_chunks
    for name in parent:
        assert parent[name] == worker[name], name


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_chunks_written_from_memory_equal_staged(tmp_path, dtype, monkeypatch):
    """Test that chunks encoded straight from an in-memory job (one job holding
    consecutive rows) are the bytes of the same chunks assembled from staging."""
    n = 23
    catalogue, jobs, base = _fake_run(n=n, dtype=dtype, job_size=n)
    rng = np.random.default_rng(3)
    job = JobResult(
        job_id=0, rows=np.arange(n, dtype=np.int64), images=jobs[0].images[:0],
        status=np.zeros(0, np.int16), tile=1, origin=np.zeros((0, 2), np.int64),
        box_shape=np.zeros((0, 2), np.int64),
    )
    job.images = (rng.random((n, len(BANDS), *OUT_SHAPE)) * 250).astype(dtype)
    job.status = rng.choice(
        [Status.OK, Status.PARTIAL_OVERLAP], size=n
    ).astype(np.int16)
    job.origin = rng.integers(-3, 100, size=(n, 2))
    job.box_shape = rng.integers(3, 9, size=(n, 2))
    mapping = (np.zeros(n, np.int64), np.arange(n, dtype=np.int64))
    trees, sums = [], []
    for name, pinned in (("memory", {0: job}), ("staged", None)):
        path = tmp_path / f"{name}.zarr"
        writer = ZarrWriter.create(
            path, n_rows=n, bands=BANDS, out_shape=OUT_SHAPE, dtype=dtype,
            tiles=_tiles(), chunk_rows=5, **catalogue,
        )
        if pinned is None:
            stage_job(path, job)
            monkeypatch.undo()
        else:  # no block is assembled: the chunks are views of the job
            monkeypatch.setattr(ZarrWriter, "_empty_block", None)
        sums.append(writer.write_chunks(range(writer.n_chunks), mapping, base,
                                        results=pinned))
        writer.finalize(sums[-1])
        remove_run_state(path)
        trees.append(_tree(path, skip=()))
    assert sums[0] == sums[1]
    assert trees[0] == trees[1]
    out = open_output(tmp_path / "memory.zarr")
    np.testing.assert_array_equal(out.images[:], job.images)
    np.testing.assert_array_equal(out.status[:], job.status)
    np.testing.assert_array_equal(out.origin[:], job.origin)
    np.testing.assert_array_equal(out.box_shape[:], job.box_shape)


def _write_series(files, folder, blobs):
    """Write ``blobs`` as ``folder/c.0``, ``c.1``, ... through ``files``."""
    with files:
        for k, blob in enumerate(blobs):
            path = str(folder / f"c.{k}")
            files.write(path + ".partial", path, blob)


def _check_series(folder, blobs):
    """Assert that ``folder`` holds exactly the files `_write_series` wrote."""
    for k, blob in enumerate(blobs):
        assert (folder / f"c.{k}").read_bytes() == blob
    assert sorted(os.listdir(folder)) == sorted(f"c.{k}" for k in range(len(blobs)))


@pytest.mark.parametrize("min_bytes", [0, 1 << 40])
def test_file_series_writes_and_replaces(tmp_path, min_bytes):
    """Test that FileSeries files hold their bytes, with or without the
    page-cache advice, replace older files and fail without leftovers."""
    from cutana.io._writeback import FileSeries

    rng = np.random.default_rng(5)
    blobs = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()
             for n in rng.integers(0, 3_000_000, 9)]
    (tmp_path / "c.3").write_bytes(b"an older chunk")
    _write_series(FileSeries(lag=2, min_bytes=min_bytes), tmp_path, blobs)
    _check_series(tmp_path, blobs)
    with pytest.raises(FileNotFoundError), FileSeries(min_bytes=min_bytes) as files:
        missing = str(tmp_path / "no" / "c.0")
        files.write(missing + ".partial", missing, b"x" * 10)
    assert not (tmp_path / "no").exists()


def _blobs(seed, sizes):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in sizes]


def _o_direct_opens(monkeypatch, refuse=False):
    """Count the files `os.open` opens with ``O_DIRECT`` (refused with EINVAL
    when ``refuse``, as tmpfs does)."""
    import errno

    opened = []
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            if refuse:
                raise OSError(errno.EINVAL, "Invalid argument", path)
            opened.append(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return opened


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="needs O_DIRECT (Linux)")
@pytest.mark.parametrize("refuse", [False, True])
def test_file_series_background_thread(tmp_path, monkeypatch, refuse):
    """Test that files handed to the writer thread hold their bytes (sizes on
    and off the O_DIRECT alignment, below min_bytes written in the calling
    thread), replace older files and leave nothing else; a file system that
    refuses O_DIRECT gets ordinary writes."""
    from cutana.io._writeback import ALIGN, FileSeries

    sizes = [ALIGN, ALIGN + 1, 3 * ALIGN - 7, 10, 2_000_000, 1, 70_001, 5 * ALIGN]
    blobs = _blobs(7, sizes)
    (tmp_path / "c.2").write_bytes(b"an older chunk")
    opened = _o_direct_opens(monkeypatch, refuse=refuse)
    _write_series(FileSeries(min_bytes=64, direct=True), tmp_path, blobs)
    _check_series(tmp_path, blobs)
    # every file of min_bytes or more went through O_DIRECT (unless refused),
    # possibly fewer when the thread was busy and the caller wrote one itself
    big = [k for k, n in enumerate(sizes) if n >= 64]
    assert len(opened) <= len(big)
    assert not opened if refuse else opened
    assert all(p.endswith(".partial") for p in opened)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="needs O_DIRECT (Linux)")
def test_file_series_busy_thread_and_errors(tmp_path, monkeypatch):
    """Test that the caller writes a file itself while the thread is busy,
    that the aligned buffers are kept for the next series (and released),
    and that an error of the thread (a missing folder) is raised by close or
    a later write, with nothing written."""
    import threading

    from cutana.io import _writeback
    from cutana.io._writeback import DEPTH, FileSeries

    blobs = _blobs(8, [100_000] * (DEPTH + 4))
    release = threading.Event()
    in_thread = []
    real_write_file = FileSeries._write_file

    def slow_write_file(self, tmp, path, buf, n):
        in_thread.append(path)
        release.wait(10)
        return real_write_file(self, tmp, path, buf, n)

    monkeypatch.setattr(FileSeries, "_write_file", slow_write_file)
    files = FileSeries(min_bytes=0, direct=True)
    real_close = files.close

    def close():
        release.set()  # every file handed over: let the thread go on
        real_close()

    files.close = close
    _write_series(files, tmp_path, blobs)
    _check_series(tmp_path, blobs)
    # the thread took at most DEPTH files at a time; the caller wrote the rest
    assert 1 <= len(in_thread) <= DEPTH
    assert 1 <= len(_writeback._BUFFERS) <= DEPTH  # kept for the next series
    _writeback.release_buffers()
    assert not _writeback._BUFFERS

    monkeypatch.setattr(FileSeries, "_write_file", real_write_file)
    missing = tmp_path / "no"
    with pytest.raises(FileNotFoundError):
        _write_series(FileSeries(min_bytes=0, direct=True), missing, blobs)
    assert not missing.exists()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="needs O_DIRECT (Linux)")
def test_file_series_thread_copies_bytes_and_caller_copies_the_rest(
    tmp_path, monkeypatch
):
    """Test that the writer thread copies a `bytes` into its aligned buffer
    itself, and that a buffer its owner may change (a bytearray, an array)
    is copied by the caller: changed after `write` returns, while the thread
    is held back, its file still holds what was written."""
    import threading

    from cutana.io._writeback import FileSeries

    release = threading.Event()
    copied_by = []
    real_fill = FileSeries._fill
    real_write_file = FileSeries._write_file

    def fill(self, buf, view):
        copied_by.append((len(view), threading.current_thread().name))
        return real_fill(self, buf, view)

    def held_write_file(self, tmp, path, buf, n):
        release.wait(10)
        return real_write_file(self, tmp, path, buf, n)

    monkeypatch.setattr(FileSeries, "_fill", fill)
    monkeypatch.setattr(FileSeries, "_write_file", held_write_file)
    frozen, mutable = _blobs(9, [50_000, 60_000])
    changing = bytearray(mutable)
    array = np.frombuffer(mutable, dtype=np.uint8).copy()
    files = FileSeries(min_bytes=0, direct=True)
    paths = [str(tmp_path / f"c.{k}") for k in range(3)]
    files.write(paths[0] + ".partial", paths[0], frozen)
    files.write(paths[1] + ".partial", paths[1], changing)
    changing[:] = b"x" * len(changing)  # changed before the thread copies
    release.set()
    files.write(paths[2] + ".partial", paths[2], array)
    array[:] = 0
    files.close()
    assert [(tmp_path / f"c.{k}").read_bytes() for k in range(3)] == [
        frozen, mutable, mutable
    ]
    assert (len(frozen), "cutana-writer") in copied_by  # the bytes: by the thread
    # the bytearray (and the array, unless the caller wrote it itself)
    assert (len(mutable), threading.current_thread().name) in copied_by
    assert (len(mutable), "cutana-writer") not in copied_by


@pytest.mark.parametrize("version", [4, 3])
def test_write_chunks_background_same_bytes(tmp_path, monkeypatch, version):
    """Test that chunk files written by the background thread (every size of
    file, min_bytes 0), with a helper thread compressing every other chunk,
    are the bytes written without them, in runs of two chunks that share
    the thread (and, in a store of format 3, per-row arrays written after
    each run's images)."""
    import functools
    import threading

    from cutana.io import zarr as zarr_module
    from cutana.io._writeback import FileSeries

    monkeypatch.setattr(
        zarr_module, "FileSeries", functools.partial(FileSeries, min_bytes=0)
    )
    encoded_by = []
    real_encoder = ZarrWriter._encoder

    class Spy:
        def __init__(self, codec):
            self.codec = codec

        def encode(self, part):
            encoded_by.append(threading.current_thread().name)
            return self.codec.encode(part)

    def encoder(self, name):
        codec = real_encoder(self, name)
        return codec if codec in (None, "raw") else Spy(codec)

    monkeypatch.setattr(ZarrWriter, "_encoder", encoder)
    # chunks of 6 rows of 2 x 5 x 4 bytes: two chunks per run
    monkeypatch.setattr(zarr_module, "_MAX_RUN_BYTES", 2 * 6 * 40)
    opened = _o_direct_opens(monkeypatch) if hasattr(os, "O_DIRECT") else None
    trees = []
    for background in (False, True):
        path = tmp_path / f"b{background}.zarr"
        catalogue, jobs, base = _fake_run(n=40, seed=3, dtype="uint8")
        writer = ZarrWriter.create(
            path, n_rows=40, bands=BANDS, out_shape=OUT_SHAPE, dtype="uint8",
            config={"size": 5}, tiles=_tiles(), chunk_rows=6, **catalogue,
        )
        if version != 4:
            _old_layout(path, version)
            writer = ZarrWriter.open(path)
        checksums = writer.write_chunks(
            range(writer.n_chunks), _mapping(40, jobs), base,
            results={j.job_id: j for j in jobs}, background=background,
            helper=background,
        )
        trees.append((_tree(path), dict(checksums)))
        here = threading.current_thread().name
        by_helper = [t for t in encoded_by if t.startswith("cutana-encode")]
        # with the helper, one chunk of each run of two is compressed there
        assert len(by_helper) == (encoded_by.count(here) - 1 if background else 0)
        encoded_by.clear()
    assert trees[0] == trees[1]
    assert any(name.startswith("images/") for name in trees[1][0])
    if version == 3:
        assert any(name.startswith("status/") for name in trees[1][0])
    if opened is not None:  # the thread wrote chunks of the second store only
        assert opened and all("bTrue.zarr" in p for p in opened)


def _pairs():
    from cutana.io.zarr import _encode_pairs

    return list(_encode_pairs([0, 1, 2], lambda k: k, lambda v: 2 * v, True))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_encode_helper_pairs_in_order_and_after_fork():
    """Test that the helper's encodings come back in order, and that a
    child forked after the helper started makes its own (the parent's
    thread does not exist there: work handed to it would wait for ever)."""
    assert _pairs() == [(0, 0), (1, 2), (2, 4)]
    with get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_pairs).get(timeout=60) == [(0, 0), (1, 2), (2, 4)]


def test_concurrent_write_chunks(tmp_path):
    """Test that two processes writing disjoint chunks give the serial result."""
    serial, parallel = tmp_path / "serial.zarr", tmp_path / "parallel.zarr"
    ws, *_, cs = _run(serial)
    catalogue, jobs, base = _fake_run()
    wp = ZarrWriter.create(
        parallel,
        n_rows=40,
        bands=BANDS,
        out_shape=OUT_SHAPE,
        dtype="float32",
        config={"size": 5, "resample": "none"},
        tiles=_tiles(),
        chunk_rows=6,
        **catalogue,
    )
    for job in jobs:
        stage_job(parallel, job)
    mapping = _mapping(40, jobs)
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(wp.write_chunks, chunks, mapping, base)
            for chunks in ([0, 2, 4, 6], [1, 3, 5])
        ]
        results = [f.result() for f in futures]
    cp = ChunksWritten()
    for result in results:
        cp.update(result)
    assert cp == cs
    assert sorted(cp.rows) == list(range(7))
    ws.finalize(cs)
    wp.finalize(cp)
    ta, tb = _tree(serial), _tree(parallel)
    assert ta == tb


def test_io_names_come_from_their_modules_when_used(tmp_path):
    """Test that `cutana.io` offers every public name of its modules, in
    their order, each the object of its module, and that importing it
    imports none of them (a worker imports the writer it uses only):
    in a fresh interpreter, ``cutana.io`` alone, then its modules as their
    names are used."""
    import importlib
    import subprocess
    import sys

    import cutana
    import cutana.io

    modules = ["staging", "ledger", "zarr", "fits", "archive"]
    expected = []
    for name in modules:
        module = importlib.import_module(f"cutana.io.{name}")
        expected += module.__all__
        for attr in module.__all__:
            assert getattr(cutana.io, attr) is getattr(module, attr)
        assert getattr(cutana.io, name) is module
    assert cutana.io.__all__ == expected
    assert set(expected) <= set(dir(cutana.io))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        cutana.io.nothing  # noqa: B018
    script = (
        "import sys, cutana.io as io\n"
        "def loaded():\n"
        "    return sorted(m for m in sys.modules if m.startswith('cutana.io'))\n"
        "print(*loaded(), 'zarr' in sys.modules)\n"
        "io.stage_job\n"
        "print(*loaded(), 'zarr' in sys.modules)\n"
        "print(io.archive.open_output is io.open_output)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(cutana.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "cutana.io False",
        "cutana.io cutana.io.staging False",
        "True",  # a module by its name (`cutana.io.archive`), imported then
    ]


def test_writer_pickles_as_its_path(tmp_path):
    """Test that a writer sent to another process reopens the same store."""
    writer, *_ = _run(tmp_path / "out.zarr")
    clone = pickle.loads(pickle.dumps(writer))
    assert clone.path == writer.path
    assert (clone.n_rows, clone.chunk_rows, clone.bands) == (40, 6, BANDS)


def test_create_refuses_existing_output(tmp_path):
    """Test that an output is replaced only with overwrite, and a non-store never."""
    path = tmp_path / "out.zarr"
    _run(path)
    args = {
        "n_rows": 2,
        "bands": ["g"],
        "out_shape": (3, 3),
        "dtype": "uint8",
        "source_id": ["a", "b"],
        "ra": [1.0, 2.0],
        "dec": [3.0, 4.0],
    }
    with pytest.raises(FileExistsError, match="already exists"):
        ZarrWriter.create(path, **args)
    writer = ZarrWriter.create(path, overwrite=True, **args)
    assert writer.n_rows == 2
    assert not os.path.exists(staging_dir(path))
    other = tmp_path / "mydata"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a Zarr store"):
        ZarrWriter.create(other, overwrite=True, **args)
    assert (other / "precious.txt").read_text() == "keep me"


def test_create_validates(tmp_path):
    """Test that inconsistent arguments are rejected with the bad value named."""
    args = {
        "n_rows": 2,
        "bands": ["g"],
        "out_shape": (3, 3),
        "dtype": "uint8",
        "source_id": ["a", "b"],
        "ra": [1.0, 2.0],
        "dec": [3.0, 4.0],
    }
    with pytest.raises(ValueError, match=r"ra must have shape \(2,\)"):
        ZarrWriter.create(tmp_path / "a", **{**args, "ra": [1.0]})
    with pytest.raises(ValueError, match="out_shape must be"):
        ZarrWriter.create(tmp_path / "b", **{**args, "out_shape": (0, 3)})
    with pytest.raises(TypeError, match="cannot be stored as JSON"):
        ZarrWriter.create(tmp_path / "c", **{**args, "config": {"x": object()}})
    with pytest.raises(ValueError, match="non-finite"):
        ZarrWriter.create(tmp_path / "d", **{**args, "config": {"x": float("nan")}})


def test_interrupted_creation_is_refused(tmp_path):
    """Test that a store whose creation was cut short cannot be opened for resume."""
    path = tmp_path / "out.zarr"
    zarr.open_group(path, mode="w")
    with pytest.raises(ValueError, match="not a complete cutana Zarr store"):
        ZarrWriter.open(path)
    with pytest.raises(FileNotFoundError, match="no Zarr store"):
        ZarrWriter.open(tmp_path / "missing")


def test_write_chunks_rejects_unaccounted_rows(tmp_path):
    """Test that a row with neither a staged cutout nor a final status is an error."""
    path = tmp_path / "out.zarr"
    catalogue, jobs, base = _fake_run()
    writer = ZarrWriter.create(
        path,
        n_rows=40,
        bands=BANDS,
        out_shape=OUT_SHAPE,
        dtype="float32",
        chunk_rows=6,
        **catalogue,
    )
    for job in jobs:
        stage_job(path, job)
    job_of_row, pos_of_row = _mapping(40, jobs)
    lost = int(np.flatnonzero(job_of_row >= 0)[0])
    job_of_row[lost] = -1
    with pytest.raises(ValueError, match=f"row {lost} belongs to no staged job"):
        writer.write_chunks([lost // 6], (job_of_row, pos_of_row), base)
    job_of_row, pos_of_row = _mapping(40, jobs)
    pos_of_row[lost] += 1
    with pytest.raises(ValueError, match="does not hold the rows"):
        writer.write_chunks([lost // 6], (job_of_row, pos_of_row), base)
    # nothing was written for that chunk
    assert np.all(zarr.open_group(path)["status"][:] == Status.PENDING)


def test_write_chunks_callable_mapping(tmp_path):
    """Test that the row mapping and base status may be given as callables."""
    path = tmp_path / "out.zarr"
    catalogue, jobs, base = _fake_run()
    writer = ZarrWriter.create(
        path,
        n_rows=40,
        bands=BANDS,
        out_shape=OUT_SHAPE,
        dtype="float32",
        chunk_rows=6,
        **catalogue,
    )
    for job in jobs:
        stage_job(path, job)
    job_of_row, pos_of_row = _mapping(40, jobs)
    calls = []

    def lookup(r0, r1):
        calls.append((r0, r1))
        return job_of_row[r0:r1], pos_of_row[r0:r1]

    checksums = writer.write_chunks(
        range(writer.n_chunks), lookup, lambda r0, r1: base[r0:r1]
    )
    # called for consecutive ranges of whole chunks that cover every row once
    assert calls[0][0] == 0 and calls[-1][1] == 40
    assert all(a[1] == b[0] for a, b in itertools.pairwise(calls))
    assert {r for call in calls for r in call} <= {
        r for k in range(writer.n_chunks) for r in writer.chunk_range(k)
    }
    np.testing.assert_array_equal(
        zarr.open_group(path)["images"][:], _expected(40, jobs, base, "float32")[0]
    )
    assert sorted(checksums) == list(range(7))


def test_staging_atomic(tmp_path, monkeypatch):
    """Test that a half-written staging is never visible and leftovers are cleaned."""
    out = tmp_path / "out"
    _, jobs, _ = _fake_run()
    job = jobs[0]
    staged = stage_job(out, job)
    assert staged.n == len(job.rows)
    assert list_staged(out) == [0]
    # a killed worker leaves a temporary folder: ignored, then cleaned
    leftover = os.path.join(staging_dir(out), ".tmp-job-000001-999-deadbeef")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "rows.npy"), "wb") as fh:
        fh.write(b"partial")
    assert list_staged(out) == [0]
    with pytest.raises(FileNotFoundError, match="job 1 has not been staged"):
        load_staged(out, 1)
    assert clean_staging(out) == 1
    assert sorted(os.listdir(staging_dir(out))) == ["job-000000"]

    # a failure in the middle of staging leaves nothing behind
    calls = {"n": 0}
    real = np.lib.format.write_array

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            msg = "No space left on device"
            raise OSError(msg)
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing)
    with pytest.raises(OSError, match="No space left"):
        stage_job(out, jobs[1])
    monkeypatch.undo()
    assert sorted(os.listdir(staging_dir(out))) == ["job-000000"]

    # restaging (a retry) replaces the earlier copy
    again = stage_job(out, job)
    assert again.checksum == staged.checksum
    back = load_staged(out, 0, checksum=staged.checksum)
    np.testing.assert_array_equal(back.images, job.images)
    np.testing.assert_array_equal(back.rows, job.rows)
    assert back.messages == job.messages
    assert back.tile == job.tile


def test_staging_checksum_detects_corruption(tmp_path):
    """Test that a corrupted staged file no longer matches its checksum."""
    out = tmp_path / "out"
    _, jobs, _ = _fake_run()
    staged = stage_job(out, jobs[0])
    assert verify_staged(out, 0, staged.checksum)
    path = os.path.join(staged.path, "images.npy")
    with open(path, "r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert not verify_staged(out, 0, staged.checksum)
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_staged(out, 0, checksum=staged.checksum)
    assert not verify_staged(out, 5, staged.checksum)


def test_stage_job_validates(tmp_path):
    """Test that inconsistent job results are refused before anything is written."""
    _, jobs, _ = _fake_run()
    job = jobs[0]
    bad = JobResult(**{**job.__dict__, "status": job.status[:-1]})
    with pytest.raises(ValueError, match="status must have shape"):
        stage_job(tmp_path, bad)
    bad = JobResult(**{**job.__dict__, "rows": job.rows[::-1].copy()})
    with pytest.raises(ValueError, match="strictly ascending"):
        stage_job(tmp_path, bad)
    bad = JobResult(**{**job.__dict__, "job_id": -1})
    with pytest.raises(ValueError, match="job_id must be a non-negative integer"):
        stage_job(tmp_path, bad)
    assert list_staged(tmp_path) == []


def test_resume_trusts_only_verified_records(tmp_path):
    """Test that resume keeps recorded chunks that exist and redoes the others."""
    path = tmp_path / "out.zarr"
    writer, catalogue, jobs, base, checksums = _run(path)
    state = Ledger(path).read()
    assert state.chunks == checksums
    assert state.verified_jobs(path) == {j.job_id for j in jobs}
    assert sorted(state.chunk_rows) == list(range(7))
    for k, (status, geometry) in checksums.rows.items():
        np.testing.assert_array_equal(state.chunk_rows[k][0], status)
        np.testing.assert_array_equal(state.chunk_rows[k][1], geometry)
    # lose chunk 2's file, corrupt chunk 4's data, and lose the rows of
    # chunk 5's record (the store holds them only at the end)
    os.remove(writer._chunk_file("images", 2))
    zarr.open_group(path)["images"][24] = 123.0
    rows = {k: v for k, v in state.chunk_rows.items() if k != 5}
    reopened = ZarrWriter.open(path)
    assert reopened.verified_chunks(state.chunks, rows=rows) == set(range(7)) - {2, 5}
    assert reopened.verified_chunks(state.chunks, rows=rows, deep=True) == (
        set(range(7)) - {2, 4, 5}
    )
    rows[0] = (rows[0][0], rows[0][1] + 1)  # recorded rows that do not match
    assert 0 not in reopened.verified_chunks(state.chunks, rows=rows, deep=True)
    redo = reopened.write_chunks([2, 4, 5], _mapping(40, jobs), base)
    assert redo == {2: checksums[2], 4: checksums[4], 5: checksums[5]}
    counts = reopened.finalize(state.chunks, rows={**state.chunk_rows, **redo.rows})
    assert sum(counts.values()) == 40
    assert verify_output(path) == []


def test_finalize_requires_every_chunk(tmp_path):
    """Test that finalize refuses a store with unwritten chunks."""
    path = tmp_path / "out.zarr"
    writer, *_, checksums = _run(path, chunk_order=[0, 1, 2])
    # every row reads as pending until the run ends and stores them
    stored = np.asarray(zarr.open_group(str(path), mode="r")["status"][:])
    np.testing.assert_array_equal(writer.read_status(), stored)
    assert (stored == Status.PENDING).all()
    with pytest.raises(ValueError, match="4 of 7 chunks have no checksum"):
        writer.finalize(checksums)
    all_sums = {**checksums, **{k: "00000000" for k in range(3, 7)}}
    with pytest.raises(ValueError, match="4 of 7 chunks have no row status"):
        writer.finalize(all_sums, rows=checksums.rows)
    with pytest.raises(ValueError, match="40 rows are still pending"):
        writer.finalize(all_sums)  # rows neither given nor stored
    status, geometry = np.zeros(40, np.int16), np.zeros((40, 5), np.int64)
    status[7] = Status.PENDING
    with pytest.raises(ValueError, match=r"1 rows are still pending \(first: row 7\)"):
        writer.write_rows(status, geometry)
    status[7] = 99
    with pytest.raises(ValueError, match="row 7 has unknown status 99"):
        writer.write_rows(status, geometry)
    with pytest.raises(ValueError, match=r"shapes \(40,\) and \(40, 5\)"):
        writer.write_rows(status[:5], geometry)
    problems = verify_output(path)
    assert any("pending" in p for p in problems)
    assert any("not been finalised" in p for p in problems)


def test_verify_detects_damage(tmp_path):
    """Test that verify reports missing and corrupted chunks and bad statuses."""
    path = tmp_path / "out.zarr"
    writer, *_, checksums = _run(path)
    writer.finalize(checksums)
    remove_run_state(path)
    assert verify_output(path) == []
    os.remove(writer._chunk_file("images", 1))
    chunk3 = writer._chunk_file("images", 3)
    with open(chunk3, "r+b") as fh:
        data = bytearray(fh.read())
        data[len(data) // 2] ^= 0xFF
        fh.seek(0)
        fh.write(data)
    zarr.open_group(path)["status"][0] = 42
    problems = verify_output(path)
    text = "\n".join(problems)
    assert "1 chunks are missing from the store, e.g. chunks 1" in text
    assert "unknown status code, e.g. rows 0" in text
    assert "do not match their checksum" in text and "3" in text
    assert verify_output(tmp_path / "nothing") != []


def test_wcs_matches_astropy_cutout2d(tmp_path):
    """Test that open(...).wcs(i) equals astropy Cutout2D's WCS, edges included."""
    rng = np.random.default_rng(3)
    data = rng.normal(size=(80, 100)).astype(np.float32)
    wcs = _tile_wcs()
    positions = [(50.2, 40.7), (3.4, 77.9), (97.0, 2.2), (20.5, 20.5)]
    size = (5, 4)
    images, origin = [], []
    for pos in positions:
        c = AstropyCutout2D(data, pos, size, wcs=wcs, mode="partial", fill_value=0)
        images.append(c.data)
        origin.append(
            (
                c.slices_original[1].start - c.slices_cutout[1].start,
                c.slices_original[0].start - c.slices_cutout[0].start,
            )
        )
    n = len(positions)
    path = tmp_path / "out.zarr"
    writer = ZarrWriter.create(
        path,
        n_rows=n,
        bands=["vis"],
        out_shape=size,
        dtype="float32",
        source_id=[f"s{i}" for i in range(n)],
        ra=np.zeros(n),
        dec=np.zeros(n),
        tiles=[
            {"key": "t0", "paths": ["/x/t0.fits"], "header": wcs.to_header().tostring()}
        ],
        chunk_rows=3,
    )
    job = JobResult(
        job_id=0,
        rows=np.arange(n),
        images=np.stack(images)[:, None],
        status=np.array([0, 1, 1, 0], dtype=np.int16),
        tile=0,
        origin=np.array(origin),
        box_shape=np.tile(size, (n, 1)),
    )
    stage_job(path, job)
    checksums = writer.write_chunks(
        range(writer.n_chunks),
        (np.zeros(n, int), np.arange(n)),
        np.full(n, -1, np.int16),
    )
    writer.finalize(checksums)
    out = open_output(path)
    pix = np.array([[0, 0], [3, 4], [1.5, 2.25], [-1, 7]], dtype=float)
    for i, pos in enumerate(positions):
        ref = AstropyCutout2D(data, pos, size, wcs=wcs, mode="partial", fill_value=0)
        np.testing.assert_array_equal(out[i][0], ref.data)
        got = out.wcs(i).pixel_to_world(pix[:, 0], pix[:, 1])
        exp = ref.wcs.pixel_to_world(pix[:, 0], pix[:, 1])
        np.testing.assert_allclose(got.ra.deg, exp.ra.deg, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got.dec.deg, exp.dec.deg, rtol=0, atol=1e-12)


def test_wcs_of_row_without_cutout(tmp_path):
    """Test that asking for the WCS of a row without a cutout names its status."""
    path = tmp_path / "out.zarr"
    writer, _, jobs, base, checksums = _run(path)
    writer.finalize(checksums)
    out = open_output(path)
    row = int(np.flatnonzero(out.tile < 0)[0])
    with pytest.raises(ValueError, match=f"row {row} has no cutout"):
        out.wcs(row)
    with_tile = int(np.flatnonzero(out.tile >= 0)[0])
    assert out.wcs(with_tile).pixel_shape == OUT_SHAPE[::-1]
    with pytest.raises(IndexError, match="out of range"):
        out[40]


def test_chunk_without_cutouts_is_stored(tmp_path):
    """Test that a chunk equal to the fill values still gets its files and verifies."""
    path = tmp_path / "out.zarr"
    n = 5
    writer = ZarrWriter.create(
        path,
        n_rows=n,
        bands=["g"],
        out_shape=(3, 3),
        dtype="uint8",
        source_id=["a", "b", "c", "d", "e"],
        ra=np.zeros(n),
        dec=np.zeros(n),
        chunk_rows=2,
    )
    reopened = ZarrWriter.open(path)  # as a worker would
    base = np.array([3, 2, 3, 3, 2], dtype=np.int16)
    no_jobs = (np.full(n, -1), np.zeros(n, int))
    checksums = reopened.write_chunks(range(3), no_jobs, base)
    assert all(reopened.chunk_exists(k) for k in range(3))
    counts = writer.finalize(checksums)
    assert counts["BAD_ROW"] == 3 and counts["NO_OVERLAP"] == 2
    assert verify_output(path) == []


def test_leftovers_of_killed_writes_removed(tmp_path):
    """Test that temporary files of killed chunk writes do not stay in the store."""
    path = tmp_path / "out.zarr"
    writer, _, jobs, base, checksums = _run(path)
    leftovers = [
        os.path.join(
            os.path.dirname(writer._chunk_file("images", 1)), "0.ab12.partial"
        ),
        os.path.join(
            os.path.dirname(writer._chunk_file("geometry", 1)), "0.cd34.partial"
        ),
        os.path.join(
            os.path.dirname(writer._chunk_file("status", 1)), "1.ef56.partial"
        ),
        os.path.join(path, "zarr.json.0123.partial"),
        # a store of an older cutana has nested chunk folders (c/1/0/0/0)
        os.path.join(path, "images", "c", "1", "0", "0", "0.ab12.partial"),
    ]
    for leftover in leftovers:
        os.makedirs(os.path.dirname(leftover), exist_ok=True)
        with open(leftover, "wb") as fh:
            fh.write(b"half a chunk")
    writer.write_chunks([1], _mapping(40, jobs), base)  # the redone chunk
    writer.finalize(checksums)
    assert not any(os.path.exists(p) for p in leftovers)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_direct_chunk_encoding_equals_zarr(tmp_path, dtype):
    """Test that images chunks written directly are the bytes zarr itself writes."""
    import zarr as _zarr

    from cutana.io.zarr import ZarrWriter as _Writer

    rng = np.random.default_rng(7)
    n = 23
    w = _Writer.create(
        tmp_path / "a.zarr", n_rows=n, bands=["x", "y"], out_shape=(9, 7), dtype=dtype,
        source_id=[str(i) for i in range(n)], ra=np.zeros(n), dec=np.zeros(n),
        chunk_rows=5,
    )
    _old_layout(tmp_path / "a.zarr", 3)  # where status is written per chunk
    w = _Writer.open(tmp_path / "a.zarr")
    images = (rng.random((n, 2, 9, 7)) * 200).astype(dtype)
    status = rng.integers(0, 4, n).astype(np.int16)
    with FileSeries() as files:
        assert w._write_direct("images", list(range(w.n_chunks)), 0, images, files)
        assert w._write_direct("status", list(range(w.n_chunks)), 0, status, files)
    ref = _zarr.open_array(tmp_path / "a.zarr" / "images", mode="r")
    np.testing.assert_array_equal(ref[:], images)
    other = _zarr.create_array(
        tmp_path / "b.zarr", shape=ref.shape, chunks=ref.chunks, dtype=ref.dtype,
        compressors=ref.compressors, fill_value=0, overwrite=True,
    )
    other[:] = images
    sref = _zarr.open_array(tmp_path / "a.zarr" / "status", mode="r")
    np.testing.assert_array_equal(sref[:], status)
    sother = _zarr.create_array(
        tmp_path / "s.zarr", shape=sref.shape, chunks=sref.chunks, dtype=sref.dtype,
        compressors=None, fill_value=-1, overwrite=True,
    )
    sother[:] = status
    for k in range(w.n_chunks):
        # the store's keys are flat (c.k.0.0.0), zarr's default nested (c/k/0/0/0)
        key = ref.metadata.encode_chunk_key((k, 0, 0, 0))
        assert key == f"c.{k}.0.0.0"
        a = (tmp_path / "a.zarr" / "images" / key).read_bytes()
        b_key = other.metadata.encode_chunk_key((k, 0, 0, 0))
        b = (tmp_path / "b.zarr" / b_key).read_bytes()
        assert a == b
        key = sref.metadata.encode_chunk_key((k,))
        s_key = sother.metadata.encode_chunk_key((k,))
        assert (tmp_path / "a.zarr" / "status" / key).read_bytes() == (
            tmp_path / "s.zarr" / s_key
        ).read_bytes()


def _numcodecs_one_thread(monkeypatch, **settings):
    """numcodecs' Blosc of ``settings``, compressing in one thread (as
    `ZarrWriter._write_direct` has it)."""
    import numcodecs.blosc
    from numcodecs import Blosc

    monkeypatch.setattr(numcodecs.blosc, "use_threads", False)
    return Blosc(**settings)


@pytest.mark.parametrize("cname", ["lz4", "zstd"])
@pytest.mark.parametrize("shuffle", [0, 1, 2])
def test_blosc_encoder_bytes_equal_numcodecs(monkeypatch, cname, shuffle):
    """Test that the chunk encoder gives numcodecs' bytes (what zarr writes),
    decoded by numcodecs to the input: every shuffle, 1-, 2- and 4-byte
    values, one-byte to many-block buffers, and two threads encoding at once
    (python-blosc's own threads would reorder a buffer's blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    from cutana.io.zarr import _blosc_encoder

    rng = np.random.default_rng(11)
    arrays = [np.arange(1, dtype=np.uint8)]
    for dtype in ("uint8", "uint16", "float32"):
        for n in (1000, 3 * 1024 * 1024 + 5):  # one block; ~50 blocks
            sky = rng.normal(40, 9, n).clip(0, 255)  # noise over a flat level
            arrays.append(sky.astype(dtype))
    for a in arrays:
        settings = dict(cname=cname, clevel=1, shuffle=shuffle, blocksize=0,
                        typesize=a.dtype.itemsize)
        numcodecs_blosc = _numcodecs_one_thread(monkeypatch, **settings)
        ours = _blosc_encoder(**settings).encode(a)
        assert bytes(ours) == bytes(numcodecs_blosc.encode(a)), (a.dtype, a.size)
        decoded = np.frombuffer(numcodecs_blosc.decode(ours), dtype=a.dtype)
        np.testing.assert_array_equal(decoded, a)
    big = arrays[-1]
    encoder = _blosc_encoder(cname, 1, shuffle, 0, 4)
    with ThreadPoolExecutor(2) as pool:
        out = list(pool.map(encoder.encode, [big] * 8))
    assert {bytes(o) for o in out} == {bytes(encoder.encode(big))}


def test_blosc_encoder_choice(monkeypatch):
    """Test that python-blosc encodes where it gives numcodecs' bytes, and
    numcodecs otherwise: without python-blosc, with a block size set, with
    another C-Blosc version."""
    import sys

    from numcodecs import Blosc

    from cutana.io.zarr import _blosc_encoder, _PyBlosc

    blosc = pytest.importorskip("blosc")
    import numcodecs.blosc

    if blosc.blosclib_version.split()[0] != numcodecs.blosc.VERSION_STRING:
        pytest.skip("python-blosc and numcodecs have different C-Blosc versions")
    assert isinstance(_blosc_encoder("lz4", 1, 2, 0, 1), _PyBlosc)
    # (the encoder set one thread of Blosc's own, and the GIL released)
    assert blosc.set_nthreads(1) == 1
    assert blosc.set_releasegil(True) == 1
    assert isinstance(_blosc_encoder("lz4", 1, 2, 65536, 1), Blosc)
    monkeypatch.setattr(blosc, "blosclib_version", "1.0.0 ($Date:: 2010 #$)")
    assert isinstance(_blosc_encoder("lz4", 1, 2, 0, 1), Blosc)
    monkeypatch.setitem(sys.modules, "blosc", None)  # not installed
    assert isinstance(_blosc_encoder("lz4", 1, 2, 0, 1), Blosc)


def test_format_3_checksums_are_crc32c(tmp_path):
    """New stores record CRC-32C of each chunk's bytes; verify catches a changed
    chunk."""
    import google_crc32c

    path = tmp_path / "v3.zarr"
    n = 40
    catalogue, jobs, base = _fake_run(n=n)
    writer = ZarrWriter.create(
        path, n_rows=n, bands=BANDS, out_shape=OUT_SHAPE, dtype="float32",
        config={"size": 5, "resample": "none"}, tiles=_tiles(), chunk_rows=6,
        **catalogue,
    )
    assert writer.checksum == "crc32c"
    for job in jobs:
        stage_job(path, job)
    checksums = writer.write_chunks(range(writer.n_chunks), _mapping(n, jobs), base)
    writer.finalize(checksums)
    remove_run_state(path)
    images, status, tile, origin, box = _expected(n, jobs, base, "float32")
    stored = zarr.open_group(path, mode="r")
    assert "chunk_sha256" not in stored
    digests = stored["chunk_crc32c"][:]
    assert digests.shape == (writer.n_chunks, 4)
    for k in range(writer.n_chunks):
        sl = slice(6 * k, 6 * k + 6)
        data = b"".join(np.ascontiguousarray(p).tobytes() for p in (
            images[sl], status[sl].astype("<i2"), tile[sl].astype("<i4"), origin[sl],
            box[sl].astype("<i4")))
        assert (bytes(digests[k]).hex() == f"{google_crc32c.value(data):08x}"
                == checksums[k])
    assert verify_output(path) == []
    # a chunk rewritten with other values no longer matches its checksum
    arr = zarr.open_array(path / "images", mode="r+")
    arr[0:6] = arr[0:6] + 1
    problems = verify_output(path)
    assert any("1 chunks do not match their checksum, e.g. chunks 0" in p
               for p in problems), problems


def test_closing_a_file_series_whose_writer_never_started():
    """Closing a series whose writer thread was made but never started (a
    Ctrl-C between the two) returns without error (it raised RuntimeError,
    which took the interrupt's place)."""
    import threading

    from cutana.io._writeback import FileSeries

    series = FileSeries(direct=True)
    series._thread = threading.Thread(target=lambda: None)
    series.close()
    assert series._thread is None


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_patch_chunks_replaces_some_rows_and_keeps_the_others(tmp_path, version):
    """Test that `ZarrWriter.patch_chunks` rewrites a finished store's chunks
    with the rows of newly staged jobs (their tile numbers mapped to the
    store's by `start_repair`) and new statuses for rows without a cutout,
    keeps every other row byte for byte, and that the store verifies once
    finalised with the stored checksums of the other chunks (every format)."""
    path = tmp_path / "out.zarr"
    n = 40
    catalogue, jobs, base = _fake_run(n=n)
    writer = ZarrWriter.create(
        path, n_rows=n, bands=BANDS, out_shape=OUT_SHAPE, dtype="float32",
        config={"size": 5}, tiles=_tiles(), chunk_rows=6, **catalogue,
    )
    if version != 4:
        _old_layout(path, version)
        writer = ZarrWriter.open(path)
    for job in jobs:
        stage_job(path, job)
    written = writer.write_chunks(range(writer.n_chunks), _mapping(n, jobs), base)
    writer.finalize(written)
    remove_run_state(path)
    images, status, tile, origin, box = _expected(n, jobs, base, "float32")

    # the new run's index: the store's tiles 2, 0 and a new one
    records = [_tiles()[2], _tiles()[0], {**_tiles()[1], "key": "new"}]
    writer = ZarrWriter.open(path)
    tile_map = writer.start_repair(records)
    assert tile_map.tolist() == [2, 0, 3]
    assert writer.attrs["complete"] is False and writer.attrs["repairing"] is True
    rng = np.random.default_rng(7)
    redo = [np.array([2, 3, 9]), np.array([10, 30])]
    new_jobs = []
    for job_id, rows in enumerate(redo):
        m = len(rows)
        new_jobs.append(JobResult(
            job_id=job_id, rows=rows, tile=2 - job_id,
            images=rng.normal(size=(m, len(BANDS), *OUT_SHAPE)).astype("float32"),
            status=np.full(m, Status.OK, np.int16),
            origin=rng.integers(0, 50, size=(m, 2)), box_shape=np.full((m, 2), 5),
        ))
        stage_job(path, new_jobs[-1])
    kept = status.copy()
    settled = int(np.flatnonzero((tile < 0) & (status == Status.NO_OVERLAP))[0])
    kept[settled] = Status.TILE_ERROR  # a row without a cutout gets another status
    for job in new_jobs:
        images[job.rows] = job.images
        status[job.rows] = job.status
        tile[job.rows] = tile_map[job.tile]
        origin[job.rows] = job.origin
        box[job.rows] = job.box_shape
    status[settled] = Status.TILE_ERROR
    chunks = sorted({int(r) // 6 for r in np.r_[redo[0], redo[1], settled]})
    before = _tree(path)
    with pytest.raises(ValueError, match="without a cutout"):
        wrong = kept.copy()
        wrong[settled] = Status.OK
        writer.patch_chunks(chunks, _mapping(n, new_jobs), wrong, tile_map=tile_map)
    mapping = _mapping(n, new_jobs)
    patched = writer.patch_chunks(chunks, mapping, kept, tile_map=tile_map)
    assert sorted(patched) == chunks
    after = _tree(path)
    untouched = [k for k in range(writer.n_chunks) if k not in chunks]
    for k in untouched:
        name = os.path.relpath(writer._chunk_file("images", k), path)
        assert after[name] == before[name]

    checksums = writer.stored_checksums()
    assert len(checksums) == writer.n_chunks
    checksums.update(patched)
    if version == 4:
        _, geometry = writer.stored_rows()
        for k, (rows_status, rows_geometry) in patched.rows.items():
            geometry[6 * k : 6 * k + len(rows_status)] = rows_geometry
        writer.write_rows(status, geometry)
    writer.finalize(checksums)
    assert "repairing" not in zarr.open_group(path, mode="r").attrs
    out = open_output(path)
    np.testing.assert_array_equal(out.images[:], images)
    np.testing.assert_array_equal(out.status, status)
    np.testing.assert_array_equal(out.tile, tile)
    np.testing.assert_array_equal(out.origin, origin)
    assert verify_output(path) == []


_STOPPED_WORKER = """
import multiprocessing, os, signal, sys
import numpy as np

def work(path):
    from numcodecs import Blosc
    from cutana.io.zarr import ZarrWriter

    ZarrWriter.open(path)  # as a worker does before it writes chunks
    Blosc(cname="lz4", clevel=1, shuffle=Blosc.BITSHUFFLE).encode(
        np.arange(4096, dtype=np.uint8))
    os.kill(os.getpid(), signal.SIGKILL)  # stopped before its clean-up

if __name__ == "__main__":
    proc = multiprocessing.get_context("forkserver").Process(
        target=work, args=(sys.argv[1],))
    proc.start()
    proc.join()
    print(proc.exitcode)
"""


def test_a_worker_stopped_after_compressing_leaves_no_semaphore(tmp_path):
    """Test that a worker process that opened a store and compressed a chunk
    leaves nothing to multiprocessing's resource tracker when it is killed:
    numcodecs' Blosc made a named semaphore on its first use, and a run
    stopped (Ctrl-C, SIGTERM) while its workers were in long jobs printed a
    warning about leaked semaphore objects."""
    import subprocess
    import sys

    import cutana

    writer, *_ = _run(tmp_path / "out.zarr")
    script = tmp_path / "stopped_worker.py"
    script.write_text(_STOPPED_WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cutana.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run(
        [sys.executable, str(script), writer.path], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(-9)]  # killed, as a terminated worker
    assert "leaked" not in done.stderr, done.stderr
