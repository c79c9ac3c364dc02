# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
``cutana verify``: check an output against its catalogue and its checksums.

The structural checks (every row has a known final status, arrays have the
right shapes and dtypes, every chunk is present and matches the checksum
recorded when it was committed) are those of `cutana.io.verify_output`.
This module adds the check against a fresh validation of the catalogue:
the output must have one row per catalogue row, the same ids in the same
order, and a row is ``BAD_ROW`` exactly when the catalogue row is invalid.
"""

import logging
import os

import numpy as np

from .catalog import COLUMN_OPTIONS, read_catalog
from .exceptions import CatalogError
from .io.archive import open_output, verify_output
from .status import Status

__all__ = ["verify"]

logger = logging.getLogger(__name__)


def verify(output, catalogue=None):
    """Check an output; return the list of problems (empty when all is well).

    Parameters
    ----------
    output : str or path-like
        The output of a run (Zarr store or FITS folder).
    catalogue : str or path-like, optional
        The catalogue to check against; by default the one recorded in the
        output when it was written. An output made from an in-memory table
        records none: it is then checked without one, with a warning.

    Returns
    -------
    problems : list of str
        One message per problem, naming the row and what is wrong.

    Examples
    --------
    >>> import os
    >>> import tempfile
    >>> from cutana.bench.synthetic import make_demo_survey
    >>> from cutana.pipeline import make_cutouts
    >>> from cutana.verify import verify
    >>> survey = make_demo_survey(tempfile.mkdtemp(), n_sources=40)
    >>> out = os.path.join(tempfile.mkdtemp(), "out.zarr")
    >>> report = make_cutouts(survey.catalogue_path, out, size=16, memory_limit="2GB",
    ...                       progress=False)
    >>> verify(out)
    []
    >>> len(verify(os.path.join(tempfile.mkdtemp(), "missing.zarr"))) >= 1
    True
    """
    output = os.fspath(output)
    problems = verify_output(output)
    try:
        archive = open_output(output)
    except (OSError, ValueError, KeyError) as exc:
        why = f"{output}: cannot be opened: {exc}"
        # (verify_output has said it already when it is not an output at all)
        said = str(exc) and any(str(exc) in p for p in problems)
        return problems if said else [*problems, why]
    source = catalogue or archive.attrs.get("catalogue")
    if not source:  # (a run given a Table or DataFrame: not a problem)
        logger.warning(
            "%s: checked without its catalogue, which it does not record (the run "
            "was given a table in memory); pass the catalogue to check against it",
            output,
        )
        return problems
    if not os.path.exists(source):
        problems.append(f"{output}: its catalogue {source} no longer exists")
        return problems
    size = archive.config.get("size")
    # a run given tiles neither used nor checked a file-list column
    files_column = False if archive.config.get("tiles") else None
    try:
        # the columns the run was told to read (see --id-column etc.)
        columns = {k: archive.config.get(k) for k in COLUMN_OPTIONS}
        cat = read_catalog(source, size=size, files_column=files_column, **columns)
    except CatalogError as exc:
        problems.append(f"{source}: {exc}")
        return problems
    try:
        status = np.asarray(archive.status)
        ids = np.asarray(archive.source_id).astype(str)
        ra, dec = np.asarray(archive.ra), np.asarray(archive.dec)
    except Exception as exc:  # noqa: BLE001 - a damaged chunk (reported above)
        problems.append(f"{output}: cannot read its rows: {type(exc).__name__}: {exc}")
        return problems
    if len(cat) != len(status):
        problems.append(
            f"{output}: {len(status)} rows, but the catalogue {source} has {len(cat)}"
        )
        return problems
    differ = np.flatnonzero(ids != cat.source_id.astype(str))
    for r in differ[:20]:
        problems.append(
            f"row {r}: source_id {str(ids[r])!r} but the catalogue has "
            f"{str(cat.source_id[r])!r}"
        )
    # positions are the catalogue's, as read and checked (NaN where invalid)
    moved = np.flatnonzero(~(_same(ra, cat.ra) & _same(dec, cat.dec)))
    for r in moved[:20]:
        problems.append(
            f"row {r}: position ({float(ra[r])!r}, {float(dec[r])!r}) but the "
            f"catalogue has ({float(cat.ra[r])!r}, {float(cat.dec[r])!r})"
        )
    bad = np.asarray(cat.status) == Status.BAD_ROW
    marked_ok = np.flatnonzero(bad & (status != Status.BAD_ROW))
    for r in marked_ok[:20]:
        problems.append(
            f"row {r}: status {Status(int(status[r])).name} but the catalogue row is "
            f"invalid ({cat.messages.get(int(r), 'bad row')})"
        )
    wrongly_bad = np.flatnonzero(~bad & (status == Status.BAD_ROW))
    note = ""
    if len(wrongly_bad):
        wrongly_bad, note = _not_bad_with_tiles(wrongly_bad, source, archive)
    for r in wrongly_bad[:20]:
        problems.append(f"row {r}: status BAD_ROW but the catalogue row is valid{note}")
    listed = (differ, moved, marked_ok, wrongly_bad)
    n_more = sum(max(0, len(rows) - 20) for rows in listed)
    if n_more > 0:
        problems.append(f"... and {n_more} more row problems")
    return problems


def _not_bad_with_tiles(rows, source, archive):
    """Of ``rows``, BAD_ROW in the output though their catalogue rows are
    valid, those that the run's plan does not make bad either; with a note
    for the problems when it cannot be made.

    Some rows are bad for what only the tiles tell: a size in arcsec that is
    no pixel of the row's tile, or more than a size may be, or a file list
    that names no file for a band. The run's options (its ``config``) plan
    it again, from the catalogue and the tiles' headers.
    """
    from .pipeline import plan_cutouts

    quiet = logging.getLogger("cutana")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the run has said what planning says
    try:
        plan = plan_cutouts(source, **archive.config)
    except Exception as exc:  # noqa: BLE001 - tiles gone or changed, say
        note = f" (and planning the run again with its tiles failed: {exc})"
        return rows, note
    finally:
        quiet.setLevel(level)
    base = np.asarray(plan.base_status)
    return rows[base[rows] != Status.BAD_ROW], ""


def _same(a, b):
    """Element-wise equality of two float arrays, NaN equal to NaN."""
    return np.isclose(a, b, rtol=0, atol=0, equal_nan=True)
