# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Look at the cutouts of a run: a grid of them in one figure.

`plot_cutouts` draws one panel per catalogue row of an output (Zarr store
or FITS folder, `cutana.open`), in one band, titled with the source id and,
for a cutout that is not complete, its status; ``cutana preview`` writes
such a figure to a file. Cutouts the run left in floating point are shown
with a linear stretch over astropy's `~astropy.visualization.ZScaleInterval`
(each panel its own, as a quick look in DS9 would); integer cutouts, which
the run has already stretched (``--normalize``), are shown as they are, from
0 to the largest value of their dtype. Pixels north-up as in the tile
(``origin='lower'``); NaN (outside the tile) in light blue. Needs
matplotlib (``pip install 'cutana[plot]'``).
"""

import os

import numpy as np

from .io.archive import CutoutArchive, open_output
from .status import Status

__all__ = ["DEFAULT_ROWS", "plot_cutouts"]

#: Rows `plot_cutouts` shows when none are asked for (the first ones).
DEFAULT_ROWS = 32

#: Statuses whose rows hold a cutout.
_CUT = (Status.OK, Status.PARTIAL_OVERLAP)

#: Inches per panel.
_PANEL = 1.6

#: Colour of NaN pixels (outside the tile): no grey level of the image.
_NAN_COLOUR = "#8fb3d9"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a test dependency
        msg = "the preview needs matplotlib: pip install 'cutana[plot]'"
        raise ImportError(msg) from None
    return Figure


def _band_index(archive, band):
    """Channel index of ``band`` (index or name) in ``archive``."""
    names = list(archive.bands)
    if isinstance(band, str):
        if band not in names:
            msg = f"band {band!r} is not in the output; its bands are {names}"
            raise ValueError(msg)
        return names.index(band)
    if isinstance(band, bool) or not isinstance(band, (int, np.integer)):
        msg = f"band must be a band name or an index, got {band!r}"
        raise TypeError(msg)
    if not -len(names) <= band < len(names):
        msg = (
            f"band {band} is out of range for an output of {len(names)} band(s) "
            f"{names}"
        )
        raise IndexError(msg)
    return int(band) % len(names)


def _rows(archive, rows):
    """Row numbers to show: ``rows`` (a slice or integers) checked against
    the output, or its first `DEFAULT_ROWS`."""
    n = len(archive)
    if rows is None:
        rows = slice(0, DEFAULT_ROWS)
    if isinstance(rows, slice):
        return list(range(n))[rows]
    return [archive._row(i) for i in np.atleast_1d(np.asarray(rows)).tolist()]


def _display_norm(image):
    """Colour scaling of one panel: zscale for floats, the dtype's range for
    integers (already stretched by the run)."""
    from astropy.visualization import ImageNormalize, ZScaleInterval

    if image.dtype.kind in "iu":
        return ImageNormalize(vmin=0, vmax=np.iinfo(image.dtype).max, clip=True)
    finite = image[np.isfinite(image)]
    if not finite.size:
        return ImageNormalize(vmin=0, vmax=1)
    vmin, vmax = ZScaleInterval().get_limits(finite)
    if not vmax > vmin:
        vmin, vmax = float(finite.min()), float(finite.min()) + 1.0
    return ImageNormalize(vmin=vmin, vmax=vmax, clip=True)


def plot_cutouts(output, rows=None, *, band=0, columns=8, path=None, cmap="gray"):
    """Draw cutouts of a run's output in a grid, one panel per catalogue row.

    Parameters
    ----------
    output : str, path-like or `~cutana.io.CutoutArchive`
        The output of a run (``--output``), or the output opened with
        `cutana.open`.
    rows : slice or sequence of int, optional
        Catalogue rows to show, in this order (default: the first
        `DEFAULT_ROWS`). A row without a cutout gets a panel that names its
        status.
    band : int or str, optional
        Channel to show, by index or band name (default: the first).
    columns : int, optional
        Panels per line of the grid.
    path : str or path-like, optional
        Also save the figure there, in the format its extension names
        (``.png``, ``.pdf``, ``.svg``, ...).
    cmap : str, optional
        Matplotlib colour map.

    Returns
    -------
    figure : `matplotlib.figure.Figure`
        The figure (shown in a notebook when it is a cell's value).

    Raises
    ------
    ValueError, IndexError, TypeError
        If the band or a row is not in the output, or ``columns`` is not a
        positive integer.

    Examples
    --------
    >>> import tempfile
    >>> import cutana
    >>> from cutana.bench import make_demo_survey
    >>> from cutana.preview import plot_cutouts
    >>> tmp = tempfile.mkdtemp()
    >>> survey = make_demo_survey(tmp, n_sources=12)
    >>> _ = cutana.make_cutouts(survey.catalogue_path, tmp + "/out.zarr", size=24,
    ...                         progress=False)
    >>> figure = plot_cutouts(tmp + "/out.zarr", band="VIS", columns=4,
    ...                       path=tmp + "/preview.png")
    >>> len(figure.axes)
    12
    """
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or (
        columns < 1
    ):
        msg = f"columns must be a positive integer, got {columns!r}"
        raise ValueError(msg)
    archive = output if isinstance(output, CutoutArchive) else open_output(output)
    c = _band_index(archive, band)
    shown = _rows(archive, rows)
    figure_class = _figure_class()
    import matplotlib

    colours = matplotlib.colormaps[cmap].with_extremes(bad=_NAN_COLOUR)
    n_cols = max(1, min(int(columns), len(shown)))
    n_lines = max(1, -(-len(shown) // n_cols))
    figure = figure_class(figsize=(_PANEL * n_cols, (_PANEL + 0.25) * n_lines))
    status = np.asarray(archive.status)
    source_id = np.asarray(archive.source_id)
    for k, i in enumerate(shown):
        ax = figure.add_subplot(n_lines, n_cols, k + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        code = Status(int(status[i]))
        name = str(source_id[i])
        name = name if len(name) <= 18 else name[:17] + "…"
        if code in _CUT:
            image = np.asarray(archive[i])[c]
            ax.imshow(image, origin="lower", cmap=colours, norm=_display_norm(image),
                      interpolation="nearest")
            title = name if code == Status.OK else f"{name}\n{code.name}"
        else:  # no cutout: say why
            ax.text(0.5, 0.5, code.name.replace("_", " "), ha="center", va="center",
                    fontsize=7, transform=ax.transAxes)
            title = name
        ax.set_title(title, fontsize=7)
    figure.suptitle(
        f"{os.path.basename(os.path.normpath(archive.path))}: band "
        f"{archive.bands[c]}", fontsize=9,
    )
    figure.tight_layout()
    if path is not None:
        figure.savefig(os.fspath(path), dpi=100)
    return figure
