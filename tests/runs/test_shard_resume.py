"""Shard runs that stop and go on (issue 25): real shards written from the demo COCO folder, real run_clip.py runs.

- gradient accumulation over an epoch whose batches are not a multiple of K, resumed mid-epoch: the same steps and
  weights as the uninterrupted run;
- a SIGTERM'd run (the pre-emption checkpoint) resumes without repeating a sample, skip counts kept;
- a wrong key, or shards whose images all fail to decode, stop with one line instead of looping forever.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import webdataset as wds
from conftest import REPO, run_py
from safetensors.torch import load_file

from clip_train.checkpoint.layout import complete_checkpoints
from clip_train.data.coco import load_coco_split
from clip_train.data.shard_stream import read_samples
from clip_train.shards import write_shards


@pytest.fixture(scope="module")
def shards(demo, tmp_path_factory) -> dict:
    """Two shards of 100 demo samples; one of 8 samples, 4 of them bad (no image, no caption, empty caption,
    undecodable image); two of 20 samples whose images are all undecodable."""
    data_dir, model_dir = demo
    root = tmp_path_factory.mktemp("shard-resume")
    train = load_coco_split(data_dir, "train", "2017").columns
    write_shards({k: v[:200] for k, v in train.items()}, str(root / "good"), 100)
    jpg = next(read_samples([str(root / "good" / "00000.tar")], print))["jpg"]
    with wds.TarWriter(str(root / "bad.tar")) as w:
        w.write({"__key__": "b0", "jpg": b"not a jpeg at all", "txt": "a caption"})
        w.write({"__key__": "b1", "txt": "a caption without image"})
        w.write({"__key__": "b2", "jpg": jpg})
        w.write({"__key__": "b3", "jpg": jpg, "txt": "   "})
        for i in range(4):
            w.write({"__key__": f"g{i}", "jpg": jpg, "txt": f"good caption {i}"})
    os.makedirs(root / "undecodable")
    for s in range(2):
        with wds.TarWriter(str(root / "undecodable" / f"{s:05d}.tar")) as w:
            for i in range(20):
                w.write({"__key__": f"u{s}_{i}", "jpg": b"\xff\xd8 cut", "txt": f"caption {i}"})
    return {"root": root, "model": model_dir}


def train_args(shards: dict, out, pattern: str, *extra: str) -> list[str]:
    return [
        "run_clip.py", "--output_dir", str(out), "--model_name_or_path", shards["model"], "--train_shards", pattern,
        "--do_train", "--per_device_train_batch_size", "4", "--dataloader_num_workers", "1", "--num_train_epochs",
        "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--save_minutes", "0",
        "--seed", "7", "--use_cpu", *extra,
    ]  # fmt: skip


def key_log(prefix: str) -> list[tuple[int, list[str]]]:
    with open(f"{prefix}.rank0") as f:
        return [(int(e), keys.split()) for e, keys in (line.rstrip("\n").split(" ", 1) for line in f)]


def test_accumulated_run_resumed_mid_epoch_ends_with_the_uninterrupted_steps_and_weights(shards, tmp_path):
    """K = 2 over 9 batches an epoch (36 samples, batch 4): 5 optimizer steps an epoch, the last one of a single
    batch; 2 epochs = 10 steps. The run resumed from its step-2 checkpoint (what a kill after step 2 leaves) must
    take the epoch's last step too: 10 steps, the same losses and weights, the epoch never going backwards."""
    pattern = f"{shards['root']}/good/{{00000..00001}}.tar"
    extra = ["--gradient_accumulation_steps", "2", "--train_num_samples", "36", "--save_steps", "2",
             "--save_total_limit", "0"]  # fmt: skip
    ref, resumed = tmp_path / "reference", tmp_path / "resumed"
    env = {"OMP_NUM_THREADS": "1", "CLIP_SHARD_KEY_LOG": str(tmp_path / "keys-ref")}
    r = run_py(train_args(shards, ref, pattern, *extra), timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    os.makedirs(resumed)
    shutil.copytree(ref / "checkpoint-2", resumed / "checkpoint-2")
    env["CLIP_SHARD_KEY_LOG"] = str(tmp_path / "keys-resumed")
    r = run_py(train_args(shards, resumed, pattern, *extra), timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shard stream resumes epoch 0 after 4 of its 9 batches" in r.stderr

    states = [json.load(open(out / "trainer_state.json")) for out in (ref, resumed)]
    assert states[0]["global_step"] == states[1]["global_step"] == 10
    assert key_log(str(tmp_path / "keys-ref"))[4:] == key_log(str(tmp_path / "keys-resumed"))
    logged = [{h["step"]: h for h in s["log_history"] if "loss" in h} for s in states]
    assert sorted(logged[1]) == list(range(1, 11))  # steps 1-2 from the checkpoint's history
    for step, h in logged[1].items():
        assert h["loss"] == pytest.approx(logged[0][step]["loss"], rel=1e-5, abs=1e-6), step
        assert h["epoch"] == pytest.approx(logged[0][step]["epoch"])
    epochs = [h["epoch"] for h in logged[1].values()]
    assert epochs == sorted(epochs) and epochs[-1] == pytest.approx(2.0)
    weights = [load_file(str(out / "model.safetensors")) for out in (ref, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6, msg=name)

    # --ignore_data_skip: as with a dataset, the resumed epoch starts over (its first batches again).
    again = tmp_path / "again"
    shutil.copytree(ref / "checkpoint-2", again / "checkpoint-2")
    env["CLIP_SHARD_KEY_LOG"] = str(tmp_path / "keys-again")
    r = run_py(train_args(shards, again, pattern, *extra, "--ignore_data_skip", "--max_steps", "4"), timeout=400,
               env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the shard stream starts epoch 0 over" in r.stderr
    assert key_log(str(tmp_path / "keys-again")) == key_log(str(tmp_path / "keys-ref"))[:4]


def test_sigterm_then_rerun_repeats_no_sample_and_keeps_the_skip_counts(shards, tmp_path):
    """2 epochs of 40 batches over 204 usable samples (4 bad ones among them); SIGTERM in epoch 2. Only the
    pre-emption decides a save here: its checkpoint must hold the stream's progress, or the rerun replays the
    wrong raw samples (skips happened before it) and loses the skip counts."""
    pattern = f"{shards['root']}/good/{{00000..00001}}.tar::{shards['root']}/bad.tar"
    extra = ["--train_num_samples", "160", "--save_steps", "100000"]
    out, log = tmp_path / "out", str(tmp_path / "keys")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIP_SHARD_KEY_LOG": log}
    p = subprocess.Popen([sys.executable, *train_args(shards, out, pattern, *extra)], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.err", "w"))  # fmt: skip
    deadline = time.monotonic() + 300
    while not (os.path.exists(log + ".rank0") and len(key_log(log)) > 50):
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "first.err").read_text()[-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    assert p.wait(120) == 128 + signal.SIGTERM, (tmp_path / "first.err").read_text()[-3000:]
    (last,) = complete_checkpoints(str(out))
    stopped = int(last.rsplit("-", 1)[1])
    assert 40 < stopped < 80
    saved = json.load(open(os.path.join(last, "shard_stream-rank0.json")))
    assert saved["skipped"] and saved["batches"] == stopped - 40
    before = key_log(log)[:stopped]
    os.rename(log + ".rank0", log + ".first.rank0")
    r = run_py(train_args(shards, out, pattern, *extra), timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    after = key_log(log)
    assert len(before) + len(after) == 80
    for epoch in (0, 1):
        keys = Counter(k for e, batch in before + after if e == epoch for k in batch)
        assert sum(keys.values()) == 160 and set(keys.values()) == {1}, keys.most_common(3)
    results = json.load(open(out / "all_results.json"))
    skips = {k: v for k, v in results.items() if k.startswith("train_skipped_") and "nonfinite" not in k}
    assert sum(skips.values()) >= sum(saved["skipped"].values()) > 0


@pytest.mark.parametrize("case", ["wrong-caption-key", "all-undecodable"])
def test_input_without_a_usable_sample_stops_within_seconds_with_one_line(shards, tmp_path, case):
    if case == "wrong-caption-key":
        pattern, extra = f"{shards['root']}/good/{{00000..00001}}.tar", ["--caption_key", "caption"]
        want = "none of the first 50 samples has a file for --caption_key caption; their keys (samples): jpg (50)"
    else:
        pattern, extra = f"{shards['root']}/undecodable/{{00000..00001}}.tar", []
        want = "gave no usable sample (skipped: {'undecodable_image': 40})"
    t0 = time.monotonic()
    r = run_py(train_args(shards, tmp_path / "out", pattern, "--train_num_samples", "40", *extra), timeout=120,
               env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("run_clip.py: error: ") and want in errors[0], r.stderr[
        -3000:
    ]
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 90
