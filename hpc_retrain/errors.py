"""The one error base of the package.

Every error this package raises for something a user can fix (a file, a setting, a run folder, a plate)
derives from :class:`HpcRetrainError`; its message is the one line the command prints, naming what is wrong
and the fix. The command layer catches this base once (``hpc_retrain.commands.main``): anything else is a bug
and keeps its traceback. Each error class lives with the module that raises it; most also derive from
``ValueError`` (bad input), which callers of the library have always been able to catch.

Here too are the few exceptions that cross layers: :class:`ModelError` (the run folder format and the model
loader both raise it), :class:`JobFailed` and :class:`TrainingInterrupted` (raised inside the training,
handled by the command layer). A stop asked for by a signal is not an error and does not derive from the
base, as ``KeyboardInterrupt`` is not an ``Exception``.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any


class HpcRetrainError(Exception):
    """Something a user can fix; the message names the file or setting and what to do."""


class ModelError(HpcRetrainError, ValueError):
    """A model file or run folder that is missing, tampered with, or does not fit MISIC's input/output.

    Here rather than with the model loader: the run folder format (``io.runfolder``), below the loader,
    raises it too when a ``--model`` path stands for nothing loadable.
    """


class JobFailed(HpcRetrainError, RuntimeError):
    """A submitted training job that ended with an error; the message says where its log is."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; ``train`` again on the same run resumes."""

    def __init__(self, signum: int, checkpoint: Path, previous_handler: Any = None):
        super().__init__(f"stopped by {signal.Signals(signum).name}; state saved to {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.previous_handler = previous_handler
