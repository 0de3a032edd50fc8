"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

The content goes to a temporary file in the same folder (``.tmp-<pid>-<name>``, so that a failed process
can find and remove its own leftovers), is flushed to disk, and replaces the file in one ``os.replace``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temp_path(path: str | Path) -> Path:
    """The temporary name a write of ``path`` by this process goes through."""
    path = Path(path)
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


@contextlib.contextmanager
def replacing(path: str | Path, mode: str = "w", **open_kw: Any) -> Iterator[IO]:
    """An open file whose content replaces ``path`` when the block ends without an error (and is dropped
    when it raises): ``with replacing(p, newline="") as f: csv.writer(f)...``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with replacing(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with replacing(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, doc: Any, indent: int | None = 1, **dumps_kw: Any) -> Path:
    return write_text(path, json.dumps(doc, indent=indent, **dumps_kw))


def pid_alive(pid) -> bool:
    """Whether process ``pid`` (of this host) still runs: a temporary file or lock of a dead one is stale."""
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
