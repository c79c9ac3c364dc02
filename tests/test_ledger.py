# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the completion ledger `cutana.io.Ledger`."""

import json
import logging
import os

import numpy as np
import pytest

from cutana.io import JobResult, Ledger, StagedJob, stage_job


def _job(job_id, rows):
    """A tiny seeded job result."""
    rng = np.random.default_rng(job_id)
    n = len(rows)
    return JobResult(
        job_id=job_id,
        rows=np.asarray(rows, dtype=np.int64),
        images=rng.normal(size=(n, 1, 3, 3)).astype(np.float32),
        status=np.zeros(n, np.int16),
        tile=0,
        origin=np.zeros((n, 2), np.int64),
        box_shape=np.full((n, 2), 3),
    )


def _filled_ledger(out):
    with Ledger(out) as ledger:
        ledger.run_started("plan-1", resume=False)
        ledger.job_staged(StagedJob(job_id=0, n=3, checksum="aa", path="x"))
        ledger.job_staged(StagedJob(job_id=1, n=2, checksum="bb", path="y"))
        ledger.chunks_written({1: "c1", 0: "c0"})
    return ledger.path


def test_records_round_trip(tmp_path):
    """Test that staged jobs, written chunks and runs are read back."""
    path = _filled_ledger(tmp_path)
    assert path == os.path.join(tmp_path, ".cutana", "ledger.jsonl")
    state = Ledger(tmp_path).read()
    assert state.fingerprint == "plan-1"
    assert state.jobs == {0: {"checksum": "aa", "n": 3}, 1: {"checksum": "bb", "n": 2}}
    assert state.chunks == {0: "c0", 1: "c1"}
    assert state.n_records == 5
    assert not state.finished and not state.truncated
    with Ledger(tmp_path) as ledger:
        ledger.run_finished("plan-1", report={"seconds": 1.5})
    state = Ledger(tmp_path).read()
    assert state.finished
    assert state.report == {"seconds": 1.5}
    # every line is one JSON object
    with open(path) as fh:
        events = [json.loads(line)["event"] for line in fh]
    assert events == [
        "run_started",
        "job_staged",
        "job_staged",
        "chunk_written",
        "chunk_written",
        "run_finished",
    ]


def test_chunks_of_a_task_are_flushed_to_disk_once(tmp_path, monkeypatch):
    """A task's chunk records go to disk with one ``fsync``, each a line of its own."""
    with Ledger(tmp_path) as ledger:
        ledger.run_started("plan-1")
        calls = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real_fsync(fd))
        ledger.chunks_written({k: f"c{k}" for k in (4, 2, 3, 0, 1)})
        ledger.chunks_written({})  # nothing to record: no write, no flush
    assert len(calls) == 1
    state = Ledger(tmp_path).read()
    assert state.chunks == {k: f"c{k}" for k in range(5)}
    assert state.n_records == 6
    with open(ledger.path) as fh:
        chunks = [json.loads(line).get("chunk") for line in fh]
    assert chunks == [None, 0, 1, 2, 3, 4]


def test_a_worker_appends_chunk_records_unflushed_and_repairs_nothing(
    tmp_path, monkeypatch
):
    """A worker's ledger appends its chunk records without ``fsync`` (the
    parent flushes them, `Ledger.sync`), beside the parent's, and never cuts
    a last line short (the parent may be writing it): only the parent's
    opening repairs it."""
    parent = Ledger(tmp_path)
    parent.run_started("plan-1")
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real_fsync(fd))
    with Ledger(tmp_path, worker=True) as worker:
        worker.chunks_written({3: "c3"}, sync=False)
        with open(parent.path, "ab") as fh:
            fh.write(b'{"event": "chunk_wri')  # a line being written
        worker.chunks_written({4: "c4"}, sync=False)
    assert calls == []
    parent.sync()
    assert len(calls) == 1
    with open(parent.path, "rb") as fh:
        assert b'{"event": "chunk_wri{' in fh.read()  # (left as it was)
    state = Ledger(tmp_path).read()
    assert state.chunks == {3: "c3"} and state.skipped == [3]
    parent.close()


