# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""Tests of BatchCutout2D.resample and BatchCutout2D.normalize against references."""

import numpy as np
import pytest
from astropy.nddata import Cutout2D as AstropyCutout2D
from astropy.visualization import PercentileInterval, SqrtStretch
from scipy.ndimage import map_coordinates

from cutana import BatchCutout2D


@pytest.fixture
def image():
    """A seeded random big-endian image."""
    return np.random.default_rng(1).normal(10, 3, size=(80, 90)).astype(">f4")


POSITIONS = [(10.3, 12.7), (45.0, 40.5), (88.2, 3.0), (60.6, 70.1)]


@pytest.mark.parametrize("mode", ["partial", "trim"])
def test_resample_bilinear_matches_scipy(image, mode):
    """Test that resample('bilinear') equals map_coordinates on astropy's cutout."""
    batch = BatchCutout2D(image, POSITIONS, 17, mode=mode, fill_value=0.0)
    out = batch.resample((23, 29), "bilinear")
    assert out.shape == (len(POSITIONS), 23, 29)
    for i, pos in enumerate(POSITIONS):
        ref = AstropyCutout2D(image.astype(np.float64), pos, 17, mode=mode,
                              fill_value=0.0)
        ny, nx = ref.data.shape
        yy = (np.arange(23) + 0.5) * ny / 23 - 0.5
        xx = (np.arange(29) + 0.5) * nx / 29 - 0.5
        grid = np.meshgrid(yy, xx, indexing="ij")
        expect = map_coordinates(ref.data, grid, order=1, mode="nearest")
        np.testing.assert_allclose(out[i], expect, rtol=1e-5, atol=1e-5)


def test_resample_area_conserves_flux(image):
    """Test that area resampling keeps each cutout's total (partial mode, zero fill)."""
    batch = BatchCutout2D(image, POSITIONS, 16, mode="partial", fill_value=0.0)
    out = batch.resample(7, "area", dtype=np.float64)
    for i, pos in enumerate(POSITIONS):
        ref = AstropyCutout2D(image.astype(np.float64), pos, 16, mode="partial",
                              fill_value=0.0)
        assert out[i].sum() == pytest.approx(ref.data.sum(), rel=1e-5)


def test_normalize_sqrt_uint8_matches_astropy(image):
    """Test that normalize('sqrt', uint8) equals astropy.visualization rounding."""
    batch = BatchCutout2D(image, POSITIONS[:2], 20)
    out = batch.normalize("sqrt", percentile=99.0, dtype="uint8")
    for i in range(2):
        data = batch[i].data.astype(np.float64)
        vmin, vmax = PercentileInterval(99.0).get_limits(data)
        expect = np.round(
            SqrtStretch()(np.clip((data - vmin) / (vmax - vmin), 0, 1)) * 255
        )
        np.testing.assert_array_equal(out[i], expect.astype(np.uint8))


def test_normalize_needs_uniform_shapes(image):
    """Test that normalize on trimmed cutouts of different shapes asks for a stack."""
    batch = BatchCutout2D(image, [(1, 1), (40, 40)], 10, mode="trim")
    with pytest.raises(ValueError, match="different shapes"):
        batch.normalize("linear")
    stack = batch.resample(10)
    assert batch.normalize("linear", stack=stack).shape == (2, 10, 10)


@pytest.mark.parametrize("kind", ["section", "compressed", "float16"])
@pytest.mark.parametrize("method", ["bilinear", "nearest", "area"])
def test_resample_reads_fits_sections_and_float16(tmp_path, image, kind, method):
    """Test that resample reads a FITS ``Section`` or ``CompImageSection``
    (which BatchCutout2D takes; resample failed: "data must be a 2-D
    array, got 0 dimensions") and float16 data (refused: "unsupported
    dtype"), reading only the part the boxes reach, as it resamples the
    same values as a float32 array: boxes inside, across the edges and
    outside."""
    import contextlib

    from astropy.io import fits

    positions = [(1.2, 2.7), (45.0, 40.5), (88.9, 78.0), (-3.0, 30.0), (200.0, 5.0)]
    data = image.astype(np.float32)
    with contextlib.ExitStack() as stack:
        if kind == "float16":
            source = data.astype(np.float16)
            data = source.astype(np.float32)
        else:
            path = tmp_path / "tile.fits"
            hdus = [fits.PrimaryHDU(data)]
            if kind == "compressed":
                packed = fits.CompImageHDU(data, compression_type="GZIP_1")
                hdus = [fits.PrimaryHDU(), packed]
            fits.HDUList(hdus).writeto(path)
            hdul = stack.enter_context(fits.open(path))
            source = hdul[-1].section
            data = hdul[-1].data  # (the compressed one as stored, quantised)
        for size in (1, 6, (9, 14)):
            got = BatchCutout2D(source, positions, size, errors="mask").resample(
                (7, 5), method)
            want = BatchCutout2D(data, positions, size, errors="mask").resample(
                (7, 5), method)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target", [2.5, (3.7, 4.2), "4", (4, 5, 6), True])
def test_resample_target_must_be_whole_numbers(image, target):
    """Test that a resample target that is not a whole number, or a pair of
    them, is refused (2.5 was taken as 2, and "4" as 4); numpy integers
    are whole numbers."""
    batch = BatchCutout2D(image, POSITIONS, 6)
    with pytest.raises(TypeError, match="target must be a whole number or a pair"):
        batch.resample(target)
    assert batch.resample(np.int64(4)).shape == (len(POSITIONS), 4, 4)
    assert batch.resample(np.array([3, 5])).shape == (len(POSITIONS), 3, 5)


@pytest.mark.parametrize(("size", "shape"), [(3, (3, 3)), ((4, 5), (4, 5)),
                                             ([], (0, 0))])
def test_a_batch_of_no_source_has_the_sizes_shape(image, size, shape):
    """Test that a batch of no source is a ``(0, ny, nx)`` stack of the size
    asked for (it was ``(0, 0, 0)``, while ``resample`` gave ``(0, H, W)``);
    an empty list of sizes has no shape."""
    batch = BatchCutout2D(image, np.zeros((0, 2)), size)
    assert batch.data.shape == batch.shape == (0, *shape)
    assert batch.resample(5).shape == (0, 5, 5)
