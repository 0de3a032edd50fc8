"""The block engine: the grid, halos at borders, filters block-wise == whole image, seam merging."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from hpc_retrain.imaging import blocks as B


@pytest.mark.parametrize("shape,block", [((100, 130), 32), ((64, 64), 64), ((50, 71), (20, 33)), ((5, 300), 7)])
def test_grid_covers_the_image_exactly_once_by_cores(shape, block):
    count = np.zeros(shape, int)
    strips = list(B.strips(shape, block, halo=5))
    for i, strip in enumerate(strips):
        assert len({b.rows for b in strip}) == 1  # a strip is one row of blocks
        for j, b in enumerate(strip):
            assert b.index == (i, j)
            count[b.core] += 1
    assert np.all(count == 1)
    assert [b for s in strips for b in s] == list(B.blocks(shape, block, 5))


def test_halo_is_clipped_at_the_borders_and_crop_returns_the_core():
    im = np.arange(40 * 50).reshape(40, 50)
    out = np.zeros_like(im)
    for b in B.blocks(im.shape, 16, halo=3):
        win = b.read(im)
        (r0, r1), (c0, c1) = b.rows, b.cols
        assert win.shape == (min(r1 + 3, 40) - max(r0 - 3, 0), min(c1 + 3, 50) - max(c0 - 3, 0))
        np.testing.assert_array_equal(win[b.inner], im[b.core])
        np.testing.assert_array_equal(b.crop(win), im[b.core])
        b.write(out, win)
    np.testing.assert_array_equal(out, im)
    first = next(B.blocks(im.shape, 16, halo=3))
    assert first.window == (slice(0, 19), slice(0, 19)) and first.inner == (slice(0, 16), slice(0, 16))


def test_read_through_index_maps_gives_the_globally_padded_window():
    rng = np.random.default_rng(0)
    im = rng.random((37, 45))
    pads = ("reflect", 4, 4), ("constant", 6, 6)
    padded = np.pad(np.pad(im, 4, mode="reflect"), 6)
    index = tuple(B.axis_index(n, *pads) for n in im.shape)
    h = 10  # = 4 + 6: grid coordinate 0 is position h of the padded axes
    for b in B.blocks(im.shape, 16, halo=h):
        (r0, r1), (c0, c1) = b.rows, b.cols
        win = b.read(im, index)
        np.testing.assert_array_equal(win, padded[r0:r1 + 2 * h, c0:c1 + 2 * h])
        assert b.crop(win).shape == (r1 - r0, c1 - c0)


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_gaussian_blockwise_equals_whole_image_with_the_halo_from_sigma(sigma):
    im = np.random.default_rng(1).random((90, 110))
    whole = ndi.gaussian_filter(im, sigma, mode="mirror")
    halo = B.gaussian_halo(sigma)
    out = np.zeros_like(im)
    for b in B.blocks(im.shape, 25, halo):
        b.write(out, ndi.gaussian_filter(b.read(im), sigma, mode="mirror"))
    np.testing.assert_array_equal(out, whole)
    # one pixel less context and the seams show
    short = np.zeros_like(im)
    for b in B.blocks(im.shape, 25, halo - 1):
        b.write(short, ndi.gaussian_filter(b.read(im), sigma, mode="mirror"))
    assert not np.array_equal(short, whole)


def test_rescale_window_equals_the_whole_resize():
    from skimage.transform import resize

    im = np.random.default_rng(2).random((80, 96))
    for out_shape in ((57, 69), (120, 140)):
        whole = resize(im, out_shape, order=1)
        got = np.zeros(out_shape)
        for b in B.blocks(out_shape, 23):
            got[b.core] = B.rescale_window(lambda r0, r1, c0, c1: im[r0:r1, c0:c1], im.shape, out_shape,
                                           b.rows, b.cols)
        np.testing.assert_allclose(got, whole, atol=1e-12)


def _label_blockwise(mask: np.ndarray, block: int) -> np.ndarray:
    """Connected components per block (no halo), joined with seam_pairs + join."""
    labels = np.zeros(mask.shape, np.int64)
    pairs, next_id = [], 1
    for b in B.blocks(mask.shape, block, halo=1):
        local, n = ndi.label(b.read(mask))
        ids = np.unique(b.crop(local))
        ids = ids[ids > 0]  # numbered: the objects of this block's core only
        lut = np.zeros(n + 1, np.int64)
        lut[ids] = np.arange(next_id, next_id + len(ids))
        next_id += len(ids)
        local = lut[local]
        b.write(labels, local)
        (r0, r1), (c0, c1), (ir, ic) = b.rows, b.cols, b.inner
        if r0 > 0:
            pairs.append(B.seam_pairs(labels[r0 - 1, c0:c1], local[ir.start - 1, ic]))
        if c0 > 0:
            pairs.append(B.seam_pairs(labels[r0:r1, c0 - 1], local[ir, ic.start - 1]))
    lut = B.join(np.concatenate(pairs, axis=1), next_id)
    return lut[labels]


def test_seam_merge_joins_a_cell_across_seams_and_keeps_touching_neighbours_apart():
    mask = np.zeros((60, 60), bool)
    mask[10:14, 2:58] = True  # crosses both vertical seams
    mask[20:50, 28:33] = True  # crosses the horizontal seams, touches nothing
    labels = _label_blockwise(mask, 20)
    assert len(np.unique(labels[10:14, 2:58])) == 1 and len(np.unique(labels[20:50, 28:33])) == 1
    assert labels.max() == 2 and labels[12, 5] != labels[30, 30]
    # the ids are consecutive, numbered in the order of their first block
    assert labels[12, 5] == 1 and labels[30, 30] == 2
    # two cells side by side along a seam, each continuing across it; the two sides put the boundary
    # between them one pixel apart: the odd shared pixel does not join the neighbours
    theirs = np.array([1, 1, 1, 1, 1, 4, 4, 4, 4, 4])
    ours = np.array([2, 2, 2, 2, 3, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(B.seam_pairs(theirs, ours), [[1, 4], [2, 3]])
    assert B.seam_pairs(theirs, np.zeros(10, int)).shape == (2, 0)
    lut = B.join(np.array([[1, 3], [4, 4]]), 6)  # 1-4-3 one cell, 2 and 5 alone
    np.testing.assert_array_equal(lut, [0, 1, 2, 1, 1, 3])


def test_is_large_is_one_rule():
    assert not B.is_large((1024, 1024), 1024) and B.is_large((1025, 10), 1024)
