# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of cutana.tiles: indexing, grouping, broken files, assignment, pixels."""

import json
import math
import mmap
import os

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D, NoOverlapError
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from cutana.exceptions import TileError
from cutana.tiles import Assignment, BandFile, Tile, TileIndex, open_pixels

SCALE = 0.1 / 3600.0  # 0.1 arcsec per pixel, in degrees


def _wcs(crval, shape, *, rotation_deg=0.0, scale=SCALE):
    """A TAN WCS centred on ``crval`` for an image of ``shape`` (ny, nx)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(crval)
    w.wcs.crpix = [(shape[1] + 1) / 2.0, (shape[0] + 1) / 2.0]
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    w.wcs.cd = np.array([[-scale * c, scale * s], [scale * s, scale * c]])
    return w


def make_tile(
    path,
    crval=(150.0, 2.0),
    shape=(60, 80),
    *,
    band="VIS",
    tileid=None,
    dtype=">f4",
    compressed=False,
    bzero=None,
    wcs=True,
    rotation_deg=0.0,
    scale=SCALE,
    extname=None,
    keywords=None,
    seed=0,
):
    """Write a tiny synthetic tile and return its pixel values as written."""
    rng = np.random.default_rng(seed)
    header = (
        _wcs(crval, shape, rotation_deg=rotation_deg, scale=scale).to_header()
        if wcs
        else fits.Header()
    )
    if band is not None:
        header["BAND"] = band
    if tileid is not None:
        header["TILEID"] = tileid
    header["MAGZERO"] = 24.5
    for key, value in (keywords or {}).items():
        header[key] = value
    if np.dtype(dtype).kind == "f":
        data = rng.normal(100.0, 10.0, shape).astype(dtype)
    else:
        data = rng.integers(-1000, 1000, shape).astype(dtype)
    if bzero is not None:
        header["BSCALE"] = 1
        header["BZERO"] = bzero
    if compressed:
        hdul = fits.HDUList(
            [fits.PrimaryHDU(), fits.CompImageHDU(data, header, name=extname)]
        )
    elif extname is not None:
        hdul = fits.HDUList(
            [fits.PrimaryHDU(), fits.ImageHDU(data, header, name=extname)]
        )
    else:
        hdul = fits.HDUList([fits.PrimaryHDU(data, header)])
    if bzero is not None and not compressed:
        # keep the stored integers exactly as given: write raw, no scaling
        hdul[-1].header["BZERO"] = bzero
    hdul.writeto(path, overwrite=True)
    return data


def _grid_tiles(tmp_path, bands=("VIS", "NIR-H")):
    """Two sky tiles, each in two bands, grouped by TILEID."""
    paths = []
    for t, crval in enumerate([(150.0, 2.0), (150.0, 2.01)]):
        for b in bands:
            p = tmp_path / f"img_{t}_{b}.fits"
            make_tile(p, crval, band=b, tileid=f"T{t}")
            paths.append(str(p))
    return paths


# --------------------------------------------------------------------------
# indexing
# --------------------------------------------------------------------------


def test_group_by_tileid(tmp_path):
    """Test that files sharing TILEID become one tile with one file per band."""
    _grid_tiles(tmp_path)
    index = TileIndex.from_paths(str(tmp_path / "*.fits"))
    assert index.errors == []
    assert index.bands == ["NIR-H", "VIS"]  # first appearance in sorted paths
    assert [t.key for t in index.tiles] == ["T0", "T1"]
    for t, tile in enumerate(index.tiles):
        assert isinstance(tile, Tile)
        assert [b.band for b in tile.bands] == ["NIR-H", "VIS"]
        names = [os.path.basename(b.path) for b in tile.bands]
        assert names == [f"img_{t}_NIR-H.fits", f"img_{t}_VIS.fits"]
        assert tile.shape == (60, 80)
        assert tile.same_grid
        band = tile.bands[0]
        assert band.dtype == ">f4"
        assert band.compressed is False
        assert band.hdu == 0
        assert band.shape == (60, 80)


def test_group_by_euclid_file_name(tmp_path):
    """Test that TILE<digits> in Euclid names groups files and names bands."""
    for tile, dec in (("102018211", 2.0), ("102018212", 2.01)):
        for band in ("VIS", "NIR-H", "NIR-J"):
            name = f"EUC_MER_BGSUB-MOSAIC-{band}_TILE{tile}-ABC123_20241017T0Z_00.fits"
            make_tile(tmp_path / name, (150.0, dec), band=None)
    index = TileIndex.from_paths([str(tmp_path)])
    assert index.errors == []
    assert [t.key for t in index.tiles] == ["102018211", "102018212"]
    # sorted file names: NIR-H, NIR-J, VIS
    assert index.bands == ["NIR-H", "NIR-J", "VIS"]
    assert all(b is not None for t in index.tiles for b in t.bands)


def test_group_by_wcs(tmp_path):
    """Test that files without tile id are grouped by identical WCS and shape."""
    make_tile(tmp_path / "a_g.fits", (10.0, 0.0), band="g")
    make_tile(tmp_path / "a_r.fits", (10.0, 0.0), band="r")
    make_tile(tmp_path / "b_g.fits", (10.0, 0.01), band="g")
    make_tile(tmp_path / "c_r.fits", (10.0, 0.0), shape=(61, 80), band="r")
    index = TileIndex.from_paths(sorted(str(p) for p in tmp_path.iterdir()))
    assert index.bands == ["g", "r"]
    assert len(index.tiles) == 3
    keys = [t.key for t in index.tiles]
    assert all(k.startswith("wcs-") for k in keys)
    assert len(set(keys)) == 3
    assert keys == sorted(keys)  # tiles in the order of their keys
    tiles = {os.path.basename(t.reference.path): t for t in index.tiles}
    assert [os.path.basename(b.path) for b in tiles["a_g.fits"].bands] == [
        "a_g.fits", "a_r.fits"
    ]
    assert tiles["b_g.fits"].bands[1] is None
    assert tiles["b_g.fits"].missing_bands == (1,)
    assert tiles["c_r.fits"].bands[0] is None
    assert tiles["c_r.fits"].shape == (61, 80)


def test_tiles_of_one_unnamed_file_each_are_one_band(tmp_path):
    """Test that tiles of one file each, none naming its band (no keyword, no
    Euclid name), are one band named after what their file names share,
    so that every tile has it, instead of one band per file that every
    other tile lacks."""
    for t in range(3):
        make_tile(tmp_path / f"field{t}.fits", (150.0, 2.0 + 0.01 * t), band=None)
    index = TileIndex.from_paths(str(tmp_path / "field*.fits"))
    assert index.errors == []
    assert index.bands == ["field"]
    assert len(index.tiles) == 3
    assert sorted(os.path.basename(t.bands[0].path) for t in index.tiles) == [
        "field0.fits", "field1.fits", "field2.fits"
    ]
    for tile in index.tiles:
        assert tile.missing_bands == () and tile.bands[0].band == "field"
    # names that share nothing give the band 'image'; one tile keeps its name
    os.rename(tmp_path / "field1.fits", tmp_path / "other.fits")
    index = TileIndex.from_paths(str(tmp_path / "*.fits"))
    assert index.bands == ["image"] and len(index.tiles) == 3
    assert TileIndex.from_paths(str(tmp_path / "other.fits")).bands == ["other"]


def test_unnamed_images_of_one_field_stay_bands(tmp_path):
    """Test that single files whose images share a centre (bands of one field
    on other pixel grids, not tiles of one band) keep their names as bands,
    of one tile whose second band is on a grid of its own."""
    make_tile(tmp_path / "img_g.fits", band=None)
    make_tile(tmp_path / "img_r.fits", (150.0 + 2e-4, 2.0), band=None,
              shape=(30, 40), scale=2 * SCALE)
    index = TileIndex.from_paths(str(tmp_path / "img_*.fits"))
    assert index.bands == ["img_g", "img_r"]
    assert len(index.tiles) == 1 and index.tiles[0].own_grid == (1,)


@pytest.mark.parametrize("order", ["gr", "rg"])
def test_bands_of_one_field_on_other_grids_are_one_tile(tmp_path, order):
    """Test that band files with no tile id, of one field on different pixel
    grids, are one tile (bands in the files' order), while files of other
    bands whose fields lie apart stay tiles of their own."""
    make_tile(tmp_path / "g.fits", band="g")
    make_tile(tmp_path / "r.fits", (150.0 + 2e-4, 2.0), band="r",
              shape=(30, 40), scale=2 * SCALE)
    make_tile(tmp_path / "i.fits", (151.0, 2.0), band="i")  # another field
    index = TileIndex.from_paths([str(tmp_path / f"{b}.fits") for b in order + "i"])
    assert index.errors == []
    assert index.bands == [*order, "i"]
    assert len(index.tiles) == 2
    joined = next(t for t in index.tiles if t.bands[0] is not None)
    assert [b.band for b in joined.bands[:2]] == list(order)
    assert joined.own_grid == (1,) and joined.bands[2] is None


def test_a_source_off_the_reference_band_on_another_grid_is_assigned(tmp_path):
    """Test that a source whose box misses the reference band file (g) but
    meets a band file on a grid of its own (r, reaching 0.7 arcsec further
    east) is assigned to the tile, as a partial cutout (astropy's Cutout2D
    of r gives one), by position and by file lists; one that misses both is
    not."""
    g, r = tmp_path / "g.fits", tmp_path / "r.fits"
    make_tile(g, band="g")
    make_tile(r, (150.0 + 2e-4, 2.0), band="r", shape=(30, 40), scale=2 * SCALE)
    index = TileIndex.from_paths([str(g), str(r)])
    assert index.tiles[0].own_grid == (1,)
    g_wcs, r_wcs = (WCS(fits.getheader(p)) for p in (g, r))
    ra, dec = g_wcs.all_pix2world([40.0, -5.0, -20.0], [30.0, 30.0, 30.0], 0)
    sky = SkyCoord(ra, dec, unit="deg")
    for k, (in_g, in_r) in enumerate([(True, True), (False, True), (False, False)]):
        for path, w, meets in ((g, g_wcs, in_g), (r, r_wcs, in_r)):
            try:
                Cutout2D(fits.getdata(path), sky[k], 4, wcs=w)
                assert meets, (k, path.name)
            except NoOverlapError:
                assert not meets, (k, path.name)
    by_position = index.assign(ra, dec, 4)
    lists = [(str(g), str(r))] * 3
    by_files, _ = TileIndex.from_file_lists(lists).assign_by_files(lists, ra, dec, 4)
    for a in (by_position, by_files):
        assert a.tile.tolist() == [0, 0, -1]
        assert a.inside.tolist() == [True, False, False]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        # what differs within a tile is the band
        ({"A": ("T0_g", "T0_r"), "B": ("T1_g", "T1_r")}, "g r g r"),
        ({"A": ("deep.3.r.sci", "deep.3.i.sci"), "B": ("deep.4.r.sci", "deep.4.i.sci")},
         "r i r i"),
        ({"A": ("T0_g", "T0_g_rms"), "B": ("T1_g", "T1_g_rms")}, "g g_rms g g_rms"),
        # band names with a hyphen stay whole, but a hyphen can also separate
        ({"A": ("T0_VIS", "T0_NIR-H"), "B": ("T1_VIS", "T1_NIR-H")},
         "VIS NIR-H VIS NIR-H"),
        ({"A": ("sim_NIR-Y_0", "sim_NIR-H_0"), "B": ("sim_NIR-Y_1", "sim_NIR-H_1")},
         "NIR-Y NIR-H NIR-Y NIR-H"),
        ({"A": ("T0-g", "T0-r"), "B": ("T1-g", "T1-r")}, "g r g r"),
        # a tile of one file (its other unreadable, say) takes its band's word
        ({"A": ("T0_g", "T0_r"), "B": ("T1_r",)}, "g r r"),
        # names that do not line up stay whole
        ({"A": ("T0_g", "T0_r"), "B": ("T1_x", "T1_y")}, None),
        ({"A": ("T0_g", "T0_r"), "B": ("T1_z",)}, None),
        ({"A": ("T0", "T0_g"), "B": ("T1", "T1_g")}, None),
    ],
)
def test_unnamed_bands_from_what_differs_within_a_tile(tmp_path, names, expected):
    """Test that when no file names its band and the file names do not give
    every tile the same bands, the parts of the names that differ between a
    tile's files are the bands, if that lines the tiles up; otherwise each
    file's name without ending stays its band."""
    stems = [stem for group in names.values() for stem in group]
    for t, (sky, group) in enumerate(names.items()):
        for k, stem in enumerate(group):
            make_tile(tmp_path / f"{stem}.fits", (150.0, 2.0 + 0.01 * t), band=None,
                      tileid=sky, seed=k)
    index = TileIndex.from_paths(str(tmp_path / "*.fits"))
    assert index.errors == []
    assert len(index.tiles) == 2
    got = {os.path.basename(b.path)[:-5]: b.band
           for t in index.tiles for b in t.bands if b is not None}
    want = stems if expected is None else expected.split()
    assert got == dict(zip(stems, want, strict=True))
    assert sorted(index.bands) == sorted(set(want))


@pytest.mark.parametrize("n_tiles", [1, 2])
def test_unnamed_bands_from_folders(tmp_path, n_tiles):
    """Test that band files of the same name in one folder per band
    (``g/T0.fits``, ``r/T0.fits``) are bands named after their folders, and
    all of them are kept, also for a single tile."""
    for band in ("g", "r"):
        (tmp_path / band).mkdir()
        for t in range(n_tiles):
            make_tile(tmp_path / band / f"T{t}.fits", (150.0, 2.0 + 0.01 * t),
                      band=None, seed=t)
    index = TileIndex.from_paths(str(tmp_path / "*" / "*.fits"))
    assert index.errors == []
    assert index.bands == ["g", "r"] and len(index.tiles) == n_tiles
    got = sorted([b.path for b in tile.bands] for tile in index.tiles)
    assert got == [
        [str(tmp_path / band / f"T{t}.fits") for band in ("g", "r")]
        for t in range(n_tiles)
    ]


def test_indexing_progress_bar(tmp_path, monkeypatch, capsys):
    """Test that indexing shows a progress bar over the files when asked
    (and the headers take longer than the delay, here 0 s), not otherwise,
    and indexes the same either way."""
    import cutana.tiles as tiles_module

    monkeypatch.setattr(tiles_module, "INDEX_PROGRESS_DELAY", 0.0)
    paths = []
    for t in range(3):
        for band in ("g", "r"):
            paths.append(str(tmp_path / f"T{t}_{band}.fits"))
            make_tile(paths[-1], (150.0, 2.0 + 0.01 * t), band=band, tileid=f"T{t}")
    lists = [tuple(paths[2 * t : 2 * t + 2]) for t in range(3)]
    for make in (
        lambda progress: TileIndex.from_paths(paths, progress=progress),
        lambda progress: TileIndex.from_file_lists(lists, progress=progress),
    ):
        quiet = make(False)
        assert "indexing tiles" not in capsys.readouterr().err
        shown = make(True)
        err = capsys.readouterr().err
        assert "indexing tiles" in err and "/6 " in err
        assert [[b.path for b in t.bands] for t in shown.tiles] == [
            [b.path for b in t.bands] for t in quiet.tiles
        ]
        assert shown.bands == quiet.bands == ["g", "r"]


def test_tiles_are_numbered_whatever_files_are_missing(tmp_path):
    """Test that the tiles are in the order of their keys, also when the
    first file of a tile is missing: a tile's number (and which of two
    overlapping tiles a source equally deep in both goes to) then does not
    change when a band file is put back, which an interrupted run resumed
    since relies on. The tile was listed after all others."""
    for tile, ra in (("102000001", 10.0), ("102000002", 10.02)):
        for band in ("NIR-H", "VIS"):
            make_tile(tmp_path / f"EUC_MER_BGSUB-MOSAIC-{band}_TILE{tile}.fits",
                      (ra, 0.0), band=band, tileid=tile)
    paths = sorted(str(p) for p in tmp_path.iterdir())
    whole = TileIndex.from_paths(paths)
    assert [t.key for t in whole.tiles] == ["102000001", "102000002"]
    lacking = TileIndex.from_paths(paths[1:])  # NIR-H of the first tile
    assert [t.key for t in lacking.tiles] == ["102000001", "102000002"]
    assert lacking.tiles[0].missing_bands == (0,)


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        ({"BAND": "b1", "FILTER": "f1", "FILTNAME": "n1"}, "b1"),
        ({"FILTER": "f1", "FILTNAME": "n1"}, "f1"),
        ({"FILTNAME": "n1"}, "n1"),
        ({}, "plain_name"),
    ],
)
def test_band_keyword_order(tmp_path, keywords, expected):
    """Test that the band comes from BAND, FILTER, FILTNAME, then the file name."""
    make_tile(tmp_path / "plain_name.fits.gz", band=None, keywords=keywords)
    index = TileIndex.from_paths(tmp_path / "plain_name.fits.gz")
    assert index.bands == [expected]


