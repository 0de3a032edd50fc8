import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hpc_retrain.inference import model


def test_pretrained_is_pinned_and_found_in_the_package():
    p = model.pretrained_path()
    assert p.name == model.PRETRAINED_NAME
    assert "site-packages" in str(p) or "misic" in str(p.parent)
    assert model.sha256(p) == model.PRETRAINED_SHA256


def test_a_refusal_comes_before_tensorflow_whose_first_import_stays_quiet(tmp_path):
    """The CLI routes TensorFlow's first import through the capture of its native start-up lines instead of
    importing it up front: a bad path is refused with TensorFlow never imported, and a later ``import keras``
    (after a lookup such as ``backend.installed`` makes, which must not use the capture up) prints none."""
    code = ("import importlib.util, sys\n"
            "from hpc_retrain.commands import main\n"
            "rc = main(['segment', '--plate', sys.argv[1]])\n"
            "print(rc, 'tensorflow' in sys.modules)\n"
            "importlib.util.find_spec('tensorflow')\n"
            "import keras\n"
            "print('tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nowhere")], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split() == ["2", "False", "True"], out.stdout + out.stderr
    assert f"{tmp_path / 'nowhere'}: plate not found" in out.stderr
    noise = re.compile(r"absl::InitializeLog|cuInit|cudart_stub|cuda drivers|port\.cc|cpu_feature_guard")
    assert not noise.search(out.stderr), out.stderr


def test_tampered_file_fails_the_check(tmp_path):
    bad = tmp_path / model.PRETRAINED_NAME
    shutil.copy(model.pretrained_path(), bad)
    with open(bad, "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(model.ModelError, match="does not match the pinned"):
        model.verify_sha256(bad, model.PRETRAINED_SHA256)


def test_load_maps_tiles_to_body_and_contour(pretrained_model):
    m = pretrained_model
    assert tuple(m.input_shape) == (None, 256, 256, 3)
    assert tuple(m.output_shape) == (None, 256, 256, 2)
    y = np.asarray(m(np.zeros((1, 256, 256, 3), np.float32), training=False))
    assert y.shape == (1, 256, 256, 2) and 0 <= y.min() and y.max() <= 1


def test_not_a_model_file(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(model.ModelError, match="junk.h5: not a loadable Keras model"):
        model.load(junk)
    with pytest.raises(model.ModelError, match="no model.keras"):
        model.load(tmp_path)


def test_wrong_shapes_are_refused(tmp_path):
    import keras

    inp = keras.Input((256, 256, 1))
    out = keras.layers.Conv2D(2, 1, activation="sigmoid")(inp)
    p = tmp_path / "one_channel.keras"
    keras.Model(inp, out).save(p)
    with pytest.raises(model.ModelError, match="do not fit MISIC tiles"):
        model.load(p)


def test_reinitialize_resets_batchnorm_and_changes_kernels():
    import keras

    m = model.load()
    bn = [l for l in m.layers if isinstance(l, keras.layers.BatchNormalization)]
    convs = [l for l in m.layers if isinstance(l, keras.layers.Conv2D)]
    before = np.array(convs[3].kernel)
    assert any(not np.allclose(np.array(l.moving_mean), 0) for l in bn)  # pretrained statistics exist
    model.reinitialize(m, seed=1)
    for l in bn:
        np.testing.assert_array_equal(np.array(l.moving_mean), 0)
        np.testing.assert_array_equal(np.array(l.moving_variance), 1)
        np.testing.assert_array_equal(np.array(l.gamma), 1)
        np.testing.assert_array_equal(np.array(l.beta), 0)
    after = np.array(convs[3].kernel)
    assert not np.allclose(before, after)
    assert np.all(np.array(convs[3].bias) == 0)
    # reproducible for a seed
    m2 = model.load()
    model.reinitialize(m2, seed=1)
    np.testing.assert_array_equal(np.array(m2.layers[-1].kernel), np.array(m.layers[-1].kernel))
