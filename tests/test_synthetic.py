# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of the synthetic survey generator `cutana.bench.synthetic`."""

import ast
import filecmp
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import NoOverlapError, PartialOverlapError
from astropy.nddata.utils import overlap_slices
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.stats import norm

from cutana.bench import Survey, make_demo_survey, make_survey
from cutana.bench.synthetic import BAND_PROPERTIES, tile_file_name

BANDS = ("VIS", "NIR-Y", "NIR-J", "NIR-H")
SMALL = dict(
    n_tiles=4,
    tile_size=300,
    n_sources=200,
    overlap_pixels=40,
    edge_fraction=0.1,
    off_tile_fraction=0.05,
    bad_row_fraction=0.04,
    size_range_pixels=(16, 48),
    seed=3,
)


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A small four-tile, four-band survey shared by the tests of this module."""
    return make_survey(tmp_path_factory.mktemp("survey"), **SMALL)


def _box_overlap(x, y, size, shape):
    """'inside', 'partial' or 'none' for a square box, by astropy's overlap_slices."""
    try:
        overlap_slices(shape, (size, size), (y, x), mode="strict")
    except NoOverlapError:
        return "none"
    except PartialOverlapError:
        return "partial"
    return "inside"


def test_files_exist(survey):
    """Test that every tile file and the catalogue exist with Euclid-like names."""
    assert isinstance(survey, Survey)
    assert survey.bands == list(BANDS)
    assert len(survey.tile_paths) == 4
    for k, paths in enumerate(survey.tile_paths):
        assert len(paths) == len(BANDS)
        for band, path in zip(BANDS, paths, strict=True):
            assert Path(path).is_absolute()
            assert Path(path).is_file()
            assert Path(path).name == (
                f"EUC_MER_BGSUB-MOSAIC-{band}_TILE{survey.tile_ids[k]}"
                "-SYNTH_20260101T000000.000000Z_00.00.fits"
            )
    assert Path(survey.catalogue_path).is_file()
    assert survey.n_sources == len(survey.truth) == SMALL["n_sources"]
    assert sorted(set(survey.paths)) == sorted(p for t in survey.tile_paths for p in t)


def test_headers(survey):
    """Test that each file has the band keywords, a TAN CD WCS and >f4 pixels."""
    for k, paths in enumerate(survey.tile_paths):
        for band, path in zip(BANDS, paths, strict=True):
            with fits.open(path, memmap=True) as hdul:
                assert len(hdul) == 1
                header = hdul[0].header
                assert hdul[0].data.dtype == np.dtype(">f4")
                assert hdul[0].data.shape == (300, 300)
            assert header["BITPIX"] == -32
            assert header["BAND"] == band
            assert header["FILTER"] == BAND_PROPERTIES[band]["filter"]
            assert header["MAGZERO"] == BAND_PROPERTIES[band]["magzero"]
            assert header["TILEID"] == survey.tile_ids[k]
            assert header["BUNIT"] == "ADU"
            assert header["CTYPE1"] == "RA---TAN"
            assert header["CTYPE2"] == "DEC--TAN"
            assert "CD1_1" in header and "CD2_2" in header
            wcs = WCS(header)
            scales = proj_plane_pixel_scales(wcs) * 3600
            np.testing.assert_allclose(scales, [0.1, 0.1], rtol=1e-12)
    assert BAND_PROPERTIES["VIS"]["magzero"] == 24.6
    assert 30.0 <= BAND_PROPERTIES["NIR-H"]["magzero"] <= 30.1


def test_wcs_maps_truth(survey):
    """Test that each tile's WCS maps the catalogue RA/Dec to the truth pixels."""
    truth = survey.truth
    good = np.isfinite(truth["mosaic_x"])
    sky = SkyCoord(truth["ra"][good], truth["dec"][good], unit="deg")
    for k in range(len(survey.tile_paths)):
        wcs = WCS(fits.getheader(survey.tile_paths[k][2]))
        x, y = wcs.world_to_pixel(sky)
        np.testing.assert_allclose(x, truth["x_tile"][good, k], atol=1e-6)
        np.testing.assert_allclose(y, truth["y_tile"][good, k], atol=1e-6)
    # x, y of the chosen tile are the matching columns of x_tile, y_tile
    has = truth["tile"] >= 0
    rows = np.flatnonzero(has)
    np.testing.assert_array_equal(
        truth["x"][has], truth["x_tile"][rows, truth["tile"][has]]
    )
    np.testing.assert_array_equal(
        truth["y"][has], truth["y_tile"][rows, truth["tile"][has]]
    )
    assert survey.wcs(1).wcs.compare(WCS(fits.getheader(survey.tile_paths[1][0])).wcs)


