"""The run identity in every checkpoint marker includes --accumulation_mode: resuming an accumulated run with the
other mode would change the objective silently. A real run saves a checkpoint; the rerun with the other mode
stops with one line; a marker written before the mode was recorded still resumes."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import run_clip
from clip_train.checkpoint.integrity import differences, run_identity
from clip_train.checkpoint.layout import MARKER


def argv(demo: tuple[str, str], out: str, steps: int, *extra: str) -> list[str]:
    data_dir, model_dir = demo
    return [
        "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_train",
        "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_train_samples", "16", "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "True",
        "--retrieval_eval", "False", *extra,
    ]  # fmt: skip


def test_a_resume_with_the_other_accumulation_mode_stops_with_one_line(demo, tmp_path, capfd) -> None:
    out = str(tmp_path / "out")
    assert run_clip.cli(argv(demo, out, 1)) == 0, capfd.readouterr().err[-3000:]
    marker = os.path.join(out, "checkpoint-1", MARKER)
    saved = json.load(open(marker))["run"]
    assert saved["accumulation_mode"] == "contrastive"
    capfd.readouterr()

    rc = run_clip.cli(argv(demo, out, 2, "--accumulation_mode", "mean"))
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("run_clip.py: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "--accumulation_mode contrastive then, mean now" in lines[0]

    # A marker from before the mode was recorded: nothing to compare, the run resumes as it did.
    old = json.load(open(marker))
    del old["run"]["accumulation_mode"]
    json.dump(old, open(marker, "w"))
    assert run_clip.cli(argv(demo, out, 2)) == 0, capfd.readouterr().err[-3000:]
    assert (
        json.load(open(os.path.join(out, "checkpoint-2", MARKER)))["run"]["accumulation_mode"]
        == "contrastive"
    )


class Stream(list):
    """A streamed split as run_identity sees it: its shard names and epoch length."""

    urls = ["/d/00000.tar"]
    num_samples = 4


def test_with_one_micro_batch_the_mode_is_not_part_of_the_run() -> None:
    """K = 1: both modes are the same objective, recorded as None, so the flag alone never blocks a resume."""
    split = SimpleNamespace(dataset=Stream([0] * 4), image_paths=[])

    def identity(k: int, mode: str) -> dict:
        args = SimpleNamespace(world_size=1, per_device_train_batch_size=4, gradient_accumulation_steps=k)
        return run_identity(args, "local", "m", split, accumulation_mode=mode)

    assert identity(1, "contrastive")["accumulation_mode"] is None
    assert differences(identity(1, "contrastive"), identity(1, "mean")) == []
    assert differences(identity(2, "contrastive"), identity(2, "mean")) == [
        "--accumulation_mode contrastive then, mean now"
    ]
