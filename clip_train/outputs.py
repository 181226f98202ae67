"""The output folder: writable, and resumed from its last complete checkpoint unless asked to start fresh."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

from .checkpointing import MARKER, is_complete
from .loading import SetupError

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
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


def complete_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders every rank finished writing (they carry checkpoint_complete.json), oldest first."""
    return [p for _, p in _checkpoints(output_dir) if is_complete(p)]


def _check_writable(out: str) -> None:
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


def prepare_output_dir(training_args: Any, recipe_args: Any) -> str | None:
    """Check output_dir is writable; return the checkpoint to resume from (None for a fresh start).

    Rank 0 also removes what a resume cannot use: with --overwrite_output_dir every checkpoint, otherwise the
    unfinished ones newer than the resume point (a kill while saving), whose steps the run will redo.
    """
    out = training_args.output_dir
    _check_writable(out)
    if not training_args.do_train:
        return None
    asked = training_args.resume_from_checkpoint
    if asked:
        if not os.path.isfile(os.path.join(asked, "trainer_state.json")):
            raise SetupError(
                f"--resume_from_checkpoint {asked!r}: not a checkpoint folder (no trainer_state.json)"
            )
        if not is_complete(asked):
            logger.warning("%s has no %s: it may be incomplete; resuming from it as asked", asked, MARKER)
        _refuse_finished(asked, training_args, asked=True)
        return asked
    every = _checkpoints(out)
    complete = [p for _, p in every if is_complete(p)]
    resume = None if recipe_args.overwrite_output_dir or not complete else complete[-1]
    resume_step = next((s for s, p in every if p == resume), 0)
    if recipe_args.overwrite_output_dir:
        doomed = [p for _, p in every]
    else:  # unfinished ones are only deleted next to a finished one, never a folder of unknown origin
        doomed = [p for s, p in every if resume and s > resume_step and p not in complete]
        unknown = [os.path.basename(p) for _, p in every if not resume and p not in complete]
        if unknown:
            logger.warning("Not resuming from %s: no %s (interrupted while saving, or not written by this "
                           "script); --resume_from_checkpoint PATH uses one anyway", ", ".join(unknown), MARKER)  # fmt: skip
    if doomed and training_args.process_index == 0:
        why = "--overwrite_output_dir" if recipe_args.overwrite_output_dir else f"unfinished (no {MARKER})"
        logger.warning("Deleting %d checkpoint(s) in %s, %s: %s", len(doomed), out, why,
                       ", ".join(os.path.basename(p) for p in doomed))  # fmt: skip
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
    if resume:
        _refuse_finished(resume, training_args)
        logger.info("Resuming from %s (pass --overwrite_output_dir to start fresh)", resume)
    return resume


def _refuse_finished(checkpoint: str, training_args: Any, asked: bool = False) -> None:
    """A finished run is not resumed: the Trainer would train one step past --max_steps, or none at all."""
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        state = json.load(f)
    if training_args.max_steps > 0:
        done = (state.get("global_step") or 0) >= training_args.max_steps
        goal = f"--max_steps {training_args.max_steps}"
    else:
        done = (state.get("epoch") or 0.0) >= training_args.num_train_epochs
        goal = f"--num_train_epochs {training_args.num_train_epochs:g}"
    if done:
        where = (
            f"--resume_from_checkpoint {checkpoint} is the end of a finished run: it"
            if asked
            else f"{training_args.output_dir} holds a finished run: its last checkpoint, {os.path.basename(checkpoint)},"
        )
        raise SetupError(
            f"{where} already reaches {goal}. Pass --overwrite_output_dir to train again, raise {goal.split()[0]} "
            "to go on, or --do_train False to only evaluate"
        )