def test_band_selection_and_order(tmp_path):
    """Test that bands= selects and orders bands and rejects unknown bands."""
    _grid_tiles(tmp_path, bands=("g", "r", "i"))
    pattern = str(tmp_path / "*.fits")
    index = TileIndex.from_paths(pattern)
    assert index.bands == ["g", "i", "r"]  # first appearance in sorted paths
    index = TileIndex.from_paths(pattern, bands=["r", "g"])
    assert index.bands == ["r", "g"]
    for tile in index.tiles:
        assert [b.band for b in tile.bands] == ["r", "g"]
    with pytest.raises(
        ValueError,
        match=r"band 'z' was found in no tile file; bands found: 'g', 'i', 'r'",
    ):
        TileIndex.from_paths(pattern, bands=["g", "z"])
    with pytest.raises(ValueError, match=r"Did you mean 'r'"):
        TileIndex.from_paths(pattern, bands=["R"])


def test_same_header_band_uses_file_names(tmp_path):
    """Test that a science map and its RMS map with one FILTER get file-name bands."""
    make_tile(
        tmp_path / "EUC_MER_BGSUB-MOSAIC-VIS_TILE7-x.fits",
        keywords={"FILTER": "VIS"},
        band=None,
    )
    make_tile(
        tmp_path / "EUC_MER_MOSAIC-VIS-RMS_TILE7-x.fits",
        keywords={"FILTER": "VIS"},
        band=None,
    )
    index = TileIndex.from_paths(str(tmp_path / "*.fits"))
    assert index.errors == []
    assert sorted(index.bands) == ["VIS", "VIS-RMS"]
    assert len(index.tiles) == 1


