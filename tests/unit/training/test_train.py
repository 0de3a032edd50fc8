"""Training pieces: the loss, the split, the data order, augmentation, freezing, precision, checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_retrain.config import RunConfig, TrainConfig
from hpc_retrain.prepare import layout
from hpc_retrain.prepare import store as st
from hpc_retrain.training import data as td
from hpc_retrain.training import loop as tr
from hpc_retrain.training import network as nw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from trainstore import build_store  # noqa: E402


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("store") / "store.zarr", n_fields=8)


@pytest.fixture(scope="module")
def misic():
    from hpc_retrain.inference import model

    return model.load()


# ------------------------------------------------------------------------------------------ loss
def test_weighted_bce_matches_numpy():
    rng = np.random.default_rng(0)
    y = (rng.random((2, 8, 8, 2)) < 0.3).astype(np.float32)
    p = rng.random((2, 8, 8, 2)).astype(np.float32)
    p[0, 0, 0] = [0.0, 1.0]  # saturated predictions: the clip keeps the loss finite
    w = np.array([3.0, 15.0])
    got = float(nw.weighted_bce(y, p, w))
    pc = np.clip(p.astype(np.float64), nw.EPS, 1 - nw.EPS)
    want = np.mean(-(w * y * np.log(pc) + (1 - y) * np.log(1 - pc)))
    assert got == pytest.approx(want, rel=1e-5)
    # The weight applies to positives only: with all-negative labels it has no effect.
    z = np.zeros_like(y)
    assert float(nw.weighted_bce(z, p, w)) == pytest.approx(float(nw.weighted_bce(z, p, [1.0, 1.0])), rel=1e-6)


def _with_body_fraction(root, p_body: float) -> None:
    qc = root["field_qc"][:]
    qc[:, layout.QC_COLUMNS.index("positive_body")] = p_body
    root["field_qc"][:] = qc


def test_the_recipe_follows_the_stores_density_and_the_config_overrides_it(tmp_path):
    from hpc_retrain.training import recipe as rc

    path = build_store(tmp_path / "s.zarr", n_fields=3)
    root = st.open_store(path, mode="r+")
    fields = np.array([0, 1, 2])
    # the synthetic colonies: dense, so no class weight and the fast rate
    dense = rc.choose(root, fields, TrainConfig(), "s")
    assert dense.body_fraction == pytest.approx(st.positive_fraction(root, fields)[0]) and dense.body_fraction > 0.1
    assert (dense.regime, dense.learning_rate, dense.pos_weight, dense.given) == ("dense", 2e-3, (1.0, 1.0), ())
    # cells on 2 % of the pixels (as ColiCoords): (1-p)/p and the slow rate, as before the rule
    _with_body_fraction(root, 0.02)
    sparse = rc.choose(root, fields, TrainConfig(), "s")
    p = st.positive_fraction(root, fields)
    assert sparse.regime == "sparse" and sparse.learning_rate == 1e-4
    np.testing.assert_allclose(sparse.pos_weight, (1 - p) / p)
    assert "sparse" in sparse.describe() and "2.0%" in sparse.describe()
    # the line itself is dense
    _with_body_fraction(root, rc.DENSE_BODY_FRACTION)
    assert rc.choose(root, fields, TrainConfig(), "s").regime == "dense"
    # what the config sets wins, and is said to be the config's
    given = rc.choose(root, fields, TrainConfig(learning_rate=5e-4, pos_weight=(2.0, 9.0)), "s")
    assert (given.learning_rate, given.pos_weight, given.given) == (5e-4, (2.0, 9.0), ("learning_rate", "pos_weight"))
    assert "set in the config" in given.describe()
    with pytest.raises(tr.TrainingError, match="pos_weight"):
        rc.choose(root, fields, TrainConfig(pos_weight=(2.0,)), "s")


def test_the_recipe_refuses_empty_labels(tmp_path):
    from hpc_retrain.training import recipe as rc

    path = build_store(tmp_path / "s.zarr", n_fields=2)
    root = st.open_store(path, mode="r+")
    qc = root["field_qc"][:]
    qc[:, layout.QC_COLUMNS.index("positive_contour")] = 0
    root["field_qc"][:] = qc
    with pytest.raises(tr.TrainingError, match="contour labels are 0 positive"):
        rc.choose(root, np.array([0, 1]), TrainConfig(), str(path))


# ------------------------------------------------------------------------------------------ data
def test_split_is_by_field_seeded_and_never_empty():
    usable = np.arange(10)
    a, b = tr.split_fields(usable, 0.2, seed=3)
    assert len(b) == 2 and len(a) == 8 and set(a) | set(b) == set(usable) and not set(a) & set(b)
    np.testing.assert_array_equal(tr.split_fields(usable, 0.2, seed=3)[1], b)
    assert any(not np.array_equal(tr.split_fields(usable, 0.2, seed=s)[1], b) for s in range(4, 10))
    # Tiny fractions still hold out one field; large ones still train on one.
    assert [len(x) for x in tr.split_fields(np.arange(2), 0.01, 0)] == [1, 1]
    assert [len(x) for x in tr.split_fields(np.arange(3), 0.9, 0)] == [1, 2]
    assert [len(x) for x in tr.split_fields(np.arange(1), 0.2, 0)] == [1, 0]
    assert [len(x) for x in tr.split_fields(np.arange(5), 0.0, 0)] == [5, 0]


def test_field_tiles_follow_store_layout(small_store):
    root = st.open_store(small_store)
    tiles = tr.field_tiles(root, np.array([1, 3]))
    tf_ = root["tile_field"][:]
    assert set(tf_[tiles]) == {1, 3} and len(tiles) == np.isin(tf_, [1, 3]).sum()


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    tiles = np.arange(100, 120)
    o1, c1, s1 = tr.epoch_plan(tiles, 1, 0, 8, None, True)
    o1b, c1b, _ = tr.epoch_plan(tiles, 1, 0, 8, None, True)
    o2, _, _ = tr.epoch_plan(tiles, 2, 0, 8, None, True)
    np.testing.assert_array_equal(o1, o1b)
    np.testing.assert_array_equal(c1, c1b)
    assert sorted(o1) == list(tiles) and s1 == 3 and not np.array_equal(o1, o2)
    assert set(c1) <= set(range(8)) and len(set(c1)) > 1
    o, c, s = tr.epoch_plan(tiles, 1, 0, 8, 2, False)
    assert s == 2 and len(o) == 16 and not c.any()


def test_a_few_tiles_go_round_again_up_to_tiles_per_epoch():
    """20 tiles, at least 64 an epoch: 4 rounds, each a permutation of every tile (so each tile 4 times, in new
    orders), deterministic, and a cap on steps still wins."""
    tiles = np.arange(100, 120)
    o, c, s = tr.epoch_plan(tiles, 3, 0, 8, None, True, 64)
    assert len(o) == 80 and s == 10
    for r in range(4):
        assert sorted(o[20 * r: 20 * (r + 1)]) == list(tiles)
    assert not np.array_equal(o[:20], o[20:40])
    np.testing.assert_array_equal(o, tr.epoch_plan(tiles, 3, 0, 8, None, True, 64)[0])
    # fewer tiles asked for than there are: one round, as without the setting
    np.testing.assert_array_equal(tr.epoch_plan(tiles, 3, 0, 8, None, True, 5)[0], tr.epoch_plan(tiles, 3, 0, 8, None, True)[0])
    assert tr.epoch_plan(tiles, 3, 0, 8, 4, True, 64)[2] == 4


def test_augmentation_moves_target_and_label_together():
    rng = np.random.default_rng(1)
    x = rng.random((6, 6, 3)).astype(np.float32)
    y = (rng.random((6, 6, 2)) < 0.5).astype(np.float32)
    for code in range(8):
        ax, ay = (np.asarray(a) for a in td.augment_pair(x, y, np.int32(code)))
        def want(a, code=code):
            return np.rot90(a, code % 4)[:, ::-1] if code >= 4 else np.rot90(a, code % 4)

        np.testing.assert_array_equal(ax, want(x))
        np.testing.assert_array_equal(ay, want(y))


def test_dataset_reads_store_tiles_in_order(small_store):
    reader = tr.TileReader(small_store)
    root = st.open_store(small_store)
    order = np.array([5, 2, 7])
    batches = list(tr.make_dataset(reader, order, np.zeros(3, np.int32), batch=2))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(x, root["targets"][:][order])
    np.testing.assert_array_equal(y, root["labels"][:][order].astype(np.float32))


def test_dataset_reads_a_fixed_depth_ahead(small_store):
    # Fixed depths, nothing autotuned: tf.data's autotuner made each epoch's iterator wait 20-60 s at its end
    # (benchmarks/RESULTS.md, 4b). The loader reads the batch handed out and at most PREFETCH_DEPTH behind it.
    from hpc_retrain.training import loader as tl

    reader = tr.TileReader(small_store)
    reads = []
    read = reader.read
    reader.read = lambda i: (reads.append(int(i)), read(i))[1]
    it = iter(tr.make_dataset(reader, np.arange(8), np.zeros(8, np.int32), batch=1))
    next(it)
    import time

    time.sleep(0.5)  # let the threads read all they may
    assert len(reads) == 1 + tl.PREFETCH_DEPTH
    assert sum(1 for _ in it) == 7 and len(reads) == 8


# ------------------------------------------------------------------------------------------ model
def test_finetune_decoder_freezes_through_the_bottleneck(misic):
    import keras

    enc = nw.encoder_layers(misic)
    nxt = misic.layers[len(enc)]
    assert isinstance(nxt, keras.layers.UpSampling2D)
    pools = [l for l in enc if isinstance(l, keras.layers.MaxPooling2D)]
    assert len(pools) == 3  # every pooling is in the encoder; the deepest conv block (32x32) too
    assert enc[-1].output.shape[1] == 32 and enc[-1].output.shape[-1] == 256


def test_mixed_precision_model_keeps_weights_and_a_float32_output(misic):
    net = nw.with_policy(misic, "mixed_float16")
    assert net.layers[1].compute_dtype == "float16" and net.layers[-1].compute_dtype == "float32"
    for a, b in zip(net.get_weights(), misic.get_weights()):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).standard_normal((1, 256, 256, 3)).astype(np.float32)
    out = net(x, training=False)
    assert out.dtype == "float32"
    np.testing.assert_allclose(out.numpy(), misic(x, training=False).numpy(), atol=0.05)


def test_native_bfloat16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert nw.cpu_has_native_bfloat16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")  # AVX-512 alone: emulated
    assert not nw.cpu_has_native_bfloat16(str(info))
    assert not nw.cpu_has_native_bfloat16(str(tmp_path / "absent"))  # not Linux: float32


@pytest.mark.parametrize("native, setting, policy", [
    (True, "auto", "float32"), (True, "on", "mixed_bfloat16"), (False, "on", "mixed_bfloat16"),
    (True, "off", "float32")])
def test_precision_policy_on_a_cpu(monkeypatch, native, setting, policy):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU takes float16")
    monkeypatch.setattr(nw, "cpu_has_native_bfloat16", lambda: native)
    assert nw.precision_policy(setting) == policy


def test_bfloat16_model_keeps_weights_and_a_float32_output(misic):
    net = nw.with_policy(misic, "mixed_bfloat16")
    assert net.layers[1].compute_dtype == "bfloat16" and net.layers[-1].compute_dtype == "float32"
    x = np.random.default_rng(0).standard_normal((1, 256, 256, 3)).astype(np.float32)
    out = net(x, training=False)
    assert out.dtype == "float32"
    np.testing.assert_allclose(out.numpy(), misic(x, training=False).numpy(), atol=0.05)


def test_resume_compares_fixed_settings_and_a_field_added_since_with_its_default():
    from hpc_retrain.training.checkpoints import changed_fixed_settings

    cfg = RunConfig()
    old = cfg.train.model_dump(mode="json")
    del old["tiles_per_epoch"]  # a checkpoint written before the field existed
    assert changed_fixed_settings(old, cfg) == []
    assert changed_fixed_settings(dict(old, batch_size=2), cfg) == [("batch_size", 2, cfg.train.batch_size)]
    assert [k for k, _, _ in changed_fixed_settings(old, cfg.updated(train__tiles_per_epoch=32))] == \
        ["tiles_per_epoch"]
    # The recipe's settings: left unset they are the run's own (a run from before the recipe recorded 1e-4);
    # set to something else, they are a change
    before_recipe = dict(old, learning_rate=1e-4, pos_weight=None)
    assert changed_fixed_settings(before_recipe, cfg) == []
    assert changed_fixed_settings(before_recipe, cfg.updated(train__learning_rate=1e-3)) == \
        [("learning_rate", 1e-4, 1e-3)]


def test_best_epoch_counts_f1_within_one_validation_cell_as_equal_then_iou():
    from hpc_retrain.training.history import replaces_best

    def replay(rows, cells):
        hist, chosen, picks = [], None, []
        for e, (f1, iou) in enumerate(rows):
            row = {"epoch": e, "loss": 1.0, "val_f1": f1, "val_iou": iou}
            hist.append(row)
            if replaces_best(row, chosen, hist, cells):
                chosen = row
            picks.append(chosen["epoch"])
        return picks

    # ColiCoords fold 2 (14 validation cells): F1 peaks early by less than a cell while IoU keeps rising
    f1 = [0.522, 0.667, 0.720, 0.720, 0.692, 0.667, 0.667, 0.667, 0.667, 0.667, 0.643]
    iou = [0.34, 0.38, 0.41, 0.44, 0.46, 0.47, 0.48, 0.49, 0.50, 0.51, 0.53]
    assert replay(list(zip(f1, iou)), 14) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]  # 0.643 is more than 1/14 below
    # with many validation cells the same numbers are real differences: the top F1 stays chosen
    assert replay(list(zip(f1, iou)), 1000) == [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    # an F1 more than a cell above the chosen epoch wins even with a lower IoU
    assert replay([(0.5, 0.6), (0.7, 0.4)], 10) == [0, 1]
    # without validation fields: the lower training loss
    assert replace_loss_only() == [0, 0, 2]


def replace_loss_only():
    from hpc_retrain.training.history import replaces_best

    hist, chosen, picks = [], None, []
    for e, loss in enumerate([1.0, 1.2, 0.8]):
        row = {"epoch": e, "loss": loss}
        hist.append(row)
        if replaces_best(row, chosen, hist, 0):
            chosen = row
        picks.append(chosen["epoch"])
    return picks
