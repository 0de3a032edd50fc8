"""Signalling a real CLI process once it reached a given point, and reaping it: one helper for the tests that
interrupt ``train``/``prepare`` (SIGTERM, SIGINT, SIGKILL) and check what it left behind."""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


def log_has(path: Path, text: str):
    """A ``ready`` predicate: ``path`` exists and holds ``text`` (e.g. ``"epoch 2/2 step 1/3"`` in train.log)."""
    return lambda: path.is_file() and text in path.read_text()


def wait_for(ready, proc: subprocess.Popen, timeout: float = 240, poll_s: float = 0.5, what: str = "") -> None:
    """Poll ``ready()`` until it holds; fail with the process's stderr if it exits first, or after ``timeout``."""
    t = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            err = proc.communicate()[1] if proc.stderr else ""
            raise AssertionError(f"exited {proc.returncode} before {what or 'it was ready'}: {(err or '')[-3000:]}")
        assert time.monotonic() - t < timeout, f"timed out after {timeout:.0f} s waiting for {what or ready}"
        time.sleep(poll_s)


@contextmanager
def reaped(proc: subprocess.Popen):
    """``proc`` is killed with SIGKILL (and waited for) if it still runs when the block ends: no stray process
    outlives a failed test."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def interrupt_when(ready, proc: subprocess.Popen, signum: int, settle_s: float = 0.0, timeout: float = 240,
                   poll_s: float = 0.5, what: str = "", wait_s: float = 240) -> str:
    """Send ``signum`` once ``ready()`` holds (and ``settle_s`` later); the process's stderr ("" when not piped)
    once it exits (killed if it outlives the test)."""
    with reaped(proc):
        wait_for(ready, proc, timeout, poll_s, what)
        time.sleep(settle_s)
        proc.send_signal(signum)
        return proc.communicate(timeout=wait_s)[1] or ""
