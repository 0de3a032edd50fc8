"""A training store's per-field state and QC table (``<store>.qc.csv``), and the summary ``prepare`` prints.

Every field's stages (labels, targets) record done/error flags and QC numbers in the store as they finish;
this module turns them into the field's status, the fields attribute and the CSV a user reads.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

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
