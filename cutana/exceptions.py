# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Exceptions and warnings raised by cutana.

Every cutana error derives from a standard Python exception, so that callers
who do not know about cutana can still catch it (``except ValueError``,
``except OSError``). The overlap errors are astropy's own classes, re-exported
here so that ``cutana.Cutout2D`` raises exactly what
`astropy.nddata.Cutout2D` raises.
"""

from astropy.nddata import NoOverlapError, PartialOverlapError
from astropy.utils.exceptions import AstropyUserWarning

__all__ = [
    "CatalogError",
    "ConfigError",
    "CutanaWarning",
    "NoOverlapError",
    "PartialOverlapError",
    "TileError",
]


class CutanaWarning(AstropyUserWarning):
    """A warning issued by cutana (something odd, but the run can go on)."""


class CatalogError(ValueError):
    """A source catalogue cannot be used as a whole.

    Raised for file-level problems only (missing or unreadable file, no RA or
    Dec column, no size information at all). Problems with single rows never
    raise: those rows get the status ``Status.BAD_ROW`` and a message.
    """


class TileError(OSError):
    """A tile file cannot be opened or read.

    The message names the file and the reason. The sources that need the
    tile get the status ``Status.TILE_ERROR``; other sources are unaffected.
    """


class ConfigError(ValueError):
    """An option or configuration value is invalid (unknown key, bad value)."""
