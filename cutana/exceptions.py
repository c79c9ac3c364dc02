# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Exceptions and warnings raised by cutana.

Every cutana error derives from a standard Python exception, so that callers
who do not know about cutana can still catch it (``except ValueError``,
``except OSError``). The overlap errors are astropy's own classes, re-exported
here so that ``cutana.Cutout2D`` raises exactly what
`astropy.nddata.Cutout2D` raises.
"""

from astropy.utils.exceptions import AstropyUserWarning

__all__ = [
    "CatalogError",
    "ConfigError",
    "CutanaWarning",
    "NoOverlapError",  # noqa: F822 - loaded by __getattr__
    "PartialOverlapError",  # noqa: F822 - loaded by __getattr__
    "TileError",
]


class CutanaWarning(AstropyUserWarning):
    """A warning issued by cutana (something odd, but the run can go on).

    Examples
    --------
    >>> import warnings
    >>> from cutana.exceptions import CutanaWarning
    >>> issubclass(CutanaWarning, UserWarning)
    True
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warnings.warn("tile header lacks MAGZERO", CutanaWarning)
    >>> caught[0].category.__name__, str(caught[0].message)
    ('CutanaWarning', 'tile header lacks MAGZERO')
    """


class CatalogError(ValueError):
    """A source catalogue cannot be used as a whole.

    Raised for file-level problems only (missing or unreadable file, no RA or
    Dec column, no size information at all). Problems with single rows never
    raise: those rows get the status `cutana.Status.BAD_ROW` and a message.

    Examples
    --------
    A missing catalogue is a `CatalogError`, which is also a `ValueError`:

    >>> from cutana.catalog import read_catalog
    >>> from cutana.exceptions import CatalogError
    >>> try:
    ...     read_catalog("no-such-catalogue.csv")
    ... except ValueError as exc:
    ...     print(type(exc).__name__, isinstance(exc, CatalogError))
    CatalogError True
    """


class TileError(OSError):
    """A tile file cannot be opened or read.

    The message names the file and the reason. The sources that need the
    tile get the status `cutana.Status.TILE_ERROR`; other sources are
    unaffected.

    Examples
    --------
    >>> from cutana.exceptions import TileError
    >>> try:
    ...     raise TileError("tile_01.fits: file is truncated")
    ... except OSError as exc:  # a TileError is an OSError
    ...     print(type(exc).__name__, exc)
    TileError tile_01.fits: file is truncated
    """


class ConfigError(ValueError):
    """An option or configuration value is invalid (unknown key, bad value).

    Examples
    --------
    >>> from cutana.exceptions import ConfigError
    >>> from cutana.pipeline import RunOptions
    >>> try:
    ...     RunOptions(dtype="int8", memory_limit="1GB").validate()
    ... except ValueError as exc:  # a ConfigError is a ValueError
    ...     print(type(exc).__name__, isinstance(exc, ConfigError))
    ConfigError True
    """


def __getattr__(name):
    # astropy's overlap errors, loaded on first use: importing astropy.nddata
    # is slow, and the pipeline never raises them
    if name in ("NoOverlapError", "PartialOverlapError"):
        from astropy.nddata import utils

        return getattr(utils, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