def test_tiles_overlap(survey):
    """Test that neighbouring tiles overlap by exactly overlap_pixels."""
    assert survey.grid_shape == (2, 2)
    step = 300 - SMALL["overlap_pixels"]
    assert survey.tile_origins == [(0, 0), (step, 0), (0, step), (step, step)]
    wcs0 = WCS(fits.getheader(survey.tile_paths[0][0]))
    wcs1 = WCS(fits.getheader(survey.tile_paths[1][0]))
    wcs2 = WCS(fits.getheader(survey.tile_paths[2][0]))
    # column 0 of tile 1 is column `step` of tile 0; row 0 of tile 2 likewise
    ys = np.arange(0, 300, 37.0)
    ra0, dec0 = wcs0.pixel_to_world_values(np.full_like(ys, step), ys)
    ra1, dec1 = wcs1.pixel_to_world_values(np.zeros_like(ys), ys)
    np.testing.assert_allclose(ra0, ra1, rtol=0, atol=1e-11)
    np.testing.assert_allclose(dec0, dec1, rtol=0, atol=1e-11)
    ra0, dec0 = wcs0.pixel_to_world_values(ys, np.full_like(ys, step))
    ra2, dec2 = wcs2.pixel_to_world_values(ys, np.zeros_like(ys))
    np.testing.assert_allclose(ra0, ra2, rtol=0, atol=1e-11)
    np.testing.assert_allclose(dec0, dec2, rtol=0, atol=1e-11)
    # the overlap strips hold the same sky: their difference is pure noise of
    # sqrt(2) sigma, while the images themselves carry galaxies
    band = 1
    a = fits.getdata(survey.tile_paths[0][band])[:, step:].astype(float)
    b = fits.getdata(survey.tile_paths[1][band])[:, : SMALL["overlap_pixels"]].astype(
        float
    )
    sigma = 10 ** (
        -0.4 * (BAND_PROPERTIES["NIR-Y"]["depth"] - BAND_PROPERTIES["NIR-Y"]["magzero"])
    )
    np.testing.assert_allclose(np.std(a - b), np.sqrt(2) * sigma, rtol=0.05)
    assert np.abs(a).max() > 20 * sigma


def test_categories_by_astropy(survey):
    """Test that each row's category agrees with astropy's overlap_slices."""
    truth = survey.truth
    cat = Table.read(survey.catalogue_path)
    wcs = [WCS(fits.getheader(paths[0])) for paths in survey.tile_paths]
    for row in truth:
        category = row["category"]
        if category == "bad":
            continue
        size = int(cat["diameter_pixel"][row["row"]])
        sky = SkyCoord(cat["RA"][row["row"]], cat["Dec"][row["row"]], unit="deg")
        overlaps = [_box_overlap(*w.world_to_pixel(sky), size, (300, 300)) for w in wcs]
        if category == "ok":
            assert "inside" in overlaps
            assert overlaps[row["tile"]] == "inside"
        elif category == "edge":
            assert "inside" not in overlaps
            assert overlaps[row["tile"]] == "partial"
            # the cutout crosses the outer border of the mosaic
            mx = my = 2 * 300 - SMALL["overlap_pixels"]
            x, y = row["mosaic_x"], row["mosaic_y"]
            assert min(x, y, mx - 1 - x, my - 1 - y) < size / 2 - 1
        else:
            assert overlaps == ["none"] * 4
        np.testing.assert_array_equal(
            row["inside_tile"], [o == "inside" for o in overlaps]
        )


def test_fractions(survey):
    """Test that the numbers of edge, off-tile and bad rows follow the fractions."""
    truth = survey.truth
    n = SMALL["n_sources"]
    counts = {
        c: int(np.sum(truth["category"] == c)) for c in ("ok", "edge", "off", "bad")
    }
    assert counts == {"ok": 162, "edge": 20, "off": 10, "bad": 8}
    assert counts["edge"] == round(SMALL["edge_fraction"] * n)
    kinds, nk = np.unique(
        truth["bad_kind"][truth["category"] == "bad"], return_counts=True
    )
    assert list(kinds) == [
        "dec_out_of_range",
        "duplicate_id",
        "nan_ra",
        "negative_size",
    ]
    assert list(nk) == [2, 2, 2, 2]
    assert list(np.unique(truth["expected_status"])) == [0, 1, 2, 3]
    # the rows are shuffled, not grouped by category
    first = {c: int(np.flatnonzero(truth["category"] == c)[0]) for c in counts}
    assert max(first.values()) < n / 2


