import numpy as np
import pytest

from hpc_retrain.imaging.tiling import TileGrid, extract_tiles, stitch_tiles


@pytest.mark.parametrize("shape", [(512, 512), (731, 600), (224, 224), (100, 300), (225, 449)])
def test_round_trip_and_count(shape):
    rng = np.random.default_rng(0)
    im = rng.random(shape + (3,)).astype(np.float32)
    tiles, grid = extract_tiles(im, 256, 16)
    assert tiles.shape == (len(grid), 256, 256, 3)
    assert len(grid) == len(TileGrid(shape, 256, 16))
    np.testing.assert_array_equal(stitch_tiles(tiles, grid), im)


def test_matches_misic_reference():
    from misic.utils import extract_tiles as misic_extract
    from misic.utils import stitch_tiles as misic_stitch

    rng = np.random.default_rng(1)
    im = rng.random((700, 513, 3))
    ref, params = misic_extract(im, size=256, exclude=16)
    ours, grid = extract_tiles(im, 256, 16)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(grid.positions, params["positions"])
    np.testing.assert_allclose(stitch_tiles(ours, grid), misic_stitch(ref, params))


def test_tiles_overlap_by_twice_the_margin():
    im = np.arange(600 * 600, dtype=np.float32).reshape(600, 600)
    tiles, grid = extract_tiles(im, 256, 16)
    # horizontally adjacent tiles share 32 columns
    np.testing.assert_array_equal(tiles[0][:, -32:], tiles[1][:, :32])
    assert grid.stride == 224
