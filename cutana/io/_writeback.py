# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Writing large output files without filling the page cache.

A run writes its output once and does not read it back. Left to itself, the
operating system copies every written byte into its page cache and keeps it
there until it needs the memory; copying into that cache costs the writing
process as much time as compressing the data (more on virtual machines,
where never-used memory is slow to touch).

Where the platform allows it (``O_DIRECT``, Linux) and the caller asks
for it, a `FileSeries` copies each large file into an aligned buffer and
hands it to one background thread that writes it with ``O_DIRECT``: the
device reads the bytes straight from the buffer, nothing is copied into
the page cache, and the thread spends its time waiting for the device,
while the calling thread goes on (e.g. compresses the next chunk). At most
`DEPTH` files wait for the thread; while it is that far behind (a slow
device), the calling thread writes the next file itself, as below.
`FileSeries.close` waits until every file is written and raises the first
error the thread met. A file system that refuses ``O_DIRECT`` (``EINVAL``,
e.g. tmpfs) gets ordinary writes. The thread helps only where a core is
free for it: with every core busy cutting, the waits cost more than the
page-cache copy saves.

Otherwise each file is written in the calling thread, and its writeback
is started at once (``posix_fadvise(POSIX_FADV_DONTNEED)`` on a file with
unwritten pages starts it without waiting for it); a few files later the
same advice, given again, drops the file's pages, written by now, so that
the next files reuse that memory. This is advice only: where the platform
lacks it, files are written the ordinary way. The contents of the files
never depend on how they were written.
"""

import collections
import errno
import mmap
import os
import queue
import threading

__all__ = ["ALIGN", "DEPTH", "FileSeries", "release_buffers"]

_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")
_DIRECT = hasattr(os, "O_DIRECT")

#: Alignment of the buffers, and of the lengths, written with ``O_DIRECT``
#: (a file's length is then set with ``ftruncate``).
ALIGN = 4096

#: Files handed to the writer thread and not written yet, at most; each
#: holds an aligned buffer of its size.
DEPTH = 2

# aligned buffers kept between series (a fresh buffer's first touch is slow)
_BUFFERS = []
_BUFFERS_LOCK = threading.Lock()


def release_buffers():
    """Drop the aligned buffers kept for the next `FileSeries` of this process.

    Examples
    --------
    >>> from cutana.io._writeback import release_buffers
    >>> release_buffers()
    """
    with _BUFFERS_LOCK:
        _BUFFERS.clear()


def _write_all(fd, view):
    """Write all of ``view`` to ``fd`` (``os.write`` may write less)."""
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _padded(n):
    return -(-n // ALIGN) * ALIGN


class FileSeries:
    """Write a series of files, each replacing its final name atomically.

    Parameters
    ----------
    lag : int, optional
        Files written since a file's writeback started before its pages are
        dropped (buffered writes).
    min_bytes : int, optional
        Smaller files are written the ordinary way, without advice, in the
        calling thread (their pages are few, and the kernel writes many small
        files back more efficiently together).
    direct : bool, optional
        Whether larger files are written with ``O_DIRECT`` by a background
        thread (where the platform has ``O_DIRECT``).

    Examples
    --------
    >>> import os, tempfile
    >>> from cutana.io._writeback import FileSeries
    >>> folder = tempfile.mkdtemp()
    >>> with FileSeries(min_bytes=0) as files:
    ...     for k in range(6):
    ...         path = os.path.join(folder, f"c.{k}")
    ...         files.write(path + ".partial", path, bytes([k]) * 1000)
    >>> sorted(os.listdir(folder))
    ['c.0', 'c.1', 'c.2', 'c.3', 'c.4', 'c.5']
    >>> with open(os.path.join(folder, "c.5"), "rb") as fh:
    ...     fh.read() == bytes([5]) * 1000
    True
    """

    def __init__(self, lag=4, min_bytes=1 << 20, direct=False):
        self.lag = int(lag)
        self.min_bytes = int(min_bytes)
        self.direct = bool(direct) and _DIRECT
        self._open = collections.deque()
        self._thread = None
        self._todo = None  # (tmp, path, buffer, size), None to stop
        self._free = None  # buffers the thread is done with
        self._buffers = []  # every buffer this series took
        self._error = None
        self._raised = False
        self._direct_ok = True

    def write(self, tmp, path, data):
        """Write ``data`` to ``tmp``, then rename ``tmp`` to ``path``.

        With the background thread, the file may be written after this
        returns; `close` waits for it.

        Parameters
        ----------
        tmp, path : str
            Temporary and final file names (in the same folder).
        data : bytes-like
            The file's contents.

        Raises
        ------
        OSError
            If the file cannot be written (e.g. ``ENOSPC``); nothing is
            renamed then. With the background thread, the error of a file
            is raised by a later call, or by `close`.
        """
        view = memoryview(data).cast("B")
        if self.direct and len(view) >= self.min_bytes and self._hand_over(
            tmp, path, view, type(data) is bytes
        ):
            return
        advise = _FADVISE and len(view) >= self.min_bytes
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, view)
            if advise:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # start writeback
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            raise
        if not advise:
            os.close(fd)
            return
        self._open.append(fd)
        while len(self._open) > self.lag:
            self._drop(self._open.popleft())

    def close(self):
        """Wait for the files handed to the thread, give the advice for the
        last files and close them.

        Raises
        ------
        OSError
            The first error the background thread met, unless `write`
            raised it already.
        """
        try:
            if self._thread is not None:
                # (an interrupt can come between making the thread and
                # starting it: there is nothing to wait for then)
                if self._thread.ident is not None:
                    self._todo.put(None)
                    self._thread.join()
                self._thread = None
                with _BUFFERS_LOCK:
                    _BUFFERS.extend(self._buffers)
                    del _BUFFERS[:-DEPTH]  # the newest, for the next series
                self._buffers = []
        finally:
            while self._open:
                self._drop(self._open.popleft())
        self._raise_error()

    def _raise_error(self):
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def _hand_over(self, tmp, path, view, frozen):
        """Hand ``view`` to the thread, which writes it from an aligned
        buffer; False (the caller writes the file) while the thread is busy
        with `DEPTH` files. The thread copies a ``frozen`` view (of a
        `bytes`, which nobody can change) into the buffer itself, which
        takes that copy off the calling thread; any other view is copied
        here, before its owner can change it."""
        if self._thread is None:
            self._todo = queue.Queue()
            self._free = queue.Queue()
            with _BUFFERS_LOCK:
                for _ in range(DEPTH):
                    buf = _BUFFERS.pop() if _BUFFERS else None
                    if buf is not None:
                        self._buffers.append(buf)
                    self._free.put(buf)
            self._thread = threading.Thread(
                target=self._run, name="cutana-writer", daemon=True
            )
            self._thread.start()
        if self._error is not None:
            self._raise_error()
            raise self._error  # raised before: later files are not written
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            return False
        n = len(view)
        if not frozen:
            buf = self._fill(buf, view)
            view = None
        self._todo.put((tmp, path, buf, view, n))
        return True

    def _fill(self, buf, view):
        """``buf`` (or a larger aligned buffer in its place) holding ``view``
        at its start; returns the buffer."""
        n = len(view)
        if buf is None or len(buf) < _padded(n):
            if buf is not None:
                self._buffers.remove(buf)
            buf = mmap.mmap(-1, _padded(n))  # page-aligned
            self._buffers.append(buf)
        buf[:n] = view
        return buf

    def _run(self):
        """The writer thread: write the files handed over, in order."""
        while True:
            item = self._todo.get()
            if item is None:
                return
            tmp, path, buf, view, n = item
            item = None
            try:
                if self._error is None:
                    if view is not None:
                        buf = self._fill(buf, view)
                    self._write_file(tmp, path, buf, n)
            except BaseException as exc:  # noqa: BLE001 - raised by write/close
                self._error = exc
            finally:
                view = None  # the caller's bytes, no longer needed
                self._free.put(buf)

    def _write_file(self, tmp, path, buf, n):
        """Write ``buf[:n]`` to ``tmp`` with ``O_DIRECT`` (or the ordinary
        way where refused), then rename it to ``path``."""
        view = memoryview(buf)
        if not (self._direct_ok and self._write_direct(tmp, view, n)):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, view[:n])
            finally:
                os.close(fd)
        os.replace(tmp, path)

    def _write_direct(self, tmp, view, n):
        """Write ``view[:n]`` to ``tmp`` with ``O_DIRECT``; False (and no
        more tries in this series) when the file system refuses it."""
        size = _padded(n)
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644
            )
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct_ok = False
            return False
        try:
            _write_all(fd, view[:size])
            os.ftruncate(fd, n)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct_ok = False  # e.g. an alignment the device refuses
            return False
        finally:
            os.close(fd)
        return True

    @staticmethod
    def _drop(fd):
        try:
            if _FADVISE:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written: drop
        except OSError:  # pragma: no cover - advice only
            pass
        finally:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