@pytest.mark.parametrize("lists", [False, True])
def test_bands_on_other_pixel_grids_are_kept(tmp_path, lists):
    """Test that band files of a tile whose pixel grid differs from the
    reference band's (shifted reference pixel, other shape) are kept as
    bands on grids of their own, whose pixel positions come from their own
    WCS, while a file on the same grid to 4e-5 pixel shares the grid."""
    make_tile(tmp_path / "g.fits", tileid="7", band="g")
    make_tile(tmp_path / "r.fits", tileid="7", band="r", crval=(150.0001, 2.0))
    make_tile(tmp_path / "i.fits", tileid="7", band="i", shape=(50, 80))
    # the same grid as g, to 4e-5 pixel (CRVAL written with fewer digits)
    make_tile(tmp_path / "z.fits", tileid="7", band="z", crval=(150.0 + 1e-9, 2.0))
    paths = [str(tmp_path / f"{b}.fits") for b in "grzi"]
    if lists:
        index = TileIndex.from_file_lists([tuple(paths)])
    else:
        index = TileIndex.from_paths(paths)
    assert index.errors == []
    assert len(index.tiles) == 1
    tile = index.tiles[0]
    assert all(b is not None for b in tile.bands)
    assert sorted(index.bands[c] for c in tile.own_grid) == ["i", "r"]
    # positions in each band's own file, as astropy's WCS gives them
    from astropy.wcs import WCS

    ra, dec = np.array([150.001, 149.999]), np.array([2.0005, 1.9995])
    for c, name in enumerate(index.bands):
        x, y = index.band_pixels(0, c, ra, dec)
        ref = WCS(fits.getheader(tmp_path / f"{name}.fits")).all_world2pix(ra, dec, 0)
        assert_allclose(x, ref[0], rtol=0, atol=1e-9)
        assert_allclose(y, ref[1], rtol=0, atol=1e-9)
    xy = index.band_positions(np.array([0, -1]), ra, dec)
    r = index.bands.index("r")
    one = np.ravel(index.band_pixels(0, r, ra[:1], dec[:1]))
    assert_allclose(xy[0, r], one, rtol=0, atol=0)
    assert np.isnan(xy[1]).all() and np.isnan(xy[0, index.bands.index("z")]).all()
    # which bands are on grids of their own survives the serialisation
    again = TileIndex.from_dict(index.to_dict())
    assert again.tiles[0].own_grid == tile.own_grid


def test_no_band_positions_without_other_grids(tmp_path):
    """Test that an index whose tiles share one grid per tile gives no
    band positions (jobs then carry none)."""
    make_tile(tmp_path / "g.fits", tileid="7", band="g")
    make_tile(tmp_path / "r.fits", tileid="7", band="r")
    index = TileIndex.from_paths(str(tmp_path / "*.fits"))
    assert index.tiles[0].own_grid == ()
    assert index.band_positions(np.array([0]), [150.0], [2.0]) is None


def test_duplicate_band_in_tile_is_an_error(tmp_path):
    """Test that a second file of the same band and tile is reported, not used."""
    make_tile(tmp_path / "a.fits", tileid="7", band="VIS")
    make_tile(tmp_path / "b.fits", tileid="7", band="VIS")
    index = TileIndex.from_paths([str(tmp_path / "a.fits"), str(tmp_path / "b.fits")])
    assert len(index.tiles) == 1
    assert index.tiles[0].bands[0].path.endswith("a.fits")
    assert len(index.errors) == 1
    assert index.errors[0][0].endswith("b.fits")
    assert "already has a file for band 'VIS'" in index.errors[0][1]


def test_science_file_wins_over_a_background_model_of_its_band(tmp_path):
    """Test that of two files claiming a band, the one whose name gives it is used.

    A background model sorts before the science image (BGMOD < BGSUB) and
    has the same FILTER; the science image must not be displaced, and the
    band order must not depend on the model's presence.
    """
    for band, seed in (("VIS", 1), ("NIR-H", 2)):
        make_tile(
            tmp_path / f"EUC_MER_BGSUB-MOSAIC-{band}_TILE7-x.fits",
            keywords={"FILTER": band}, band=None, seed=seed,
        )
    alone = TileIndex.from_paths(str(tmp_path / "*.fits"))
    model = tmp_path / "EUC_MER_BGMOD-VIS_TILE7-x.fits"
    make_tile(model, keywords={"FILTER": "VIS"}, band=None, seed=3)
    index = TileIndex.from_paths(str(tmp_path / "*.fits"))
    assert index.bands == alone.bands
    assert len(index.tiles) == 1
    vis = index.tiles[0].bands[index.bands.index("VIS")]
    assert vis.path.endswith("EUC_MER_BGSUB-MOSAIC-VIS_TILE7-x.fits")
    assert [e[0] for e in index.errors] == [str(model)]
    assert "this one is ignored" in index.errors[0][1]


def test_image_in_extension_and_hdu_option(tmp_path):
    """Test that the first 2-D image HDU is used, or the one named by hdu=."""
    path = tmp_path / "ext.fits"
    data = make_tile(path, extname="SCI")
    index = TileIndex.from_paths(str(path))
    band = index.tiles[0].bands[0]
    assert band.hdu == 1
    by_name = TileIndex.from_paths(str(path), hdu="SCI").tiles[0].bands[0]
    assert by_name.hdu == "SCI"
    with open_pixels(by_name) as px:
        assert_array_equal(px.data[:], data)
    bad = TileIndex.from_paths(str(path), hdu=0)
    assert bad.tiles == []
    assert "HDU 0 is not a 2-D image" in bad.errors[0][1]


def test_broken_files_land_in_errors(tmp_path):
    """Test that unreadable files are listed with a reason and never stop the index."""
    make_tile(tmp_path / "good.fits", tileid="1")
    raw = (tmp_path / "good.fits").read_bytes()
    (tmp_path / "truncated.fits").write_bytes(raw[: 2880 + 1000])
    (tmp_path / "header_cut.fits").write_bytes(raw[:1000])
    (tmp_path / "text.fits").write_text("SIMPLE? no, this is a text file\n")
    (tmp_path / "empty.fits").write_bytes(b"")
    make_tile(tmp_path / "nowcs.fits", wcs=False)
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])]),
        ]
    ).writeto(tmp_path / "table.fits")
    fits.PrimaryHDU(np.zeros((3, 4, 5), "f4")).writeto(tmp_path / "cube.fits")
    make_tile(tmp_path / "badwcs.fits", keywords={"CTYPE1": "RA---XYZ"})
    paths = [
        str(tmp_path / "good.fits"),
        str(tmp_path / "missing.fits"),
        str(tmp_path / "none_*.fits"),
    ]
    paths += [
        str(tmp_path / n)
        for n in (
            "truncated.fits",
            "header_cut.fits",
            "text.fits",
            "empty.fits",
            "nowcs.fits",
            "table.fits",
            "cube.fits",
            "badwcs.fits",
        )
    ]
    index = TileIndex.from_paths(paths)
    assert len(index.tiles) == 1
    assert index.tiles[0].bands[0].path.endswith("good.fits")
    errors = dict(index.errors)
    expected = {
        "missing.fits": "file does not exist",
        "none_*.fits": "no file matches this pattern",
        "truncated.fits": "file is truncated",
        "header_cut.fits": "cannot read FITS header",
        "text.fits": "cannot read FITS header",
        "empty.fits": "cannot read FITS header",
        "nowcs.fits": "no celestial WCS",
        "table.fits": "no 2-D image HDU",
        "cube.fits": "no 2-D image HDU",
        "badwcs.fits": "WCS",
    }
    assert len(errors) == len(expected)
    for name, reason in expected.items():
        path = str(tmp_path / name)
        assert path in errors, name
        assert errors[path].startswith(path)
        assert reason in errors[path], (name, errors[path])


