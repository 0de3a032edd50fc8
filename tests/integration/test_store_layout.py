"""The training store describes itself to plain zarr: no stray files in the hierarchy (no "not recognized as a
component" warning), ``dimension_names`` and a description on every array, the settings as a root attribute
that round-trips; stores written the old way (``config.yaml`` inside) still read, and a prepare rerun fixes them."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from hpc_retrain.config import RunConfig
from hpc_retrain.prepare import layout
from hpc_retrain.prepare import pipeline as preparation
from hpc_retrain.prepare import store as st
from hpc_retrain.synth import plates as synth
from hpc_retrain.training import loop as tr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainstore import build_store  # noqa: E402

CFG = RunConfig().updated(preprocess__mean_width=7.0, train__batch_size=4, seed=11)


def _store(path: Path, cfg: RunConfig = CFG) -> Path:
    """A small store made through store.py as prepare makes it: create, stage arrays, the saved config."""
    build_store(path, n_fields=2, cfg=cfg)
    root = st.open_store(path, mode="r+")
    st.ensure_stage_arrays(root, 2)
    st.save_config(root, path, cfg)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("layout") / "s.train.zarr")


def _read_everything(path: Path) -> zarr.Group:
    g = zarr.open_group(str(path), mode="r")
    members = dict(g.members())  # lists the hierarchy: where a stray file warns
    for a in g.array_values():
        a[:1]
    dict(g.attrs)
    assert members
    return g


def _make_old_style(path: Path, cfg: RunConfig, keep_attr: bool) -> None:
    """As stores were written before: config.yaml inside, arrays without attributes (optionally no config
    attribute either, as a hand-made store might have)."""
    for meta in path.glob("*/zarr.json"):
        doc = json.loads(meta.read_text())
        doc.pop("dimension_names", None)
        doc["attributes"] = {}
        meta.write_text(json.dumps(doc))
    if not keep_attr:
        del zarr.open_group(str(path), mode="r+").attrs[layout.CONFIG_ATTR]
    cfg.save(path)
    assert zarr.open_array(str(path / "targets"), mode="r").metadata.dimension_names is None


def test_plain_zarr_opens_the_store_without_a_warning(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = _read_everything(store)
    assert not (store / layout.OLD_CONFIG_FILE).exists()
    assert {"targets", "labels", "field_status", "labels_written", "targets_error"} <= set(g.array_keys())


def test_every_array_has_dimension_names_and_a_description(store):
    g = zarr.open_group(str(store), mode="r")
    arrays = layout.array_layout(st.stored_config(g))
    assert set(g.array_keys()) == set(arrays)
    for name, a in g.arrays():
        dims = a.metadata.dimension_names
        assert dims is not None and len(dims) == a.ndim, (name, dims)
        assert list(dims) == arrays[name][0], name
        assert isinstance(a.attrs.get("description"), str) and len(a.attrs["description"]) > 20, name
        if a.ndim == 4:
            assert list(dims) == ["tile", "y", "x", "c"]
            assert len(a.attrs["channel_names"]) == a.shape[-1], name
        elif a.ndim == 2:
            assert len(a.attrs["column_names"]) == a.shape[-1], name
        else:
            assert list(dims) in (["tile"], ["field"]), name
    assert g["targets"].attrs["channel_names"] == ["shape_index_sigma_1", "shape_index_sigma_1.5",
                                                   "shape_index_sigma_2"]
    assert g["labels"].attrs["channel_names"] == g["probabilities"].attrs["channel_names"] == ["body", "contour"]
    assert g["field_qc"].attrs["column_names"] == list(layout.QC_COLUMNS) == g.attrs["qc_columns"]
    codes = g["field_status"].attrs["codes"]
    assert set(codes) == {str(layout.PENDING), str(layout.OK), str(layout.FLAGGED)}
    assert codes[str(layout.FLAGGED)].startswith("flagged") and codes[str(layout.OK)].startswith("ok")
    for stage in ("labels", "targets"):
        assert g[f"{stage}_written"].attrs["units"] == "seconds since 1970-01-01T00:00:00Z"


def test_config_round_trips(store, tmp_path):
    assert st.read_config(store) == CFG
    g = zarr.open_group(str(store), mode="r")
    assert RunConfig.from_dict(g.attrs["config"]) == CFG  # plain zarr + the config schema
    copy = st.config_copy_path(store)
    assert copy == store.with_name("s.train.config.yaml") and RunConfig.read_saved(copy) == CFG
    # a rerun with other settings outside what the tiles depend on: the attribute follows, the copy too
    other = CFG.updated(train__batch_size=16)
    path = _store(tmp_path / "t.zarr")
    st.save_config(st.open_store(path, mode="r+"), path, other)
    assert st.read_config(path) == other == RunConfig.read_saved(st.config_copy_path(path))
    # train takes the tile settings from there
    assert tr.store_config(RunConfig(), st.open_store(path), path).preprocess == other.preprocess


@pytest.mark.parametrize("keep_attr", [True, False], ids=["attr-and-yaml", "yaml-only"])
def test_an_old_style_store_still_reads_and_a_save_moves_its_config_out(tmp_path, keep_attr):
    path = _store(tmp_path / "old.zarr")
    _make_old_style(path, CFG, keep_attr)
    with pytest.warns(UserWarning, match="config.yaml"):  # what the old layout did to plain zarr
        _read_everything(path)
    root = st.open_store(path)
    assert st.stored_config(root) == CFG.to_dict() and st.read_config(path) == CFG
    assert tr.store_config(RunConfig(), root, path).preprocess.mean_width == 7.0
    assert st.prepare_command(root, path).startswith("hpc-retrain prepare --plate PLATE --out")
    # what a prepare rerun does to it: the config becomes the attribute, the arrays get their attributes
    root = st.open_store(path, mode="r+")
    assert set(st.describe_arrays(root)) == set(layout.array_layout())
    st.save_config(root, path, CFG)
    assert not (path / layout.OLD_CONFIG_FILE).exists() and st.config_copy_path(path).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = _read_everything(path)
    assert RunConfig.from_dict(g.attrs["config"]) == CFG
    arrays = layout.array_layout(st.stored_config(g))
    for name, a in g.arrays():
        assert isinstance(a.attrs.get("description"), str) and list(a.metadata.dimension_names) == arrays[name][0]
    np.testing.assert_array_equal(g["tile_field"][:], [0, 1])  # data untouched


def test_prepare_writes_a_self_describing_store_and_fixes_an_old_one(tmp_path):
    """The real writer, on the smallest plate: one field, one tile."""
    plate = synth.write_plate(tmp_path / "plate.zarr", fmt="ome-zarr", wells=["A1"], fields_per_well=1,
                              shape=(128, 128), seed=5)
    cfg = RunConfig().updated(plate__path=plate, preprocess__mean_width=7.0)
    out = tmp_path / "p.train.zarr"
    preparation.run(cfg, out, preparation.STAGES["prepare"], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = _read_everything(out)
    assert set(g.array_keys()) == set(layout.array_layout(g.attrs["config"]))
    assert all(a.metadata.dimension_names and "description" in a.attrs for a in g.array_values())
    assert g["field_status"][:].tolist() == [layout.OK] and np.isfinite(g["labels_written"][:]).all()
    assert st.read_config(out) == cfg
    saved = yaml.safe_load(st.config_copy_path(out).read_text())
    assert saved["plate"]["path"] == str(plate) and "hpc_retrain_version" in saved
    # an old-style store: the rerun (nothing left to compute) resumes it and moves its config.yaml out
    _make_old_style(out, cfg, keep_attr=True)
    preparation.run(cfg, out, preparation.STAGES["prepare"], progress=False)
    assert not (out / layout.OLD_CONFIG_FILE).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = _read_everything(out)
    assert all("description" in a.attrs and a.metadata.dimension_names for a in g.array_values())
    assert st.read_config(out) == cfg and g["field_status"][:].tolist() == [layout.OK]
