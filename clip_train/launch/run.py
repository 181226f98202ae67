"""The launch itself: the run folder, torchrun with its output tee'd to the logs, signals, then the summary.

SIGTERM or Ctrl-C to the launcher goes to torchrun as one SIGTERM (torchrun runs in its own session, so a terminal's
Ctrl-C reaches it only this way, once); torchrun forwards it to the workers, which finish their step and write a
checkpoint (clip_train/checkpoint/preemption.py). A second signal kills torchrun's whole process group.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from clip_train.checkpoint.layout import last_complete_step
from clip_train.errors import LaunchError
from clip_train.launch import runfolder, summary, worker
from clip_train.launch.plan import LaunchPlan

# Seconds a node waits, once its own workers started, to see every other node's file in the run folder.
SHARED_WAIT = 30.0


class Tee:
    """A text sink writing to the console and the log files, line by line."""

    def __init__(self, *sinks: TextIO) -> None:
        self.sinks = sinks
        self.lock = threading.Lock()  # the shared-folder check writes from a thread of its own

    def write(self, text: str) -> int:
        with self.lock:
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
    line = (
        f"[launch] {plan.profile} on {plan.family}: {where}node {plan.node_rank} of "
        f"{plan.world // plan.nproc}, {plan.nproc} process(es) here, world size {plan.world}, "
        f"up to {restarts} restart(s)"
    )
    if plan.nodes.nnodes > 1 or plan.profile == "cluster":
        line += f"\n[launch] nodes: {plan.nodes.describe()}"
    return line


def _folder_lines(plan: LaunchPlan) -> list[str]:
    """Set a finished run aside; say whether this launch starts anew or resumes."""
    run_dir, lines = plan.paths.run_dir, []
    if plan.managed and plan.node_rank == 0:  # one node sets a finished run aside: the folder may be shared
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
    own_node = runfolder.node_file(paths.run_dir, plan.node_rank)
    # The previous launch's notes: this one decides anew (every node's workers start after every node got here).
    for note in (paths.run_dir / runfolder.STOP, paths.run_dir / runfolder.RANK0, own_node):
        note.unlink(missing_ok=True)
    with open(paths.log_file, "w") as log, open(paths.run_dir / runfolder.LAUNCH_LOG, "a") as history:
        out = Tee(sys.stdout, log, history)
        for line in [
            *plan.notes,
            *folder_lines,
            _start_line(plan),
            "[launch] command: " + shlex.join(plan.command),
        ]:
            print(line, file=out)
        done = threading.Event()
        check = threading.Thread(target=_check_shared, args=(plan, out, done), daemon=True)
        if plan.nodes.nnodes > 1:
            check.start()
        rc, stopped_by = _run(plan, out)
        done.set()
        if check.is_alive():
            check.join()
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
        stop = worker.read_stop(paths.run_dir / runfolder.STOP)
        if rc != 0 and stop:
            print(
                f"[Error] training stopped with status {stop[0]} ({stop[1]}); not restarted: a rerun would only "
                f"repeat it. The whole log is {paths.log_file}",
                file=out,
            )
            return stop[0]
        if rc != 0:
            print(f"[Error] training exited with status {rc}; the whole log is {paths.log_file}", file=out)
            return rc
        if plan.nodes.nnodes > 1:
            holder = _read(paths.run_dir / runfolder.RANK0)
            if holder != plan.launcher_id:
                print(
                    f"[launch] node {plan.node_rank} finished; its workers did not hold global rank 0, so the "
                    f"summary is written by {holder or 'the node whose worker did (not found in this run folder)'}",
                    file=out,
                )
                return 0
            print(
                f"[launch] node {plan.node_rank}'s worker held global rank 0: it writes the summary", file=out
            )
        rc = summary.report(
            paths.run_dir, paths.summary_file, started_at=started, out=out, network=plan.model_name,
            rank_size=plan.world, batch_size=plan.batch_size, device_type=machine, case_name=plan.case,
            e2e_seconds=int(time.time() - started),
        )  # fmt: skip
    if rc == 0:
        shutil.copyfile(paths.summary_file, paths.run_dir / runfolder.SUMMARY)
    return rc


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _check_shared(plan: LaunchPlan, out: Tee, done: threading.Event) -> None:
    """Warn when this node does not see every node's file in the run folder: the folder is not shared.

    Each node's first worker writes its file once the rendezvous formed the group; from the moment this node's own
    file appears, the others get SHARED_WAIT seconds (or until the run ends) to show up."""
    run_dir, nnodes, token = plan.paths.run_dir, plan.nodes.nnodes, plan.nodes.rdzv_id

    def seen(rank: int) -> bool:
        return _read(runfolder.node_file(run_dir, rank)) == token

    while not seen(plan.node_rank):  # our workers have not started (yet)
        if done.wait(0.5):
            return
    deadline = time.monotonic() + SHARED_WAIT
    while missing := [r for r in range(nnodes) if not seen(r)]:
        if done.wait(0.5) or time.monotonic() > deadline:
            if missing := [r for r in range(nnodes) if not seen(r)]:
                print(
                    f"[Warning] the run folder {run_dir} is not shared by every node: node {plan.node_rank} does "
                    f"not see node(s) {', '.join(map(str, missing))} start in it. Put OUTPUT_ROOT (or "
                    "--output_dir) on storage every node sees: checkpoints, resumes and the summary need one folder",
                    file=out,
                )
            return


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
