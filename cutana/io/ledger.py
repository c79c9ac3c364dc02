# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
The completion ledger of a run.

``OUT/.cutana/ledger.jsonl`` is an append-only file of JSON records, one a
line, written only by the parent process and flushed to disk after every
record. It says which jobs are staged and which output chunks are written,
with their checksums, so that a resumed run redoes only what is missing.

A crash can cut the last line short; readers ignore such a line and the
next writer cuts it off before appending. A resumed run trusts a record only
if the staged files or chunks it names still exist and match its checksum
(`LedgerState.verified_jobs`, `cutana.io.ZarrWriter.verified_chunks`).
"""

import base64
import datetime
import json
import logging
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from .staging import state_dir, verify_staged

__all__ = ["Ledger", "LedgerState"]

logger = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"


@dataclass
class LedgerState:
    """What a ledger says about a run.

    Parameters
    ----------
    fingerprint : str or None
        Plan fingerprint of the latest ``run_started`` record.
    runs : list of str
        Fingerprints of every ``run_started`` record, oldest first.
    jobs : dict
        Job id (int) to ``{"checksum": str, "n": int}`` of staged jobs; a
        later record for the same job replaces an earlier one.
    chunks : dict
        Chunk index (int) to checksum (str) of written chunks.
    chunk_rows : dict
        Chunk index (int) to the ``(status, geometry)`` arrays of its rows,
        for the written chunks whose record holds them (stores of format 4
        keep them only here until the run ends).
    finished : bool
        Whether the latest run recorded ``run_finished``.
    report : dict or None
        The report of the latest ``run_finished`` record.
    n_records : int
        Number of records read.
    truncated : bool
        Whether the last line was cut short (and ignored).
    skipped : list of int
        1-based numbers of other unreadable lines (ignored; their jobs or
        chunks are simply redone).

    Examples
    --------
    >>> import tempfile
    >>> from cutana.io import Ledger, StagedJob
    >>> out = tempfile.mkdtemp()
    >>> with Ledger(out) as ledger:
    ...     ledger.run_started("plan-1")
    ...     ledger.job_staged(StagedJob(job_id=0, n=3, checksum="ab", path=""))
    ...     ledger.chunks_written({0: "cd", 1: "ef"})
    ...     ledger.run_finished("plan-1", report={"rows": 3})
    >>> state = Ledger(out).read()
    >>> state.fingerprint, state.jobs, state.chunks
    ('plan-1', {0: {'checksum': 'ab', 'n': 3}}, {0: 'cd', 1: 'ef'})
    >>> state.finished, state.report, state.n_records, state.truncated
    (True, {'rows': 3}, 5, False)
    >>> state.verified_jobs(out)  # the receipt names no staged files
    set()
    """

    fingerprint: str | None = None
    runs: list = field(default_factory=list)
    jobs: dict = field(default_factory=dict)
    chunks: dict = field(default_factory=dict)
    chunk_rows: dict = field(default_factory=dict)
    finished: bool = False
    report: dict | None = None
    n_records: int = 0
    truncated: bool = False
    skipped: list = field(default_factory=list)

    def verified_jobs(self, out_dir, job_ids=None):
        """Return the recorded jobs whose staged files exist and match.

        Parameters
        ----------
        out_dir : str or path-like
            The output folder.
        job_ids : iterable of int, optional
            Check only these jobs (e.g. those still needed by unwritten
            chunks); by default every recorded job. Jobs not recorded are
            never returned.

        Returns
        -------
        job_ids : set of int
            Jobs that need not be redone.
        """
        wanted = self.jobs.keys() if job_ids is None else (int(j) for j in job_ids)
        ok = set()
        for job_id in wanted:
            record = self.jobs.get(job_id)
            if record is not None and verify_staged(
                out_dir, job_id, record["checksum"]
            ):
                ok.add(job_id)
        return ok


class Ledger:
    """Append-only completion ledger ``OUT/.cutana/ledger.jsonl``.

    The parent process writes it; a worker of the same machine may append
    the records of the chunks it writes as it goes (``worker=True``).
    Every record is one line of JSON, written with a single ``write`` call
    (appends of one call each do not interleave) and flushed to disk
    (``fsync``) before the method returns, unless asked not to.

    Parameters
    ----------
    out_dir : str or path-like
        The output folder; ``OUT/.cutana`` is created on the first write.
    worker : bool, optional
        Opened by a worker: a last line cut short is not repaired here (the
        parent may be writing it), and nothing is created.

    Examples
    --------
    >>> import tempfile
    >>> from cutana.io import Ledger
    >>> with tempfile.TemporaryDirectory() as out:
    ...     with Ledger(out) as ledger:
    ...         ledger.run_started("abc")
    ...         ledger.chunk_written(0, "00ff")
    ...     Ledger(out).read().chunks
    {0: '00ff'}
    """

    def __init__(self, out_dir, *, worker=False):
        self.out_dir = os.fspath(out_dir)
        self.path = os.path.join(state_dir(self.out_dir), LEDGER_NAME)
        self._fd = None
        self._worker = worker

    # -- writing -----------------------------------------------------------

    def _open(self):
        if self._fd is not None:
            return
        if self._worker:  # (the parent made it, and repairs it)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._repair()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair(self):
        """Cut off a last line left incomplete by a crash."""
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.path, "r+b") as fh:
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            # find the last complete line
            pos = size
            keep = 0
            while pos > 0:
                step = min(pos, 1 << 16)
                pos -= step
                fh.seek(pos)
                block = fh.read(step)
                idx = block.rfind(b"\n")
                if idx >= 0:
                    keep = pos + idx + 1
                    break
            fh.seek(keep)
            tail = fh.read()
            if _parses(tail):
                # a whole record that only lost its newline: complete it
                fh.seek(size)
                fh.write(b"\n")
            else:
                logger.warning(
                    "ledger %s: removing an incomplete last record (%d bytes)",
                    self.path,
                    size - keep,
                )
                fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())

    def append(self, record):
        """Append one record and flush it to disk.

        Parameters
        ----------
        record : dict
            A JSON-serialisable record with an ``"event"`` key.
        """
        self._append([record])

    def _append(self, records, sync=True):
        """Append records with one write, then flush them to disk once
        (unless not ``sync``)."""
        for record in records:
            if "event" not in record:
                msg = f"a ledger record needs an 'event' key, got {record!r}"
                raise ValueError(msg)
        if not records:
            return
        self._open()
        data = "".join(
            json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
            + "\n"
            for record in records
        ).encode("ascii")
        written = os.write(self._fd, data)
        if written != len(data):  # pragma: no cover - only on a full disk
            msg = f"short write to ledger {self.path} ({written} of {len(data)} bytes)"
            raise OSError(msg)
        if sync:
            os.fsync(self._fd)

    def run_started(self, fingerprint, **info):
        """Record the start (or resumption) of a run.

        Parameters
        ----------
        fingerprint : str
            Fingerprint of the plan; a resume must use the same plan.
        **info
            Further JSON-serialisable fields (e.g. ``resume=True``).
        """
        self.append(
            {
                "event": "run_started",
                "fingerprint": str(fingerprint),
                "time": _now(),
                **info,
            }
        )

    def job_staged(self, staged):
        """Record a staged job.

        Parameters
        ----------
        staged : `~cutana.io.StagedJob`
            The receipt returned by `~cutana.io.stage_job`.
        """
        self.append(
            {
                "event": "job_staged",
                "job_id": int(staged.job_id),
                "n": int(staged.n),
                "checksum": str(staged.checksum),
            }
        )

    def chunk_written(self, chunk, checksum):
        """Record a written output chunk.

        Parameters
        ----------
        chunk : int
            Chunk index.
        checksum : str
            Checksum returned by `~cutana.io.ZarrWriter.write_chunks`.
        """
        self.chunks_written({chunk: checksum})

    def chunks_written(self, checksums, rows=None, *, sync=True):
        """Record several written chunks, one record each, in index order.

        The records are written and flushed to disk together (one ``fsync``
        for a task's chunks rather than one per chunk); a crash can still
        cut only the last line short.

        Parameters
        ----------
        checksums : dict
            Chunk index to checksum, as returned by
            `~cutana.io.ZarrWriter.write_chunks`.
        rows : dict, optional
            Chunk index to the ``(status, geometry)`` of its rows
            (`~cutana.io.ChunksWritten.rows`), kept in the record
            (compressed) and read back as `LedgerState.chunk_rows`.
        sync : bool, optional
            Flush them to disk before returning. A worker that records the
            chunks it writes as it goes leaves that to the parent (`sync`),
            once its task is done: they survive the worker's death anyway.
        """
        rows = rows or {}
        records = []
        for k, v in sorted(checksums.items()):
            record = {"event": "chunk_written", "chunk": int(k), "checksum": str(v)}
            if k in rows:
                record["rows"] = encode_rows(*rows[k])
            records.append(record)
        self._append(records, sync=sync)

    def sync(self):
        """Flush to disk what this and other processes appended."""
        self._open()
        os.fsync(self._fd)

    def run_finished(self, fingerprint, report=None):
        """Record the end of a run.

        Parameters
        ----------
        fingerprint : str
            Fingerprint of the plan.
        report : dict, optional
            The run report (JSON-serialisable; may hold times).
        """
        self.append(
            {
                "event": "run_finished",
                "fingerprint": str(fingerprint),
                "time": _now(),
                "report": report,
            }
        )

    def close(self):
        """Close the ledger file (reading still works)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    # -- reading -----------------------------------------------------------

    def read(self):
        """Read the ledger.

        A last line cut short by a crash is ignored (``truncated``); another
        unreadable line is skipped with a warning in the log, which at worst
        makes a resumed run redo one job or chunk.

        Returns
        -------
        state : `LedgerState`
            What the ledger records; empty if there is no ledger yet.
        """
        state = LedgerState()
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return state
        lines = data.split(b"\n")
        # data ending in "\n" gives a final empty element
        last_complete = data.endswith(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            is_last = number == len(lines)
            try:
                record = json.loads(raw.decode("ascii"))
                if not isinstance(record, dict):
                    msg = "not a JSON object"
                    raise ValueError(msg)
                _apply(state, record)
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                if is_last and not last_complete:
                    state.truncated = True
                else:
                    logger.warning(
                        "ledger %s line %d is unreadable (%s); ignoring it",
                        self.path,
                        number,
                        exc,
                    )
                    state.skipped.append(number)
                continue
            if is_last and not last_complete:
                # a complete JSON object without its newline: the write was
                # cut exactly before "\n"; the record is whole, keep it
                state.truncated = True
            state.n_records += 1
        return state


def _parses(raw):
    try:
        return isinstance(json.loads(raw.decode("ascii")), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _apply(state, record):
    event = record["event"]
    if event == "run_started":
        state.fingerprint = str(record["fingerprint"])
        state.runs.append(state.fingerprint)
        state.finished = False
        state.report = None
    elif event == "job_staged":
        state.jobs[int(record["job_id"])] = {
            "checksum": str(record["checksum"]),
            "n": int(record["n"]),
        }
    elif event == "chunk_written":
        chunk = int(record["chunk"])
        checksum = str(record["checksum"])
        rows = decode_rows(record["rows"]) if "rows" in record else None
        state.chunks[chunk] = checksum
        if rows is None:
            state.chunk_rows.pop(chunk, None)
        else:
            state.chunk_rows[chunk] = rows
    elif event == "run_finished":
        state.finished = str(record["fingerprint"]) == state.fingerprint
        state.report = record.get("report")
    else:
        msg = f"unknown event {event!r}"
        raise ValueError(msg)


def encode_rows(status, geometry):
    """Encode the status and geometry of a chunk's rows as ASCII text.

    Parameters
    ----------
    status : array-like
        ``(m,)`` statuses (stored as little-endian int16).
    geometry : array-like
        ``(m, 5)`` geometry rows (stored as little-endian int64).

    Returns
    -------
    text : str
        Base64 of the zlib-compressed bytes; `decode_rows` reverses it.

    Examples
    --------
    >>> import numpy as np
    >>> from cutana.io.ledger import decode_rows, encode_rows
    >>> status, geometry = decode_rows(encode_rows([0, 7], [[0, 1, 2, 3, 4]] * 2))
    >>> status.tolist(), geometry[1].tolist()
    ([0, 7], [0, 1, 2, 3, 4])
    """
    status = np.ascontiguousarray(status, dtype="<i2").reshape(-1)
    geometry = np.ascontiguousarray(geometry, dtype="<i8").reshape(-1, 5)
    if len(geometry) != len(status):
        msg = f"{len(status)} statuses but {len(geometry)} geometry rows"
        raise ValueError(msg)
    raw = status.tobytes() + geometry.tobytes()
    return base64.b64encode(zlib.compress(raw, 1)).decode("ascii")


def decode_rows(text):
    """Decode what `encode_rows` made: ``(status, geometry)`` arrays.

    Parameters
    ----------
    text : str
        The encoding of a ledger's chunk record (its ``rows`` field).

    Returns
    -------
    status : `~numpy.ndarray`
        ``(m,)`` int16 statuses.
    geometry : `~numpy.ndarray`
        ``(m, 5)`` int64 geometry rows.

    Raises
    ------
    ValueError
        If ``text`` is not such an encoding (a ledger line holding one is
        skipped when read, and its chunk is written again).
    """
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (zlib.error, ValueError, AttributeError) as exc:
        msg = f"unreadable row status and geometry ({exc})"
        raise ValueError(msg) from None
    m, extra = divmod(len(raw), 42)  # 2 bytes of status + 40 of geometry
    if extra:
        msg = f"row status and geometry of {len(raw)} bytes (not 42 per row)"
        raise ValueError(msg)
    status = np.frombuffer(raw, dtype="<i2", count=m).astype(np.int16)
    geometry = np.frombuffer(raw, dtype="<i8", offset=2 * m).reshape(m, 5)
    return status, geometry.astype(np.int64)


def _now():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