def test_chunk_records_keep_row_status_and_geometry(tmp_path, caplog):
    """Test that a chunk record keeps its rows' status and geometry exactly,
    that a record whose rows cannot be decoded is skipped (its chunk is then
    written again), and that a later record of the chunk replaces them."""
    rng = np.random.default_rng(5)
    status = rng.integers(0, 5, 186).astype(np.int16)
    geometry = rng.integers(-(2**40), 2**40, (186, 5))
    with Ledger(tmp_path) as ledger:
        ledger.run_started("plan-1")
        ledger.chunks_written({3: "c3", 4: "c4"}, rows={3: (status, geometry)})
    state = Ledger(tmp_path).read()
    assert state.chunks == {3: "c3", 4: "c4"}
    assert sorted(state.chunk_rows) == [3]  # chunk 4 was recorded without
    got_status, got_geometry = state.chunk_rows[3]
    assert got_status.dtype == np.int16 and got_geometry.dtype == np.int64
    np.testing.assert_array_equal(got_status, status)
    np.testing.assert_array_equal(got_geometry, geometry)
    # damage the rows of chunk 3's record: the line is skipped, not trusted
    path = os.path.join(tmp_path, ".cutana", "ledger.jsonl")
    with open(path) as fh:
        lines = fh.readlines()
    record = json.loads(lines[1])
    assert record["chunk"] == 3
    record["rows"] = record["rows"][:-8] + "AAAAAAA="
    lines[1] = json.dumps(record) + "\n"
    with open(path, "w") as fh:
        fh.writelines(lines)
    with caplog.at_level(logging.WARNING, logger="cutana.io.ledger"):
        state = Ledger(tmp_path).read()
    assert state.chunks == {4: "c4"} and state.chunk_rows == {}
    assert state.skipped == [2]
    assert "unreadable row status and geometry" in caplog.text
    # a later record of the same chunk without rows drops earlier ones
    with Ledger(tmp_path) as ledger:
        ledger.chunks_written({4: "d4"}, rows={4: (status, geometry)})
        ledger.chunks_written({4: "e4"})
    state = Ledger(tmp_path).read()
    assert state.chunks == {4: "e4"} and state.chunk_rows == {}


def test_missing_ledger_is_empty(tmp_path):
    """Test that reading a ledger that does not exist gives an empty state."""
    state = Ledger(tmp_path / "nothing").read()
    assert state.jobs == {} and state.chunks == {} and state.fingerprint is None


@pytest.mark.parametrize("cut", [2, 10, 25])
def test_truncated_last_line_tolerated(tmp_path, cut):
    """Test that a last record cut short is ignored, then repaired on append."""
    path = _filled_ledger(tmp_path)
    with Ledger(tmp_path) as ledger:
        ledger.chunk_written(2, "c2")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(size - cut)
    state = Ledger(tmp_path).read()
    assert state.truncated
    assert state.chunks == {0: "c0", 1: "c1"}
    assert state.skipped == []
    # the next writer cuts the broken line off before appending
    with Ledger(tmp_path) as ledger:
        ledger.chunk_written(3, "c3")
    state = Ledger(tmp_path).read()
    assert not state.truncated
    assert state.chunks == {0: "c0", 1: "c1", 3: "c3"}
    with open(path, "rb") as fh:
        for line in fh:
            json.loads(line)


def test_record_without_newline_is_kept(tmp_path):
    """Test that a complete record whose newline was lost still counts."""
    path = _filled_ledger(tmp_path)
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 1)
    state = Ledger(tmp_path).read()
    assert state.chunks == {0: "c0", 1: "c1"}
    assert state.truncated
    with Ledger(tmp_path) as ledger:
        ledger.chunk_written(2, "c2")
    state = Ledger(tmp_path).read()
    assert state.chunks == {0: "c0", 1: "c1", 2: "c2"}
    assert not state.truncated


def test_corrupt_middle_line_skipped(tmp_path, caplog):
    """Test that an unreadable line inside the ledger is skipped and logged."""
    path = _filled_ledger(tmp_path)
    with open(path, "rb") as fh:
        lines = fh.readlines()
    lines[1] = b'{"event": "job_st\x00\xff\n'
    with open(path, "wb") as fh:
        fh.writelines(lines)
    with caplog.at_level(logging.WARNING, logger="cutana.io.ledger"):
        state = Ledger(tmp_path).read()
    assert state.skipped == [2]
    assert state.jobs == {1: {"checksum": "bb", "n": 2}}  # job 0 will be redone
    assert "line 2 is unreadable" in caplog.text


def test_new_run_resets_finished(tmp_path):
    """Test that a later run_started gives an unfinished run with its fingerprint."""
    with Ledger(tmp_path) as ledger:
        ledger.run_started("a")
        ledger.run_finished("a")
        ledger.run_started("b", resume=True)
    state = Ledger(tmp_path).read()
    assert state.runs == ["a", "b"]
    assert state.fingerprint == "b"
    assert not state.finished


def test_append_requires_event(tmp_path):
    """Test that a record without an event is refused."""
    with (
        Ledger(tmp_path) as ledger,
        pytest.raises(ValueError, match="needs an 'event' key"),
    ):
        ledger.append({"job_id": 3})


def test_verified_jobs(tmp_path):
    """Test that only recorded jobs whose staged files match are trusted."""
    with Ledger(tmp_path) as ledger:
        ledger.run_started("p")
        for job_id in range(3):
            ledger.job_staged(
                stage_job(tmp_path, _job(job_id, [job_id * 2, job_id * 2 + 1]))
            )
    stage_job(
        tmp_path, _job(3, [7])
    )  # staged, but its receipt never reached the ledger
    staged1 = os.path.join(tmp_path, ".cutana", "staging", "job-000001", "status.npy")
    with open(staged1, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x07")
    os.remove(os.path.join(tmp_path, ".cutana", "staging", "job-000002", "images.npy"))
    state = Ledger(tmp_path).read()
    assert state.verified_jobs(tmp_path) == {0}
    assert state.verified_jobs(tmp_path, job_ids=[0, 3]) == {0}
