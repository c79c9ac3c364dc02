# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Writing large output files without filling the page cache.

A run writes its output once and does not read it back. Left to itself, the
operating system keeps every written byte in its page cache until it needs
the memory, so a run's output takes fresh memory page after page, and
copying into never-used memory is slow on many virtual machines. A
`FileSeries` writes each file, asks the kernel to start writing it to the
device at once (``posix_fadvise(POSIX_FADV_DONTNEED)`` on a file with
unwritten pages starts its writeback without waiting for it), and a few
files later gives the same advice again, which then drops the file's pages,
written by now, so that the next files reuse that memory. This is advice
only: where the platform lacks it, files are written the ordinary way, and
their contents never depend on it.
"""

import collections
import os

__all__ = ["FileSeries"]

_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


class FileSeries:
    """Write a series of files, each replacing its final name atomically.

    Parameters
    ----------
    lag : int, optional
        Files written since a file's writeback started before its pages are
        dropped.
    min_bytes : int, optional
        Smaller files get no advice (their pages are few, and the kernel
        writes many small files back more efficiently together).

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

    def __init__(self, lag=4, min_bytes=1 << 20):
        self.lag = int(lag)
        self.min_bytes = int(min_bytes)
        self._open = collections.deque()

    def write(self, tmp, path, data):
        """Write ``data`` to ``tmp``, then rename ``tmp`` to ``path``.

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
            renamed then.
        """
        view = memoryview(data).cast("B")
        advise = _FADVISE and len(view) >= self.min_bytes
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
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
        """Give the advice for the last files and close them."""
        while self._open:
            self._drop(self._open.popleft())

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
