# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of `cutana.preview` and ``cutana preview``: the panels hold the
output's own cutouts, with astropy's zscale limits for floats."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from astropy.visualization import ZScaleInterval  # noqa: E402

import cutana  # noqa: E402
from cutana import Status  # noqa: E402
from cutana.bench import make_demo_survey  # noqa: E402
from cutana.cli import main  # noqa: E402
from cutana.preview import DEFAULT_ROWS, plot_cutouts  # noqa: E402


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A float32 Zarr output and a uint8 FITS one of the demo survey."""
    tmp = tmp_path_factory.mktemp("preview")
    survey = make_demo_survey(tmp / "survey", n_sources=40)
    zarr_out = tmp / "float.zarr"
    cutana.make_cutouts(survey.catalogue_path, zarr_out, size=20, progress=False)
    fits_out = tmp / "uint8"
    cutana.make_cutouts(survey.catalogue_path, fits_out, size=20, format="fits",
                        normalize="asinh", dtype="uint8", progress=False)
    return zarr_out, fits_out


def _panels(figure):
    """(images, titles, texts) of each panel of a figure."""
    out = []
    for ax in figure.axes:
        images = ax.get_images()
        out.append((
            images[0] if images else None,
            ax.get_title(),
            [t.get_text() for t in ax.texts],
        ))
    return out


def test_panels_hold_the_cutouts_of_their_rows(outputs):
    """Test that each panel shows its row's cutout in the band asked for,
    scaled over astropy's zscale limits, titled with the source id and the
    status of a partial cutout, and that a row without cutout names its
    status."""
    out, _ = outputs
    archive = cutana.open(out)
    status = np.asarray(archive.status)
    assert {Status.OK, Status.PARTIAL_OVERLAP} <= set(status.tolist())
    assert (~np.isin(status, [Status.OK, Status.PARTIAL_OVERLAP])).any()
    figure = plot_cutouts(out, band="NIR-J", columns=7)
    panels = _panels(figure)
    assert len(panels) == DEFAULT_ROWS
    c = archive.bands.index("NIR-J")
    for i, (image, title, texts) in enumerate(panels):
        code = Status(int(status[i]))
        assert title.splitlines()[0] == archive.source_id[i]
        if code not in (Status.OK, Status.PARTIAL_OVERLAP):
            assert image is None and texts == [code.name.replace("_", " ")]
            continue
        expect = np.asarray(archive[i])[c]
        np.testing.assert_array_equal(np.ma.getdata(image.get_array()), expect)
        vmin, vmax = ZScaleInterval().get_limits(expect[np.isfinite(expect)])
        assert (image.norm.vmin, image.norm.vmax) == pytest.approx((vmin, vmax))
        assert (len(title.splitlines()) == 2) == (code == Status.PARTIAL_OVERLAP)
    # 32 panels of 7 per line: 5 lines
    assert figure.axes[-1].get_subplotspec().get_geometry()[:2] == (5, 7)


def test_rows_and_band_by_index(outputs):
    """Test that rows are shown in the order asked for (also negative ones)
    and that a band index selects that channel."""
    out, _ = outputs
    archive = cutana.open(out)
    cut = np.flatnonzero(np.asarray(archive.status) == Status.OK)
    rows = [int(cut[3]), int(cut[0]), int(cut[-1]) - len(archive)]
    figure = plot_cutouts(archive, rows, band=2)
    for (image, title, _), i in zip(_panels(figure), rows, strict=True):
        assert title == archive.source_id[i]
        np.testing.assert_array_equal(np.ma.getdata(image.get_array()),
                                      np.asarray(archive[i])[2])


def test_integer_cutouts_are_shown_as_stretched(outputs, tmp_path):
    """Test that integer (already stretched) cutouts of a FITS output are
    shown over the whole range of their dtype, and that the figure is saved."""
    _, out = outputs
    archive = cutana.open(out)
    ok = np.flatnonzero(np.asarray(archive.status) == Status.OK)[:5].tolist()
    path = tmp_path / "p.png"
    figure = plot_cutouts(out, ok, path=path)
    for (image, _, _), i in zip(_panels(figure), ok, strict=True):
        np.testing.assert_array_equal(image.get_array(), np.asarray(archive[i])[0])
        assert (image.norm.vmin, image.norm.vmax) == (0, 255)
    assert path.stat().st_size > 0


def test_bad_arguments_are_named(outputs):
    """Test that a band or row not in the output, and a bad column count,
    are clear errors."""
    out, _ = outputs
    with pytest.raises(ValueError, match=r"band 'Y' is not in the output; its bands "
                       r"are \['VIS', 'NIR-Y', 'NIR-J', 'NIR-H'\]"):
        plot_cutouts(out, band="Y")
    with pytest.raises(IndexError, match="band 4 is out of range"):
        plot_cutouts(out, band=4)
    with pytest.raises(IndexError, match="row 40 is out of range for an output of 40"):
        plot_cutouts(out, [0, 40])
    with pytest.raises(ValueError, match="columns must be a positive integer"):
        plot_cutouts(out, columns=0)


def test_preview_command(outputs, tmp_path, capsys):
    """Test that ``cutana preview`` writes an image of the rows asked for,
    by slice, and names a bad band, bad rows and a missing output."""
    import matplotlib.image

    out, _ = outputs
    path = tmp_path / "grid.png"
    assert main(["preview", str(out), "--rows", "4:10", "--band", "VIS",
                 "--columns", "3", "-o", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().err
    # 2 lines of 3 panels, of 1.6 x 1.85 inches each, at 100 dpi
    assert matplotlib.image.imread(path).shape[:2] == (370, 480)
    assert main(["preview", str(out), "--rows", "1", "2"]) == 0  # (default file)
    assert (out.parent / f"{out.name}.preview.png").exists()
    assert main(["preview", str(out), "--band", "Y", "-o", str(path)]) == 2
    assert "band 'Y' is not in the output" in capsys.readouterr().err
    assert main(["preview", str(out), "--rows", "a:b", "-o", str(path)]) == 2
    assert "--rows 'a:b' is not a START:STOP slice" in capsys.readouterr().err
    assert main(["preview", str(tmp_path / "nothing"), "-o", str(path)]) == 2
    assert "is not a cutana output" in capsys.readouterr().err
