"""The launch itself: the run folder, torchrun with its output tee'd to the logs, signals, then the summary.

SIGTERM or Ctrl-C to the launcher goes to torchrun as one SIGTERM (torchrun runs in its own session, so a terminal's
Ctrl-C reaches it only this way, once); torchrun forwards it to the workers, which finish their step and write a
checkpoint (clip_train/preemption.py). A second signal kills torchrun's whole process group.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import TextIO

from clip_train.checkpoint.layout import last_complete_step
from clip_train.errors import LaunchError
from clip_train.launch import runfolder, summary
from clip_train.launch.plan import LaunchPlan


class Tee:
    """A text sink writing to the console and the log files, line by line."""

    def __init__(self, *sinks: TextIO) -> None:
        self.sinks = sinks

    def write(self, text: str) -> int:
        for sink in self.sinks:
            sink.write(text)
            sink.flush()
        return len(text)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()


def _start_line(plan: LaunchPlan) -> str:
    where = (
        f"card {plan.card.split('=')[1]} ({plan.card}; the process sees it as {plan.family}:0), "
        if plan.card
        else ""
    )
    restarts = plan.command[plan.command.index("--max_restarts") + 1]
    return (
        f"[launch] {plan.profile} on {plan.family}: {where}node {plan.node_rank} of "
        f"{plan.world // plan.nproc}, {plan.nproc} process(es) here, world size {plan.world}, "
        f"up to {restarts} restart(s)"
    )


def _folder_lines(plan: LaunchPlan) -> list[str]:
    """Set a finished run aside; say whether this launch starts anew or resumes."""
    run_dir, lines = plan.paths.run_dir, []
    if plan.managed:
        aside = runfolder.set_aside(run_dir)
        if aside:
            lines.append(
                f"[launch] {run_dir.name}: the finished run there is kept as {aside}; starting a new run"
            )
    step = last_complete_step(run_dir)
    if step is not None:
        lines.append(f"[launch] resuming the interrupted run in {run_dir} from checkpoint-{step}")
    else:
        lines.append(f"[launch] run folder: {run_dir}")
    return lines


def execute(plan: LaunchPlan, started: float, machine: str) -> int:
    paths = plan.paths
    try:
        paths.log_dir.mkdir(parents=True, exist_ok=True)
        folder_lines = _folder_lines(plan)
        paths.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(
            f"cannot create {paths.run_dir} ({exc.strerror}): set OUTPUT_ROOT to a writable folder"
        ) from exc
    paths.summary_file.unlink(
        missing_ok=True
    )  # a failed run must not leave the previous figures looking current
    with open(paths.log_file, "w") as log, open(paths.run_dir / runfolder.LAUNCH_LOG, "a") as history:
        out = Tee(sys.stdout, log, history)
        for line in [
            *plan.notes,
            *folder_lines,
            _start_line(plan),
            "[launch] command: " + shlex.join(plan.command),
        ]:
            print(line, file=out)
        rc, stopped_by = _run(plan, out)
        if stopped_by:
            step = last_complete_step(paths.run_dir)
            where = (
                f"the last complete checkpoint is {paths.run_dir}/checkpoint-{step}: run the same command again to "
                "resume from it"
                if step is not None
                else "no checkpoint was written: a rerun starts from the beginning"
            )
            print(f"[launch] stopped by {signal.Signals(stopped_by).name}; {where}", file=out)
            return 128 + stopped_by
        if rc != 0:
            print(f"[Error] training exited with status {rc}; the whole log is {paths.log_file}", file=out)
            return rc
        if plan.node_rank != 0:
            return 0
        rc = summary.report(
            paths.run_dir, paths.summary_file, started_at=started, out=out, network=plan.model_name,
            rank_size=plan.world, batch_size=plan.batch_size, device_type=machine, case_name=plan.case,
            e2e_seconds=int(time.time() - started),
        )  # fmt: skip
    if rc == 0:
        shutil.copyfile(paths.summary_file, paths.run_dir / runfolder.SUMMARY)
    return rc


def _run(plan: LaunchPlan, out: Tee) -> tuple[int, int]:
    """Run torchrun, copying its output to ``out``; (exit status, the signal that stopped it or 0)."""
    proc = subprocess.Popen(
        plan.command, env=plan.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    stopped = []

    def forward(signum: int, frame: object) -> None:
        if (
            stopped
        ):  # the second signal: no more waiting (torchrun's workers each run in a session of their own)
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        stopped.append(signum)
        print(f"[launch] {signal.Signals(signum).name}: asking the workers to save and stop", file=out)
        proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            out.write(raw.decode("utf-8", errors="replace"))
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return rc, (stopped[0] if stopped else 0)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, deepest first (Linux /proc; empty elsewhere)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return []
    return [d for k in kids for d in (*_descendants(k), k)]