def test_compressed_tile(tmp_path):
    """Test that compressed tiles are indexed from headers and read through .section."""
    data = make_tile(tmp_path / "c.fits", dtype="f4", compressed=True, tileid="9")
    index = TileIndex.from_paths(str(tmp_path / "c.fits"))
    band = index.tiles[0].bands[0]
    assert band.compressed is True
    assert band.shape == (60, 80)
    assert band.hdu == 1
    assert np.dtype(band.dtype) == np.dtype("float32")
    with open_pixels(band) as px:
        assert isinstance(px.data, fits.hdu.compressed.CompImageSection)
        window = px.data[5:15, 7:30]
        # lossy float compression: compare with astropy's own decompression
        assert_array_equal(window, fits.getdata(tmp_path / "c.fits", ext=1)[5:15, 7:30])
        assert_allclose(window, data[5:15, 7:30], rtol=0.01)
        assert window.dtype == np.dtype(band.dtype)


def test_fsspec_urls(tmp_path):
    """Test that memory:// and file:// URLs are indexed and opened."""
    fsspec = pytest.importorskip("fsspec")
    data = make_tile(tmp_path / "VIS_TILE5.fits", tileid=None)
    fs = fsspec.filesystem("memory")
    fs.pipe("/cutana-test/VIS_TILE5.fits", (tmp_path / "VIS_TILE5.fits").read_bytes())
    fs.pipe("/cutana-test/broken.fits", b"not fits at all")
    try:
        index = TileIndex.from_paths("memory://cutana-test/*.fits")
        assert len(index.tiles) == 1
        band = index.tiles[0].bands[0]
        assert band.path == "memory:///cutana-test/VIS_TILE5.fits"
        assert band.is_remote
        assert index.tiles[0].key == "5"
        assert [e[0] for e in index.errors] == ["memory:///cutana-test/broken.fits"]
        with open_pixels(band) as px:
            assert_array_equal(px.data[2:9, 3:11], data[2:9, 3:11])
    finally:
        fs.rm("/cutana-test", recursive=True)
    url = "file://" + str(tmp_path / "VIS_TILE5.fits")
    band = TileIndex.from_paths(url).tiles[0].bands[0]
    assert band.path == url
    assert not band.is_remote
    with open_pixels(band) as px:
        assert isinstance(px.data, np.ndarray)
        assert_array_equal(px.data, data)


def test_round_trip_through_json(tmp_path):
    """Test that to_dict/from_dict round-trip exactly through JSON."""
    paths = _grid_tiles(tmp_path)
    index = TileIndex.from_paths(paths + [str(tmp_path / "missing.fits")])
    d = index.to_dict()
    text = json.dumps(d)
    back = TileIndex.from_dict(json.loads(text))
    assert back == index
    assert back.to_dict() == d
    assert back.tiles == index.tiles
    assert back.errors == index.errors
    assert back.tiles[0].bands[0].wcs().wcs.compare(index.tiles[0].bands[0].wcs().wcs)
    lists = TileIndex.from_file_lists([tuple(paths[:2]), tuple(paths[2:])])
    assert TileIndex.from_dict(json.loads(json.dumps(lists.to_dict()))) == lists
    with pytest.raises(ValueError, match="not a serialised TileIndex"):
        TileIndex.from_dict({"format": "other"})


def test_band_file_helpers(tmp_path):
    """Test wcs(), pixel_scale_arcsec() and zeropoint() of a band file."""
    make_tile(tmp_path / "a.fits", keywords={"ZP_BAD": "abc", "ZP_T": True})
    band = TileIndex.from_paths(str(tmp_path / "a.fits")).tiles[0].bands[0]
    assert isinstance(band, BandFile)
    w = band.wcs()
    assert w.naxis == 2 and w.has_celestial
    assert w.pixel_shape == (80, 60)
    assert band.wcs() is w  # cached
    assert band.pixel_scale_arcsec() == pytest.approx(0.1, rel=1e-9)
    tile = TileIndex.from_paths(str(tmp_path / "a.fits")).tiles[0]
    assert tile.pixel_scale_arcsec() == band.pixel_scale_arcsec()
    assert band.zeropoint() == 24.5
    assert band.zeropoint("NOPE") is None
    with pytest.raises(
        TileError, match=r"a\.fits: header keyword ZP_BAD = 'abc' is not a zero point"
    ):
        band.zeropoint("ZP_BAD")
    with pytest.raises(TileError, match="ZP_T"):
        band.zeropoint("ZP_T")
    header = band.fits_header()
    assert header["BAND"] == "VIS"


def test_zero_point_in_the_primary_header_of_an_extension_image(tmp_path):
    """Test that the zero point of an image in an extension is also looked
    for in the primary header, as its band and tile keywords are (an
    empty primary holding MAGZERO, the usual multi-extension layout, made
    every source a TILE_ERROR under flux conversion); the image's own
    header comes first."""
    from astropy.coordinates import SkyCoord
    from astropy.nddata import Cutout2D

    import cutana

    data = np.random.default_rng(2).normal(100, 10, (60, 80)).astype(">f4")
    wcs = _wcs((150.0, 2.0), data.shape)
    primary = fits.PrimaryHDU()
    primary.header.update({"MAGZERO": 25.0, "ZPALT": 23.0, "BAND": "VIS"})
    image = fits.ImageHDU(data, wcs.to_header(), name="SCI")
    image.header["ZPALT"] = 24.0
    fits.HDUList([primary, image]).writeto(tmp_path / "mef.fits")
    band = TileIndex.from_paths(str(tmp_path / "mef.fits")).tiles[0].bands[0]
    assert band.hdu == 1 and band.zeropoint() == 25.0
    assert band.zeropoint("ZPALT") == 24.0  # the image's own header first
    assert BandFile.from_dict(band.to_dict()) == band
    make_tile(tmp_path / "plain.fits")  # the image in the primary: no copy
    plain = TileIndex.from_paths(str(tmp_path / "plain.fits")).tiles[0].bands[0]
    assert plain.primary_header == ""

    cat = tmp_path / "cat.csv"
    sky = wcs.pixel_to_world(40.2, 30.7)
    cat.write_text(f"SourceID,RA,Dec\na,{float(sky.ra.deg)!r},{float(sky.dec.deg)!r}\n")
    out = tmp_path / "o.zarr"
    report = cutana.make_cutouts(cat, out, size=9, tiles=[str(tmp_path / "mef.fits")],
                                 flux_conversion=True, progress=False)
    assert report.exit_code == 0 and report.counts == {"OK": 1}
    ref = Cutout2D(data, SkyCoord(sky.ra, sky.dec), 9, wcs=wcs, mode="partial")
    expected = ref.data.astype(np.float64) * 3631 * 10 ** (-0.4 * 25.0)
    got = cutana.open(out).images[0, 0]
    np.testing.assert_array_equal(got, expected.astype(np.float32))


# --------------------------------------------------------------------------
# ESA Cutana file lists
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_long", "n_short", "want"), [(1, 5, 2), (3, 3, 3), (4, 2, 3), (0, 6, 2)]
)
def test_default_bands_are_the_positions_most_rows_list(
    tmp_path, caplog, n_long, n_short, want
):
    """Test that the bands of file lists are by default the positions at
    least half the rows list (rows, not distinct lists; empty and missing
    lists not counted), with a warning naming the first longer row when
    some are left out, and that ``bands`` may still name them."""
    import logging

    g, r, i = (str(tmp_path / f"{b}.fits") for b in "gri")
    for path, band in zip((g, r, i), "gri", strict=True):
        make_tile(path, (150.0, 2.0), band=band)
    rows = [None, ()] + [(g, r)] * n_short + [(g, r, i)] * n_long
    with caplog.at_level(logging.WARNING, logger="cutana"):
        index = TileIndex.from_file_lists(rows)
    assert index.bands == ["g", "r", "i"][:want]
    warned = "rows list more than" in caplog.text
    assert warned == (want == 2 and n_long > 0)
    if warned:
        first = 2 + n_short
        assert f"{n_long} of {n_long + n_short} rows" in caplog.text
        assert f"(e.g. row {first}: 3 files)" in caplog.text
    if n_long:
        assert TileIndex.from_file_lists(rows, bands=["g", "i"]).bands == ["g", "i"]


