# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""What astropy logs (rather than warns) while cutana calls it, kept quiet.

astropy reports some things through its logger, not as warnings: making a
WCS from a header whose SIP coefficients lack ``-SIP`` in its CTYPE prints
a dozen lines, without the file's name, and writing the header of every
cutout of such a tile prints them again, for each file. cutana keeps those
messages and reports them once, with the file's name
(`cutana.tiles`).
"""

import contextlib
import logging

__all__ = ["astropy_log_kept"]


class _Collect(logging.Filter):
    """Keep (and drop) the records logged to a logger while it is attached."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        self.records.append(record)
        return False


@contextlib.contextmanager
def astropy_log_kept():
    """Drop what astropy logs inside the block, and keep it.

    Yields
    ------
    notes : list of str
        Filled when the block ends: each message of level INFO or above,
        on one line.

    Examples
    --------
    >>> from astropy import log
    >>> from cutana._astropy_log import astropy_log_kept
    >>> with astropy_log_kept() as notes:
    ...     log.info("two\\n   lines")
    >>> notes
    ['two lines']
    """
    from astropy import log

    collect = _Collect()
    log.addFilter(collect)
    notes = []
    try:
        yield notes
    finally:
        log.removeFilter(collect)
        notes.extend(
            " ".join(r.getMessage().split())
            for r in collect.records
            if r.levelno >= logging.INFO
        )
