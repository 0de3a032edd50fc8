"""Training data: the field split, each epoch's tile order and the Zarr tile pipeline.

Every choice here is a pure function of the store and ``(seed, epoch)``, so a resumed run reads exactly the
tiles, in the order and with the augmentation, that the interrupted one would have.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hpc_retrain.errors import HpcRetrainError
from hpc_retrain.prepare import store as st


class TrainingError(HpcRetrainError, ValueError):
    """A run that cannot start or continue; the message names the folder or store and the problem."""


# ----------------------------------------------------------------------------------------- data split
def split_fields(usable: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation fields (not tiles: neighbouring tiles of one field would leak)."""
    usable = np.asarray(usable, int)
    n = len(usable)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    perm = np.random.default_rng([seed, 0x5E1D]).permutation(usable)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def field_tiles(root, fields: np.ndarray) -> np.ndarray:
    ent = st.entries(root)
    parts = [np.arange(ent[f].first_tile, ent[f].first_tile + ent[f].n_tiles) for f in fields]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def epoch_plan(train_tiles: np.ndarray, epoch: int, seed: int, batch: int, steps_cap: int | None,
               augment: bool, min_tiles: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Tile order, augmentation codes (0-7: k = code % 4 quarter turns, flipped when code >= 4), steps.

    With ``min_tiles`` the tiles go round in fresh permutations until at least that many are planned.
    A pure function of (seed, epoch): a resumed run sees exactly the order the interrupted one would.
    """
    rng = np.random.default_rng([seed, 0xDA7A, epoch])
    rounds = max(1, math.ceil((min_tiles or 0) / len(train_tiles))) if len(train_tiles) else 1
    order = np.concatenate([rng.permutation(train_tiles) for _ in range(rounds)])
    codes = rng.integers(0, 8, len(order)) if augment else np.zeros(len(order), np.int64)
    steps = math.ceil(len(order) / batch)
    if steps_cap is not None:
        steps = min(steps, steps_cap)
    n = min(len(order), steps * batch)
    return order[:n], codes[:n].astype(np.int32), steps


# ------------------------------------------------------------------------------------------ the tiles
class TileReader:
    """Random access to one tile's (target, label) in the Zarr store.

    Opening checks, from a listing of chunk keys (nothing read), that every tile of the usable fields has
    its ``targets`` and ``labels`` chunk files: zarr reads a missing one as zeros. A chunk that exists but
    cannot be decoded (truncated, overwritten) fails ``read`` with one line naming the file; as that happens
    in a loader thread, the line is also kept in ``TileReader.failure`` for the caller.
    """

    failure: str | None = None  # the last unreadable tile's message, in this process

    def __init__(self, path: Path):
        TileReader.failure = None  # a failure of an earlier training in this process is not this one's
        self.path = Path(path)
        root = st.open_store(path)  # a deleted or garbled array metadata: StoreError, one line
        st.check_tiles(root, self.path)
        self.root = root
        self.targets, self.labels = root["targets"], root["labels"]
        self.size = int(self.targets.shape[1])

    def read(self, i) -> tuple[np.ndarray, np.ndarray]:
        i = int(i)
        try:
            return np.asarray(self.targets[i], np.float32), np.asarray(self.labels[i], np.uint8)
        except Exception as e:
            TileReader.failure = _unreadable_tile(self, i, e)
            raise st.StoreError(TileReader.failure) from None


def _unreadable_tile(reader: TileReader, i: int, e: Exception) -> str:
    """One line: the store, the tile's field, the chunk file that fails, the decoder's complaint, the fix."""
    root = reader.root
    try:
        field = st.entries(root)[int(root["tile_field"][i])]
        where = f" (field {field.well}/{field.field})"
    except Exception:
        where = ""
    files = []
    for name in ("targets", "labels"):
        try:
            root[name][i]
        except Exception:
            files.append(str(st.chunk_file(root, reader.path, name, i)))
    files = files or [f"{reader.path}/targets|labels chunk of tile {i}"]
    env = st.environment_error(e)
    if env is not None:  # the machine's (permissions, I/O): the file may well be fine, never advise deleting it
        what, fix = st.ENVIRONMENT_ERRORS[env.errno]
        return (f"{reader.path}: tile {i}{where}: cannot read chunk file {env.filename or ' and '.join(files)} "
                f"({what}); {fix} and rerun the same command to resume (the file itself may be fine)")
    text = " ".join(str(e).split())[:200]
    return (f"{reader.path}: tile {i}{where} is unreadable ({type(e).__name__}: {text}): chunk file "
            f"{' and '.join(files)} is truncated or corrupt; delete it and rerun "
            f"`{st.prepare_command(root, reader.path)}` (with the options the store was made with), which redoes "
            f"fields with missing chunks")


def make_dataset(reader: TileReader, tiles: np.ndarray, codes: np.ndarray, batch: int):
    """Batches of (target, label) as NumPy arrays, read by threads from Zarr in the given order, augmented by
    code (``loader.TileLoader``: no tf.data, so every backend sees the same batches)."""
    from hpc_retrain.training.loader import TileLoader

    return TileLoader(reader, tiles, codes, batch)


def augment_pair(x, y, code):
    """The same flip/quarter-turn for target and label (``loader.augment_pair``)."""
    from hpc_retrain.training.loader import augment_pair as pair

    return pair(np.asarray(x), np.asarray(y), int(code))
