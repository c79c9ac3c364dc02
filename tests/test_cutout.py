# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""
Differential tests of `cutana.Cutout2D` and `cutana.BatchCutout2D`.

The reference is astropy's own `astropy.nddata.Cutout2D`: every case is run
through both, and the results are compared attribute for attribute (values,
types and dtypes), or the exceptions are compared by type.
"""

import math
import re
import warnings

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.nddata import Cutout2D as AstropyCutout2D
from astropy.nddata import NoOverlapError, PartialOverlapError
from astropy.wcs import WCS
from astropy.wcs.utils import skycoord_to_pixel
from hypothesis import given, settings
from hypothesis import strategies as st

from cutana import BatchCutout2D, Cutout2D

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

NY, NX = 18, 24  # a non-square image


def _image(dtype=np.float64, shape=(NY, NX), seed=0):
    """A seeded image of the given dtype (values fit every integer dtype)."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 120, size=shape)
    return values.astype(dtype)


def _header(kind="tan", shape=(NY, NX)):
    """A celestial FITS header: 'tan', 'rotated', 'nonsquare' or 'sip'."""
    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = shape[1]
    h["NAXIS2"] = shape[0]
    ctype = "TAN-SIP" if kind == "sip" else "TAN"
    h["CTYPE1"] = f"RA---{ctype}"
    h["CTYPE2"] = f"DEC--{ctype}"
    h["CRPIX1"] = shape[1] / 2 + 0.3
    h["CRPIX2"] = shape[0] / 2 - 0.2
    h["CRVAL1"] = 150.1
    h["CRVAL2"] = 2.2
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    scale = 1.0 / 3600  # 1 arcsec pixels
    if kind == "tan":
        h["CDELT1"] = -scale
        h["CDELT2"] = scale
    elif kind == "rotated":
        theta = np.deg2rad(30.0)
        h["CD1_1"] = -scale * np.cos(theta)
        h["CD1_2"] = scale * np.sin(theta)
        h["CD2_1"] = scale * np.sin(theta)
        h["CD2_2"] = scale * np.cos(theta)
    elif kind == "nonsquare":
        h["CDELT1"] = -scale
        h["CDELT2"] = 2.5 * scale
    elif kind == "sip":
        h["CD1_1"] = -scale
        h["CD1_2"] = 0.1 * scale
        h["CD2_1"] = 0.05 * scale
        h["CD2_2"] = scale
        h["A_ORDER"] = 2
        h["B_ORDER"] = 2
        h["A_0_2"] = 2e-4
        h["A_1_1"] = -3e-4
        h["A_2_0"] = 4e-4
        h["B_0_2"] = -1e-4
        h["B_1_1"] = 2e-4
        h["B_2_0"] = 3e-4
    else:
        msg = f"unknown WCS kind {kind!r}"
        raise ValueError(msg)
    return h


def _wcs(kind="tan", shape=(NY, NX)):
    return WCS(_header(kind, shape))


def _same(x, y, path="value"):
    """Assert that x and y are equal in value, type and dtype (NaN equals NaN)."""
    assert type(x) is type(y), f"{path}: {type(x).__name__} != {type(y).__name__}"
    if isinstance(x, (tuple, list)):
        assert len(x) == len(y), f"{path}: length {len(x)} != {len(y)}"
        for k, (a, b) in enumerate(zip(x, y, strict=True)):
            _same(a, b, f"{path}[{k}]")
    elif isinstance(x, slice):
        _same(x.start, y.start, f"{path}.start")
        _same(x.stop, y.stop, f"{path}.stop")
        _same(x.step, y.step, f"{path}.step")
    elif isinstance(x, (np.ndarray, np.generic)):
        assert x.dtype == y.dtype, f"{path}: dtype {x.dtype} != {y.dtype}"
        assert np.shape(x) == np.shape(y), (
            f"{path}: shape {np.shape(x)} != {np.shape(y)}"
        )
        np.testing.assert_array_equal(x, y, err_msg=path, strict=True)
    elif isinstance(x, float) and math.isnan(x):
        assert math.isnan(y), path
    else:
        assert x == y, f"{path}: {x!r} != {y!r}"


_GEOMETRY_ATTRS = (
    "shape",
    "shape_input",
    "input_position_original",
    "input_position_cutout",
    "slices_original",
    "slices_cutout",
    "bbox_original",
    "bbox_cutout",
    "origin_original",
    "origin_cutout",
    "position_original",
    "position_cutout",
    "center_original",
    "center_cutout",
    "xmin_original",
    "xmax_original",
    "ymin_original",
    "ymax_original",
    "xmin_cutout",
    "xmax_cutout",
    "ymin_cutout",
    "ymax_cutout",
    "_origin_original_true",
)


def _assert_same_wcs(w1, w2):
    """Assert that two cutout WCS objects are the same transformation."""
    if w2 is None:
        assert w1 is None
        return
    assert type(w1) is type(w2)
    assert w1.array_shape == w2.array_shape
    assert w1.to_header(relax=True).tostring() == w2.to_header(relax=True).tostring()
    np.testing.assert_array_equal(w1.wcs.crpix, w2.wcs.crpix, strict=True)
    assert (w1.sip is None) == (w2.sip is None)
    if w2.sip is not None:
        np.testing.assert_array_equal(w1.sip.crpix, w2.sip.crpix, strict=True)
    yy, xx = np.mgrid[-1:4, -2:3].astype(float)
    s1 = w1.pixel_to_world(xx * 1.7, yy * 2.3)
    s2 = w2.pixel_to_world(xx * 1.7, yy * 2.3)
    np.testing.assert_array_equal(s1.ra.deg, s2.ra.deg)
    np.testing.assert_array_equal(s1.dec.deg, s2.dec.deg)


def assert_same_cutout(c, a, *, exact_byteorder=True):
    """Assert that cutana cutout ``c`` equals astropy's ``a`` in every attribute."""
    assert isinstance(c, AstropyCutout2D)
    assert type(c.data) is type(a.data)
    if exact_byteorder:
        assert c.data.dtype == a.data.dtype
    else:  # batch stacks are in native byte order
        assert c.data.dtype.newbyteorder("=") == a.data.dtype.newbyteorder("=")
    assert c.data.shape == a.data.shape
    np.testing.assert_array_equal(c.data, a.data)
    if a.data.dtype.kind == "f":
        np.testing.assert_array_equal(np.isnan(c.data), np.isnan(a.data))
    for name in _GEOMETRY_ATTRS:
        _same(getattr(c, name), getattr(a, name), name)
    for pos in [(0, 0), (1.5, -2.25), (7, 3)]:
        _same(c.to_original_position(pos), a.to_original_position(pos), "to_original")
        _same(c.to_cutout_position(pos), a.to_cutout_position(pos), "to_cutout")
    _assert_same_wcs(c.wcs, a.wcs)


def run_both(data, position, size, **kwargs):
    """Run cutana and astropy; return both results, or assert the same exception."""
    results = []
    for cls in (Cutout2D, AstropyCutout2D):
        try:
            results.append(cls(data, position, size, **kwargs))
        except Exception as exc:  # noqa: BLE001 - compared below
            results.append(exc)
    c, a = results
    if isinstance(a, Exception):
        assert isinstance(c, Exception), f"astropy raised {a!r}, cutana did not"
        assert type(c) is type(a), f"cutana raised {c!r}, astropy {a!r}"
        return c, a
    assert not isinstance(c, Exception), f"cutana raised {c!r}, astropy did not"
    assert type(c) is Cutout2D
    return c, a


