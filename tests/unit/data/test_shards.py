"""Training from WebDataset shards written by clip_train.shards from the demo COCO folder: real tars, real runs
(torchrun with 2 gloo ranks x 2 loader workers), a real kill -9 and resume; the sample keys of every trained batch
come from the stream's key log (CLIP_SHARD_KEY_LOG)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter

import psutil
import pytest
import webdataset as wds
from conftest import REPO, run_py

from clip_train.checkpoint.layout import complete_checkpoints
from clip_train.data.coco import load_coco_split
from clip_train.data.shard_reader import shard_sizes
from clip_train.data.shard_stream import SampleFormat, ShardStream, StreamConfig, read_samples
from clip_train.errors import DataError
from clip_train.shards import write_shards


@pytest.fixture(scope="module")
def shards(demo, tmp_path_factory) -> dict:
    """8 train shards of 100 samples (800 caption rows of 160 images), 4 validation shards of 50; and the same
    train rows cut to 750 over 8 uneven shards (7 x 94 + 92)."""
    data_dir, model_dir = demo
    root = tmp_path_factory.mktemp("shards")
    train = load_coco_split(data_dir, "train", "2017").columns
    val = load_coco_split(data_dir, "validation", "2017").columns
    write_shards(train, str(root / "train"), 100)
    write_shards(val, str(root / "val"), 50)
    write_shards({k: v[:750] for k, v in train.items()}, str(root / "uneven"), 94)
    return {"root": root, "data_dir": data_dir, "model": model_dir, "train": train}


def train_args(shards: dict, out: str, pattern: str, *extra: str) -> list[str]:
    return [
        "run_clip.py", "--output_dir", out, "--model_name_or_path", shards["model"], "--train_shards", pattern,
        "--do_train", "--per_device_train_batch_size", "8", "--dataloader_num_workers", "2",
        "--num_train_epochs", "1", "--learning_rate", "1e-3", "--logging_steps", "5", "--report_to", "none",
        "--save_minutes", "0", "--use_cpu", *extra,
    ]  # fmt: skip


def torchrun(world: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(port)]


def key_log(prefix: str, rank: int = 0) -> list[tuple[int, list[str]]]:
    with open(f"{prefix}.rank{rank}") as f:
        return [(int(e), keys.split()) for e, keys in (line.rstrip("\n").split(" ", 1) for line in f)]


def test_writer_writes_img2dataset_layout(shards):
    folder = shards["root"] / "train"
    assert json.load(open(folder / "sizes.json")) == {f"{i:05d}.tar": 100 for i in range(8)}
    assert json.load(open(folder / "00003_stats.json"))["successes"] == 100
    with tarfile.open(folder / "00000.tar") as t:
        names = t.getnames()
        assert names[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
        meta = json.load(t.extractfile("000000000.json"))
        assert t.extractfile("000000000.txt").read().decode() == shards["train"]["caption"][0]
    assert meta["image_id"] == shards["train"]["image_id"][0] and meta["key"] == "000000000"
    # CLI too, from a csv file: one clear error for a bad source
    r = run_py(["-m", "clip_train.shards", "--data_dir", "/nonexistent", "--out", str(shards["root"] / "x")])
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_too_few_shards_or_samples_is_a_clear_error(shards):
    urls = [str(shards["root"] / "val" / f"{i:05d}.tar") for i in range(4)]
    fmt = SampleFormat(("jpg",), "txt", tokenizer=None, max_len=16, image_size=32)
    common = dict(seed=0, shuffle_buffer=10, rank=0)
    with pytest.raises(DataError, match="every stream needs at least one shard"):
        ShardStream(urls, fmt, StreamConfig(batch_size=8, world=2, workers=4, num_samples=200, **common))
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardStream(urls, fmt, StreamConfig(batch_size=64, world=2, workers=2, num_samples=100, **common))


def test_a_shard_cut_between_members_is_caught_by_its_sizes_file(shards, tmp_path):
    """tarfile reads a tar cut inside a member's header as a complete, shorter one: the sizes file tells."""
    write_shards({k: v[:200] for k, v in shards["train"].items()}, str(tmp_path), 50)
    urls = [str(tmp_path / f"{i:05d}.tar") for i in range(4)]
    with tarfile.open(urls[1]) as t:
        cut = t.getmember("000010010.jpg").offset + 100  # inside the 11th sample's first header
    data = open(urls[1], "rb").read()
    open(urls[1], "wb").write(data[:cut])
    errors = []
    samples = list(read_samples(urls, lambda url, e: errors.append((url, str(e)))))
    assert len(samples) == 160 and errors == []  # unnoticed without sizes
    samples = list(read_samples(urls, lambda url, e: errors.append((url, str(e))), shard_sizes(urls)))
    assert len(samples) == 160 and errors == [
        (urls[1], "10 samples where its sizes file lists 50: cut short")
    ]


