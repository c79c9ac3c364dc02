# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Per-source status codes shared by every layer and every output format."""

import enum

__all__ = ["Status", "STATUS_DESCRIPTIONS"]


class Status(enum.IntEnum):
    """Outcome of one catalogue row.

    The integer values are stored in the ``status`` array of every output and
    never change meaning between versions.

    Examples
    --------
    >>> from cutana import Status
    >>> from cutana.status import STATUS_DESCRIPTIONS
    >>> int(Status.OK), int(Status.PARTIAL_OVERLAP), int(Status.PENDING)
    (0, 1, -1)
    >>> Status(2).name
    'NO_OVERLAP'
    >>> STATUS_DESCRIPTIONS[Status.BAD_ROW]
    'invalid catalogue row'
    """

    #: A complete cutout, every pixel inside the tile.
    OK = 0
    #: Cut, but the cutout overlaps a tile edge; outside pixels hold the fill value.
    PARTIAL_OVERLAP = 1
    #: The source lies on no tile given (or its cutout misses every tile).
    NO_OVERLAP = 2
    #: The catalogue row is invalid (NaN, out-of-range value, bad size, duplicate id).
    BAD_ROW = 3
    #: The tile (or one of its bands) could not be read, or lacks a needed keyword.
    TILE_ERROR = 4
    #: Not processed yet (the fill value of a fresh output; a resumed run
    #: finishes these).
    PENDING = -1


STATUS_DESCRIPTIONS = {
    Status.OK: "complete cutout",
    Status.PARTIAL_OVERLAP: "cutout overlaps a tile edge, outside filled",
    Status.NO_OVERLAP: "source lies on no tile",
    Status.BAD_ROW: "invalid catalogue row",
    Status.TILE_ERROR: "tile could not be read",
    Status.PENDING: "not processed yet",
}