def test_from_file_lists_and_assign_by_files(tmp_path):
    """Test that distinct file tuples are tiles and broken ones are file errors."""
    vis0, nir0 = str(tmp_path / "t0_vis.fits"), str(tmp_path / "t0_nir.fits")
    vis1, nir1 = str(tmp_path / "t1_vis.fits"), str(tmp_path / "t1_nir.fits")
    make_tile(vis0, (150.0, 2.0), band="VIS")
    make_tile(nir0, (150.0, 2.0), band="NIR-H")
    make_tile(vis1, (150.0, 2.01), band="VIS")
    (tmp_path / "t1_nir.fits").write_bytes(b"garbage")
    rows = [
        (vis0, nir0),
        (vis1, nir1),
        (vis0, nir0),
        (),
        (vis0,),
        ("/elsewhere/x.fits", nir0),
    ]
    index = TileIndex.from_file_lists(rows[:5])
    assert index.bands == ["VIS", "NIR-H"]
    assert len(index.tiles) == 2
    assert [b.path for b in index.tiles[0].bands] == [vis0, nir0]
    assert index.tiles[1].bands[0].path == vis0
    assert index.tiles[1].key != index.tiles[0].key
    assert index.file_lists[(vis1, nir1)] == -1
    assert [e[0] for e in index.errors] == [nir1]

    ra = np.full(6, 150.0)
    dec = np.array([2.0, 2.01, 2.0, 2.0, 2.0, 2.0])
    a, file_error = index.assign_by_files(rows, ra, dec, 10)
    assert isinstance(a, Assignment)
    assert file_error is a.file_error
    assert_array_equal(a.tile, [0, -1, 0, -1, 1, -1])
    assert_array_equal(a.file_error, [False, True, False, False, False, True])
    assert "t1_nir.fits" in a.messages[1] and "cannot read FITS header" in a.messages[1]
    assert "not in this tile index" in a.messages[5]
    assert list(a.messages) == [1, 5]  # in row order
    # rows sharing one tuple object (as catalogues give them) are looked up once
    shared = [rows[1], rows[0], rows[1], rows[5], rows[0], rows[1]]
    b, _ = index.assign_by_files(shared)
    assert_array_equal(b.tile, [-1, 0, -1, -1, 0, -1])
    assert list(b.messages) == [0, 2, 3, 5]
    assert b.messages[0] == b.messages[2] == a.messages[1]
    assert b.messages[3] == a.messages[5]
    assert_allclose(a.x[[0, 2]], 39.5, atol=1e-6)
    assert_allclose(a.y[[0, 2]], 29.5, atol=1e-6)
    assert a.inside[0]
    # the tuple (vis0,) only has the VIS band
    assert index.tiles[1].bands[1] is None
    # a source off its own tile: no overlap, not a file error
    far, _ = index.assign_by_files([(vis0, nir0)], [151.0], [2.0], 10)
    assert_array_equal(far.tile, [-1])
    assert_array_equal(far.file_error, [False])


def test_file_lists_same_band_is_positional(tmp_path):
    """Test that two files with one band name get positional names."""
    a, b = str(tmp_path / "a.fits"), str(tmp_path / "b.fits")
    make_tile(a, band="VIS")
    make_tile(b, band="VIS")
    index = TileIndex.from_file_lists([(a, b)])
    assert index.bands == ["VIS", "VIS[1]"]
    assert [x.path for x in index.tiles[0].bands] == [a, b]
    sel = TileIndex.from_file_lists([(a, b)], bands=["VIS[1]"])
    assert [x.path for x in sel.tiles[0].bands] == [b]
    with pytest.raises(ValueError, match="band 'NIR' was found in no tile file"):
        TileIndex.from_file_lists([(a, b)], bands=["NIR"])


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("T{t}_{band}.fits", ["VIS", "NIR-H"]),
        ("{band}/T{t}.fits", ["VIS", "NIR-H"]),
        ("T{t}-{band}.fits", ["VIS", "NIR-H"]),
        ("img{t}{band}.fits", ["img0VIS", "img0NIR-H"]),  # no separator: as named
    ],
)
def test_file_lists_of_unnamed_files_name_bands_by_what_differs(tmp_path, pattern,
                                                                expected):
    """Test that when no file of the lists names its band, the positions are
    named after what differs between the paths of a list (not after the
    first list's file names), and --bands picks by those names."""
    lists = []
    for t in range(2):
        files = []
        for band in ("VIS", "NIR-H"):
            path = tmp_path / pattern.format(t=t, band=band)
            path.parent.mkdir(exist_ok=True)
            make_tile(path, (150.0, 2.0 + 0.01 * t), band=None)
            files.append(str(path))
        lists.append(tuple(files))
    index = TileIndex.from_file_lists(lists)
    assert index.bands == expected
    assert [[b.path for b in t.bands] for t in index.tiles] == [list(f) for f in lists]
    picked = TileIndex.from_file_lists(lists, bands=[expected[1]])
    assert [[b.path for b in t.bands] for t in picked.tiles] == [[f[1]] for f in lists]


def test_file_lists_in_another_band_order_warn(tmp_path, caplog):
    """Test that file lists naming their bands in another order than the
    first list are cut by position, as documented and as ESA Cutana does,
    with a warning naming a file and its channel (it was silent)."""
    files = {}
    for t in range(3):
        for band in ("VIS", "NIR"):
            files[t, band] = str(tmp_path / f"t{t}_{band}.fits")
            make_tile(files[t, band], crval=(150.0, 2.0 + 0.01 * t), band=band)
    stems = [str(tmp_path / f"s{k}.fits") for k in range(2)]
    for k, path in enumerate(stems):  # bands known only by their file's stem
        make_tile(path, band=None, seed=k)
    lists = [(files[0, "VIS"], files[0, "NIR"]), (files[1, "VIS"], files[1, "NIR"])]
    with caplog.at_level("WARNING", logger="cutana.tiles"):
        TileIndex.from_file_lists([*lists, (stems[0], stems[1]), (stems[1], stems[0])])
    assert not caplog.records
    swapped = (files[2, "NIR"], files[2, "VIS"])
    with caplog.at_level("WARNING", logger="cutana.tiles"):
        index = TileIndex.from_file_lists([*lists, swapped])
    assert index.bands == ["VIS", "NIR"]
    assert [b.path for b in index.tiles[2].bands] == list(swapped)  # by position
    (record,) = caplog.records
    text = record.getMessage()
    assert text.startswith("1 of 3 tile file lists hold a band at another position")
    assert f"{files[2, 'NIR']} (band NIR) at position 0, which is channel VIS" in text


#: SIP coefficients, for a header whose CTYPE lacks "-SIP"
_SIP_CARDS = {"A_ORDER": 2, "B_ORDER": 2, "A_2_0": 1e-6, "B_0_2": 1e-6}


@pytest.mark.parametrize("lists", [False, True])
def test_what_astropy_logs_of_a_wcs_is_one_warning_naming_a_file(
    tmp_path, caplog, lists
):
    """Test that what astropy logs (rather than warns) of the WCS of tile
    files, SIP coefficients under a CTYPE without "-SIP" here, is one
    warning that counts the files and names one, and one INFO line per
    file: astropy printed a dozen lines per file, naming none."""
    from astropy import log

    paths = [str(tmp_path / f"t{k}.fits") for k in range(3)]
    for k, path in enumerate(paths):
        make_tile(path, (150.0, 2.0 + 0.01 * k), band="VIS", seed=k,
                  keywords=_SIP_CARDS if k < 2 else None)
    with log.log_to_list() as astropy_records, caplog.at_level(
        "INFO", logger="cutana.tiles"
    ):
        if lists:
            index = TileIndex.from_file_lists([(p,) for p in paths])
        else:
            index = TileIndex.from_paths(paths)
    assert not [r for r in astropy_records if "SIP" in str(r.msg)]
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage().startswith(
        f"astropy.wcs reports on the WCS of 2 tile file(s), e.g. {paths[0]}: "
        "Inconsistent SIP distortion information is present"
    )
    noted = [
        r.getMessage().split(": astropy.wcs: ")
        for r in caplog.records
        if r.levelname == "INFO" and ": astropy.wcs: " in r.getMessage()
    ]
    assert sorted(path for path, _ in noted) == paths[:2]
    assert all(note.startswith("Inconsistent SIP") for _, note in noted)
    # the WCS is astropy's, with the distortion
    sip = {t.bands[0].path: t.wcs().sip is not None for t in index.tiles}
    assert sip == {paths[0]: True, paths[1]: True, paths[2]: False}


