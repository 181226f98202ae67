#!/usr/bin/env python3
"""Shards benchmark: WebDataset shards (--train_shards) against the COCO zips, on the same images.

    python benchmarks/bench_shards.py                      # data + tiny model made once under .cache/bench-shards
    python benchmarks/bench_shards.py --images 1000 --workers 2

Prints:
  (0) raw samples/s (tar read + key grouping, no decoding) of the two maintained readers, one process: the
      ``webdataset`` package (what clip_train/data/shard_stream.py uses) and datasets' streaming ``webdataset`` builder
      (image column left undecoded), for the library choice;
  (a) samples/s of ONE loader process producing training samples (decode + resize/crop + tokenise): from the
      shards (ShardStream, shuffle buffer 1000, timed after its first fill) vs on the fly from the COCO zips (the
      --image_cache False path, random access in the zip, captions tokenised beforehand);
  (b) end-to-end train samples/s of run_clip.py, tiny clip-roberta (image 224), batch 64, 1 epoch: --train_shards
      with N loader workers vs the decoded-image cache (warm: built by a first run, its build time shown apart),
      and (c) the peak RSS of each run's process tree.

The data: demo-format COCO folder, 640x480 JPEGs, 5 COCO-length captions each, written to shards of 500 samples.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from bench_input import (  # noqa: E402
    TINY,
    describe_machine,
    lengthen_captions,
    load,
    random_model,
    run_config,
)

from clip_train import demo  # noqa: E402
from clip_train.data.coco import load_coco_split  # noqa: E402
from clip_train.shards import write_shards  # noqa: E402

IMAGE_SIZE = 224


def prepare(root: str, n_train: int) -> dict[str, str]:
    paths = {k: os.path.join(root, k) for k in ("coco", "tiny", "shards")}
    if not os.path.isfile(os.path.join(root, "READY")):
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        print(f"making the benchmark data, shards and model in {root} (once) ...", flush=True)
        captions = demo.write_coco(paths["coco"], n_train, 100, image_size=(640, 480), grain=10.0)
        _, text_dir = demo.write_tiny_towers(os.path.join(root, "towers"), captions)
        random_model(paths["tiny"], text_dir, **TINY)
        lengthen_captions(paths["coco"], text_dir)
        write_shards(load_coco_split(paths["coco"], "train").columns, paths["shards"], 500)
        with open(os.path.join(root, "READY"), "w") as f:
            f.write("ok\n")
    return paths


def bench_readers(urls: list[str], limit: int) -> dict[str, float]:
    """(0): raw samples/s of webdataset and of datasets' streaming webdataset builder, one process."""
    from clip_train.data.shard_stream import read_samples

    found = {}
    t = time.perf_counter()
    n = sum(1 for _, _ in zip(range(limit), read_samples(urls, print), strict=False))
    found["webdataset"] = n / (time.perf_counter() - t)
    try:
        import datasets

        t = time.perf_counter()
        ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
        ds = ds.cast_column("jpg", datasets.Image(decode=False))
        n = sum(1 for _, _ in zip(range(limit), ds, strict=False))
        found["datasets streaming"] = n / (time.perf_counter() - t)
    except Exception as e:  # report, do not fail the benchmark
        print(f"    datasets streaming webdataset: {type(e).__name__}: {e}", flush=True)
    return found


