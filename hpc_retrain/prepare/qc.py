"""A training store's per-field state and QC table (``<store>.qc.csv``), and the summary ``prepare`` prints.

Every field's stages (labels, targets) record done/error flags and QC numbers in the store as they finish;
this module turns them into the field's status, the fields attribute and the CSV a user reads, and judges from
them whether the fluorescence teacher is a fair guide for validation (``teacher_doubt``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from hpc_retrain.io import atomic
from hpc_retrain.prepare import layout

FIELD_STAGES = ("labels", "targets")  # what a field of a training store goes through, in order


def qc_path(store_path: Path) -> Path:
    p = Path(store_path)
    return p.with_name((p.name[:-5] if p.name.endswith(".zarr") else p.name) + ".qc.csv")


def set_field_state(root, i: int) -> None:
    done = [bool(root[f"{s}_done"][i]) for s in FIELD_STAGES]
    errors = [str(root[f"{s}_error"][i]) for s, d in zip(FIELD_STAGES, done) if d]
    if any(done):
        root["field_status"][i] = layout.FLAGGED if any(errors) else layout.OK
    if all(done):
        root["field_done"][i] = 1


class Summary:
    def __init__(self, path: Path, rows: list[dict[str, Any]], stages: tuple[str, ...]):
        self.path, self.rows, self.stages = path, rows, stages

    @property
    def nothing_usable(self) -> bool:
        """Every field finished these stages and every one was flagged: nothing to train on."""
        finished = [r for r in self.rows if all(r[f"{s}_done"] for s in self.stages)]
        return bool(finished) and len(finished) == len(self.rows) and not any(r["status"] == "ok" for r in self.rows)

    @property
    def flagged(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "flagged"]

    def text(self) -> str:
        n = len(self.rows)
        ok = sum(r["status"] == "ok" for r in self.rows)
        lines = [f"{self.path}: {n} fields, {ok} ok, {len(self.flagged)} flagged "
                 f"({' + '.join(self.stages)}); QC table: {qc_path(self.path)}"]
        for r in self.flagged[:20]:
            lines.append(f"  FLAGGED {r['well']} {r['field']}: {r['error']}")
        if len(self.flagged) > 20:
            lines.append(f"  ... and {len(self.flagged) - 20} more (see the QC table)")
        return "\n".join(lines)


def finalize(store_path: Path, stages: tuple[str, ...]) -> Summary:
    """Field states, attrs and the QC table from what the tasks wrote."""
    import zarr

    root = zarr.open_group(str(store_path), mode="r+")
    nf = root["field_done"].shape[0]
    for i in range(nf):  # repairs a run killed between a stage's flag and the field's
        set_field_state(root, i)
    qc = root["field_qc"][:]
    status = root["field_status"][:]
    flags = {s: (root[f"{s}_done"][:], root[f"{s}_error"][:]) for s in FIELD_STAGES}
    names = {layout.PENDING: "pending", layout.OK: "ok", layout.FLAGGED: "flagged"}
    fields = list(root.attrs["fields"])
    rows = []
    for i, f in enumerate(fields):
        error = "; ".join(str(flags[s][1][i]) for s in FIELD_STAGES if flags[s][0][i] and flags[s][1][i])
        f = dict(f, status=names[int(status[i])], error=error)
        fields[i] = f
        row = {"index": i, "well": f["well"], "field": f["field"], "status": f["status"],
               **{f"{s}_done": int(flags[s][0][i]) for s in FIELD_STAGES}, "n_tiles": f["n_tiles"]}
        row.update({c: float(v) for c, v in zip(layout.QC_COLUMNS, qc[i])})
        row.update(source=f["source"], error=error)
        rows.append(row)
    root.attrs["fields"] = fields
    with atomic.replacing(qc_path(store_path), newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return Summary(Path(store_path), rows, stages)


# ------------------------------------------------------------------------------------ the teacher's strength
# A teacher can pass QC and still be a poor judge: dim or fading fluorescence leaves cells out of the labels or
# half-labelled. On real phase contrast with fading GFP (issue 27) the teacher scored F1 0.18 against complete
# masks while the student it taught reached 0.87, and validation F1 against it (0.33-0.45) said little.
# Two QC numbers see it: MISIC's uncertain share (probabilities 0.25-0.75 among all above 0.25; a field is
# flagged above labels.MAX_UNCERTAIN_SHARE, 0.45) and the share of the objects it found that were dropped as
# too dim or speck-sized (labels.clean). Neither separates cleanly field by field: the ColiCoords fields, whose
# teacher is fair (held-out student F1 0.77-0.83 against it), span 0.27-0.45 and 0-0.47 (fold 1 of
# benchmarks.colicoords_cv, 8 fields: 2 over 0.38, 1 over 0.40), a synthetic field at 1/25 the brightness
# gives 0.43. So the store is doubted when half its fields are past these limits, not one.
WEAK_UNCERTAIN_SHARE = 0.40
WEAK_DROPPED_SHARE = 0.5


def teacher_doubt(root, fields) -> str | None:
    """Why the labels of ``fields`` (a training store's usable fields) are a weak guide, or None when their QC
    shows a confident teacher that kept most of what it found. Judged field by field (fluorescence that fades
    over a time-lapse or across a plate leaves some fields weak): weak when half of them are."""
    from hpc_retrain.prepare import labels  # its model machinery is not needed to read the table

    fields = np.asarray(fields, int)
    if not len(fields):
        return None
    qc = np.asarray(root["field_qc"][:], np.float64)[fields]
    col = {c: np.nan_to_num(qc[:, layout.QC_COLUMNS.index(c)])
           for c in ("body_q2", "body_q3", "body_q4", "cells", "dropped")}
    uncertain = labels.uncertain_share(col["body_q2"], col["body_q3"], col["body_q4"])
    found = col["cells"] + col["dropped"]
    dropped = np.where(found > 0, col["dropped"] / np.maximum(found, 1), 0.0)
    why = []
    for share, limit, what in ((uncertain, WEAK_UNCERTAIN_SHARE, "of the candidate cell pixels uncertain"),
                               (dropped, WEAK_DROPPED_SHARE, "of the objects found dropped as too dim or small")):
        weak = share > limit
        if weak.sum() * 2 >= len(fields):
            why.append(f"{weak.sum()} of {len(fields)} fields with over {limit:.0%} {what} "
                       f"(up to {share.max():.0%})")
    return "; ".join(why) or None
