# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Stop requests (SIGTERM, Ctrl-C) that the running code checks at safe points.

The ``cutana`` command's signal handler raises its exception in the main
thread wherever that thread is, and Python can lose it there (e.g. raised
while a finaliser runs, or while a module being imported is compiled): in
about 1 of 60 runs sent SIGTERM early under load, the run went on to its
end with exit 0. The handler therefore also records the request here, and
the executor raises it again between tasks (`raise_requested`): a stop is
then delayed to the end of the task at hand, never lost.
"""

__all__ = ["clear", "raise_requested", "request"]

_REQUESTED = []  # exception classes, in the order asked


def request(exc_type):
    """Record that the process was asked to stop by raising ``exc_type``.

    Parameters
    ----------
    exc_type : type
        A `BaseException` subclass, e.g. `KeyboardInterrupt`.

    Examples
    --------
    >>> from cutana import _stop
    >>> class Stop(BaseException): ...
    >>> _stop.request(Stop)
    >>> _stop.raise_requested()
    Traceback (most recent call last):
    ...
    cutana._stop.Stop
    >>> _stop.clear()
    >>> _stop.raise_requested()  # nothing asked for
    """
    _REQUESTED.append(exc_type)


def raise_requested():
    """Raise the first stop asked for, if any (see `request`)."""
    if _REQUESTED:
        raise _REQUESTED[0]


def clear():
    """Forget the stops asked for (e.g. once the stop has been handled)."""
    _REQUESTED.clear()
