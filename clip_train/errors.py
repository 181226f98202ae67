"""The package's error classes: each is one line for the user (run_clip.py and the launcher print it, exit 2 / 1).

A leaf: every module may import it; it imports nothing of ours.
"""

from __future__ import annotations

import os


class ArgumentError(Exception):
    """A command-line value that cannot work, said before anything is loaded or made."""


class DataError(Exception):
    """The data cannot be read as asked (a missing file, a bad column, a cut zip or shard, no usable sample)."""


class SetupError(Exception):
    """The model folder or the output folder cannot be used as asked."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the run cannot recover by skipping steps."""


class LaunchError(Exception):
    """One line for the user; with usage=True the usage follows it."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def says_errors(error: Exception) -> bool:
    """Under torchrun every rank stops alike (exit 2 on all): rank 0 says why, once. A data or set-up problem is
    also said by each node's first rank, since nodes may see other disks; an argument error is the same on all."""
    if os.environ.get("RANK", "0") == "0":
        return True
    return not isinstance(error, ArgumentError) and os.environ.get("LOCAL_RANK", "0") == "0"
