import dask.array as da
import numpy as np
import pytest
import tifffile
from skimage.feature import shape_index
from skimage.transform import rescale as sk_rescale

from hpc_retrain.config import PreprocessConfig
from hpc_retrain.imaging import preprocess as P


def _cells(shape=(300, 280), seed=0):
    """Dark rods on a bright uint16 background with noise: brightfield-like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    im = np.full(shape, 60000.0)
    for _ in range(12):
        cy, cx, a = rng.uniform(20, shape[0] - 20), rng.uniform(20, shape[1] - 20), rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(a) + (xx - cx) * np.sin(a)
        v = -(yy - cy) * np.sin(a) + (xx - cx) * np.cos(a)
        im -= 3000 * ((np.abs(u) < 12) & (np.abs(v) < 4))
    return (im + rng.normal(0, 50, shape)).clip(0, 65535).astype(np.uint16)


def test_halo_derives_from_largest_sigma():
    assert P.gaussian_radius(2.0) == 8
    assert P.shape_index_halo((1.0, 1.5, 2.0)) == 10
    assert P.shape_index_halo((1.0, 1.5, 3.0)) == 14


@pytest.mark.parametrize("mean_width", [7.0, 10.0, 14.0])
@pytest.mark.parametrize("chunk", [64, 97])
def test_chunked_equals_whole_image(mean_width, chunk):
    cfg = PreprocessConfig(mean_width=mean_width)
    im = _cells()
    whole = P.features_np(im, cfg.brightfield, cfg)
    lazy = P.features(da.from_array(im, chunks=chunk), cfg.brightfield, cfg, chunk=chunk)
    assert lazy.shape == whole.shape == P.rescaled_shape(im.shape, cfg.scale) + (3,)
    assert lazy.numblocks[0] > 1  # the test would prove nothing on one chunk
    np.testing.assert_allclose(lazy.compute(), whole, atol=1e-6)


def test_whole_image_is_the_misic_recipe():
    """Normalize, gamma, skimage rescale, MISIC's reflect-pad-8 shape index, negated for light background."""
    cfg = PreprocessConfig(mean_width=8.0)
    im = _cells(seed=3)
    lo, hi = np.percentile(im, cfg.brightfield.percentiles)
    x = np.clip((im - lo) / (hi - lo), 0, 1) ** 0.41
    x = sk_rescale(x, round(10 / 8.0, 2), order=1)
    pw = 8
    xp = np.pad(x, pw, "reflect")
    ref = np.stack([shape_index(xp, s)[pw:-pw, pw:-pw] for s in (1, 1.5, 2)], -1)
    ref = -np.nan_to_num(ref)
    np.testing.assert_allclose(P.features_np(im, cfg.brightfield, cfg), ref, atol=1e-5)


def test_light_background_flips_sign():
    cfg = PreprocessConfig(mean_width=10)
    im = _cells()
    dark = cfg.brightfield.model_copy(update={"light_background": False})
    np.testing.assert_allclose(P.features_np(im, cfg.brightfield, cfg), -P.features_np(im, dark, cfg))


def test_integer_percentiles_are_exact_when_chunked():
    im = _cells(seed=5)
    exact = P.intensity_range(im, (0.5, 99.5))
    chunked = P.intensity_range(da.from_array(im, chunks=50), (0.5, 99.5))
    np.testing.assert_allclose(chunked, exact)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((64, 64), np.uint16), "constant image"),
        (np.full((64, 64), 7.5, np.float32), "constant image"),
        (np.where(np.eye(64) > 0, np.nan, 1.0), "NaN"),
        (np.ones((64, 64, 2)), "2-D"),
        (np.ones((8, 8)), "too small"),
        (np.ones((64, 64), bool), "pixel type"),
    ],
)
def test_bad_images_get_clear_errors(image, match):
    cfg = PreprocessConfig(mean_width=7.0)
    with pytest.raises(P.ImageError, match=match) as e:
        P.features_np(image, cfg.brightfield, cfg, source="plate/A1_s0_bf.tif")
    assert "A1_s0_bf.tif" in str(e.value)


def test_real_colicoords_brightfield_features(colicoords):
    im = tifffile.imread(colicoords / "ds1" / "brightfield" / "00001.tif")
    cfg = PreprocessConfig(mean_width=14)
    f = P.features_np(im, cfg.brightfield, cfg)
    assert f.dtype == np.float32 and np.isfinite(f).all()
    assert f.min() >= -1 and f.max() <= 1
    lazy = P.features(da.from_array(im, chunks=128), cfg.brightfield, cfg, chunk=128).compute()
    np.testing.assert_allclose(lazy, f, atol=1e-6)