def bench_worker(paths: dict[str, str], limit: int, repeat: int) -> dict[str, list[float]]:
    """(a): one process making training samples from the shards vs from the zips on the fly, alternating
    ``repeat`` times (a shared machine's load moves a lot between two measurements)."""
    from collections import Counter

    import numpy as np
    from transformers import AutoTokenizer

    from clip_train.data.dataset import build_dataset
    from clip_train.data.shard_stream import SampleFormat, ShardStream, StreamConfig

    tok = AutoTokenizer.from_pretrained(paths["tiny"])
    urls = sorted(glob.glob(os.path.join(paths["shards"], "*.tar")))
    rows = load_coco_split(paths["coco"], "train").columns
    found: dict[str, list[float]] = {"shards": [], "zips on the fly": []}
    with tempfile.TemporaryDirectory() as tmp:
        ds, _, _ = build_dataset(rows["caption"], rows["image_path"], tok, image_size=IMAGE_SIZE, max_len=128,
                                 use_cache=False, cache_dir=tmp, num_proc=None, overwrite_cache=False,
                                 skipped=Counter())  # fmt: skip
        for seed in range(repeat):
            config = StreamConfig(num_samples=limit + 1, batch_size=1, world=1, rank=0, workers=1, seed=seed,
                                  shuffle_buffer=1000)  # fmt: skip
            stream = ShardStream(urls, SampleFormat(("jpg",), "txt", tok, 128, IMAGE_SIZE), config)
            samples = iter(stream)
            next(samples)  # steady state: the shuffle buffer's first fill (1000 raw samples) is start-up
            t = time.perf_counter()
            n = sum(1 for _ in samples)
            found["shards"].append(n / (time.perf_counter() - t))
            order = np.random.default_rng(seed).permutation(len(ds))[:limit]
            t = time.perf_counter()
            for i in order:
                ds[int(i)]["pixel_values"].shape  # noqa: B018 (decode)
            found["zips on the fly"].append(len(order) / (time.perf_counter() - t))
    return found


def train_args(paths: dict[str, str], out: str, cache_dir: str, extra: list[str]) -> list[str]:
    return [
        "--output_dir", out, "--model_name_or_path", paths["tiny"], "--do_train", "--num_train_epochs", "1",
        "--per_device_train_batch_size=64", "--learning_rate", "5e-4", "--skip_steps", "10",
        "--dataloader_drop_last", "--image_cache_dir", cache_dir, "--report_to", "none", "--save_strategy", "no",
        "--logging_steps", "50", "--use_cpu", *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(REPO, ".cache", "bench-shards"))
    p.add_argument("--images", type=int, default=1000, help="train images (5 captions each)")
    p.add_argument("--workers", type=int, default=2, help="loader workers of the shard run")
    p.add_argument(
        "--samples", type=int, default=1500, help="samples of the one-process measurements (0), (a)"
    )
    p.add_argument("--repeat", type=int, default=3, help="alternating repeats of (a)")
    p.add_argument("--skip-train", action="store_true", help="only (0) and (a)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the training runs (0: torch's default; 1 is steadier on a busy machine)")  # fmt: skip
    a = p.parse_args(argv)
    paths = prepare(a.root, a.images)
    print(f"machine: {describe_machine()}", flush=True)
    urls = sorted(glob.glob(os.path.join(paths["shards"], "*.tar")))
    for name, rate in bench_readers(urls, a.samples).items():
        print(f"(0) raw read, {name:18s}: {rate:8.0f} samples/s (load {load()})", flush=True)
    for name, rates in bench_worker(paths, a.samples, a.repeat).items():
        print(f"(a) one loader process, {name:16s}: median {sorted(rates)[len(rates) // 2]:6.1f} samples/s "
              f"(runs: {', '.join(f'{r:.1f}' for r in rates)}; load {load()})", flush=True)  # fmt: skip
    if a.skip_train:
        return 0
    cache_dir = os.path.join(a.root, "cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    configs = [
        ("image cache, cold (builds it)", ["--data_dir", paths["coco"]]),
        ("image cache, warm", ["--data_dir", paths["coco"]]),
        (f"shards, {a.workers} workers", ["--train_shards", f"{paths['shards']}/{{00000..{len(urls) - 1:05d}}}.tar",
                                          "--dataloader_num_workers", str(a.workers)]),
    ]  # fmt: skip
    print("\n| run | train samples/s after 10 steps | train loop s | wall s | peak RSS (tree) | load |")
    print("|---|---:|---:|---:|---:|---|")
    for name, extra in configs:
        out = tempfile.mkdtemp(prefix="run-", dir=a.root)
        before = load()
        env = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}
        r = run_config(train_args(paths, out, cache_dir, extra), os.path.join(a.root, "run.log"), env)
        shutil.rmtree(out, ignore_errors=True)
        print(f"| {name} | {r['train_samples_per_second']:.1f} | {r['train_runtime']:.1f} | {r['wall_s']:.1f} | "
              f"{r['peak_rss'] / 2**30:.2f} GiB | {before} -> {load()} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
