"""A SIGTERM during the final save: the save is finished (no file cut short), the run stops with 128 + 15 before
evaluating, nothing says "finished", and the same command run again completes the run."""

from __future__ import annotations

import json
import os

from conftest import run_py
from safetensors.torch import load_file

# TEST SEAM (a slow save): the scheduler's SIGTERM is sent at the start of the final save_model and the save then
# lingers, so the signal arrives while the final model is being written. Checkpoints (which pass their folder) are
# left alone.
SIGTERM_IN_FINAL_SAVE = """
import os, signal, sys, time
import run_clip

class SlowFinalSave(run_clip.ClipTrainer):
    def save_model(self, output_dir=None, _internal_call=False):
        if output_dir is None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)
        super().save_model(output_dir, _internal_call)

run_clip.ClipTrainer = SlowFinalSave
sys.exit(run_clip.cli(sys.argv[1:]))
"""


def two_steps(demo: tuple[str, str], out) -> list[str]:
    """A two-step run that trains, saves only at the end, and evaluates."""
    data_dir, model_dir = demo
    return [
        "--output_dir", str(out), "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_train",
        "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "8", "--max_train_samples", "16",
        "--max_eval_samples", "16", "--dataloader_num_workers", "0", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "True",
    ]  # fmt: skip


def test_sigterm_during_the_final_save_finishes_it_then_stops(demo, tmp_path) -> None:
    out = tmp_path / "out"
    args = two_steps(demo, out)
    r = run_py(["-c", SIGTERM_IN_FINAL_SAVE, *args], timeout=300)
    assert r.returncode == 128 + 15, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("run_clip.py:")]
    assert len(lines) == 1 and "stopped by SIGTERM during the final save, after finishing it" in lines[0], (
        lines
    )
    assert "logit_scale" in load_file(out / "model.safetensors")  # whole: it loads
    assert (out / "config.json").is_file() and (out / "train_results.json").is_file()
    assert not (out / "all_results.json").exists() and not (out / "eval_results.json").exists()
    # What the launcher does next: the same command again. It is not taken for a finished run and completes.
    r = run_py(["run_clip.py", *args], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_loss" in results and "train_samples_per_second" in results
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# TEST SEAM: the scheduler's SIGTERM arrives during the last training step (the Trainer then saves and leaves
# train() without a pre-emption stop, since no step is left to stop at).
SIGTERM_IN_LAST_STEP = """
import os, signal, sys
import run_clip

class LastStepSignal(run_clip.ClipTrainer):
    def training_step(self, *args, **kwargs):
        if self.state.global_step == self.state.max_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(*args, **kwargs)

run_clip.ClipTrainer = LastStepSignal
sys.exit(run_clip.cli(sys.argv[1:]))
"""


def test_sigterm_in_the_last_step_stops_after_the_final_save(demo, tmp_path) -> None:
    """Not lost: the run saves the final model whole and stops with 128 + 15 instead of evaluating on."""
    out = tmp_path / "out"
    args = two_steps(demo, out)
    r = run_py(["-c", SIGTERM_IN_LAST_STEP, *args], timeout=300)
    assert r.returncode == 128 + 15, r.stderr[-3000:]
    assert "logit_scale" in load_file(out / "model.safetensors")
    assert not (out / "all_results.json").exists() and not (out / "eval_results.json").exists()
