"""The output folder: writable, and resumed from its last complete checkpoint unless asked to start fresh."""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any

from .loading import SetupError

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders that finished saving (trainer_state.json is written last), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def prepare_output_dir(training_args: Any, recipe_args: Any) -> str | None:
    """Check output_dir is writable; return the checkpoint to resume from (None for a fresh start)."""
    out = training_args.output_dir
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SetupError(
            f"--output_dir {out!r} is not writable ({e.strerror}); choose another folder."
        ) from e
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if not training_args.do_train:
        return None
    checkpoints = complete_checkpoints(out)
    if recipe_args.overwrite_output_dir:
        if checkpoints and training_args.process_index == 0:
            logger.warning(
                "--overwrite_output_dir: deleting %d earlier checkpoint(s) in %s", len(checkpoints), out
            )
            for path in checkpoints:
                shutil.rmtree(path, ignore_errors=True)
        return None
    if checkpoints:
        logger.info("Resuming from %s (pass --overwrite_output_dir to start fresh)", checkpoints[-1])
        return checkpoints[-1]
    return None
