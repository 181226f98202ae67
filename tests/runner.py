"""Helpers for tests that run run_clip.py as a user would: the commands, starting, finishing and killing runs,
reading the losses back. Shared by tests/runs/ and the module tests that train a few steps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import psutil
from conftest import REPO

from clip_train.demo import recipe_args

# 12 steps an epoch: the kill lands mid-epoch or on its boundary, and the resumed part crosses epoch boundaries.
MAX_STEPS, SAVE_STEPS, KILL_AFTER = 48, 4, 14


def train_cmd(demo: tuple[str, str], out: str, world: int) -> list[str]:
    """One process saves every SAVE_STEPS steps; two save by the clock (every 0.3 s) with --save_steps "never"."""
    data_dir, model_dir = demo
    launcher = [sys.executable]
    if world > 1:
        with socket.socket() as s:  # a free port, so concurrent test runs never meet
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_port",
            str(port),
        ]
    return launcher + [
        "run_clip.py", "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir,
        "--do_train", "--max_train_samples", "96", "--per_device_train_batch_size", str(8 // world),
        "--dataloader_drop_last", "--dataloader_num_workers", "1", "--max_steps", str(MAX_STEPS),
        *(["--save_steps", str(SAVE_STEPS)] if world == 1 else ["--save_steps", "150000", "--save_minutes", "0.005"]),
        "--logging_steps", "1", "--learning_rate", "1e-3", "--seed", "7",
        "--report_to", "none",
        "--use_cpu",  # on a CPU-only machine accelerate sees torchrun's ranks only with use_cpu (see report)
    ]  # fmt: skip


def start(cmd: list[str], log_path: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(p: subprocess.Popen, log_path: str, timeout: int = 300) -> str:
    p.wait(timeout=timeout)
    log = open(log_path).read()
    assert p.returncode == 0, log[-4000:]
    return log


def kill_all(p: subprocess.Popen) -> None:
    """SIGKILL a run and every process under it, as a crashed node or a killed job does. torchrun starts each
    worker in a session of its own, so a signal to torchrun's process group would leave the workers running."""
    below = psutil.Process(p.pid).children(recursive=True)
    p.send_signal(signal.SIGKILL)
    for proc in below:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:  # a loader worker that ended between the listing and the kill
            pass
    p.wait(timeout=60)  # reaped here, not by psutil, so that Popen keeps the exit status
    psutil.wait_procs(below, timeout=60)


def losses(out: str) -> dict[int, float]:
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def recipe_cmd(data_dir: str, model_dir: str, out: str, *extra: str) -> list[str]:
    """The recipe's exact command line (see the README), shortened with --max_steps."""
    args = recipe_args(data_dir, model_dir, out)
    args[args.index("--dataloader_num_workers") + 1] = "1"
    args[args.index("--per_device_train_batch_size=64")] = "--per_device_train_batch_size=16"
    args[args.index("--per_device_eval_batch_size=64")] = "--per_device_eval_batch_size=16"
    args[args.index("--skip_steps") + 1] = "2"
    return ["run_clip.py", *args, "--report_to", "none", *extra]