def test_bad_rows_in_catalogue(survey):
    """Test that bad rows carry their defect and duplicates repeat an earlier id."""
    cat = Table.read(survey.catalogue_path)
    truth = survey.truth
    for row in np.flatnonzero(truth["category"] == "bad"):
        kind = truth["bad_kind"][row]
        if kind == "nan_ra":
            assert np.isnan(cat["RA"][row])
        elif kind == "dec_out_of_range":
            assert cat["Dec"][row] == 95
        elif kind == "negative_size":
            assert cat["diameter_pixel"][row] < 0
        else:
            earlier = np.flatnonzero(cat["SourceID"][:row] == cat["SourceID"][row])
            assert len(earlier) == 1
            assert truth["category"][earlier[0]] != "bad"
    valid = truth["category"] != "bad"
    assert len(set(cat["SourceID"][valid])) == int(valid.sum())
    assert np.all(np.isfinite(cat["RA"][valid]))
    assert np.all(np.abs(cat["Dec"][valid]) <= 90)
    lo, hi = SMALL["size_range_pixels"]
    assert np.all(
        (cat["diameter_pixel"][valid] >= lo) & (cat["diameter_pixel"][valid] <= hi)
    )


def test_catalogue_columns(survey):
    """Test that the catalogue reads with astropy and fits_file_paths name its tile."""
    cat = Table.read(survey.catalogue_path, format="ascii.csv")
    assert cat.colnames == [
        "SourceID",
        "RA",
        "Dec",
        "diameter_pixel",
        "diameter_arcsec",
        "fits_file_paths",
    ]
    assert cat["SourceID"][0].startswith("SYN-")
    np.testing.assert_allclose(cat["diameter_arcsec"], cat["diameter_pixel"] * 0.1)
    truth = survey.truth
    for i, literal in enumerate(cat["fits_file_paths"]):
        paths = ast.literal_eval(literal)
        assert isinstance(paths, list)
        assert len(paths) == len(BANDS)
        assert all(Path(p).is_file() for p in paths)
        assert paths in survey.tile_paths
        if truth["tile"][i] >= 0:
            assert paths == survey.tile_paths[truth["tile"][i]]
    header = fits.getheader(ast.literal_eval(cat["fits_file_paths"][0])[3])
    assert header["BAND"] == "NIR-H"


def test_galaxy_flux(survey):
    """Test that pixel sums near a bright source match the galaxy model in two tiles."""
    truth = survey.truth
    both = truth["inside_tile"].sum(axis=1) >= 2
    row = truth[both][np.argmax(truth["flux"][both, 0])]
    drawn = np.isfinite(truth["mosaic_x"])
    others = truth[drawn]
    sums = []
    for k in np.flatnonzero(row["inside_tile"]):
        image = fits.getdata(survey.tile_paths[k][0]).astype(float)
        r = int(np.ceil(4 * max(row["sigma_x"], row["sigma_y"])))
        cx, cy = int(round(row["x_tile"][k])), int(round(row["y_tile"][k]))
        measured = image[cy - r : cy + r + 1, cx - r : cx + r + 1].sum()
        # independent reference: every galaxy's Gaussian integrated over the box
        gx = others["x_tile"][:, k]
        gy = others["y_tile"][:, k]
        fx = norm.cdf(cx + r + 0.5, gx, others["sigma_x"]) - norm.cdf(
            cx - r - 0.5, gx, others["sigma_x"]
        )
        fy = norm.cdf(cy + r + 0.5, gy, others["sigma_y"]) - norm.cdf(
            cy - r - 0.5, gy, others["sigma_y"]
        )
        expected = np.sum(others["flux"][:, 0] * fx * fy)
        assert measured == pytest.approx(expected, rel=0.01)
        sums.append(measured)
    assert len(sums) >= 2


def test_deterministic(tmp_path):
    """Test that the same seed gives identical bytes and another seed other pixels."""
    kw = dict(
        n_tiles=2,
        bands=("VIS", "NIR-J"),
        tile_size=120,
        n_sources=40,
        size_range_pixels=(16, 32),
        bad_row_fraction=0.1,
        seed=7,
    )
    a = make_survey(tmp_path / "a", **kw)
    b = make_survey(tmp_path / "b", **kw)
    c = make_survey(tmp_path / "c", **{**kw, "seed": 8})
    for pa, pb, pc in zip(a.paths, b.paths, c.paths, strict=True):
        assert filecmp.cmp(pa, pb, shallow=False)
        assert not filecmp.cmp(pa, pc, shallow=False)
    text_a = Path(a.catalogue_path).read_text().replace(str(tmp_path / "a"), "DIR")
    text_b = Path(b.catalogue_path).read_text().replace(str(tmp_path / "b"), "DIR")
    assert text_a == text_b


