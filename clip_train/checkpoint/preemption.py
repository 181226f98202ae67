"""Pre-emption loses nothing: SIGTERM or Ctrl-C ends the step, writes a complete checkpoint, then stops.

Schedulers send SIGTERM some time before SIGKILL (torchrun forwards it to its workers and waits
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds, 30 by default). During training the signal only raises a flag; at the
end of each optimizer step the ranks agree on it, and all of them ask the Trainer for a save and a stop at that same
step, so ``CheckpointMarker`` marks the checkpoint complete as for any save. run_clip.py then raises ``Preempted``
and exits 128 + the signal number with one line naming the checkpoint. A second signal, or one before the first
step began (nothing to save yet; the input may be stuck), takes the default action at once.

Agreement costs one all-reduce of one CPU int per step on a gloo group (the world group on CPU, a gloo side group
next to HCCL/NCCL), so it never waits for the accelerator: the host only meets the other ranks' hosts, which the
step's gradient all-reduce already made it do. Without a gloo side group the flag is shared on the device every
``DEVICE_CHECK_EVERY`` steps instead (a host sync there).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEVICE_CHECK_EVERY = 10


class Preempted(Exception):
    """Training stopped on a signal after writing a complete checkpoint."""

    def __init__(self, signum: int, step: int, output_dir: str, saved: bool = True) -> None:
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = (
            f"{output_dir}/checkpoint-{step} is complete: run the same command again to resume from it"
            if saved
            else "nothing was saved (--save_strategy no): a rerun starts over"
        )
        super().__init__(f"stopped by {name} after step {step}; {where}")


class PreemptionHandler(TrainerCallback):
    """Turns SIGTERM / SIGINT during training into a save-and-stop at a step every rank agrees on."""

    def __init__(self) -> None:
        self.signum = 0  # the signal received here (0: none)
        self.stopped_at: tuple[int, int, bool] | None = None  # (signal, step, saved) once agreed
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._every = 1
        # A step has begun since training started: a save at its end is worth waiting for.
        self._stepping = False

    def _handler(self, signum: int, frame: Any) -> None:
        # The second one (the user means it), or one before any step began (nothing new to save, and the step it
        # would wait for may never come: input that yields nothing): the default action, at once.
        if self.signum or not self._stepping:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning(
            "%s received: finishing this step, then saving a checkpoint", signal.Signals(signum).name
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            self._previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook's worker): leave signals alone
            self._previous = {}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":
                self._group = dist.group.WORLD
            else:
                try:  # collective: every rank calls it here
                    self._group = dist.new_group(backend="gloo")
                except RuntimeError as exc:
                    self._group, self._every = None, DEVICE_CHECK_EVERY
                    logger.info(
                        "no gloo side group (%s): pre-emption checked every %d steps", exc, self._every
                    )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stepping = True

    def _agreed_signal(self, args: Any) -> int:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum
        device = "cpu" if self._group is not None else args.device
        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stepping = True
        if state.global_step >= state.max_steps or state.global_step % self._every:
            return  # the last step ends the run anyway; it saves and reports as usual
        signum = self._agreed_signal(args)
        if signum:
            control.should_save = args.save_strategy != "no"
            self.stopped_at = (signum, state.global_step, control.should_save)
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def check(self, output_dir: str) -> None:
        """Raise Preempted if training stopped on a signal (run_clip.py calls it right after train())."""
        if self.stopped_at:
            signum, step, saved = self.stopped_at
            raise Preempted(signum, step, output_dir, saved)
