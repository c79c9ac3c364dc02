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

__all__ = [
    "behind", "chain", "clear", "hurried", "raise_requested", "request", "requested",
]

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


def requested():
    """Whether a stop was asked for (see `request`)."""
    return bool(_REQUESTED)


def hurried():
    """Whether a stop was asked for more than once (a second Ctrl-C or
    SIGTERM while the first one's clean-up runs): the clean-up then ends
    its workers at once (`cutana.executor`) instead of waiting for them.

    Examples
    --------
    >>> from cutana import _stop
    >>> _stop.request(KeyboardInterrupt)
    >>> _stop.requested(), _stop.hurried()
    (True, False)
    >>> _stop.request(KeyboardInterrupt)
    >>> _stop.hurried()
    True
    >>> _stop.clear()
    """
    return len(_REQUESTED) > 1


def raise_requested():
    """Raise the first stop asked for, if any (see `request`)."""
    if _REQUESTED:
        raise _REQUESTED[0]


def behind(exc):
    """The stop (Ctrl-C, SIGTERM: an exception that is not an `Exception`)
    that ``exc`` was raised while handling, if any.

    A clean-up that fails during a stop must not turn it into an error (a
    task's, which would be retried, or the command's); nor must Python's
    wrapping of an exception raised in a class body being made (its
    ``__set_name__`` calls, while astropy is imported, say: a
    `RuntimeError` raised from the stop).

    Parameters
    ----------
    exc : BaseException
        The exception raised.

    Returns
    -------
    stop : BaseException or None
        The first exception of ``exc``'s context chain (``exc`` itself
        first) that is not an `Exception`, or None.

    Examples
    --------
    >>> from cutana import _stop
    >>> try:
    ...     try:
    ...         raise KeyboardInterrupt
    ...     except KeyboardInterrupt as stop:
    ...         raise RuntimeError("while stopping") from stop
    ... except RuntimeError as exc:
    ...     type(_stop.behind(exc)).__name__
    'KeyboardInterrupt'
    >>> _stop.behind(ValueError("no stop")) is None
    True
    """
    return next((e for e in chain(exc) if not isinstance(e, Exception)), None)


def chain(exc):
    """Yield ``exc`` and the exceptions it was raised while handling
    (``__context__``), each once.

    Parameters
    ----------
    exc : BaseException or None
        The exception raised last.

    Yields
    ------
    exc : BaseException
        ``exc``, then its context, and so on.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__context__


def clear():
    """Forget the stops asked for (e.g. once the stop has been handled)."""
    _REQUESTED.clear()
