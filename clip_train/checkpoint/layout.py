"""Where checkpoints live and when one is whole: torch-free, so the launcher reads run folders with it too.

A checkpoint folder is ``checkpoint-N`` under the run's output_dir; it is complete once every rank finished
writing it, which ``CheckpointMarker`` records in the marker file (saving.py) beside the Trainer's state.
"""

from __future__ import annotations

import os
import re

MARKER = "checkpoint_complete.json"
STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N folder, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether a checkpoint folder was finished by every rank (and still has its trainer state)."""
    return os.path.isfile(os.path.join(checkpoint, MARKER)) and os.path.isfile(
        os.path.join(checkpoint, STATE)
    )


def complete_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Checkpoint folders every rank finished writing, oldest first."""
    return [p for _, p in checkpoints(output_dir) if is_complete(p)]


def last_complete_step(output_dir: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint (what a rerun resumes from), None if none."""
    return max((step for step, p in checkpoints(output_dir) if is_complete(p)), default=None)