@pytest.mark.parametrize("fmt", ["csv", "ecsv", "fits", "parquet"])
def test_catalogue_formats(tmp_path, fmt):
    """Test that every catalogue format reads back with astropy to the same values."""
    s = make_survey(
        tmp_path,
        n_tiles=1,
        bands=("VIS",),
        tile_size=100,
        n_sources=10,
        size_range_pixels=(8, 16),
        catalogue_format=fmt,
    )
    assert s.catalogue_path.endswith(f"catalogue.{fmt}")
    cat = Table.read(s.catalogue_path)
    assert [str(v) for v in cat["SourceID"]] == list(s.truth["source_id"])
    np.testing.assert_array_equal(cat["RA"], s.truth["ra"])
    np.testing.assert_array_equal(cat["Dec"], s.truth["dec"])
    assert ast.literal_eval(str(cat["fits_file_paths"][0])) == s.tile_paths[0]


def test_no_cutana_column(tmp_path):
    """Test that cutana_style=False leaves out the fits_file_paths column."""
    s = make_survey(
        tmp_path,
        n_tiles=1,
        bands=("VIS",),
        tile_size=100,
        n_sources=5,
        size_range_pixels=(8, 16),
        cutana_style=False,
    )
    assert "fits_file_paths" not in Table.read(s.catalogue_path).colnames


@pytest.mark.parametrize(
    ("dtype", "compress"), [(">f4", True), (">i2", False), (">f8", False)]
)
def test_dtypes_and_compression(tmp_path, dtype, compress):
    """Test that other pixel types and compressed tiles hold the default image."""
    kw = dict(
        n_tiles=1,
        bands=("NIR-Y",),
        tile_size=100,
        n_sources=10,
        size_range_pixels=(8, 16),
    )
    ref = fits.getdata(make_survey(tmp_path / "ref", **kw).tile_paths[0][0])
    s = make_survey(tmp_path / "x", dtype=dtype, compress=compress, **kw)
    header = fits.getheader(s.tile_paths[0][0], s.hdu)
    assert header["BITPIX"] == {">f4": -32, ">i2": 16, ">f8": -64}[dtype]
    with fits.open(s.tile_paths[0][0]) as hdul:
        assert len(hdul) == (2 if compress else 1)
        assert s.hdu == (1 if compress else 0)
        hdu = hdul[s.hdu]
        assert hdu.header["BAND"] == "NIR-Y"
        data = hdu.data
        if dtype == ">i2":
            bscale = header["BSCALE"]
            np.testing.assert_allclose(data, ref, rtol=0, atol=bscale / 2 * 1.0001)
        else:
            np.testing.assert_array_equal(data, ref)


def test_demo_survey(tmp_path):
    """Test that the demo survey is small and has every category of row."""
    s = make_demo_survey(tmp_path)
    assert s.grid_shape == (2, 2)
    assert s.n_sources == 400
    assert set(s.truth["category"]) == {"ok", "edge", "off", "bad"}
    assert tile_file_name("VIS", s.tile_ids[0]) == Path(s.tile_paths[0][0]).name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_tiles": 0}, "n_tiles must be an integer >= 1, got 0"),
        ({"bands": ()}, "bands must be a non-empty"),
        ({"bands": ("VIS", "VIS")}, "distinct"),
        ({"overlap_pixels": 100}, "overlap_pixels must be smaller"),
        ({"edge_fraction": 1.5}, "edge_fraction must be a number between 0 and 1"),
        ({"edge_fraction": 0.6, "off_tile_fraction": 0.6}, "add up to"),
        ({"size_range_pixels": (16, 120)}, "too small for cutouts of up to 120"),
        ({"dtype": "<u2"}, "dtype must be one of"),
        ({"catalogue_format": "votable"}, "catalogue_format must be one of"),
        ({"pixel_scale_arcsec": -1}, "pixel_scale_arcsec must be a positive"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    """Test that invalid arguments raise ValueError naming the bad value."""
    base = dict(n_tiles=1, tile_size=100, n_sources=5, size_range_pixels=(8, 16))
    with pytest.raises(ValueError, match=match):
        make_survey(tmp_path, **{**base, **kwargs})
