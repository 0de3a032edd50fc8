"""Instances from (body, contour) probabilities: whole fields, and scans labelled window by window."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from hpc_retrain.config import RunConfig
from hpc_retrain.imaging.metrics import match
from hpc_retrain.inference import instances as I
from hpc_retrain.synth.plates import render_field

CFG = RunConfig().updated(preprocess__mean_width=7.0)  # the synthetic cells' width


def probabilities_from(masks: np.ndarray) -> np.ndarray:
    """What a good model would output for these cells: a smooth body map and a contour map on the edges."""
    edge = find_boundaries(masks, mode="inner")
    body = ndi.gaussian_filter(((masks > 0) & ~edge).astype(np.float32), 0.7)
    contour = ndi.gaussian_filter(edge.astype(np.float32), 0.7) * 2
    body = np.clip(body * 1.1, 0, 1)
    return np.stack([body, np.clip(contour, 0, 1)], axis=-1).astype(np.float32)


@pytest.fixture(scope="module")
def field():
    f = render_field(3, (600, 560), mean_width=7.0)
    return f.masks, probabilities_from(f.masks)


def test_instances_recover_cells_from_clean_probabilities(field):
    masks, prob = field
    labels = I.instances(prob, CFG)
    assert labels.dtype == np.int32
    ids = np.unique(labels)
    assert ids[0] == 0 and np.array_equal(ids[1:], np.arange(1, len(ids)))  # unique, sequential
    f1 = match(masks, labels)[0].f1
    assert f1 > 0.8, f1


def test_empty_probabilities_give_no_cells():
    prob = np.zeros((64, 64, 2), np.float32)
    assert not I.instances(prob, CFG).any()


def test_scan_labelled_in_windows_equals_whole_field(field):
    _, prob = field
    whole = I.instances(prob, CFG)
    labels = np.zeros(prob.shape[:2], np.int32)
    n = I.label_scan(np.moveaxis(prob, -1, 0), labels, CFG, chunk=128)  # 5 x 5 windows, many seams
    assert n == whole.max() == labels.max()
    # Same partition up to relabelling: every whole-field cell is exactly one scan cell, and back.
    pairs = np.unique(np.stack([whole.ravel(), labels.ravel()]), axis=1)
    assert np.array_equal(whole > 0, labels > 0)
    assert pairs.shape[1] == n + 1


def test_cell_across_many_seams_keeps_one_id():
    masks = np.zeros((300, 300), np.int32)
    masks[140:152, 10:290] = 1  # a long filament crossing every vertical seam
    masks[160:295, 200:212] = 2  # and one crossing the horizontal seams below it
    prob = probabilities_from(masks)
    labels = np.zeros(masks.shape, np.int32)
    n = I.label_scan(np.moveaxis(prob, -1, 0), labels, CFG, chunk=64)
    whole = I.instances(prob, CFG)
    assert n == whole.max()
    for cell in (1, 2):
        core = ndi.binary_erosion(masks == cell, iterations=2)
        assert len(np.unique(labels[core])) == 1, f"cell {cell} cut at a seam"


def test_markers_away_from_the_contour_split_cells_misic_merges():
    # Two rods side by side whose cores join: the student's body map stays high across the faint boundary
    # between them, while its contour map marks that boundary. MISIC's markers (body > 0.95 in a trough of the
    # contour) see one core and one cell; markers where the contour is low (infer.contour_threshold) see two.
    masks = np.zeros((60, 80), np.int32)
    masks[20:30, 10:70], masks[30:40, 10:70] = 1, 2
    prob = probabilities_from(masks)
    both = masks > 0
    prob[..., 0] = np.where(ndi.binary_erosion(both, iterations=2), 0.99, prob[..., 0])
    misic = I.instances(prob, CFG)
    split = I.instances(prob, CFG.updated(infer__body_threshold=0.3, infer__marker_threshold=0.6,
                                          infer__contour_threshold=0.5))
    assert misic.max() == 1  # one cell over both rods
    assert match(masks, split)[0].f1 == 1.0
    # 1 is MISIC's rule, unchanged
    assert np.array_equal(I.instances(prob, CFG.updated(infer__contour_threshold=1.0)), misic)
