"""The output folder: writable, and resumed from its newest checkpoint that verifies unless asked to start fresh.

A checkpoint is resumed only when its files are as they were saved (integrity.verify) and the run is of its shape
(integrity.run_identity). A damaged one is moved aside, never deleted, and the one before it is used. Under
several ranks the verifying ranks (rank 0, or each node's first with --save_on_each_node) check each candidate
and every rank receives their verdicts, so all resume from the same step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import torch.distributed as dist

from clip_train.checkpoint import run_lock
from clip_train.checkpoint.integrity import Check, differences, read_marker, run_identity, verify
from clip_train.checkpoint.layout import MARKER, checkpoints
from clip_train.errors import SetupError

logger = logging.getLogger(__name__)

# What the Trainer writes at the top of output_dir when a run ends: save_metrics merges into an all_results.json it
# finds, so a fresh start removes them (a previous run's keys would be reported as this run's).
RESULTS = ("all_results.json", "train_results.json", "eval_results.json", "trainer_state.json")


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


def _gather(value: Any) -> list:
    """``value`` of every rank, on every rank (just ``[value]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _agreed_check(path: str, training_args: Any) -> Check:
    """The verdict every rank shares: the first problem any verifying rank found, else their all-clear."""
    mine = verify(path) if training_args.should_save else None
    seen = [c for c in _gather(mine) if c is not None]
    return next((c for c in seen if c.problem), seen[0] if seen else Check(None, True))


def _note_unhashed(path: str, check: Check) -> None:
    if not check.hashed:
        logger.info("%s was saved before markers recorded file hashes: resuming from it unverified", path)


def _set_aside(path: str) -> str:
    """Rename a damaged checkpoint to damaged-checkpoint-N-TIME. Not checkpoint-N.*: the Trainer's rotation takes
    every checkpoint-* folder for one of its own and would delete it at the next save."""
    new = os.path.join(
        os.path.dirname(path), f"damaged-{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    n = 1
    while os.path.exists(new if n == 1 else f"{new}.{n}"):
        n += 1
    new = new if n == 1 else f"{new}.{n}"
    try:
        os.rename(path, new)
    except FileNotFoundError:  # --save_on_each_node on one shared folder: another node's rank moved it
        return "(already moved)"
    return new


def prepare_output_dir(training_args: Any, recipe_args: Any) -> str | None:
    """Check output_dir is writable; return the checkpoint to resume from (None for a fresh start).

    Rank 0 also removes what a resume cannot use: with --overwrite_output_dir every checkpoint, otherwise the
    unfinished ones newer than the resume point (a kill while saving), whose steps the run will redo. Finished
    (marked) checkpoints that fail verification are moved aside, and the newest that verifies is resumed.
    """
    out = training_args.output_dir
    _check_writable(out)
    _lock(out, training_args)
    if not training_args.do_train:
        return None
    asked = training_args.resume_from_checkpoint
    if asked:
        # What each rank sees, shared: every rank then takes the same branch (the check below is a collective).
        seen = _gather([os.path.isfile(os.path.join(asked, n)) for n in ("trainer_state.json", MARKER)])
        if not all(state for state, _ in seen):
            raise SetupError(
                f"--resume_from_checkpoint {asked!r}: not a checkpoint folder (no trainer_state.json)"
            )
        if not seen[0][1]:
            logger.warning("%s has no %s: it may be incomplete; resuming from it as asked", asked, MARKER)
        else:
            check = _agreed_check(asked, training_args)
            if check.problem:
                raise SetupError(
                    f"--resume_from_checkpoint {asked} is damaged: {check.problem}. Nothing was changed; pass "
                    "another checkpoint, or leave the flag out to resume from the newest good one in --output_dir"
                )
            _note_unhashed(asked, check)
        _refuse_finished(asked, training_args, asked=True)
        return asked
    every = checkpoints(out)
    marked = [p for _, p in every if os.path.isfile(os.path.join(p, MARKER))]
    resume, damaged = None, []
    if not recipe_args.overwrite_output_dir:
        # Rank 0's list, by name (each node may have its own disk), so every rank walks the same candidates.
        for name in reversed(_gather([os.path.basename(p) for p in marked])[0]):
            path = os.path.join(out, name)
            check = _agreed_check(path, training_args)
            if not check.problem:
                resume = path
                _note_unhashed(path, check)
                break
            damaged.append((path, check.problem))
    if damaged and not resume:
        raise SetupError(
            f"no checkpoint in {out} can be resumed: "
            + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged)
            + ". Nothing was changed. Pass --resume_from_checkpoint PATH (a good copy), --overwrite_output_dir "
            "to start over (it deletes them), or a new --output_dir"
        )
    for path, why in damaged:
        if training_args.should_save:  # each filesystem's verifier moves its copy; no other rank touches it
            logger.warning("%s is damaged (%s): moved aside to %s, nothing deleted; resuming from %s instead",
                           path, why, os.path.basename(_set_aside(path)), os.path.basename(resume))  # fmt: skip
    resume_step = next((s for s, p in every if p == resume), 0)
    if recipe_args.overwrite_output_dir:
        doomed = [p for _, p in every]
    else:  # unfinished ones are only deleted next to a finished one, never a folder of unknown origin
        doomed = [p for s, p in every if resume and s > resume_step and p not in marked]
        unknown = [os.path.basename(p) for _, p in every if not resume and p not in marked]
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
    elif training_args.should_save:
        _remove_results(out)
    return resume


def _lock(out: str, training_args: Any) -> None:
    """Take the folder's run lock (rank 0, or each node's first rank with --save_on_each_node); every rank stops
    with the same one-line error when another run holds it."""
    mine = None
    if training_args.should_save:
        mine = run_lock.take(out, run_lock.lock_name(training_args.save_on_each_node))
    holder = next((h for h in _gather(mine) if h), None)
    if holder:
        raise SetupError(
            f"--output_dir {out} is in use by another run ({holder}): wait for it to end, stop it, or choose "
            "another --output_dir"
        )


def _remove_results(out: str) -> None:
    """A fresh start: the previous run's results files go (the Trainer would merge into them)."""
    gone = []
    for name in RESULTS:
        try:
            os.remove(os.path.join(out, name))
            gone.append(name)
        except FileNotFoundError:
            pass
    if gone:
        logger.warning("Starting fresh in %s: removed the previous run's %s", out, ", ".join(gone))


def same_run(checkpoint: str | None, training_args: Any, loss_scope: str, model_path: str,
             train_split: Any, *, accumulation_mode: str) -> dict | None:  # fmt: skip
    """This run's identity (None when it does not train), after checking that ``checkpoint``, if resumed, was
    saved by a run of the same shape: the Trainer would otherwise go on with another batch, silently."""
    if train_split is None:
        return None
    run = run_identity(
        training_args, loss_scope, model_path, train_split, accumulation_mode=accumulation_mode
    )
    try:
        saved = read_marker(checkpoint).get("run") if checkpoint else None
    except (OSError, ValueError):  # an unmarked folder passed explicitly: nothing recorded to compare
        saved = None
    diff = differences(saved, run) if isinstance(saved, dict) else []
    if diff:
        raise SetupError(
            f"{checkpoint} was saved by a run of another shape: {'; '.join(diff)}. Rerun with the same settings, "
            "use a new --output_dir, or pass --overwrite_output_dir to start over"
        )
    return run


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
