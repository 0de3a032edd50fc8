import pytest
import yaml

from hpc_retrain.config import ConfigError, RunConfig


def test_defaults_are_the_published_recipe():
    cfg = RunConfig()
    assert cfg.preprocess.brightfield.gamma == 0.41
    assert cfg.preprocess.brightfield.light_background is True
    assert cfg.preprocess.sigmas == (1.0, 1.5, 2.0)
    assert (cfg.labels.body_threshold, cfg.labels.contour_threshold) == (0.4, 0.1)
    assert cfg.labels.width_factors == (0.7, 0.85, 1.0)  # MISIC's pass at the width, and two told narrower
    assert RunConfig.load(None, ["labels.width_factors=[1,0.7,0.7]"]).labels.width_factors == (0.7, 1.0)
    assert (cfg.tiling.size, cfg.tiling.margin) == (256, 16)
    # learning rate and class weights chosen from the store (training.recipe); MISIC's post-processing by default
    assert cfg.train.learning_rate is None and cfg.train.pos_weight is None and cfg.train.batch_size == 8
    assert (cfg.infer.body_threshold, cfg.infer.marker_threshold) == (0.4, 0.95)
    assert cfg.preprocess.mean_width == "auto"  # measured from the plate (hpc_retrain.prepare.width)
    assert cfg.updated(preprocess__mean_width=7).preprocess.scale == round(10 / 7, 2)


def test_mean_width_auto_must_be_measured_before_scaling(tmp_path):
    with pytest.raises(ConfigError, match="mean_width is 'auto'.*--mean-width"):
        _ = RunConfig().preprocess.scale
    # auto and numbers (old configs) both load and round-trip; case and spaces of auto do not matter
    for value, want in (("auto", "auto"), (" Auto", "auto"), (12, 12.0), ("9.5", 9.5)):
        cfg = RunConfig.load(None, [f"preprocess.mean_width={value}"])
        assert cfg.preprocess.mean_width == want
        assert RunConfig.read_saved(cfg.save(tmp_path / str(want))) == cfg
    for bad in ("wide", "0", "nan", "[7]"):
        with pytest.raises(ConfigError, match="preprocess.mean_width"):
            RunConfig.load(None, [f"preprocess.mean_width={bad}"])


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"epochs": 3}, "preprocess": {"mean_width": 12}}))
    cfg = RunConfig.load(p, ["train.epochs=5", "cluster.executor=slurm", "plate.path=/data/plate"])
    assert cfg.train.epochs == 5
    assert cfg.preprocess.mean_width == 12
    assert cfg.cluster.executor == "slurm"
    assert str(cfg.plate.path) == "/data/plate"


def test_bare_on_and_off_mean_the_words_yaml_would_read_as_booleans(tmp_path):
    for word in ("on", "off"):
        assert RunConfig.load(None, [f"train.mixed_precision={word}"]).train.mixed_precision == word
        p = tmp_path / f"{word}.yaml"
        p.write_text(f"train:\n  mixed_precision: {word}\n")
        assert RunConfig.load(p).train.mixed_precision == word
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        RunConfig.load(None, ["train.mixed_precision=1"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.epochs=0", "train.epochs"),
        ("preprocess.mean_width=-3", "preprocess.mean_width"),
        ("train.init=blank", "train.init"),
        ("tiling.margin=200", "tiling"),
        ("preprocess.sigmas=[1,2]", "preprocess.sigmas"),
        ("train.epoch=3", "train.epoch"),  # a typo is refused, not ignored
        ("plate.pattern={well}.tif", "plate.pattern"),
        ("labels.width_factors=[0.7,0.85]", "labels.width_factors"),  # 1.0: the labels' own grid
        ("labels.width_factors=[0,1]", "labels.width_factors"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        RunConfig.load(None, [override])
    assert field in str(e.value)


def test_bad_yaml_names_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml"):
        RunConfig.load(p)
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.load(tmp_path / "missing.yaml")


def test_save_and_read_back_round_trip(tmp_path):
    cfg = RunConfig.load(None, ["train.epochs=7", "preprocess.mean_width=9.5", "train.pos_weight=[3.0, 20.0]"])
    path = cfg.save(tmp_path / "run")
    text = path.read_text()
    assert "hpc_retrain_version" in text
    again = RunConfig.read_saved(tmp_path / "run")
    assert again == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_updated_validates():
    cfg = RunConfig()
    assert cfg.updated(train__epochs=2).train.epochs == 2
    with pytest.raises(ConfigError):
        cfg.updated(train__batch_size=0)


def test_a_saved_config_is_a_valid_config_file(tmp_path):
    cfg = RunConfig.load(None, ["train.epochs=4"])
    path = cfg.save(tmp_path)
    assert RunConfig.load(path) == cfg


def test_settings_moved_to_compute_still_load_from_old_files_and_options(tmp_path, caplog):
    # 0.1 kept the model's batch size, the block edge and the engine under infer; every stage that runs the
    # model reads them, so they are compute.* now. Old config files, saved runs and --set items still work.
    old = tmp_path / "old" / "config.yaml"
    old.parent.mkdir()
    old.write_text(yaml.safe_dump({"hpc_retrain_version": "0.1.0", "infer": {"batch_size": 4, "chunk": 1024,
                                                                              "engine": "tensorflow", "name": "x"}}))
    with caplog.at_level("WARNING", logger="hpc_retrain.config"):
        for cfg in (RunConfig.load(old), RunConfig.read_saved(old.parent), RunConfig.layered(saved=old.parent)):
            assert (cfg.compute.batch_size, cfg.compute.chunk, cfg.compute.engine) == (4, 1024, "tensorflow")
            assert cfg.infer.name == "x" and "batch_size" not in cfg.to_dict()["infer"]
    assert any("infer.chunk is now compute.chunk" in r.getMessage() and str(old) in r.getMessage()
               for r in caplog.records)
    assert RunConfig.load(None, ["infer.chunk=512"]).compute.chunk == 512
    assert RunConfig().updated(infer__engine="openvino").compute.engine == "openvino"
    assert RunConfig.layered(options={"infer__batch_size": 2}).compute.batch_size == 2
    # a --set under the old name beats the file's new name, as any later layer does
    assert RunConfig.load(RunConfig.read_saved(old.parent).save(tmp_path / "new"), ["infer.chunk=4096"]
                          ).compute.chunk == 4096
    # the same file naming both, with different values, is refused with both names
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"infer": {"chunk": 1024}, "compute": {"chunk": 4096}}))
    with pytest.raises(ConfigError, match="infer.chunk=1024 and compute.chunk=4096 disagree"):
        RunConfig.load(both)
    # a new config is written under the new names only
    saved = yaml.safe_load(RunConfig.load(old).save(tmp_path / "re").read_text())
    assert saved["compute"]["chunk"] == 1024 and "chunk" not in saved["infer"]