# --------------------------------------------------------------------------
# assignment
# --------------------------------------------------------------------------


def _brute_force(tiles, ra, dec, diameter):
    """Per-source reference of TileIndex.assign with astropy's world_to_pixel."""
    pix = []
    for wcs, _ in tiles:
        x, y = wcs.world_to_pixel_values(ra, dec)
        pix.append((np.asarray(x), np.asarray(y)))
    n = len(ra)
    best = np.full(n, -1)
    bx, by = np.full(n, np.nan), np.full(n, np.nan)
    binside = np.zeros(n, bool)
    for i in range(n):
        size = int(np.round(diameter[i]))
        cands = []
        for t, (_, (ny, nx)) in enumerate(tiles):
            x, y = float(pix[t][0][i]), float(pix[t][1][i])
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            x0, y0 = math.ceil(x - size / 2), math.ceil(y - size / 2)
            overlaps = x0 < nx and y0 < ny and x0 + size > 0 and y0 + size > 0
            if size == 0:
                overlaps = 0 <= x0 < nx and 0 <= y0 < ny
            whole = x0 >= 0 and y0 >= 0 and x0 + size <= nx and y0 + size <= ny
            depth = min(x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y)
            if overlaps:
                cands.append((not whole, -depth, t, x, y, whole))
        if cands:
            _, _, t, x, y, whole = min(cands)
            best[i], bx[i], by[i], binside[i] = t, x, y, whole
    return best, bx, by, binside


@pytest.mark.parametrize("centre", [(150.0, 2.0), (0.002, -0.003), (200.0, 89.99)])
def test_assign_matches_brute_force(tmp_path, centre):
    """Test that assign() agrees with a per-source astropy computation."""
    rng = np.random.default_rng(11)
    ra0, dec0 = centre
    offsets = [(0, 0, 0.0), (4, 0, 0.0), (2, 2.5, 30.0), (-5, -1, 0.0), (30, 30, 0.0)]
    paths = []
    tiles = []
    cosd = math.cos(math.radians(dec0))
    for k, (dx, dy, rot) in enumerate(offsets):
        crval = ((ra0 + dx / 3600.0 / cosd) % 360.0, dec0 + dy / 3600.0)
        shape = (60 + 10 * k, 80)
        scale = SCALE * (1.3 if k == 3 else 1.0)
        p = tmp_path / f"t{k}.fits"
        make_tile(p, crval, shape, tileid=f"K{k}", rotation_deg=rot, scale=scale)
        paths.append(str(p))
    index = TileIndex.from_paths(paths)
    assert [t.key for t in index.tiles] == [f"K{k}" for k in range(len(offsets))]
    tiles = [(t.wcs(), t.shape) for t in index.tiles]

    n = 1500
    dra = rng.uniform(-12, 16, n) / 3600.0 / cosd
    ddec = rng.uniform(-8, 10, n) / 3600.0
    ra = (ra0 + dra) % 360.0
    dec = np.clip(dec0 + ddec, -90, 90)
    diameter = rng.choice([0.0, 1.0, 2.0, 7.5, 10.5, 16.0, 31.0, 64.0, np.nan], n)
    # exact edges and half-pixel positions of tile 0
    w0, (ny0, nx0) = tiles[0]
    ex = np.array([-0.5, 0.0, 4.5, 5.0, nx0 - 5.5, nx0 - 0.5, nx0 - 1.0, 10.0])
    ey = np.array([10.0, -0.5, 5.0, 4.5, 20.0, 10.0, ny0 - 0.5, ny0 + 9.0])
    era, edec = w0.pixel_to_world_values(ex, ey)
    ra = np.concatenate([ra, era, [np.nan, 10.0, (ra0 + 180) % 360]])
    dec = np.concatenate([dec, edec, [0.0, np.nan, -dec0]])
    diameter = np.concatenate([diameter, np.full(len(ex), 10.0), [5.0, 5.0, 5.0]])

    got = index.assign(ra, dec, diameter)
    ref_tile, ref_x, ref_y, ref_inside = _brute_force(
        tiles, ra, dec, np.nan_to_num(diameter, nan=0.0)
    )
    assert got.tile.dtype == np.int32
    assert_array_equal(got.tile, ref_tile)
    assert_array_equal(got.inside, ref_inside)
    assert_allclose(got.x, ref_x, rtol=0, atol=1e-6, equal_nan=True)
    assert_allclose(got.y, ref_y, rtol=0, atol=1e-6, equal_nan=True)
    # every tile is chosen somewhere and the no-tile cases occur
    assert set(range(4)) <= set(got.tile.tolist())
    assert (got.tile == -1).any()
    assert_array_equal(got.tile[-3:], [-1, -1, -1])


def test_assign_with_sip_near_rounding_boundaries(tmp_path):
    """Test that with a SIP tile the boxes of sources a few 1e-6 pixel from a
    rounding boundary are astropy's per-source ones (the vectorised inverse of
    the distortion differs from the per-source one by more than that)."""
    from astropy.coordinates import SkyCoord
    from astropy.nddata import Cutout2D

    h = fits.Header()
    cards = dict(
        CTYPE1="RA---TAN-SIP", CTYPE2="DEC--TAN-SIP", CRVAL1=10.0, CRVAL2=-30.0,
        CRPIX1=30.3, CRPIX2=22.7, CD1_1=-2e-4, CD1_2=1e-5, CD2_1=1.2e-5, CD2_2=2e-4,
        A_ORDER=2, B_ORDER=2, A_2_0=2e-4, A_1_1=-1e-4, A_0_2=3e-5, B_2_0=1e-5,
        B_1_1=2e-4, B_0_2=-1e-4, AP_ORDER=2, BP_ORDER=2, AP_2_0=-2e-4, AP_1_1=1e-4,
        AP_0_2=-3e-5, BP_2_0=-1e-5, BP_1_1=-2e-4, BP_0_2=1e-4, TILEID="S",
    )  # fmt: skip
    for key, value in cards.items():
        h[key] = value
    data = np.zeros((320, 320), np.float32)
    fits.PrimaryHDU(data, h).writeto(tmp_path / "sip.fits")
    index = TileIndex.from_paths(str(tmp_path / "sip.fits"))
    wcs = index.tiles[0].wcs()
    rng = np.random.default_rng(1)
    n = 300
    px = np.round(rng.uniform(5, 300, n)) + 0.5 + rng.uniform(-8e-6, 8e-6, n)
    py = np.round(rng.uniform(5, 300, n)) + rng.uniform(-8e-6, 8e-6, n)
    ra, dec = wcs.all_pix2world(px, py, 0)
    got = index.assign(ra, dec, 3)
    for i in range(n):
        sky = SkyCoord(ra[i], dec[i], unit="deg")
        ref = Cutout2D(data, sky, 3, wcs=wcs, mode="partial")
        (y0, _), (x0, _) = ref.bbox_original
        assert (math.ceil(got.x[i] - 1.5), math.ceil(got.y[i] - 1.5)) == (x0, y0), i