@pytest.mark.parametrize("kind", ["even", "uneven"])
def test_two_ranks_two_workers_see_each_sample_once_and_take_equal_steps(shards, tmp_path, kind):
    """Even: 800 samples over 4 streams of 2 shards = 50 batches of 8 a rank, every key exactly once. Uneven:
    750 samples -> 46 batches a rank on both ranks; a stream short of its quota reads its shards again; no hang."""
    folder = shards["root"] / ("train" if kind == "even" else "uneven")
    log = str(tmp_path / "keys")
    cmd = torchrun(2) + train_args(shards, str(tmp_path / "out"), f"{folder}/{{00000..00007}}.tar")
    r = run_py(cmd, timeout=400, env={"CLIP_SHARD_KEY_LOG": log, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [key_log(log, rank) for rank in (0, 1)]
    steps = 50 if kind == "even" else 750 // 16
    assert [len(x) for x in ranks] == [steps, steps]
    keys = Counter(k for rank in ranks for _, batch in rank for k in batch)
    assert all(len(batch) == 8 for rank in ranks for _, batch in rank)
    if kind == "even":
        assert len(keys) == 800 and set(keys.values()) == {1}
    else:
        assert sum(keys.values()) == 2 * steps * 8 and len(keys) <= 750
    results = json.load(open(tmp_path / "out" / "all_results.json"))
    assert results["train_timed_steps"] == steps


def write_bad_tar(path: str, jpg: bytes) -> None:
    """4 bad samples (one of each kind) and 4 good ones."""
    with wds.TarWriter(path) as w:
        w.write({"__key__": "b0", "jpg": b"not a jpeg at all", "txt": "a caption"})  # undecodable
        w.write({"__key__": "b1", "txt": "a caption without image"})  # only the caption file
        w.write({"__key__": "b2", "jpg": jpg})  # only the image file
        w.write({"__key__": "b3", "jpg": jpg, "txt": "   "})  # empty caption
        for i in range(4):
            w.write({"__key__": f"g{i}", "jpg": jpg, "txt": f"good caption {i}"})


def plant_bad_shards(shards: dict, folder) -> int:
    """Two good shards, one shard of planted bad samples among good ones, one good shard cut inside its 21st
    sample's image (a download cut short). Returns the number of usable samples."""
    os.makedirs(folder)
    train = shards["train"]
    rows = {k: v[:200] for k, v in train.items()}
    write_shards(rows, str(folder / "good"), 50)  # 4 shards: 00000-00003
    good = [str(folder / "good" / f"{i:05d}.tar") for i in range(4)]
    write_bad_tar(str(folder / "bad.tar"), next(s for s in read_samples(good[:1], print))["jpg"])
    with tarfile.open(good[3]) as t:
        cut = t.getmember("000030020.jpg").offset + 512 + 100  # inside the image's bytes
    data = open(good[3], "rb").read()
    open(folder / "cut.tar", "wb").write(data[:cut])
    os.remove(good[3])
    return 3 * 50 + 4 + 20


def test_bad_samples_and_a_truncated_shard_are_counted_and_skipped(shards, tmp_path):
    usable = plant_bad_shards(shards, tmp_path / "planted")
    pattern = f"{tmp_path}/planted/good/{{00000..00002}}.tar::{tmp_path}/planted/bad.tar::{tmp_path}/planted/cut.tar"
    out = tmp_path / "out"
    # One stream, batch 2, two samples more than the usable ones: the stream draws every raw sample once (and meets
    # the cut), then starts its shards again for 2 more good samples; bad.tar may come first in that second pass.
    args = train_args(
        shards, str(out), pattern, "--train_num_samples", str(usable + 2), "--shuffle_buffer", "0"
    )
    args[args.index("--per_device_train_batch_size") + 1] = "2"
    args[args.index("--dataloader_num_workers") + 1] = "1"
    r = run_py(args, timeout=400, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.load(open(out / "all_results.json"))
    skipped = {
        k: v
        for k, v in results.items()
        if k.startswith("train_skipped_") and k != "train_skipped_nonfinite_steps"
    }
    assert skipped.pop("train_skipped_corrupt_shards") == 1, skipped
    kinds = ("undecodable_image", "missing_image", "missing_caption", "empty_caption")
    assert set(skipped) == {f"train_skipped_{k}" for k in kinds}, skipped
    assert set(skipped.values()) in ({1}, {2}), skipped
    assert results["train_timed_steps"] == usable // 2 + 1
    assert "cut.tar" in r.stderr and "the rest of it is skipped" in r.stderr


def test_retrieval_from_validation_shards_equals_the_coco_folder(shards, tmp_path):
    """Also with --max_eval_samples (the first 120 of the 200 validation rows), which both paths honour."""
    found = {}
    for name, source in (("shards", ["--validation_shards", f"{shards['root']}/val/{{00000..00003}}.tar"]),
                         ("coco", ["--data_dir", shards["data_dir"]])):  # fmt: skip
        out = tmp_path / name
        r = run_py(["run_clip.py", "--output_dir", str(out), "--model_name_or_path", shards["model"], "--do_eval",
                    "--per_device_eval_batch_size", "16", "--max_eval_samples", "120", "--report_to", "none",
                    "--use_cpu", *source])  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        found[name] = json.load(open(out / "eval_results.json"))
    assert found["shards"]["eval_samples"] == found["coco"]["eval_samples"] == 120
    wanted = ("eval_loss", "eval_retrieval_images")
    keys = [k for k in found["coco"] if "R@" in k or "rank" in k or k in wanted]
    assert len(keys) > 10
    assert {k: found["shards"][k] for k in keys} == {k: found["coco"][k] for k in keys}


def test_kill_mid_epoch_then_rerun_continues_with_exactly_the_uninterrupted_batches(shards, tmp_path):
    """The 8 train shards + one with 4 bad samples among 4 good ones, 392 samples an epoch (49 batches of 8 from
    2 loader workers, each with shards enough for its share), 2 epochs, a checkpoint every 5 steps; killed in
    epoch 2 after step 61. Samples were skipped before the checkpoint: the saved per-worker progress, not the step
    count, is what makes the resume exact."""
    write_bad_tar(
        str(tmp_path / "bad.tar"), next(read_samples([f"{shards['root']}/train/00000.tar"], print))["jpg"]
    )
    pattern = f"{shards['root']}/train/{{00000..00007}}.tar::{tmp_path}/bad.tar"
    extra = ["--num_train_epochs", "2", "--save_steps", "5", "--train_num_samples", "392"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs, procs = {}, {}
    for name in ("reference", "killed"):
        logs[name] = str(tmp_path / f"keys-{name}")
        procs[name] = subprocess.Popen([sys.executable, *train_args(shards, str(tmp_path / name), pattern, *extra)],
                                       cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.err", "w"),
                                       env={**env, "CLIP_SHARD_KEY_LOG": logs[name]})  # fmt: skip
    deadline = time.monotonic() + 300
    killed = procs["killed"]
    while not (os.path.exists(logs["killed"] + ".rank0") and len(key_log(logs["killed"])) > 61):
        err = tmp_path / "killed.err"
        assert killed.poll() is None and time.monotonic() < deadline, err.read_text()[-3000:]
        time.sleep(0.05)
    below = psutil.Process(killed.pid).children(recursive=True)
    killed.send_signal(signal.SIGKILL)
    for p in below:
        p.send_signal(signal.SIGKILL)
    killed.wait(60)
    last = complete_checkpoints(str(tmp_path / "killed"))[-1]
    resumed_at = int(last.rsplit("-", 1)[1])
    assert 49 < resumed_at < 98
    saved = json.load(open(os.path.join(last, "shard_stream-rank0.json")))
    assert sum(saved["emitted"]) > saved["batches"] * 8 and saved["skipped"]  # skips before the checkpoint
    before = key_log(logs["killed"])[:resumed_at]
    os.rename(logs["killed"] + ".rank0", logs["killed"] + ".first.rank0")
    args = train_args(shards, str(tmp_path / "killed"), pattern, *extra)
    rerun = run_py(args, timeout=400, env={"OMP_NUM_THREADS": "1", "CLIP_SHARD_KEY_LOG": logs["killed"]})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"shard stream resumes epoch 1 after {resumed_at - 49} of its 49 batches" in rerun.stderr
    assert procs["reference"].wait(300) == 0
    reference, after = key_log(logs["reference"]), key_log(logs["killed"])
    assert len(reference) == 98 and len(after) == 98 - resumed_at
    # The same batches in the same order: nothing repeated, nothing skipped.
    assert before + after == reference
    for epoch in (0, 1):
        keys = Counter(k for e, batch in before + after if e == epoch for k in batch)
        assert sum(keys.values()) == 392 and set(keys.values()) == {1}
    # The skip counts cover the whole run, the part before the kill included.
    results = [json.load(open(tmp_path / name / "all_results.json")) for name in ("reference", "killed")]
    skips = [{k: v for k, v in r.items() if "skipped" in k} for r in results]
    assert skips[0] == skips[1] and skips[0]
