"""``hpc-retrain crossval``: every field is tested exactly once by a model that never trained on it, and the
scores add up to the teacher's cells on those fields."""

from __future__ import annotations

import json

from hpc_retrain import commands
from hpc_retrain.evaluate import crossval
from hpc_retrain.synth import plates as synth

commands.build_parser()  # import every stage before TensorFlow (see test_infer.py)




def test_folds_partition_the_fields():
    parts = crossval.folds(7, 3)
    assert sorted(int(i) for p in parts for i in p) == list(range(7)) and len(parts) == 3
    assert len(crossval.folds(5, 9)) == 5 and len(crossval.folds(4, 1)) == 2


def test_crossval_tests_each_field_on_a_model_that_never_saw_it(tmp_path, capsys):
    plate = synth.write_plate(tmp_path / "plate", fmt="tiff", wells=["A1"], fields_per_well=4, shape=(256, 256),
                              seed=11)
    out = tmp_path / "cv"
    rc = commands.main(["crossval", "--plate", str(plate), "--out", str(out), "--folds", "2", "--mean-width", "7",
                   "--set", "train.epochs=1", "--set", "train.steps_per_epoch=1", "--set", "train.batch_size=2"])
    assert rc == 0
    res = json.loads((out / "crossval.json").read_text())
    tested = [k for f in res["folds"] for k in f["test_fields"]]
    assert sorted(tested) == sorted(f"A1/{i}" for i in range(4)) and len(set(tested)) == 4
    for f in res["folds"]:
        assert not set(f["test_fields"]) & set(f["train_fields"])
        for key, row in f["fields"].items():
            for name in ("pretrained", "retrained"):  # every teacher cell is matched or missed
                assert row[name]["tp"] + row[name]["fn"] == row["teacher_cells"], (key, name)
    total = sum(row["teacher_cells"] for f in res["folds"] for row in f["fields"].values())
    assert total > 20 and res["overall"]["pretrained"]["tp"] + res["overall"]["pretrained"]["fn"] == total
    assert res["mean_width"] == 7 and res["config"]["train"]["epochs"] == 1
    text = (out / "crossval.txt").read_text()
    assert "pretrained" in text and "retrained" in text and text in capsys.readouterr().out
