"""Phase contrast given to the tool by its own name: plate.phase (or plate.transmitted) is plate.brightfield."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
import zarr

from hpc_retrain.config import ConfigError, PlateConfig, RunConfig
from hpc_retrain.prepare.store import stored_config


def test_phase_and_transmitted_name_the_transmitted_light_channel(tmp_path):
    assert PlateConfig(phase="PH").brightfield == "PH"
    assert RunConfig.layered(overrides=["plate.transmitted=TL"]).plate.brightfield == "TL"
    # over a saved config, which names plate.brightfield: the alias given later wins, as the setting would
    saved = RunConfig.layered(overrides=["plate.brightfield=BF"])
    assert RunConfig.layered(file=saved, overrides=["plate.phase=PH"]).plate.brightfield == "PH"
    # a section's alias reaches the keys inside it
    cfg = RunConfig.layered(overrides=["preprocess.phase.gamma=0.5"])
    assert cfg.preprocess.brightfield.gamma == 0.5
    # ... and only that key: the transmitted light keeps its dark-cells-on-light setting (a partial channel
    # used to be filled from ChannelPrep's defaults, turning light_background off)
    assert cfg.preprocess.brightfield.light_background is True
    assert RunConfig.layered(overrides=["preprocess.fluorescence.gamma=2"]).preprocess.fluorescence.percentiles \
        == (0.5, 99.5)
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"plate": {"phase": "PH", "fluorescence": "GFP"}}))
    cfg = RunConfig.load(f)
    assert (cfg.plate.brightfield, cfg.plate.fluorescence) == ("PH", "GFP")
    # what is saved names the setting itself: stores and runs written before and after read alike
    assert "phase" not in cfg.to_dict()["plate"] and cfg.to_dict()["plate"]["brightfield"] == "PH"
    assert cfg.updated(plate__phase="X").plate.brightfield == "X"


def test_an_alias_contradicting_its_setting_is_refused(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"plate": {"phase": "PH", "brightfield": "BF"}}))
    with pytest.raises(ConfigError, match="plate.phase='PH' and plate.brightfield='BF' disagree"):
        RunConfig.load(f)
    f.write_text(yaml.safe_dump({"plate": {"phase": "PH", "brightfield": "PH"}}))
    assert RunConfig.load(f).plate.brightfield == "PH"  # the same value twice is no contradiction


def run(*argv, cwd=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "hpc_retrain", *argv], capture_output=True, text=True, timeout=300,
                       cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_a_phase_plate_goes_through_the_cli_by_its_channel_name(tmp_path):
    """synth --modality phase writes channel 'phase'; targets (no model needed) reads it as plate.phase."""
    plate = tmp_path / "ph.zarr"
    p = run("synth", "--out", str(plate), "--modality", "phase", "--wells", "A1", "--fields", "2", "--size", "160")
    assert "phase plate" in p.stdout
    store = tmp_path / "ph.train.zarr"
    run("targets", "--plate", str(plate), "--out", str(store), "--mean-width", "7", "--set", "plate.phase=phase")
    root = zarr.open_group(str(store), mode="r")
    assert root["targets"].shape[0] > 0 and float(abs(root["targets"][0]).max()) > 0
    assert stored_config(root)["plate"]["brightfield"] == "phase"
    # Without the name the plate's channel is not found, and the error says which names it has.
    bad = subprocess.run([sys.executable, "-m", "hpc_retrain", "targets", "--plate", str(plate), "--out",
                          str(tmp_path / "bad.zarr"), "--mean-width", "7"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "phase" in bad.stderr
