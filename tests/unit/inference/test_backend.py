"""The backend setting (``hpc_retrain.inference.backend``), the threaded tile loader that replaced tf.data, and
checkpoints that fit across backends. Cross-backend results run in subprocesses:
tests/integration/test_backends.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_retrain.config import ConfigError, RunConfig
from hpc_retrain.inference import backend
from hpc_retrain.prepare import store as st
from hpc_retrain.training import data as td
from hpc_retrain.training import loader as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainstore import build_store  # noqa: E402


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store") / "store.zarr", n_fields=6)


# ------------------------------------------------------------------------------------------ the setting
def test_backend_setting_default_environment_and_conflict():
    assert backend.requested(None, {}) == ("tensorflow", "the default")
    assert backend.requested(None, {"KERAS_BACKEND": "jax"}) == ("jax", "KERAS_BACKEND")  # honoured when not set
    assert backend.requested("torch", {}) == ("torch", "compute.backend")
    assert backend.requested("jax", {"KERAS_BACKEND": "jax"})[0] == "jax"  # both, agreeing
    with pytest.raises(backend.BackendError) as e:
        backend.requested("jax", {"KERAS_BACKEND": "torch"})
    msg = str(e.value)
    assert "\n" not in msg and "compute.backend=jax" in msg and "KERAS_BACKEND=torch" in msg
    with pytest.raises(backend.BackendError, match="KERAS_BACKEND=numpy: hpc-retrain runs on tensorflow, jax, torch"):
        backend.requested(None, {"KERAS_BACKEND": "numpy"})


def test_backend_is_a_compute_setting_validated_with_the_config():
    assert RunConfig().compute.backend is None  # not given: KERAS_BACKEND, else tensorflow
    assert RunConfig.load(overrides=["compute.backend=jax"]).compute.backend == "jax"
    with pytest.raises(ConfigError, match="compute.backend"):
        RunConfig.load(overrides=["compute.backend=mxnet"])


def test_another_backend_after_keras_was_imported_is_refused(monkeypatch):
    import keras

    # an earlier test of this process may have applied a backend, which exports KERAS_BACKEND: the refusal
    # asked for here is the import's, not the disagreement with that variable's
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    active = keras.backend.backend()
    other = next(b for b in backend.BACKENDS if b != active)
    with pytest.raises(backend.BackendError, match=f"already imported in this process with the {active} backend"):
        backend.apply(other)
    assert backend.apply(active) == active  # the same one again: nothing to do


# ------------------------------------------------------------------------------------------ the loader
def _tf_data_reference(reader, tiles, codes, batch):
    """The tf.data pipeline the loader replaced (trainingdata.make_dataset up to 496d346), verbatim but for
    the imports: batches of it are what runs trained on before."""
    tf = pytest.importorskip("tensorflow")
    s = reader.size

    def augment_pair(x, y, code):
        both = tf.concat([x, y], axis=-1)
        both = tf.image.rot90(both, k=code % 4)
        both = tf.cond(code >= 4, lambda: tf.reverse(both, axis=[1]), lambda: both)
        nx = x.shape[-1]
        return both[..., :nx], both[..., nx:]

    def load(i, code):
        x, y = tf.py_function(reader.read, [i], [tf.float32, tf.uint8])
        x.set_shape((s, s, 3))
        y.set_shape((s, s, 2))
        return augment_pair(x, tf.cast(y, tf.float32), code)

    ds = tf.data.Dataset.from_tensor_slices((np.asarray(tiles, np.int64), np.asarray(codes, np.int32)))
    ds = ds.map(load, num_parallel_calls=2, deterministic=True)
    opts = tf.data.Options()
    opts.autotune.enabled = False
    return [(x.numpy(), y.numpy()) for x, y in ds.batch(batch).prefetch(2).with_options(opts)]


def test_loader_gives_the_batches_tf_data_gave(small_store):
    """Same tiles, same order, same flip/turn per tile, same batch edges: an epoch plan of every code."""
    reader = td.TileReader(small_store)
    tiles = td.field_tiles(st.open_store(small_store), np.arange(6))
    order, codes, _ = td.epoch_plan(tiles, 3, 11, 4, None, True, 16)
    assert set(codes.tolist()) == set(range(8)) and len(order) == 18  # 3 rounds of 6 tiles: a short last batch
    want = _tf_data_reference(reader, order, codes, 4)
    got = list(tl.TileLoader(reader, order, codes, 4))
    assert [g[0].shape[0] for g in got] == [w[0].shape[0] for w in want] == [4, 4, 4, 4, 2]
    for (gx, gy), (wx, wy) in zip(got, want):
        assert gx.dtype == np.float32 and gy.dtype == np.float32
        np.testing.assert_array_equal(gx, wx)
        np.testing.assert_array_equal(gy, wy)
    # and the turns are not all the identity: the augmented batch differs from the plain tiles
    plain = np.stack([reader.read(i)[0] for i in order[:4]])
    assert not np.array_equal(got[0][0], plain)


def test_loader_can_be_iterated_again_and_stopped_early(small_store):
    reader = td.TileReader(small_store)
    loader = tl.TileLoader(reader, np.arange(5), np.zeros(5, np.int32), 2)
    first = [x for x, _ in loader]
    again = [x for x, _ in loader]  # validation passes reuse one loader
    assert len(loader) == 3 and all(np.array_equal(a, b) for a, b in zip(first, again))
    for _ in loader:
        break  # a signal mid-epoch: the generator closes its threads (no hang, nothing left running)
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("hpc-retrain-tiles")]


def test_unreadable_tile_raises_its_one_line_at_its_batch(tmp_path):
    store = build_store(tmp_path / "bad.zarr", n_fields=4)
    reader = td.TileReader(store)
    chunk = st.chunk_file(reader.root, store, "targets", 2)
    chunk.write_bytes(chunk.read_bytes()[:20])  # truncated
    batches = iter(tl.TileLoader(reader, np.arange(4), np.zeros(4, np.int32), 2))
    next(batches)  # tiles 0 and 1 read fine
    with pytest.raises(st.StoreError) as e:
        next(batches)
    assert "tile 2" in str(e.value) and str(chunk) in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_signatures_fit_across_integer_widths_not_across_shapes():
    from hpc_retrain.training.checkpoints import _fits

    tf_sig = ["(3, 3, 3, 32) float32", "(2,) int64", "() int64"]  # seed state, Adam's step count
    jax_sig = ["(3, 3, 3, 32) float32", "(2,) uint32", "() int32"]
    assert _fits(tf_sig, jax_sig) and _fits(jax_sig, tf_sig)
    assert not _fits(tf_sig, ["(3, 3, 3, 16) float32", "(2,) uint32", "() int32"])  # another model
    assert not _fits(tf_sig, tf_sig[:2])  # another optimizer state (loss scaling adds variables)
    assert not _fits(tf_sig, ["(3, 3, 3, 32) float32", "(2,) float32", "() int32"])


# ------------------------------------------------------------------------------------------ the GPU check
def test_gpu_check_carries_pinned_wheels_for_python_312():
    """benchmarks/gpu_bench.py installs these on a GPU machine without network: each must be the pinned
    version (container/constraints.txt), and neither TensorFlow nor OpenVINO may be among them."""
    from benchmarks import gpu_bench as gb

    specs = gb.wheel_specs()
    pinned = gb.pins()
    assert len(specs) == len(gb.CARRY) + len(gb.NO_DEPS)
    for s in specs:
        name, ver = s.split("==")
        assert pinned[name.lower().replace("_", "-")] == s
    names = {s.split("==")[0].lower() for s in specs}
    assert {"keras", "zarr", "numcodecs", "dask", "pydantic", "submitit", "misic"} <= names
    assert not names & {"tensorflow", "openvino", "tensorboard", "jax", "torch"}
    cmd = gb.download_command(Path("/tmp/whl"))
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in cmd and "--no-deps" in cmd
