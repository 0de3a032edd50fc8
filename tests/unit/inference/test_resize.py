"""``predictor.resize_to`` resizes channel by channel: the values of MISIC's one 3-D resize, bit for bit."""

import numpy as np
import pytest
from skimage.transform import resize

from hpc_retrain.inference import predictor as infer


@pytest.mark.parametrize(("src", "dst"), [((100, 130), (143, 186)), ((372, 300), (260, 210)), ((57, 91), (57, 300)),
                                          ((64, 64), (64, 64))])
def test_resize_to_equals_one_3d_resize(src, dst):
    prob = np.random.default_rng(sum(src)).random(src + (2,), dtype=np.float32)
    want = resize(prob, dst + (2,), order=1).astype(np.float32)
    got = infer.resize_to(prob, dst)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(infer.resize_to(prob[..., 0], dst), want[..., 0])
