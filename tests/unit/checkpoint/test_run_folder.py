"""The run folder belongs to one run at a time (a lock), and a fresh start leaves no earlier run's results in it."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO

import run_clip
from clip_train.checkpoint import run_lock

HOLD = """
import sys, time
from clip_train.checkpoint import run_lock
assert run_lock.take(sys.argv[1]) is None
print("locked", flush=True)
time.sleep(600)
"""


def tiny_run(demo: tuple[str, str], out: str, *extra: str) -> list[str]:
    data_dir, model_dir = demo
    return [
        "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_train",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--max_train_samples", "16",
        "--dataloader_num_workers", "0", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
        *extra,
    ]  # fmt: skip


def test_a_second_run_into_a_live_folder_stops_and_a_dead_ones_lock_is_taken_over(
    demo, tmp_path, capsys, caplog
):
    out = tmp_path / "out"
    unfinished = out / "checkpoint-3"  # the first run's save in progress: a second run would delete it
    unfinished.mkdir(parents=True)
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    try:
        assert first.stdout.readline().strip() == "locked"
        assert run_clip.cli(tiny_run(demo, str(out), "--overwrite_output_dir")) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("run_clip.py: error:")]
        assert len(errors) == 1, errors
        assert f"--output_dir {out} is in use by another run (pid {first.pid} on " in errors[0]
        assert unfinished.is_dir()  # nothing of the first run's was touched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # The first run died (kill -9, a node lost, a torchrun restart): its lock file stays, its lock does not.
    with caplog.at_level(logging.INFO, logger="clip_train"):
        assert run_lock.take(str(out)) is None
    assert f"left by a run that has ended (pid {first.pid} on " in caplog.text
    assert json.loads((out / run_lock.LOCK).read_text())["pid"] == os.getpid()


def test_overwrite_leaves_only_the_new_runs_results(demo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = {"eval_image_to_text_R@1": 0.9, "train_skipped_nonfinite_steps": 5, "epoch": 7.0, "train_loss": 0.1}
    for name in ("all_results.json", "train_results.json", "eval_results.json"):
        (out / name).write_text(json.dumps(old))
    assert run_clip.cli(tiny_run(demo, str(out), "--overwrite_output_dir")) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_image_to_text_R@1" not in results and results["train_skipped_nonfinite_steps"] == 0
    assert results["epoch"] != 7.0 and results["train_loss"] != pytest.approx(0.1)
    assert not (out / "eval_results.json").exists()  # this run did not evaluate


HOLD_WITH_A_WORKER = """
import os, sys, time
from clip_train.checkpoint import run_lock
assert run_lock.take(sys.argv[1]) is None
if os.fork() == 0:  # a DataLoader worker: forked, so it shares the lock, and outlives its parent briefly
    time.sleep(2)
    os._exit(0)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_kept_by_a_killed_runs_leftover_worker_is_waited_for(tmp_path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_WITH_A_WORKER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )  # fmt: skip
    assert first.stdout.readline().strip() == "locked"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert run_lock.take(str(tmp_path)) is None  # once the worker is gone, not "in use by pid <dead>"
