"""The launchers' folders: one run folder per case, a finished run kept aside, an interrupted one resumed.

Layout under ``$OUTPUT_ROOT/$ASCEND_DEVICE_ID/`` (the recipe's place for its logs)::

    train_$ASCEND_DEVICE_ID.log        the console of the latest launch (the recipe's users grep it); on several
                                       nodes train_$ASCEND_DEVICE_ID.node$R.log, one per node
    ${CaseName}.log                    the latest run's summary (by the node whose worker held global rank 0)
    ${CaseName}/                       the run folder: run_clip.py's --output_dir (checkpoint-N/, all_results.json,
                                       the trained model), plus launch.log (every launch of this run, appended) and
                                       summary.log (its own summary); launch-no-restart.txt, launch-rank0.txt and
                                       launch-nodes/ are the launcher's notes to itself (worker.py)
    ${CaseName}.finished-YYYYmmdd-HHMMSS/   a finished run of the same case, set aside when the case ran again

A run is finished once run_clip.py has written ``all_results.json`` (it does so last, after the final model and the
final evaluation: checkpoint/finishing.py); anything else in a run folder is an interrupted run, which the next launch
resumes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

FINISHED = "all_results.json"
LAUNCH_LOG = "launch.log"
SUMMARY = "summary.log"
STOP = "launch-no-restart.txt"  # the run stopped for a reason a restart does not fix (worker.py)
RANK0 = "launch-rank0.txt"  # the launcher whose node held global rank 0 (worker.py)
NODES = "launch-nodes"  # node-<R> per node of a multi-node launch: the folder is shared (worker.py, run.py)


@dataclass(frozen=True)
class RunPaths:
    log_dir: Path  # $OUTPUT_ROOT/$ASCEND_DEVICE_ID
    run_dir: Path  # the run's output_dir
    log_file: Path  # train_$ASCEND_DEVICE_ID.log
    summary_file: Path  # ${CaseName}.log


def case_name(model_name: str, batch_size: str, world: int, kind: str) -> str:
    """The recipe's CaseName, e.g. clip_bs64_8p_acc."""
    return f"{model_name}_bs{batch_size}_{world}p_{kind}"


def run_paths(
    output_root: Path, device_id: str, case: str, output_dir: str | None = None, node: int | None = None
) -> RunPaths:
    """The paths of one launch; ``node`` (multi-node) names the console log, which nodes sharing OUTPUT_ROOT would
    otherwise all write: train_$ASCEND_DEVICE_ID.node$R.log."""
    log_dir = output_root / device_id
    run_dir = Path(output_dir) if output_dir else log_dir / case
    log = f"train_{device_id}.log" if node is None else f"train_{device_id}.node{node}.log"
    return RunPaths(log_dir, run_dir, log_dir / log, log_dir / f"{case}.log")


def node_file(run_dir: Path, node_rank: int) -> Path:
    return run_dir / NODES / f"node-{node_rank}"


def finished_at(run_dir: Path) -> float | None:
    """When the run in ``run_dir`` finished (its results file's time), None if it has not."""
    try:
        return (run_dir / FINISHED).stat().st_mtime
    except OSError:
        return None


def set_aside(run_dir: Path) -> Path | None:
    """Rename a finished run to ``<run_dir>.finished-<its finish time>``; return the new path (None: nothing to do)."""
    when = finished_at(run_dir)
    if when is None:
        return None
    base = f"{run_dir}.finished-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}"
    target, n = Path(base), 1
    while target.exists():  # two runs finished within the same second
        n += 1
        target = Path(f"{base}-{n}")
    os.rename(run_dir, target)
    return target