@pytest.mark.parametrize(
    "cards",
    [
        {"EQUINOX": 2000.0},  # no RADESYS: FK5 (J2000), as wcslib reads it
        {"RADESYS": "FK4", "EQUINOX": 1950.0},
        {"CTYPE1": "GLON-TAN", "CTYPE2": "GLAT-TAN"},
        {"RADESYS": "ICRS"},
    ],
    ids=["fk5", "fk4", "galactic", "icrs"],
)
def test_assign_converts_icrs_to_the_tiles_frame(tmp_path, cards):
    """Test that catalogue (ICRS) positions are converted to the frame of a
    tile's WCS before they become pixels, as astropy's ``Cutout2D`` does
    with a `SkyCoord`: sources on a Galactic or FK4 tile were all off it,
    and on an FK5 tile the 0.02 arcsec frame offset moved boxes by a pixel."""
    from astropy.coordinates import SkyCoord
    from astropy.nddata import Cutout2D

    shape = (400, 400)
    w = _wcs((150.0, 2.0), shape, scale=0.05 / 3600.0)
    h = w.to_header()
    for key in ("RADESYS", "EQUINOX", "MJDREF", "DATEREF"):
        h.remove(key, ignore_missing=True)
    h.update(cards)
    h["TILEID"] = "F"
    data = np.zeros(shape, np.float32)
    fits.PrimaryHDU(data, h).writeto(tmp_path / "f.fits")
    index = TileIndex.from_paths(str(tmp_path / "f.fits"))
    wcs = index.tiles[0].wcs()
    rng = np.random.default_rng(3)
    n = 200
    px, py = rng.uniform(20, 380, n), rng.uniform(20, 380, n)
    icrs = wcs.pixel_to_world(px, py).icrs  # positions on the tile, in ICRS
    ra, dec = icrs.ra.deg, icrs.dec.deg
    got = index.assign(ra, dec, 11)
    assert_array_equal(got.tile, 0)
    assert got.inside.all()
    for i in range(n):
        sky = SkyCoord(ra[i], dec[i], unit="deg")
        ref = Cutout2D(data, sky, 11, wcs=wcs, mode="partial")
        (y0, _), (x0, _) = ref.bbox_original
        assert (math.ceil(got.x[i] - 5.5), math.ceil(got.y[i] - 5.5)) == (x0, y0), i


def test_band_with_other_distortion_is_on_its_own_grid(tmp_path):
    """Test that a band file whose SIP distortion differs from the reference
    band's (same CRPIX, CRVAL and CD) is a band on a grid of its own, not
    cut at the reference band's pixels under the reference band's WCS."""
    sip = dict(
        CTYPE1="RA---TAN-SIP", CTYPE2="DEC--TAN-SIP", CRVAL1=10.0, CRVAL2=-30.0,
        CRPIX1=150.5, CRPIX2=150.5, CD1_1=-2e-5, CD1_2=0.0, CD2_1=0.0, CD2_2=2e-5,
        A_ORDER=2, B_ORDER=2, A_2_0=4e-5, B_0_2=-3e-5, TILEID="7",
    )  # fmt: skip
    for band, factor in (("g", 1.0), ("r", 10.0), ("i", 1.0)):
        h = fits.Header()
        h.update(sip)
        h["A_2_0"] = sip["A_2_0"] * factor
        h["BAND"] = band
        fits.PrimaryHDU(np.zeros((300, 300), np.float32), h).writeto(
            tmp_path / f"{band}.fits"
        )
    paths = [str(tmp_path / f"{b}.fits") for b in "gri"]
    index = TileIndex.from_paths(paths)
    tile = index.tiles[0]
    assert index.errors == []
    assert [index.bands[c] for c in tile.own_grid] == ["r"]


def test_bands_with_one_strongly_distorted_wcs_share_the_grid(tmp_path):
    """Test that band files with the same TPV WCS, whose inverse wcslib
    cannot find at some corners, are one pixel grid (both bands cut), not
    'distortion differs'."""
    tpv = dict(
        CTYPE1="RA---TPV", CTYPE2="DEC--TPV", CRVAL1=150.0, CRVAL2=2.0,
        CRPIX1=200.3, CRPIX2=199.3, CDELT1=-0.2 / 3600, CDELT2=0.2 / 3600,
        PV1_0=0.0, PV1_1=1.0, PV1_2=0.0, PV1_4=2e-3, PV1_5=-1e-3,
        PV2_0=0.0, PV2_1=1.0, PV2_2=0.0, PV2_4=2e-3, PV2_5=-1e-3, TILEID="7",
    )  # fmt: skip
    for band, dtype in (("g", np.float32), ("r", np.int16)):
        h = fits.Header()
        h.update(tpv)
        h["BAND"] = band
        path = tmp_path / f"{band}.fits"
        fits.PrimaryHDU(np.zeros((400, 400), dtype), h).writeto(path)
    index = TileIndex.from_paths(str(tmp_path / "*.fits"))
    assert index.errors == []
    assert [b.band for b in index.tiles[0].bands] == ["g", "r"]


def test_assign_scalar_size_and_empty(tmp_path):
    """Test assign() with one size for all sources and with no sources."""
    make_tile(tmp_path / "a.fits", (150.0, 2.0), tileid="A")
    index = TileIndex.from_paths(str(tmp_path / "a.fits"))
    a = index.assign([150.0, 150.0], [2.0, 2.0 + 2.5 / 3600], 20)
    assert_array_equal(a.tile, [0, 0])
    assert_array_equal(
        a.inside, [True, False]
    )  # y = 54.5: box 45..64 leaves a 60-row tile
    assert_allclose(a.y, [29.5, 54.5], atol=1e-6)
    empty = index.assign([], [], 10)
    assert len(empty) == 0 and empty.tile.dtype == np.int32
    with pytest.raises(ValueError, match="ra and dec must be 1-D arrays of one length"):
        index.assign([1.0, 2.0], [1.0], 3)
    none = TileIndex([], []).assign([1.0], [1.0], 3)
    assert_array_equal(none.tile, [-1])


def test_footprints(tmp_path):
    """Test that tile footprints contain every pixel corner."""
    make_tile(
        tmp_path / "a.fits", (33.0, -20.0), (50, 90), tileid="A", rotation_deg=20.0
    )
    index = TileIndex.from_paths(str(tmp_path / "a.fits"))
    ra, dec, radius, scale = index.footprints()
    w = index.tiles[0].wcs()
    cra, cdec = w.pixel_to_world_values(
        [-0.5, 89.5, -0.5, 89.5], [-0.5, -0.5, 49.5, 49.5]
    )
    from astropy.coordinates import SkyCoord

    sep = (
        SkyCoord(ra[0], dec[0], unit="deg")
        .separation(SkyCoord(cra, cdec, unit="deg"))
        .deg
    )
    assert_allclose(radius[0], sep.max(), rtol=1e-6)
    assert_allclose(scale[0], SCALE, rtol=1e-9)


# --------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------


def _is_memory_mapped(array):
    """True if ``array`` is backed by a memory map (np.memmap or mmap.mmap)."""
    base = array
    while base is not None:
        if isinstance(base, np.memmap | mmap.mmap):
            return True
        base = getattr(base, "base", None)
    return False


def test_open_pixels_memmaps_float_tiles(tmp_path):
    """Test that float tiles are memory-mapped, big-endian and unscaled."""
    data = make_tile(tmp_path / "f.fits", dtype=">f4")
    band = TileIndex.from_paths(str(tmp_path / "f.fits")).tiles[0].bands[0]
    with open_pixels(band) as px:
        assert _is_memory_mapped(px.data)
        assert px.data.dtype == np.dtype(">f4")
        assert px.data.dtype.str == band.dtype
        assert px.bscale == 1.0 and px.bzero == 0.0 and not px.scaled
        assert_array_equal(px.data[10:20, 30:50], data[10:20, 30:50])
    assert px.data is None


def test_open_pixels_leaves_bzero_alone(tmp_path):
    """Test that BZERO integer tiles come back raw with bzero reported."""
    data = make_tile(tmp_path / "u.fits", dtype=">i2", bzero=32768)
    band = TileIndex.from_paths(str(tmp_path / "u.fits")).tiles[0].bands[0]
    assert band.dtype == ">i2"
    with fits.open(tmp_path / "u.fits", do_not_scale_image_data=True) as hdul:
        stored = hdul[0].data.copy()
    assert_array_equal(stored, data)
    with open_pixels(band) as px:
        assert _is_memory_mapped(px.data)
        assert px.data.dtype == np.dtype(">i2")
        assert_array_equal(px.data, stored)
        assert px.bzero == 32768.0 and px.bscale == 1.0 and px.scaled
    with fits.open(tmp_path / "u.fits") as hdul:
        physical = hdul[0].data.astype(np.float64)
    assert_array_equal(stored.astype(np.float64) * px.bscale + px.bzero, physical)


def test_open_pixels_compressed_bzero(tmp_path):
    """Test that compressed unsigned tiles come back raw with bzero reported."""
    path = tmp_path / "cu.fits"
    values = np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) * 13
    hdu = fits.CompImageHDU(values, _wcs((150.0, 2.0), (60, 80)).to_header())
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    band = TileIndex.from_paths(str(path)).tiles[0].bands[0]
    with open_pixels(band) as px:
        raw = px.data[:, :]
        assert px.bzero == 32768.0
        assert raw.dtype == np.dtype(band.dtype) == np.dtype("int16")
        assert_array_equal(raw.astype(np.int64) + 32768, values)


