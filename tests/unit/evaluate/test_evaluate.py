"""Instance matching on hand-made label images whose scores are known, and the evaluate command."""

import json

import numpy as np
import pytest
import tifffile

from hpc_retrain import commands
from hpc_retrain.evaluate.overlays import COLOURS, contact_sheet, outline_rgb, overlay_figure, tile_rgb
from hpc_retrain.imaging.metrics import Score, classify, iou_pairs, match, summarize
from hpc_retrain.io import ngff


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


def _three_cases():
    """A matched cell (IoU 2/3), a false positive and a missed cell."""
    ref = square((60, 60), 5, 5, 12, 1)
    square((60, 60), 40, 40, 12, 2, ref)  # missed
    pred = square((60, 60), 5, 7, 12, 3)  # matches cell 1
    square((60, 60), 5, 40, 12, 8, pred)  # nothing there
    img = np.random.default_rng(0).integers(0, 1000, (60, 60)).astype(np.uint16)
    return img, ref, pred


def _ring(top, left, size, depth):
    """Coordinates of the ring ``depth`` pixels in from the edge of a square (0: the outermost)."""
    t, l, b, r = top + depth, left + depth, top + size - 1 - depth, left + size - 1 - depth
    return [(t, x) for x in range(l, r + 1)] + [(b, x) for x in range(l, r + 1)] + \
        [(y, l) for y in range(t, b + 1)] + [(y, r) for y in range(t, b + 1)]


def test_outlines_are_two_pixels_in_the_colour_of_each_outcome():
    img, ref, pred = _three_cases()
    outcome = classify(ref, pred)
    assert (list(outcome.matched), list(outcome.matched_ref)) == ([3], [1])
    assert (list(outcome.false_pos), list(outcome.missed)) == ([8], [2])
    rgb = outline_rgb(img, pred, ref, outcome)
    assert rgb.shape == (60, 60, 3) and rgb.dtype == np.uint8
    for (top, left), what in (((5, 7), "matched"), ((5, 40), "false positive"), ((40, 40), "missed")):
        for depth in (0, 1):
            assert {tuple(rgb[y, x]) for y, x in _ring(top, left, 12, depth)} == {COLOURS[what]}, (what, depth)
        inside = {tuple(rgb[y, x]) for y, x in _ring(top, left, 12, 2)}
        assert all(c[0] == c[1] == c[2] for c in inside), what  # grey: the line is 2 px
    assert tuple(rgb[5, 5]) not in COLOURS.values()  # the matched reference is not drawn over the image
    assert len(set(COLOURS.values())) == 3


def test_large_fields_are_downsampled_and_tiles_keep_every_cell():
    img, ref, pred = _three_cases()
    big = [np.kron(a, np.ones((40, 40), a.dtype)) for a in (img, ref, pred)]  # 2400 x 2400
    outcome = classify(big[1], big[2])
    rgb = outline_rgb(big[0], big[2], big[1], outcome, max_side=1024)
    assert max(rgb.shape[:2]) <= 1024
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert set(COLOURS.values()) <= colours
    tile = tile_rgb(big[0], big[2], big[1], outcome, 32)
    assert tile.shape == (32, 32, 3) and tile.dtype == np.uint8
    assert set(COLOURS.values()) <= {tuple(c) for c in tile.reshape(-1, 3)}  # cells filled in their colour


def test_overlay_legend_counts_equal_the_scores():
    img, ref, pred = _three_cases()
    outcome = classify(ref, pred)
    s50 = match(ref, pred)[0]
    fig = overlay_figure(outline_rgb(img, pred, ref, outcome), outcome, "A1/0 - misic\nF1@0.5 0.500")
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == [f"matched ({s50.tp})", f"false positive ({s50.fp})", f"missed ({s50.fn})"]
    assert (s50.tp, s50.fp, s50.fn) == (1, 1, 1)
    sheet = contact_sheet([("A1/0", np.zeros((20, 30, 3), np.uint8), 0.5)] * 5, "t", outcome.counts())
    assert len([t for t in sheet.axes[0].texts if t.get_gid() == "tile"]) == 5


def _plate(tmp_path):
    root = ngff.create_plate(tmp_path / "p.ome.zarr", ["A1"], 2)
    truths = []
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
    assert commands.main(["evaluate", "--pred", str(plate), "--ref", "truth", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "A1/1" in printed
    res = json.loads((out / "scores_misic.json").read_text())
    o50 = res["overall"][0]
    assert (o50["tp"], o50["fp"], o50["fn"]) == (3, 0, 1) and o50["ap"] == pytest.approx(3 / 4)
    assert res["fields"]["A1/0"][0]["f1"] == 1.0
    assert res["overall"][1]["tp"] == 1  # only the exact square survives IoU 0.75
    assert len(res["overlays"]) == 2 and all((out / p.split("/")[-1]).is_file() for p in res["overlays"])
    assert sorted(p.split("/")[-1] for p in res["overlays"]) == ["overlay_misic_A1_0.png", "overlay_misic_A1_1.png"]
    assert res["contact_sheet"] == str(out / "contact_misic.png") and (out / "contact_misic.png").is_file()


def test_contact_sheet_has_one_panel_per_field(tmp_path, monkeypatch):
    from hpc_retrain.evaluate import overlays
    from hpc_retrain.evaluate import scoring as evaluation

    plate, _ = _plate(tmp_path)
    sheets = []
    real = overlays.contact_sheet
    monkeypatch.setattr(overlays, "contact_sheet", lambda *a: sheets.append(real(*a)) or sheets[-1])
    res = evaluation.evaluate_plate(plate, "misic", "truth", out=tmp_path / "ev", overlays=1)
    assert len(res["overlays"]) == 1 and (tmp_path / "ev" / "contact_misic.png").is_file()
    titles = [t.get_text() for t in sheets[0].axes[0].texts if t.get_gid() == "tile"]
    assert titles == ["A1/0  F1 1.00", "A1/1  F1 0.67"]
    legend = [t.get_text() for t in sheets[0].legends[0].get_texts()]
    o50 = res["overall"][0]
    assert legend == [f"matched ({o50['tp']})", f"false positive ({o50['fp']})", f"missed ({o50['fn']})"]


def test_evaluate_command_against_a_tiff_plate_channel(tmp_path):
    plate, truths = _plate(tmp_path)
    tiffs = tmp_path / "tiffs"
    tiffs.mkdir()
    for f, t in enumerate(truths):
        tifffile.imwrite(tiffs / f"A1_s{f}_masks.tif", t)
        tifffile.imwrite(tiffs / f"A1_s{f}_brightfield.tif", t.astype(np.uint16))
    out = tmp_path / "ev"
    assert commands.main(["evaluate", "--pred", str(plate), "--ref", "masks", "--ref-plate", str(tiffs),
                     "--out", str(out), "--overlays", "0"]) == 0
    assert not list(out.glob("*.png"))
    o50 = json.loads((out / "scores_misic.json").read_text())["overall"][0]
    assert (o50["tp"], o50["fp"], o50["fn"]) == (3, 0, 1)


def test_evaluate_names_a_missing_label_image(tmp_path, capsys):
    plate, _ = _plate(tmp_path)
    assert commands.main(["evaluate", "--pred", str(plate), "--ref", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "truth" in err
    assert commands.main(["evaluate", "--pred", str(plate), "--name", "other", "--ref", "truth"]) == 2
    assert "no label image 'other'" in capsys.readouterr().err
