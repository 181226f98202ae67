"""The end of a run is written whole: a SIGTERM during the final save or evaluation does not cut a file short.

During training `PreemptionHandler` turns SIGTERM / Ctrl-C into a checkpoint; its handlers are gone once training
ends, and the default action would kill the process in the middle of writing ``model.safetensors``. `FinalPhase`
notes the signal instead while the final model is written and the run evaluated (a second one acts at once: the
user means it). Once the model files are complete the ranks agree on whether one came; if so the run stops there
(exit 128 + the signal) without evaluating, so nothing says "finished". ``all_results.json``, the launcher's sign of a
finished run, is written last (`write_results`), only after the final model and the evaluation are complete.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import torch
import torch.distributed as dist

from clip_train.checkpoint.preemption import SIGNALS, Preempted

logger = logging.getLogger(__name__)

RESULTS = "all_results.json"


class StoppedAfterFinalSave(Preempted):
    """A signal came during the final save: the save was finished, then the run stopped before evaluating."""

    def __init__(self, signum: int, output_dir: str) -> None:
        Exception.__init__(
            self,
            f"stopped by {signal.Signals(signum).name} during the final save, after finishing it: the trained model "
            f"in {output_dir} is complete; it was not evaluated and no {RESULTS} was written (run the same command "
            "again to finish the run)",
        )
        self.exit_code = 128 + signum


class FinalPhase:
    """``with FinalPhase() as final:`` SIGTERM / SIGINT are noted, not acted on; `stop_if_signalled` acts on them."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum:  # the second one: the user means it
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum
        logger.warning("%s received: finishing the final save first", signal.Signals(signum).name)

    def __enter__(self) -> FinalPhase:
        try:
            self._previous = {s: signal.signal(s, self._note) for s in SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def stop_if_signalled(self, training_args: Any) -> None:
        """After the final save: raise StoppedAfterFinalSave on every rank if any rank got a signal."""
        signum = self.signum
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([signum], dtype=torch.int32, device=training_args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # collective: every rank calls it here, once
            signum = int(flag.item())
        if signum:
            raise StoppedAfterFinalSave(signum, training_args.output_dir)

    def note_late_signal(self) -> None:
        """A signal during the evaluation: the run was finished first (its results are written); say so."""
        if self.signum:
            logger.warning("%s came during the final evaluation: the run was finished first",
                           signal.Signals(self.signum).name)  # fmt: skip


def write_results(output_dir: str, results: dict) -> None:
    """Merge ``results`` into all_results.json (an evaluation-only run keeps the training's keys), atomically: the
    launcher takes the file for a finished run."""
    path = os.path.join(output_dir, RESULTS)
    merged: dict = {}
    if os.path.isfile(path):
        with open(path) as f:
            merged = json.load(f)
    merged.update(results)
    tmp = os.path.join(output_dir, f".{RESULTS}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=4, sort_keys=True)
    os.replace(tmp, path)