def test_open_pixels_errors(tmp_path):
    """Test that files broken after indexing raise TileError naming the path."""
    make_tile(tmp_path / "a.fits")
    make_tile(tmp_path / "b.fits")
    band_a = TileIndex.from_paths(str(tmp_path / "a.fits")).tiles[0].bands[0]
    band_b = TileIndex.from_paths(str(tmp_path / "b.fits")).tiles[0].bands[0]
    os.remove(tmp_path / "a.fits")
    with pytest.raises(TileError, match=r"a\.fits: file does not exist"):
        open_pixels(band_a)
    raw = (tmp_path / "b.fits").read_bytes()
    (tmp_path / "b.fits").write_bytes(raw[: 2880 + 500])
    with pytest.raises(TileError, match=r"b\.fits: file is truncated"):
        open_pixels(band_b)
    make_tile(tmp_path / "b.fits", shape=(10, 10))
    with pytest.raises(
        TileError, match=r"b\.fits: HDU 0 has shape \(10, 10\), indexed as \(60, 80\)"
    ):
        open_pixels(band_b)
    (tmp_path / "b.fits").write_bytes(b"junk")
    with pytest.raises(TileError, match=r"b\.fits: cannot open pixels"):
        open_pixels(band_b)


def test_open_pixels_keeps_maps_within_keep_bytes(tmp_path):
    """Files opened before stay mapped between calls while they fit in keep_bytes."""
    from cutana.tiles import close_kept_maps

    close_kept_maps()
    a = make_tile(tmp_path / "a.fits", seed=1)
    b = make_tile(tmp_path / "b.fits", seed=2)
    band_a = TileIndex.from_paths(str(tmp_path / "a.fits")).tiles[0].bands[0]
    band_b = TileIndex.from_paths(str(tmp_path / "b.fits")).tiles[0].bands[0]
    nbytes = a.size * 4
    room = nbytes + nbytes // 2  # one file, not two
    try:
        with open_pixels(band_a, keep_bytes=room) as px:  # headers parsed, kept
            assert px.kept
            kept = px.data
            assert_array_equal(px.data, a)
        assert px.data is None  # closed, but the mapping is kept
        with open_pixels(band_a, keep_bytes=room) as px:
            assert px.kept and px.data is kept
            assert _is_memory_mapped(px.data)
            assert_array_equal(px.data[5:9, 7:30], a[5:9, 7:30])
        # no room left for b: mapped afresh each time, a stays kept
        for _ in range(2):
            with open_pixels(band_b, keep_bytes=room) as px:
                assert not px.kept
                assert_array_equal(px.data, b)
        with open_pixels(band_a, keep_bytes=room) as px:
            assert px.kept and px.data is kept
        with open_pixels(band_a) as px:  # keep_bytes=0: never kept
            assert not px.kept and px.data is not kept
        # a file changed since it was kept is mapped afresh, with its new values
        changed = make_tile(tmp_path / "a.fits", seed=3)
        os.utime(tmp_path / "a.fits", ns=(1, 1))
        assert not np.array_equal(changed, a)
        with open_pixels(band_a, keep_bytes=room) as px:
            assert px.kept and px.data is not kept
            assert_array_equal(px.data, changed)
            renewed = px.data
        with open_pixels(band_a, keep_bytes=room) as px:
            assert px.kept and px.data is renewed
        close_kept_maps()
        with open_pixels(band_a, keep_bytes=room) as px:
            assert px.kept and px.data is not renewed
            assert_array_equal(px.data, changed)
    finally:
        close_kept_maps()


def test_open_pixels_maps_known_files_again_without_headers(tmp_path, monkeypatch):
    """A file opened before is mapped from its known layout; a changed file is
    read again."""
    import cutana.tiles as tiles_module

    make_tile(tmp_path / "a.fits")
    band = TileIndex.from_paths(str(tmp_path / "a.fits")).tiles[0].bands[0]
    with open_pixels(band) as px:
        first = np.array(px.data)
        scale = (px.bscale, px.bzero, px.blank)

    def refuse(*args, **kwargs):
        msg = "headers parsed again"
        raise AssertionError(msg)

    monkeypatch.setattr(tiles_module, "_open_fits", refuse)
    with open_pixels(band) as px:
        assert_array_equal(px.data, first)
        assert px.data.dtype == first.dtype
        assert (px.bscale, px.bzero, px.blank) == scale
    monkeypatch.undo()
    # a file changed since (here: truncated) is opened from its headers again
    raw = (tmp_path / "a.fits").read_bytes()
    (tmp_path / "a.fits").write_bytes(raw[: 2880 + 500])
    monkeypatch.setattr(tiles_module, "_open_fits", refuse)
    with pytest.raises(TileError, match="headers parsed again"):
        open_pixels(band)
    monkeypatch.undo()
    with pytest.raises(TileError, match=r"a\.fits: file is truncated"):
        open_pixels(band)


@pytest.mark.parametrize(
    ("dtype", "keywords"),
    [
        (">i2", {"BLANK": -32768}),
        (">i2", {"BLANK": -32768, "BSCALE": 0.01, "BZERO": 100.0}),
        (">i2", {"BLANK": -32768, "BZERO": 32768.0}),  # pseudo-unsigned
        (">i4", {"BLANK": 7, "BSCALE": 2.5}),
        ("u1", {"BLANK": 0}),  # astropy ignores a BLANK of 0
        ("u1", {"BLANK": 255}),
        # beyond 2**53: stored values next to BLANK, and small unsigned ones
        # stored near -2**63 (in floats they rounded to BLANK and to 0)
        (">i8", {"BLANK": -(2**63)}),
        (">i8", {"BLANK": 2**62 + 3, "BSCALE": 0.5, "BZERO": 7.0}),
        (">i8", {"BZERO": 2**63}),  # pseudo-unsigned: BLANK not applied
    ],
)
def test_pixels_are_read_as_astropy_scales_them(tmp_path, dtype, keywords):
    """Test that the raw pixels with the FITS scaling of `open_pixels`, cut
    by the Resampler, are astropy's values (NaN where astropy puts it)."""
    from cutana.resample import Resampler

    raw = np.random.default_rng(2).integers(0, 120, (6, 7)).astype(dtype)
    if np.dtype(dtype).itemsize == 8:
        keywords = {"BLANK": -(2**63) + 5, **keywords}  # (ignored if unsigned)
        low = -(2**63) if "BZERO" in keywords else max(keywords["BLANK"] - 60, -(2**63))
        raw = (raw.astype(np.int64) + np.int64(low)).astype(dtype)
    raw[1, 2:5] = keywords["BLANK"]
    path = tmp_path / "t.fits"
    fits.PrimaryHDU(raw, _wcs((150.0, 2.0), raw.shape).to_header()).writeto(path)
    with fits.open(path, mode="update", do_not_scale_image_data=True) as hdul:
        for key, value in keywords.items():
            hdul[0].header[key] = value
    expect = fits.getdata(path).astype(np.float64)
    band = TileIndex.from_paths(str(path)).tiles[0].bands[0]
    with open_pixels(band) as px:
        copy = Resampler(px.data, raw.shape, "nearest", dtype=np.float64,
                         bscale=px.bscale, bzero=px.bzero, blank=px.blank)
        got = copy([[0, 0]], raw.shape)[0][0]
    assert_array_equal(got, expect)


@pytest.mark.parametrize("scale", [0.396, 0.1, 0.3])
def test_angles_become_pixels_as_cutout2d_rounds_them(tmp_path, scale):
    """Test that sizes in arcseconds become the pixel counts astropy's
    Cutout2D gives the same angles on the same file, also where the count
    is a half-integer up to the last bit (at 0.396 arcsec per pixel a plain
    division by the scale in arcsec rounded 2 of these 2,999 sizes the other
    way)."""
    import astropy.units as u
    from astropy.nddata import Cutout2D

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [150.5, 150.5]
    w.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) * scale / 3600
    path = tmp_path / "tile.fits"
    header = w.to_header()
    fits.PrimaryHDU(np.zeros((300, 300), np.float32), header=header).writeto(path)
    index = TileIndex.from_paths([str(path)])
    sizes = np.round(np.arange(1, 3000) * 0.01, 2)
    got = np.round(index.tiles[0].angle_in_pixels(sizes))
    wcs = WCS(fits.getheader(path))
    data = np.zeros((4, 4))

    def cutout_side(size):
        try:
            return Cutout2D(data, (1.5, 1.5), size * u.arcsec, wcs=wcs,
                            mode="partial").shape[0]
        except ValueError:  # a size of 0 pixels
            return 0

    expect = [cutout_side(s) for s in sizes]
    assert 0 in expect and 1 in expect
    assert_array_equal(got, expect)
