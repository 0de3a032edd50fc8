"""Instance matching on hand-made label images whose scores are known, and the evaluate command."""

import json

import numpy as np
import pytest
import tifffile

from hpc_retrain import cli, ngff
from hpc_retrain.evaluate import Score, iou_pairs, match, overlay, summarize


def square(shape, top, left, size, value, out=None):
    out = np.zeros(shape, np.int32) if out is None else out
    out[top:top + size, left:left + size] = value
    return out


def test_iou_of_shifted_squares():
    ref = square((40, 40), 0, 0, 10, 1)
    pred = square((40, 40), 0, 2, 10, 7)  # 80 px shared, 120 px in the union
    r, p, iou, n_ref, n_pred = iou_pairs(ref, pred)
    assert (list(r), list(p), n_ref, n_pred) == ([1], [7], 1, 1)
    assert iou[0] == pytest.approx(80 / 120)
    s50, s75, s90 = match(ref, pred)
    assert (s50.tp, s50.fp, s50.fn) == (1, 0, 0) and s50.mean_iou == pytest.approx(2 / 3)
    assert (s75.tp, s75.fp, s75.fn) == (0, 1, 1) and s75.ap == 0 and s75.mean_iou == 0
    assert s90.f1 == 0


def test_precision_recall_ap_with_misses_and_false_cells():
    ref = square((60, 60), 0, 0, 10, 1)
    square((60, 60), 20, 20, 10, 2, ref)
    square((60, 60), 40, 40, 10, 3, ref)  # never found
    pred = square((60, 60), 0, 0, 10, 5)  # exact
    square((60, 60), 21, 20, 10, 6, pred)  # IoU 90/110
    square((60, 60), 0, 40, 8, 9, pred)  # nothing there
    s50, s75, s90 = match(ref, pred)
    assert (s50.tp, s50.fp, s50.fn) == (2, 1, 1)
    assert s50.precision == pytest.approx(2 / 3) and s50.recall == pytest.approx(2 / 3)
    assert s50.f1 == pytest.approx(2 / 3) and s50.ap == pytest.approx(2 / 4)
    assert s50.mean_iou == pytest.approx((1 + 90 / 110) / 2)
    assert (s90.tp, s90.fp, s90.fn) == (1, 2, 2)  # 90/110 = 0.818 < 0.9


def test_one_to_one_matching_when_a_cell_is_split():
    ref = square((20, 20), 0, 0, 10, 1)
    pred = np.zeros((20, 20), np.int32)
    pred[0:10, 0:5], pred[0:10, 5:10] = 1, 2  # two halves: IoU 0.5 each, only one may match
    s50 = match(ref, pred)[0]
    assert (s50.tp, s50.fp, s50.fn) == (1, 1, 0)


def test_scores_add_up_over_fields_and_empty_images_are_perfect():
    a = Score(0.5, 3, 1, 0, 2.4)
    b = Score(0.5, 1, 0, 2, 0.9)
    total = summarize({"f1": [a], "f2": [b]})[0]
    assert (total.tp, total.fp, total.fn) == (4, 1, 2) and total.mean_iou == pytest.approx(3.3 / 4)
    empty = match(np.zeros((8, 8), int), np.zeros((8, 8), int))[0]
    assert empty.f1 == 1.0 and empty.ap == 1.0


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="differ in shape"):
        match(np.zeros((8, 8), int), np.zeros((8, 9), int))


def test_overlay_draws_both_outlines():
    img = np.random.default_rng(0).integers(0, 1000, (30, 30)).astype(np.uint16)
    ref = square((30, 30), 5, 5, 10, 1)
    pred = square((30, 30), 15, 15, 10, 1)
    rgb = overlay(img, pred, ref)
    assert rgb.shape == (30, 30, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[5, 5]) == (0, 220, 0) and tuple(rgb[15, 15]) == (255, 0, 255)


def _plate(tmp_path):
    root = ngff.create_plate(tmp_path / "p.ome.zarr", ["A1"], 2)
    truths, preds = [], []
    for f in range(2):
        img = np.random.default_rng(f).integers(0, 4000, (2, 50, 50)).astype(np.uint16)
        grp = ngff.write_field(root, "A1", f, img, ["brightfield", "fluorescence"])
        ref = square((50, 50), 0, 0, 10, 1)
        square((50, 50), 30, 30, 10, 2, ref)
        pred = square((50, 50), 0, 2, 10, 4)  # IoU 2/3 with cell 1; cell 2 missed in field 1 only
        if f == 0:
            square((50, 50), 30, 30, 10, 5, pred)
        ngff.write_labels(grp, "truth", ref)
        ngff.write_labels(grp, "misic", pred)
        grp.attrs["hpc_retrain_source"] = {"well": "A1", "field": str(f), "source": "x"}
        truths.append(ref)
    return tmp_path / "p.ome.zarr", truths


def test_evaluate_command_against_labels_of_the_same_plate(tmp_path, capsys):
    plate, _ = _plate(tmp_path)
    out = tmp_path / "ev"
    assert cli.main(["evaluate", "--pred", str(plate), "--ref", "truth", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "A1/1" in printed
    res = json.loads((out / "scores_misic.json").read_text())
    o50 = res["overall"][0]
    assert (o50["tp"], o50["fp"], o50["fn"]) == (3, 0, 1) and o50["ap"] == pytest.approx(3 / 4)
    assert res["fields"]["A1/0"][0]["f1"] == 1.0
    assert res["overall"][1]["tp"] == 1  # only the exact square survives IoU 0.75
    assert len(res["overlays"]) == 2 and all((out / p.split("/")[-1]).is_file() for p in res["overlays"])


def test_evaluate_command_against_a_tiff_plate_channel(tmp_path):
    plate, truths = _plate(tmp_path)
    tiffs = tmp_path / "tiffs"
    tiffs.mkdir()
    for f, t in enumerate(truths):
        tifffile.imwrite(tiffs / f"A1_s{f}_masks.tif", t)
        tifffile.imwrite(tiffs / f"A1_s{f}_brightfield.tif", t.astype(np.uint16))
    out = tmp_path / "ev"
    assert cli.main(["evaluate", "--pred", str(plate), "--ref", "masks", "--ref-plate", str(tiffs),
                     "--out", str(out), "--overlays", "0"]) == 0
    o50 = json.loads((out / "scores_misic.json").read_text())["overall"][0]
    assert (o50["tp"], o50["fp"], o50["fn"]) == (3, 0, 1)


def test_evaluate_names_a_missing_label_image(tmp_path, capsys):
    plate, _ = _plate(tmp_path)
    assert cli.main(["evaluate", "--pred", str(plate), "--ref", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "truth" in err
    assert cli.main(["evaluate", "--pred", str(plate), "--name", "other", "--ref", "truth"]) == 2
    assert "no label image 'other'" in capsys.readouterr().err