def check_both(data, position, size, **kwargs):
    """Run cutana and astropy and compare results (or exception types)."""
    c, a = run_both(data, position, size, **kwargs)
    if not isinstance(a, Exception):
        assert_same_cutout(c, a)
    return c, a


# --------------------------------------------------------------------------
# Cutout2D: geometry matrix
# --------------------------------------------------------------------------

POSITIONS = [
    (5, 7),
    (5.0, 7.0),
    (5.5, 7.5),
    (5.5 + 1e-9, 7.5 - 1e-9),
    (4.5 - 1e-9, 3.5 + 1e-9),
    (np.nextafter(6.5, 7), np.nextafter(6.5, 6)),
    (0, 0),
    (-0.5, -0.5),
    (-0.5 + 1e-12, 0.49999999),
    (-0.6, 3),
    (-3, 4),
    (23, 17),
    (23.5, 17.5),
    (22.51, 16.49),
    (-10, -10),
    (100, 3),
    (3, -40.5),
]

SIZES = [
    1,
    2,
    3,
    4,
    (3, 4),
    (4, 3),
    (2, 7),
    (7, 2),
    30,
    (40, 50),
    (1, 30),
    (0, 3),
    (3, 0),
]


@pytest.mark.parametrize("mode", ["trim", "partial", "strict"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("size", SIZES)
def test_geometry_matches_astropy(mode, position, size):
    """Test that every geometry attribute matches astropy for mode, position, size."""
    data = _image()
    check_both(data, position, size, mode=mode)


@pytest.mark.parametrize("mode", ["trim", "partial", "strict"])
@pytest.mark.parametrize(
    "position",
    [(0, 0), (0.2, 3), (-0.5, 3), (3, -0.7), (3, 3), (-1, 3), (24, 3), (3, 18)],
)
def test_zero_size_matches_astropy(mode, position):
    """Test that a (0, 0) size behaves as in astropy, including its ValueError."""
    check_both(_image(), position, 0, mode=mode)
    check_both(_image(), position, (0, 0), mode=mode)


def test_zero_size_edge_quirk_raises_valueerror():
    """Test that a (0, 0) cutout starting at pixel 0 raises ValueError as in astropy."""
    with pytest.raises(ValueError):
        AstropyCutout2D(_image(), (0, 5), 0)
    with pytest.raises(ValueError, match="size"):
        Cutout2D(_image(), (0, 5), 0)


@pytest.mark.parametrize(
    "position", [(1e300, 3), (-1e300, 3), (3, 2.0**64), (3, -(2.0**63) * 3)]
)
def test_huge_positions(position):
    """Test that positions beyond the int64 range raise astropy's exception type."""
    c, a = check_both(_image(), position, 3)
    assert isinstance(a, OverflowError)


@pytest.mark.parametrize("position", [(1e17, 3), (-1e17, 3), (3, 2.0**62)])
def test_far_positions(position):
    """Test that far but representable positions raise NoOverlapError."""
    c, a = check_both(_image(), position, 3)
    assert isinstance(a, NoOverlapError)


# --------------------------------------------------------------------------
# Cutout2D: dtypes and fill values
# --------------------------------------------------------------------------

DTYPES = ["f4", "f8", "i2", "i4", "u1", "u2", "i8", "i1", "u4"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("mode", ["trim", "partial", "strict"])
@pytest.mark.parametrize("position", [(5.5, 7.5), (-1, 2), (23, 17.5)])
@pytest.mark.parametrize("fill_value", [np.nan, 0, 7])
def test_dtypes_match_astropy(dtype, order, mode, position, fill_value):
    """Test that every dtype and byte order gives astropy's data, dtype and errors."""
    data = _image(np.dtype(order + dtype))
    check_both(data, position, (4, 5), mode=mode, fill_value=fill_value)


@pytest.mark.parametrize("dtype", ["i2", "u1", "i4"])
def test_integer_nan_fill_only_when_needed(dtype):
    """Test that NaN fill into integers raises only when filling is needed."""
    data = _image(np.dtype(dtype))
    c, a = check_both(data, (5, 5), 3, mode="partial", fill_value=np.nan)
    assert not isinstance(a, Exception)
    c, a = check_both(data, (0, 0), 3, mode="partial", fill_value=np.nan)
    assert isinstance(a, ValueError)
    assert "fill_value is inconsistent" in str(c.args)
    c, a = check_both(data, (0, 0), 3, mode="trim", fill_value=np.nan)
    assert not isinstance(a, Exception)


@pytest.mark.parametrize(
    ("dtype", "fill_value"),
    [("u1", 300), ("u1", -1), ("i2", 2.7), ("u2", True), ("f4", -5)],
)
def test_fill_value_conversion(dtype, fill_value):
    """Test that fill values are converted (or refused) as astropy does."""
    check_both(
        _image(np.dtype(dtype)), (0, 0), 3, mode="partial", fill_value=fill_value
    )


def test_float32_fill_overflow_warns_as_astropy():
    """Test that an out-of-range float32 fill warns like astropy."""
    data = _image(np.float32)
    for cls in (AstropyCutout2D, Cutout2D):
        with pytest.warns(RuntimeWarning, match="overflow"):
            cls(data, (0, 0), 3, mode="partial", fill_value=1e40)


# --------------------------------------------------------------------------
# Cutout2D: sizes, units, WCS
# --------------------------------------------------------------------------

PIXEL_SIZES = [
    3,
    4.0,
    2.5,
    3.5,
    np.int64(5),
    np.float32(4.4),
    (3, 5),
    [5, 3],
    np.array([4, 6]),
    (2.5, 3.5),
    3 * u.pixel,
    u.Quantity([3, 5], u.pixel),
    (3 * u.pixel, 4),
    (4, 2 * u.pixel),
]


@pytest.mark.parametrize("size", PIXEL_SIZES, ids=repr)
@pytest.mark.parametrize("mode", ["trim", "partial"])
def test_pixel_sizes(size, mode):
    """Test that sizes as scalars, pairs and pixel Quantities match astropy."""
    check_both(_image(), (5.5, 8), size, mode=mode)


ANGULAR_SIZES = [
    5 * u.arcsec,
    0.1 * u.arcmin,
    u.Quantity([4, 7], u.arcsec),
    (4 * u.arcsec, 0.002 * u.deg),
    (5 * u.arcsec, 3),
    (3 * u.pixel, 6 * u.arcsec),
    (3, 1.5e-3 * u.deg),
    50 * u.arcsec,
]


@pytest.mark.parametrize("kind", ["tan", "rotated", "nonsquare", "sip"])
@pytest.mark.parametrize("size", ANGULAR_SIZES, ids=repr)
@pytest.mark.parametrize("mode", ["trim", "partial"])
def test_angular_sizes(kind, size, mode):
    """Test that angular sizes with several WCS kinds give astropy's shapes and WCS."""
    check_both(_image(), (9.5, 6), size, wcs=_wcs(kind), mode=mode)


@pytest.mark.parametrize("kind", ["tan", "rotated", "nonsquare", "sip"])
@pytest.mark.parametrize("mode", ["trim", "partial", "strict"])
@pytest.mark.parametrize(
    "pixel", [(10, 8), (10.5, 8.5), (0.2, 0.7), (-1.2, 3), (23.4, 17.6), (-6, 6)]
)
@pytest.mark.parametrize("frame", ["icrs", "galactic"])
def test_skycoord_positions(kind, mode, pixel, frame):
    """Test that SkyCoord positions give astropy's cutout, positions and WCS."""
    wcs = _wcs(kind)
    sky = wcs.pixel_to_world(*pixel).transform_to(frame)
    check_both(_image(), sky, (5, 4), wcs=wcs, mode=mode, fill_value=-1.0)


def test_wcs_from_data_attribute():
    """Test that a ``wcs`` attribute of the data is used, as astropy does."""

    class WithWCS(np.ndarray):
        pass

    data = _image().view(WithWCS)
    data.wcs = _wcs("rotated")
    c, a = check_both(data, (3, 4), 5, mode="partial")
    assert c.wcs is not None


@pytest.mark.parametrize("mode", ["trim", "partial"])
def test_wcs_is_independent_of_parent(mode):
    """Test that the cutout WCS is a copy and the parent WCS is unchanged."""
    wcs = _wcs("sip")
    before = wcs.to_header(relax=True).tostring()
    c, a = check_both(_image(), (1, 2), 6, wcs=wcs, mode=mode)
    assert c.wcs is not wcs
    assert wcs.to_header(relax=True).tostring() == before


def test_plot_on_original():
    """Test that plot_on_original draws astropy's rectangle."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    try:
        for position, mode in [
            ((1, 2), "partial"),
            ((10.5, 7.5), "trim"),
            ((-1, 17), "trim"),
        ]:
            c, a = check_both(_image(), position, (5, 6), mode=mode)
            c.plot_on_original(ax=axes[0], color="red")
            a.plot_on_original(ax=axes[1], color="red")
            p1, p2 = axes[0].patches[-1], axes[1].patches[-1]
            assert p1.get_xy() == p2.get_xy()
            assert (p1.get_width(), p1.get_height()) == (
                p2.get_width(),
                p2.get_height(),
            )
            assert p1.get_fill() is p2.get_fill() is False
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------
# Cutout2D: copies and views, lazily read data
# --------------------------------------------------------------------------


@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("mode", ["trim", "partial", "strict"])
@pytest.mark.parametrize("position", [(5, 5), (0, 0), (23.5, 3)])
def test_copy_and_views(copy, mode, position):
    """Test that the cutout is a view into the data exactly where astropy's is."""
    data = _image()
    c, a = check_both(data, position, 3, mode=mode, copy=copy)
    if isinstance(a, Exception):
        return
    assert np.shares_memory(c.data, data) == np.shares_memory(a.data, data)
    if not copy and mode != "partial":
        assert np.shares_memory(c.data, data)


@pytest.fixture(scope="module")
def fits_files(tmp_path_factory):
    """A plain and a tile-compressed FITS image of the same integer data."""
    path = tmp_path_factory.mktemp("fits")
    data = _image(np.int16, shape=(40, 50), seed=3)
    header = _header("sip", shape=(40, 50))
    plain = path / "plain.fits"
    fits.PrimaryHDU(data, header=header).writeto(plain)
    comp = path / "comp.fits"
    hdus = fits.HDUList(
        [fits.PrimaryHDU(), fits.CompImageHDU(data, header=header, tile_shape=(7, 9))]
    )
    hdus.writeto(comp)
    return {"plain": (plain, 0), "comp": (comp, 1), "data": data}


@pytest.mark.parametrize("which", ["plain", "comp"])
@pytest.mark.parametrize("mode", ["trim", "partial", "strict"])
@pytest.mark.parametrize("position", [(10, 12.5), (0, 0), (49.5, 39.5), (-30, 5)])
@pytest.mark.parametrize("fill_value", [np.nan, -3])
def test_lazy_sections(fits_files, which, mode, position, fill_value):
    """Test that HDU sections (plain and compressed) give astropy's cutout."""
    path, ext = fits_files[which]
    with fits.open(path) as hdul:
        section = hdul[ext].section
        assert not isinstance(section, np.ndarray)
        c, a = check_both(section, position, (6, 7), mode=mode, fill_value=fill_value)
        if not isinstance(a, Exception):
            ref = AstropyCutout2D(
                fits_files["data"], position, (6, 7), mode=mode, fill_value=fill_value
            )
            np.testing.assert_array_equal(c.data, ref.data)


# --------------------------------------------------------------------------
# Cutout2D: rounding methods and errors
# --------------------------------------------------------------------------

ROUNDING = [
    np.ceil,
    np.floor,
    np.round,
    np.rint,
    np.trunc,
    math.floor,
    math.ceil,
    round,
    lambda v: v,
    lambda v: np.floor(v + 0.25),
    lambda v: int(v) - 1,
]


@pytest.mark.parametrize("method", ROUNDING)
@pytest.mark.parametrize(
    "position",
    [(5.5, 7.5), (5, 7), (-0.5, -1.5), (-2.25, 3.75), (23.5, 17.5), (6.3, 2.7)],
)
@pytest.mark.parametrize("size", [3, 4, (2, 5)])
@pytest.mark.parametrize("mode", ["trim", "partial", "strict"])
def test_limit_rounding_method(method, position, size, mode):
    """Test that every rounding method gives astropy's boxes."""
    check_both(_image(), position, size, mode=mode, limit_rounding_method=method)


@pytest.mark.parametrize("method", [3, "ceil", None, lambda v: "x", lambda v: None])
def test_bad_rounding_method(method):
    """Test that an invalid rounding method raises ValueError as in astropy."""
    c, a = check_both(_image(), (5, 5), 3, limit_rounding_method=method)
    assert isinstance(a, ValueError)


ERROR_CASES = [
    # (data, position, size, kwargs, expected exception)
    ((5, 5), 3, {"mode": "nope"}, ValueError),
    ((-20, 5), 3, {}, NoOverlapError),
    ((5, 60), 3, {"mode": "partial"}, NoOverlapError),
    ((0, 5), 3, {"mode": "strict"}, PartialOverlapError),
    ((23.5, 17), 2, {"mode": "strict"}, PartialOverlapError),
    ((np.nan, 5), 3, {}, ValueError),
    ((5, np.inf), 3, {}, ValueError),
    ((5, 5), (3, 4, 5), {}, ValueError),
    ((5, 5), 3 * u.m, {}, ValueError),
    ((5, 5), (3, 2 * u.s), {}, ValueError),
    ((5, 5), 3 * u.arcsec, {}, ValueError),
    ((5, 5, 5), 3, {}, ValueError),
    ((5,), 3, {}, ValueError),
    ((5, 5), np.nan, {}, ValueError),
    ((5, 5), (np.inf, 2), {}, OverflowError),
]


@pytest.mark.parametrize(("position", "size", "kwargs", "expected"), ERROR_CASES)
def test_errors_match_astropy(position, size, kwargs, expected):
    """Test that each invalid input raises astropy's exception type."""
    c, a = run_both(_image(), position, size, **kwargs)
    assert isinstance(a, expected)


def test_skycoord_without_wcs():
    """Test that a SkyCoord position without WCS raises ValueError."""
    sky = SkyCoord(150.1, 2.2, unit="deg")
    c, a = run_both(_image(), sky, 3)
    assert isinstance(c, ValueError)
    assert "wcs" in str(c)


def test_three_dimensional_data():
    """Test that 3-D data raises astropy's ValueError."""
    c, a = run_both(np.zeros((3, 4, 5)), (1, 1), 2)
    assert isinstance(a, ValueError)


# --------------------------------------------------------------------------
# BatchCutout2D
# --------------------------------------------------------------------------


def _positions_of(kind, xy, wcs=None):
    """The positions ``xy`` (N, 2) in the requested form."""
    if kind == "array":
        return np.asarray(xy, dtype=float)
    if kind == "intarray":
        return np.round(np.asarray(xy)).astype(int)
    if kind == "tuples":
        return [tuple(p) for p in xy]
    if kind == "lists":
        return [list(p) for p in xy]
    if kind == "skycoord":
        xy = np.asarray(xy, dtype=float)
        return wcs.pixel_to_world(xy[:, 0], xy[:, 1])
    msg = f"unknown position kind {kind!r}"
    raise ValueError(msg)


def _size_i(size, i, n):
    """The size astropy's Cutout2D gets for source ``i``."""
    if np.isscalar(size) or (isinstance(size, u.Quantity) and size.ndim == 0):
        return size
    if isinstance(size, tuple) and len(size) == 2:
        return size
    arr = size if isinstance(size, u.Quantity) else np.asarray(size)
    if arr.ndim == 1 and len(arr) == n and n != 2:
        return arr[i]
    if arr.ndim == 2:
        return arr[i]
    return size


def check_batch(data, positions, size, *, exact_byteorder=False, **kwargs):
    """Compare BatchCutout2D with astropy Cutout2D source by source."""
    b = BatchCutout2D(data, positions, size, **kwargs)
    n = len(positions)
    assert len(b) == n
    refs = [
        AstropyCutout2D(data, positions[i], _size_i(size, i, n), **kwargs)
        for i in range(n)
    ]
    for i in range(n):
        assert_same_cutout(b[i], refs[i], exact_byteorder=exact_byteorder)
    if n:
        assert_same_cutout(b[-1], refs[-1], exact_byteorder=exact_byteorder)
        assert_same_cutout(b[-n], refs[0], exact_byteorder=exact_byteorder)
    for c, a in zip(b, refs, strict=True):
        assert_same_cutout(c, a, exact_byteorder=exact_byteorder)
    shapes = {r.data.shape for r in refs}
    if len(shapes) == 1:
        assert isinstance(b.data, np.ndarray)
        assert b.data.shape == (n, *shapes.pop())
        np.testing.assert_array_equal(b.data, np.stack([r.data for r in refs]))
    return b, refs


XY = [
    (5, 7),
    (0, 0),
    (5.5, 7.5),
    (23.5, 17.5),
    (0.4, 3),
    (12.25, -0.4),
    (20, 8),
    (10, 16.5),
]


@pytest.mark.parametrize("kind", ["array", "intarray", "tuples", "lists", "skycoord"])
@pytest.mark.parametrize("mode", ["trim", "partial"])
@pytest.mark.parametrize("size", [3, 4, (3, 5), (2, 6)])
def test_batch_position_kinds(kind, mode, size):
    """Test that every form of positions gives astropy's per-source cutouts."""
    wcs = _wcs("rotated")
    positions = _positions_of(kind, XY, wcs)
    check_batch(_image(), positions, size, wcs=wcs, mode=mode, fill_value=-2.0)


N_SIZES = [
    np.array([3, 4, 5, 1, 2, 6, 3, 4]),
    [3, 4, 5, 1, 2, 6, 3, 4],
    np.array([[3, 4], [5, 1], [2, 6], [3, 3], [4, 4], [1, 2], [7, 3], [2, 2]]),
    u.Quantity([3, 4, 5, 1, 2, 6, 3, 4], u.pixel),
    u.Quantity([3, 4, 5, 3, 2, 6, 3, 4], u.arcsec),
    u.Quantity(np.full((8, 2), [4.0, 6.5]), u.arcsec),
    np.full(8, 4),
    3 * u.pixel,
    5 * u.arcsec,
    (3 * u.arcsec, 4),
    u.Quantity([3, 4], u.arcsec),
]


@pytest.mark.parametrize("size", N_SIZES, ids=repr)
@pytest.mark.parametrize("mode", ["trim", "partial"])
@pytest.mark.parametrize("kind", ["tan", "nonsquare", "sip"])
def test_batch_sizes(size, mode, kind):
    """Test that one size or N sizes (plain, pixel or angular) match astropy."""
    wcs = _wcs(kind)
    check_batch(_image(), np.array(XY, dtype=float), size, wcs=wcs, mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("mode", ["trim", "partial"])
def test_batch_dtypes(dtype, order, mode):
    """Test that every dtype and byte order gives astropy's values (native order)."""
    data = _image(np.dtype(order + dtype))
    b, refs = check_batch(data, XY, (4, 3), mode=mode, fill_value=9)
    if b.shape is not None:
        assert b.data.dtype == np.dtype(dtype)
        assert b.data.dtype.isnative


@pytest.mark.parametrize("copy", [False, True])
def test_batch_copy(copy):
    """Test that copy=True gives independent per-source arrays."""
    data = _image()
    b, refs = check_batch(data, XY[:3], 3, mode="partial", copy=copy)
    assert not np.shares_memory(b.data, data)
    first = b[0].data
    first[0, 0] = -99.0
    assert bool(b[0].data[0, 0] == -99.0) is (not copy)
    assert data[6, 4] != -99.0


def test_batch_trim_views():
    """Test that trimmed cutouts of differing shapes are views where astropy's are."""
    data = _image()
    b, refs = check_batch(data, XY, 5, mode="trim")
    assert b.shape is None
    assert isinstance(b.data, list)
    for c, a in zip(b, refs, strict=True):
        assert np.shares_memory(c.data, data) == np.shares_memory(a.data, data)


def test_batch_empty():
    """Test that zero positions give an empty batch."""
    b = BatchCutout2D(_image(), np.zeros((0, 2)), 3)
    assert len(b) == 0
    assert list(b) == []
    assert b.data.shape[0] == 0


@pytest.mark.parametrize("index", [8, -9, 100])
def test_batch_index_out_of_range(index):
    """Test that out-of-range indices raise IndexError."""
    b = BatchCutout2D(_image(), XY, 3)
    with pytest.raises(IndexError):
        b[index]


def test_batch_index_type():
    """Test that non-integer indices raise TypeError."""
    b = BatchCutout2D(_image(), XY, 3)
    with pytest.raises(TypeError):
        b[1.0]
    assert_same_cutout(b[np.int64(2)], AstropyCutout2D(_image(), XY[2], 3))


FAILURES = {
    "no_overlap": ((-30, 4), {}, NoOverlapError),
    "partial_strict": ((0, 4), {"mode": "strict"}, PartialOverlapError),
    "nan": ((np.nan, 4), {}, ValueError),
    "inf": ((3, -np.inf), {"mode": "partial"}, ValueError),
    "int_nan_fill": ((0, 4), {"mode": "partial", "int": True}, ValueError),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("index", [0, 3, 7])
def test_batch_first_failure_raises(failure, index):
    """Test that the first failing source raises astropy's exception, with its index."""
    position, kwargs, expected = FAILURES[failure]
    kwargs = dict(kwargs)
    data = _image(np.int16) if kwargs.pop("int", False) else _image()
    xy = [(10, 9)] * 8
    xy[index] = position
    if index < 7:  # a later source fails differently: the first one wins
        xy[7] = (500, 500)
    with pytest.raises(expected) as ref:
        AstropyCutout2D(data, xy[index], 3, **kwargs)
    with pytest.raises(expected, match=rf"\b{index}\b"):
        BatchCutout2D(data, xy, 3, **kwargs)
    assert type(ref.value) is expected


def test_batch_failure_skycoord_outside():
    """Test that a SkyCoord off the image raises NoOverlapError naming its index."""
    wcs = _wcs("tan")
    sky = wcs.pixel_to_world([5, 6, 400], [5, 6, 7])
    with pytest.raises(NoOverlapError, match=r"\b2\b"):
        BatchCutout2D(_image(), sky, 3, wcs=wcs)


@pytest.mark.parametrize("mode", ["trim", "partial", "strict"])
def test_batch_errors_mask(mode):
    """Test that errors='mask' keeps failing sources, filled and flagged."""
    data = _image()
    xy = [(5, 5), (-30, 4), (np.nan, 3), (0, 0), (10, 10)]
    b = BatchCutout2D(data, xy, 3, mode=mode, errors="mask", fill_value=-1.0)
    assert len(b) == 5
    expected_ok = []
    for i, p in enumerate(xy):
        try:
            ref = AstropyCutout2D(data, p, 3, mode=mode, fill_value=-1.0)
        except (ValueError, NoOverlapError, PartialOverlapError) as exc:
            assert b.status[i] != 0
            with pytest.raises(type(exc)):
                b[i]
            expected_ok.append(False)
        else:
            assert b.status[i] == 0
            assert_same_cutout(b[i], ref, exact_byteorder=False)
            expected_ok.append(True)
    assert list(b.status == 0) == expected_ok
    if b.shape is not None:
        for i in np.flatnonzero(~np.array(expected_ok)):
            assert np.all(b.data[i] == -1.0)


def test_batch_errors_mask_integer_nan_fill():
    """Test that errors='mask' with integer data and NaN fill fills failures with 0."""
    data = _image(np.int32) + 1
    b = BatchCutout2D(data, [(5, 5), (-30, 4), (8, 9)], 3, mode="strict", errors="mask")
    assert list(b.status != 0) == [False, True, False]
    assert np.all(b.data[1] == 0)
    assert_same_cutout(b[2], AstropyCutout2D(data, (8, 9), 3, mode="strict"))


def test_batch_bad_arguments():
    """Test that a bad mode, errors value or sizes raise ValueError."""
    with pytest.raises(ValueError, match="mode"):
        BatchCutout2D(_image(), XY, 3, mode="nope")
    with pytest.raises(ValueError, match="errors"):
        BatchCutout2D(_image(), XY, 3, errors="ignore")
    with pytest.raises(ValueError, match="size"):
        BatchCutout2D(_image(), XY, np.ones((8, 3)))
    with pytest.raises(ValueError, match="size"):
        BatchCutout2D(_image(), XY, np.ones(5))
    with pytest.raises(ValueError):
        BatchCutout2D(_image(), XY, (3, 4, 5))
    with pytest.raises(ValueError, match="wcs"):
        BatchCutout2D(_image(), SkyCoord([1, 2], [3, 4], unit="deg"), 3)
    with pytest.raises(ValueError, match="wcs"):
        BatchCutout2D(_image(), XY, 3 * u.arcsec)
    with pytest.raises(ValueError):
        BatchCutout2D(_image(), XY, u.Quantity(np.ones(8), u.m))


@pytest.mark.parametrize(
    "method", [np.floor, np.round, lambda v: np.floor(v + 0.25), 4]
)
def test_batch_rounding_method(method):
    """Test that BatchCutout2D honours limit_rounding_method as astropy does."""
    if not callable(method):
        with pytest.raises(ValueError, match="callable"):
            BatchCutout2D(_image(), XY, 3, limit_rounding_method=method)
        return
    check_batch(_image(), XY, 4, mode="partial", limit_rounding_method=method)


@pytest.mark.parametrize("which", ["plain", "comp"])
@pytest.mark.parametrize("mode", ["trim", "partial"])
def test_batch_lazy_sections(fits_files, which, mode):
    """Test that BatchCutout2D on HDU sections matches astropy."""
    path, ext = fits_files[which]
    with fits.open(path) as hdul:
        section = hdul[ext].section
        xy = [(10, 12.5), (0, 0), (49.5, 39.5), (25, 20)]
        check_batch(section, xy, (6, 7), mode=mode, fill_value=-3)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_batch_threads(n_threads):
    """Test that n_threads gives the same stack as one thread."""
    rng = np.random.default_rng(5)
    data = _image(">f4", shape=(60, 70))
    xy = rng.uniform(-2, 62, size=(40, 2))
    ref = BatchCutout2D(data, xy, 6, mode="partial", n_threads=1)
    b = BatchCutout2D(data, xy, 6, mode="partial", n_threads=n_threads)
    np.testing.assert_array_equal(b.data, ref.data)
    assert_same_cutout(
        b[17], AstropyCutout2D(data, xy[17], 6, mode="partial"), exact_byteorder=False
    )


# --------------------------------------------------------------------------
# SkyCoord + SIP: vectorised vs per-source world-to-pixel
# --------------------------------------------------------------------------


def _boundary_skycoords(wcs, size, rng, n=120):
    """SkyCoords whose pixel positions sit exactly on rounding boundaries."""
    half = 0.5 if size % 2 else 0.0
    x = rng.integers(2, NX - 2, n) + half
    y = rng.integers(2, NY - 2, n) + half
    # also boundaries of the x.5 rounding of position_original
    x[::3] += 0.5 - half
    return wcs.pixel_to_world(x, y)


@pytest.mark.parametrize("size", [3, 4])
@pytest.mark.parametrize("mode", ["trim", "partial"])
def test_batch_skycoord_sip_matches_per_source(size, mode):
    """Test that SIP SkyCoord batches equal per-source astropy cutouts exactly."""
    wcs = _wcs("sip")
    rng = np.random.default_rng(11)
    sky = _boundary_skycoords(wcs, size, rng)
    data = _image()
    b = BatchCutout2D(data, sky, size, wcs=wcs, mode=mode)
    xv, yv = skycoord_to_pixel(sky, wcs, mode="all")
    n_diff = 0
    for i in range(len(sky)):
        ref = AstropyCutout2D(data, sky[i], size, wcs=wcs, mode=mode)
        n_diff += ref.input_position_original != (xv[i], yv[i])
        assert_same_cutout(b[i], ref)
        np.testing.assert_array_equal(b.data[i] if b.shape else b[i].data, ref.data)
    # the case is only meaningful if vectorised and per-source values differ
    assert n_diff > 0


def _strong_sip_wcs():
    """A SIP WCS whose iterative inverse converges slowly (strong terms)."""
    h = fits.Header()
    cards = dict(
        NAXIS=2, NAXIS1=600, NAXIS2=600, CTYPE1="RA---TAN-SIP", CTYPE2="DEC--TAN-SIP",
        CRVAL1=10.0, CRVAL2=-30.0, CRPIX1=30.3, CRPIX2=22.7,
        CD1_1=-2e-4, CD1_2=1e-5, CD2_1=1.2e-5, CD2_2=2e-4,
        A_ORDER=2, B_ORDER=2, A_2_0=2e-4, A_1_1=-1e-4, A_0_2=3e-5,
        B_2_0=1e-5, B_1_1=2e-4, B_0_2=-1e-4, AP_ORDER=2, BP_ORDER=2,
        AP_2_0=-2e-4, AP_1_1=1e-4, AP_0_2=-3e-5, BP_2_0=-1e-5, BP_1_1=-2e-4,
        BP_0_2=1e-4,
    )  # fmt: skip
    for key, value in cards.items():
        h[key] = value
    return WCS(h)


def test_batch_skycoord_sip_near_boundary():
    """Test SIP SkyCoord batches whose box limits lie a few 1e-6 pixel from a
    rounding boundary: the vectorised solution differs from astropy's
    per-source one by more than that, and every box must still be astropy's."""
    wcs = _strong_sip_wcs()
    rng = np.random.default_rng(1)
    n = 300
    px = np.round(rng.uniform(0, 300, n)) + 0.5 + rng.uniform(-8e-6, 8e-6, n)
    py = np.round(rng.uniform(0, 300, n)) + rng.uniform(-8e-6, 8e-6, n)
    sky = wcs.pixel_to_world(px, py)
    data = _image(shape=(600, 600))
    b = BatchCutout2D(data, sky, 3, wcs=wcs)
    xv, yv = skycoord_to_pixel(sky, wcs, mode="all")
    gap = 0.0
    for i in range(n):
        ref = AstropyCutout2D(data, sky[i], 3, wcs=wcs)
        x1, y1 = ref.input_position_original
        gap = max(gap, abs(float(x1) - xv[i]), abs(float(y1) - yv[i]))
        assert_same_cutout(b[i], ref)
        np.testing.assert_array_equal(b.data[i], ref.data)
    # meaningful only where the two solutions differ by more than 1e-6 pixel
    assert gap > 1e-6


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # (astropy's)
def test_batch_names_the_source_whose_position_does_not_converge():
    """Test a SIP batch with one source far off the image, whose pixel
    position astropy cannot solve: that source fails as in astropy (named),
    the others are cut."""
    from astropy.wcs import NoConvergence

    wcs = _strong_sip_wcs()
    data = _image(shape=(600, 600))
    c0 = wcs.pixel_to_world(10, 10)
    ra = [c0.ra.deg, c0.ra.deg + 180, c0.ra.deg]
    dec = [c0.dec.deg, -c0.dec.deg, c0.dec.deg + 1e-3]
    sky = SkyCoord(ra, dec, unit="deg")
    with pytest.raises(NoConvergence):
        AstropyCutout2D(data, sky[1], 3, wcs=wcs)
    with pytest.raises(NoConvergence, match="^source 1: "):
        BatchCutout2D(data, sky, 3, wcs=wcs)
    b = BatchCutout2D(data, sky, 3, wcs=wcs, errors="mask")
    assert b.status.tolist() == [0, 8, 0]
    for i in (0, 2):
        assert_same_cutout(b[i], AstropyCutout2D(data, sky[i], 3, wcs=wcs))
    with pytest.raises(NoConvergence, match="^source 1: "):
        b[1]
    # with a bad size too: astropy solves the position first (status 8)
    with pytest.raises(NoConvergence, match="^source 1: "):
        BatchCutout2D(data, sky, [3, np.nan, np.inf], wcs=wcs)
    b = BatchCutout2D(data, sky, [3, np.nan, np.inf], wcs=wcs, errors="mask")
    assert b.status.tolist() == [0, 8, 9]


def test_batch_scalar_skycoord_with_sip():
    """Test a scalar SkyCoord with a SIP WCS, on a rounding boundary."""
    wcs = _strong_sip_wcs()
    sky = wcs.pixel_to_world(18.0, 8.0)
    data = _image(shape=(600, 600))
    b = BatchCutout2D(data, sky, 3, wcs=wcs)
    assert len(b) == 1
    assert_same_cutout(b[0], AstropyCutout2D(data, sky, 3, wcs=wcs))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.bool_, np.float32])
def test_batch_one_column_with_a_stride(dtype):
    """Test one-column images whose column stride is not the item size."""
    base = (np.arange(28 * 3) % 7).astype(dtype).reshape(28, 3)
    for data in (base[:, ::3], np.broadcast_to(base[:, :1], (28, 1))):
        check_batch(data, [(0, 5), (0, 20)], 3, mode="partial", fill_value=0)


@pytest.mark.parametrize(
    "wcs",
    [WCS(naxis=3), WCS(naxis=1), "not a wcs"],
    ids=["3-D", "1-D", "str"],
)
def test_unusable_wcs_fails_at_construction(wcs):
    """Test that a WCS astropy's Cutout2D cannot shift fails at once, as there."""
    data = _image()
    with pytest.raises(Exception) as ref:
        AstropyCutout2D(data, (5, 5), 3, wcs=wcs)
    with pytest.raises(type(ref.value), match=re.escape(str(ref.value))):
        Cutout2D(data, (5, 5), 3, wcs=wcs)
    with pytest.raises(type(ref.value), match=re.escape(str(ref.value))):
        BatchCutout2D(data, [(5, 5)], 3, wcs=wcs)


def test_wcs_keeps_the_cut_shape_when_data_is_replaced():
    """Test that a cutout's WCS has the shape cut, as astropy's, when
    ``data`` is replaced before the WCS is first read."""
    data = _image()
    wcs = _wcs("tan")
    ours = Cutout2D(data, (5, 5), 3, wcs=wcs)
    ref = AstropyCutout2D(data, (5, 5), 3, wcs=wcs)
    ours.data = ours.data[:1]
    assert ours.wcs.array_shape == ref.wcs.array_shape == (3, 3)


def test_batch_negative_size_in_partial_mode():
    """Test that a negative size in mode 'partial' raises at once, naming the
    source, with astropy's error."""
    data = _image()
    with pytest.raises(ValueError) as ref:
        AstropyCutout2D(data, (5, 5), -1, mode="partial")
    with pytest.raises(ValueError, match=rf"source 1: {ref.value}"):
        BatchCutout2D(data, [(5, 5)] * 3, [3, -1, 5], mode="partial")
    b = BatchCutout2D(data, [(5, 5)] * 3, [3, -1, 5], mode="partial", errors="mask")
    assert b.status.tolist()[0] == b.status.tolist()[2] == 0
    with pytest.raises(ValueError, match=str(ref.value)):
        b[1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e19])
@pytest.mark.parametrize("mode", ["trim", "partial"])
def test_batch_sizes_astropy_refuses_fail_their_source(bad, mode):
    """Test per-source sizes astropy cannot turn into pixels (NaN, infinite,
    beyond int64): each fails its own source with astropy's exception, in
    source order, and the caller's array of sizes is left as it was."""
    data = _image()
    xy = [(5, 5), (500, 500), (6, 6), (7, 7)]  # source 1 is off the image
    sizes = np.array([3.0, 4.0, bad, 5.0])
    given = sizes.copy()
    kinds = []
    for p, s in zip(xy, sizes, strict=True):
        try:
            AstropyCutout2D(data, p, s, mode=mode)
            kinds.append(None)
        except Exception as exc:  # noqa: BLE001 - compared below
            kinds.append((type(exc), str(exc)))
    assert kinds[0] is None and kinds[3] is None and kinds[2] is not None
    with pytest.raises(kinds[1][0], match=r"^source 1: "):
        BatchCutout2D(data, xy, sizes, mode=mode)
    b = BatchCutout2D(data, xy, sizes, mode=mode, errors="mask")
    assert b.status.tolist() == [0, 2, 9, 0]
    with pytest.raises(kinds[2][0], match=re.escape(f"source 2: {kinds[2][1]}")):
        b[2]
    for i in (0, 3):
        assert_same_cutout(b[i], AstropyCutout2D(data, xy[i], sizes[i], mode=mode))
    np.testing.assert_array_equal(sizes, given)


@pytest.mark.parametrize(
    "position", [(3 + 0j, 4), ("3", "4"), (3, b"4")], ids=["complex", "text", "bytes"]
)
def test_positions_that_are_not_real_numbers(position):
    """Test positions holding complex numbers or text: astropy's error, in
    Cutout2D and (naming the source) in BatchCutout2D, from a list or an
    array of positions."""
    data = _image()
    with pytest.raises(Exception) as ref:
        AstropyCutout2D(data, position, 3)
    with pytest.raises(type(ref.value), match=re.escape(str(ref.value))):
        Cutout2D(data, position, 3)
    listed = [(5, 5), position]
    expected = re.escape(f"source 1: {ref.value}")
    for positions in (listed, np.array(listed, dtype=object)):
        with pytest.raises(type(ref.value), match=expected):
            BatchCutout2D(data, positions, 3)


@pytest.mark.parametrize("size", [-1, (-1, -1), [-2, -2, -2], (-1, 3)], ids=repr)
@pytest.mark.parametrize("mode", ["trim", "strict"])
def test_batch_negative_sizes_give_empty_cutouts(size, mode):
    """Test negative sizes in 'trim' and 'strict' mode: empty cutouts, as
    astropy's slicing gives."""
    check_batch(_image(), [(5, 5), (6, 7), (8, 9)], size, mode=mode)


def test_batch_angles_in_several_units():
    """Test per-source angular sizes in different units: each converted in
    its own unit, as astropy converts it (one common unit can round a size
    of k + 0.5 pixels the other way)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [20.5, 15.25]
    wcs.wcs.cdelt = [-1e-4, 1.3e-4]
    data = _image(shape=(40, 40))
    xy = [(20, 20)] * 3
    for middle in (900 * u.mas, 0.045 * u.arcmin, 1620 * u.mas):  # k + 0.5 px
        sizes = [0.0003 * u.deg, middle, 0.0004 * u.deg]
        b = BatchCutout2D(data, xy, sizes, wcs=wcs)
        for i, (p, s) in enumerate(zip(xy, sizes, strict=True)):
            assert_same_cutout(b[i], AstropyCutout2D(data, p, s, wcs=wcs))


def test_zero_dimensional_array_sizes_are_refused_as_astropy():
    """Test a 0-d array as the size (astropy takes ``len()`` of it): one for
    all sources, or one source's in a list (that source fails, status 9)."""
    data = _image()
    xy = [(5, 5), (8, 8), (10, 10)]
    with pytest.raises(TypeError) as ref:
        AstropyCutout2D(data, xy[0], np.array(3))
    with pytest.raises(TypeError, match=re.escape(str(ref.value))):
        BatchCutout2D(data, xy, np.array(3))
    with pytest.raises(TypeError, match=re.escape(f"source 0: {ref.value}")):
        BatchCutout2D(data, xy, [np.array(3), 4, 5])
    b = BatchCutout2D(data, xy, [np.array(3), 4, 5], errors="mask")
    assert b.status.tolist() == [9, 0, 0]
    assert_same_cutout(b[1], AstropyCutout2D(data, xy[1], 4))


def test_masked_positions_fail_as_astropy_rounds_them():
    """Test masked positions: astropy's MaskError (raised where it rounds the
    box), in Cutout2D and, naming the source, in BatchCutout2D; the other
    sources of the batch are cut (status 8 for the masked one)."""
    data = _image()
    pos = np.ma.masked_array([[3, 4], [5, 6], [7, 8]], mask=[[0, 0], [0, 1], [0, 0]])
    with pytest.raises(np.ma.MaskError) as ref:
        AstropyCutout2D(data, pos[1], 3)
    with pytest.raises(np.ma.MaskError, match=re.escape(str(ref.value))):
        Cutout2D(data, pos[1], 3)
    with pytest.raises(np.ma.MaskError, match=re.escape(f"source 1: {ref.value}")):
        BatchCutout2D(data, pos, 3)
    b = BatchCutout2D(data, pos, 3, errors="mask")
    assert b.status.tolist() == [0, 8, 0]
    for i in (0, 2):
        assert_same_cutout(b[i], AstropyCutout2D(data, pos[i], 3))


def test_batch_keeps_the_array_subclass():
    """Test that cutouts of a Quantity keep its unit, as astropy's."""
    q = _image() * u.Jy
    b = BatchCutout2D(q, [(3, 4), (10, 8)], 3)
    for i, p in enumerate([(3, 4), (10, 8)]):
        ref = AstropyCutout2D(q, p, 3)
        assert type(b[i].data) is type(ref.data) is u.Quantity
        assert b[i].data.unit == ref.data.unit
        np.testing.assert_array_equal(b[i].data.value, ref.data.value)
    assert b.data.unit == u.Jy
    # filled at the edge ('partial'): astropy's is a new plain array
    for p in [(0, 0), (10, 8)]:
        ref = AstropyCutout2D(q, p, 4, mode="partial")
        got = BatchCutout2D(q, [(0, 0), (10, 8)], 4, mode="partial")[p != (0, 0)]
        assert type(got.data) is type(ref.data)


@pytest.mark.parametrize(
    "sizes",
    [
        [3 * u.pix, 2 * u.arcsec, 4 * u.pix],
        [3, 4 * u.pix, 5],
        [(3 * u.arcsec, 4), (5 * u.arcsec, 6), (1 * u.arcsec, 2)],
        [3 * u.pix, [4, 5] * u.pix, 6 * u.pix],
    ],
    ids=["pix-arcsec", "number-pix", "tuples", "ragged-pix"],
)
def test_batch_sizes_of_mixed_kinds(sizes):
    """Test per-source sizes of mixed kinds, each as astropy takes one."""
    wcs = _wcs("tan")
    data = _image()
    xy = [(8, 9), (12, 10), (15, 14)]
    b = BatchCutout2D(data, xy, sizes, wcs=wcs, mode="partial")
    for i, (p, s) in enumerate(zip(xy, sizes, strict=True)):
        assert_same_cutout(b[i], AstropyCutout2D(data, p, s, wcs=wcs, mode="partial"))


# --------------------------------------------------------------------------
# hypothesis sweeps
# --------------------------------------------------------------------------

_coord = st.one_of(
    st.integers(-8, 30).map(float),
    st.integers(-8, 30).map(lambda v: v + 0.5),
    st.integers(-8, 30).map(lambda v: v + 0.5 + 1e-9),
    st.integers(-8, 30).map(lambda v: v + 0.5 - 1e-9),
    st.floats(-8, 30, allow_nan=False),
)
_side = st.integers(0, 12)
_size = st.one_of(_side, st.tuples(_side, _side))
_modes = st.sampled_from(["trim", "partial", "strict"])
_shape = st.tuples(st.integers(1, 20), st.integers(1, 20))


@settings(derandomize=True, max_examples=1000, deadline=None, database=None)
@given(shape=_shape, x=_coord, y=_coord, size=_size, mode=_modes)
def test_hypothesis_cutout2d(shape, x, y, size, mode):
    """Test that Cutout2D matches astropy over random geometry."""
    data = _image(shape=shape)
    check_both(data, (x, y), size, mode=mode, fill_value=-5.0)


@settings(derandomize=True, max_examples=400, deadline=None, database=None)
@given(
    shape=_shape,
    xy=st.lists(st.tuples(_coord, _coord), min_size=1, max_size=6),
    size=_size,
    mode=_modes,
    dtype=st.sampled_from(["<f4", ">f8", ">i2", "u1"]),
)
def test_hypothesis_batch(shape, xy, size, mode, dtype):
    """Test that BatchCutout2D matches per-source astropy over random geometry."""
    data = _image(np.dtype(dtype), shape=shape)
    refs = []
    first_error = None
    for i, p in enumerate(xy):
        try:
            refs.append(AstropyCutout2D(data, p, size, mode=mode, fill_value=3))
        except Exception as exc:  # noqa: BLE001 - compared below
            first_error = (i, exc)
            break
    if first_error is not None:
        i, exc = first_error
        with pytest.raises(type(exc), match=rf"\b{i}\b"):
            BatchCutout2D(data, xy, size, mode=mode, fill_value=3)
        masked = BatchCutout2D(data, xy, size, mode=mode, fill_value=3, errors="mask")
        with pytest.raises(type(exc)):
            masked[i]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_batch(data, xy, size, mode=mode, fill_value=3)


@pytest.mark.parametrize("mode", ["trim", "strict", "partial"])
def test_batch_fill_warning_only_when_filling(mode):
    """Test that an overflowing float32 fill warns only where astropy warns."""
    data = _image(np.float32)
    xy = [(5, 5), (9, 9)]  # no source needs filling
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_batch(data, xy, 3, mode=mode, fill_value=1e40)
    if mode == "partial":
        with pytest.warns(RuntimeWarning, match="overflow"):
            AstropyCutout2D(data, (0, 0), 3, mode=mode, fill_value=1e40)
        with pytest.warns(RuntimeWarning, match="overflow"):
            BatchCutout2D(data, [(5, 5), (0, 0)], 3, mode=mode, fill_value=1e40)


@pytest.mark.parametrize("method", [np.round, lambda v: np.floor(v + 0.5)])
def test_batch_skycoord_sip_rounding_methods(method):
    """Test SIP SkyCoord batches with other rounding methods against astropy."""
    wcs = _wcs("sip")
    sky = _boundary_skycoords(wcs, 3, np.random.default_rng(12), n=40)
    data = _image()
    b = BatchCutout2D(
        data, sky, 3, wcs=wcs, mode="partial", limit_rounding_method=method
    )
    for i in range(len(sky)):
        ref = AstropyCutout2D(
            data, sky[i], 3, wcs=wcs, mode="partial", limit_rounding_method=method
        )
        assert_same_cutout(b[i], ref, exact_byteorder=False)


@pytest.mark.parametrize("mode", ["trim", "partial"])
def test_batch_masked_and_complex_data(mode):
    """Test that masked and complex arrays (not for the kernel) still match astropy."""
    data = np.ma.masked_greater(_image(), 100.0)
    b, refs = check_batch(data, XY, 3, mode=mode, exact_byteorder=True)
    for c, a in zip(b, refs, strict=True):
        np.testing.assert_array_equal(
            np.ma.getmaskarray(c.data), np.ma.getmaskarray(a.data)
        )
    if b.shape is not None:
        assert isinstance(b.data, np.ma.MaskedArray)
        for i, a in enumerate(refs):
            np.testing.assert_array_equal(b.data.mask[i], np.ma.getmaskarray(a.data))
    check_batch(_image(np.complex128), XY, (2, 3), mode=mode, fill_value=1j)


@pytest.mark.parametrize("kind", ["tan", "rotated", "sip"])
@pytest.mark.parametrize("out_shape", [(45, 20), (12, 80)])
def test_resampled_cutout_wcs_maps_like_the_parent(kind, out_shape):
    """Test that the WCS of a resampled cutout (also with SIP distortion and
    its inverse) gives at output pixel q the sky position that the parent
    WCS gives at the input pixel q samples, p = origin + (q + 0.5) s - 0.5."""
    from cutana.cutout import cutout_wcs

    header = _header(kind)
    if kind == "sip":  # with inverse polynomials, and third-order terms
        header["A_ORDER"] = header["B_ORDER"] = 3
        header["A_3_0"], header["B_0_3"] = 1e-6, -2e-6
        header["AP_ORDER"] = header["BP_ORDER"] = 2
        header["AP_2_0"], header["AP_1_1"] = -4e-4, 3e-4
        header["BP_0_2"], header["BP_2_0"] = 1e-4, -3e-4
    wcs = WCS(header)
    origin, shape = np.array([7.0, 11.0]), (30, 40)  # (x0, y0), (ny, nx)
    new = cutout_wcs(wcs, origin, shape, out_shape)
    assert new.array_shape == out_shape
    scale = np.array([shape[1] / out_shape[1], shape[0] / out_shape[0]])
    qx, qy = np.meshgrid(np.arange(out_shape[1]), np.arange(out_shape[0]))
    px = origin[0] + (qx + 0.5) * scale[0] - 0.5
    py = origin[1] + (qy + 0.5) * scale[1] - 0.5
    got = np.array(new.pixel_to_world_values(qx, qy))
    want = np.array(wcs.pixel_to_world_values(px, py))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-11)
    if kind == "sip":  # the inverse polynomials transform alike
        p_inv = wcs.sip.foc2pix(wcs.sip.pix2foc(np.c_[px.ravel(), py.ravel()], 0), 0)
        q_inv = new.sip.foc2pix(new.sip.pix2foc(np.c_[qx.ravel(), qy.ravel()], 0), 0)
        np.testing.assert_allclose(
            (q_inv + 0.5) * scale - 0.5 + origin, p_inv, rtol=0, atol=1e-9
        )


def test_cutout_wcs_is_taken_when_cut():
    """Test that, as astropy's, a cutout's WCS is that of the parent when the
    cutout was made, not after the caller changed the parent."""
    wcs = _wcs("rotated")
    one = Cutout2D(_image(), (20, 15), 9, wcs=wcs)
    batch = BatchCutout2D(_image(), [(20, 15), (10, 5)], 9, wcs=wcs)
    ref = AstropyCutout2D(_image(), (20, 15), 9, wcs=wcs)
    wcs.wcs.crval = [0.0, 0.0]
    for cut in (one, batch[0]):
        np.testing.assert_array_equal(cut.wcs.wcs.crval, ref.wcs.wcs.crval)
        np.testing.assert_array_equal(cut.wcs.wcs.crpix, ref.wcs.wcs.crpix)


def test_position_of_arrays_raises_as_astropy():
    """Test that a position of one-element arrays (shape (2, 1)) raises
    astropy's ValueError, with its message."""
    position = np.array([[5.0], [6.0]])
    with pytest.raises(ValueError, match="Limit rounding method must accept") as ref:
        AstropyCutout2D(_image(), position, 4)
    with pytest.raises(ValueError) as got:
        Cutout2D(_image(), position, 4)
    assert str(got.value) == str(ref.value)


@pytest.mark.parametrize(
    "position",
    [u.Quantity([5, 6], u.pix), u.Quantity([5.0, 6.0]), (5 * u.pix, 6 * u.pix),
     (5 * u.dimensionless_unscaled, 6)],
    ids=["pixel-array", "dimensionless-array", "pixel-pair", "dimensionless-pair"],
)
def test_quantity_positions_as_astropy(position):
    """Test that a position given as a Quantity cuts, or raises the same
    exception type, as astropy's `Cutout2D` (a Quantity array in pixels
    raised TypeError here, ValueError there)."""
    data = np.arange(500.0).reshape(20, 25)
    try:
        want = AstropyCutout2D(data, position, 3)
    except Exception as exc:  # noqa: BLE001 - its type is compared
        with pytest.raises(type(exc)):
            Cutout2D(data, position, 3)
        return
    got = Cutout2D(data, position, 3)
    np.testing.assert_array_equal(got.data, want.data)
    assert got.bbox_original == want.bbox_original
