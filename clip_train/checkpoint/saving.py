"""Checkpoints that survive a kill: an explicit completion marker, a wall-clock save cadence, a sane keep-limit.

The Trainer writes a checkpoint's files from several ranks with no barrier between them (rank 0 writes the
weights, optimizer and trainer_state.json; every rank writes its rng_state_<rank>.pth), so no single file proves
the folder is whole. ``CheckpointMarker.on_save`` waits until every rank has reached it (so all have finished
writing), then rank 0 writes ``checkpoint_complete.json``; resuming only ever uses folders that have it. The
marker lists every file rank 0 sees then, with its size and hash, and the run's identity (see integrity.py).
On one node, or nodes sharing the output folder, that is every rank's file; with per-node disks and
``--save_on_each_node`` each node's first rank marks its own copy with the files it sees.

The recipe's ``--save_steps 150000`` means "never" on COCO, so the marker callback also asks for a save whenever
``--save_minutes`` of wall time have passed since the last one. Ranks must agree on the step that saves (the
marker's barrier would otherwise hang), so the decision is taken from rank 0's clock, shared by an all-reduce at
a few steps only (1, 2, 4, 8, ... steps after each save, and the step after an evaluation), from which the step of
the next save is projected.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from clip_train.checkpoint.integrity import manifest
from clip_train.checkpoint.layout import MARKER
from clip_train.errors import ArgumentError

logger = logging.getLogger(__name__)

DEFAULT_KEEP = 2


def mark_complete(checkpoint: str, global_step: int, world_size: int, run: dict | None = None) -> dict:
    """Write the marker (files' sizes and hashes, the run's identity) atomically: a kill mid-write leaves no marker
    rather than a broken one. Returns what it wrote."""
    marker = {"global_step": global_step, "world_size": world_size, "saved_at": time.time()}
    marker["files"] = manifest(checkpoint)
    if run is not None:
        marker["run"] = run
    tmp = os.path.join(checkpoint, f".{MARKER}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=1)
    os.replace(tmp, os.path.join(checkpoint, MARKER))
    return marker


def settle_save_args(training_args: Any) -> dict[str, Any]:
    """Keep the last DEFAULT_KEEP checkpoints unless told otherwise ({flag: value} to apply); refuse a limit of 1.

    With ``save_total_limit 1`` the Trainer deletes the previous checkpoint right after writing the new one
    and before that one is marked complete: a kill in between would leave nothing to resume from.
    """
    limit = training_args.save_total_limit
    if limit == 1:
        raise ArgumentError(
            "--save_total_limit 1 can leave no complete checkpoint if the run dies while saving: "
            "use 2 or more (or 0 to keep all)"
        )
    return {"save_total_limit": DEFAULT_KEEP} if limit is None else {}


def _from_rank0(value: float, args: Any) -> float:
    """Rank 0's ``value`` on every rank. An all-reduce, so it is also a barrier: every rank has arrived."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value if dist.get_rank() == 0 else 0.0], dtype=torch.float32, device=args.device)
    dist.all_reduce(t)
    return float(t.item())


class CheckpointMarker(TrainerCallback):
    """Marks finished checkpoints and saves at least every ``save_minutes`` of wall time (0: only the marker)."""

    def __init__(self, save_minutes: float, run: dict | None = None) -> None:
        self.seconds = save_minutes * 60.0
        self.run = run  # the run's identity, kept in every marker (integrity.run_identity)
        self._reset(0)

    def _reset(self, step: int) -> None:
        self._t0, self._step0 = time.monotonic(), step
        self._next_check, self._save_at = 1, None  # steps after the last save

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._reset(state.global_step)  # a resumed run counts from its checkpoint's step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.seconds <= 0 or args.save_strategy == "no":
            return
        done = state.global_step - self._step0
        if done >= self._next_check:
            self._next_check *= 2
            elapsed = max(_from_rank0(time.monotonic() - self._t0, args), 1e-6)
            # Project the step at which save_minutes will have passed, at the pace seen so far.
            self._save_at = done if elapsed >= self.seconds else math.ceil(self.seconds * done / elapsed)
        if self._save_at is not None and done >= self._save_at:
            control.should_save = True

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # An evaluation can take minutes the projection did not see: look at the clock again after the next step.
        self._next_check = min(self._next_check, state.global_step - self._step0 + 1)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _from_rank0(0.0, args)  # barrier: every rank has finished writing its part of the checkpoint
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            t0 = time.monotonic()
            files = mark_complete(folder, state.global_step, args.world_size, self.run)["files"]
            took = time.monotonic() - t0
            logger.info("Checkpoint complete: %s", folder)
            if took > 1.0:  # full-size checkpoints: say what the hashes cost (a small share of the save)
                gb = sum(f["size"] for f in files.values()) / 1e9
                logger.info("Hashing its %d files (%.2f GB) took %.1f s", len(files), gb, took)
        self._reset(state.global_step)
