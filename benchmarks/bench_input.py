#!/usr/bin/env python3
"""Input-path benchmark: the fast path of run_clip.py against its reference mode, in one run.

    python benchmarks/bench_input.py                   # data + models made once under .cache/bench
    python benchmarks/bench_input.py --root /tmp/b --models tiny

Prints a markdown table:
  (a) images/s of the cold decoded-image cache build vs the on-the-fly decode path (same worker count);
  (b) train samples/s of run_clip.py: tiny clip-roberta (image 224) for 2 epochs, and full-size random-init
      clip-roberta shapes (ViT-B/32 + roberta-base) for a few steps, batch 64, fast path vs reference mode
      (``--image_cache False --pad_to_max_length``: every image decoded per caption and every caption padded to
      128, as upstream; the rest of the input path is shared, see benchmarks/README.md);
  (c) the peak memory of each run's whole process tree (main process + loader workers), sampled every 0.2 s.

Each configuration is a subprocess of run_clip.py; its figures come from the run's all_results.json.
The data: demo-format COCO folder, 2,000 train images at 640x480 (JPEGs of photo-like size), 10,000 captions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from clip_train import demo  # noqa: E402
from clip_train.data import images  # noqa: E402
from clip_train.data.coco import load_coco_split  # noqa: E402
from clip_train.data.dataset import image_table  # noqa: E402

IMAGE_SIZE = 224
REFERENCE = ["--image_cache", "False", "--pad_to_max_length"]
# --breakdown: each half of the fast path on its own, and the fast path with the recipe's 2 loader workers (on CPU
# run_clip.py reads cached batches in the training process when no worker count is given), tiny model.
HALVES = [("cache only", ["--pad_to_max_length"]), ("padding only", ["--image_cache", "False"]),
          ("fast, 2 workers", ["--dataloader_num_workers", "2"])]  # fmt: skip


# --- data and models, made once ---------------------------------------------------------------------------------
def prepare(root: str, n_train: int) -> dict[str, str]:
    """The benchmark's COCO folder, a tiny clip-roberta and full-size random-init clip-roberta shapes."""
    paths = {k: os.path.join(root, k) for k in ("coco", "tiny", "full")}
    if not os.path.isfile(os.path.join(root, "READY")):
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        print(f"making the benchmark data and models in {root} (once) ...", flush=True)
        captions = demo.write_coco(paths["coco"], n_train, 100, image_size=(640, 480), grain=10.0)
        _, text_dir = demo.write_tiny_towers(os.path.join(root, "towers"), captions)  # for its tokenizer
        random_model(paths["tiny"], text_dir, **TINY)
        random_model(paths["full"], text_dir, **FULL)
        lengthen_captions(paths["coco"], text_dir)
        with open(os.path.join(root, "READY"), "w") as f:
            f.write("ok\n")
    return paths


def random_model(out: str, tokenizer_dir: str, vision: dict, text: dict, projection_dim: int) -> None:
    """A random-init clip-roberta of the given tower shapes, with the demo's tokenizer and a 224 image processor."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        RobertaConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = dict(text)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=32, **vision),
        RobertaConfig(vocab_size=max(len(tok), text.pop("vocab_size", 0)), type_vocab_size=1, layer_norm_eps=1e-5,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, **text),
        projection_dim=projection_dim,
    )  # fmt: skip
    VisionTextDualEncoderModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    size = {"shortest_edge": IMAGE_SIZE}
    CLIPImageProcessor(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)


# Tiny: the demo's tower sizes with ViT-B/32's patching. Full: ViT-B/32 and roberta-base (CLIPVisionConfig's and
# RobertaConfig's defaults are those shapes); only the tokenizer is the demo's.
TINY = {"vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 130},
        "projection_dim": 32}  # fmt: skip
FULL = {"vision": {}, "text": {"vocab_size": 50265, "max_position_embeddings": 514}, "projection_dim": 512}


def lengthen_captions(data_dir: str, tokenizer_dir: str, seed: int = 0) -> None:
    """Give the captions COCO-like token lengths (the padding saving depends on them).

    The demo's captions are 5-10 tokens; COCO's, with roberta-base's tokenizer, average ~14 with a tail past 30,
    so a batch of 64 pads to 24-32. Each caption gets descriptive phrases appended up to a length drawn from
    N(12.5, 3) (2% get 5-20 more), using the words the tiny tokenizer was trained on.
    """
    import random
    import zipfile

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(seed)
    ann_zip = os.path.join(data_dir, "annotations_trainval2017.zip")
    with zipfile.ZipFile(ann_zip) as z:
        files = {n: json.loads(z.read(n)) for n in z.namelist()}
    for ann in files.values():
        for a in ann["annotations"]:
            target = max(8, round(rng.gauss(12.5, 3.0))) + (rng.randint(5, 20) if rng.random() < 0.02 else 0)
            caption = a["caption"]
            while len(tok(caption)["input_ids"]) < target:
                colour, shape = rng.choice(list(demo.COLOURS)), rng.choice(demo.SHAPES)
                caption += rng.choice([f" next to a {colour} {shape}", " in the picture", f" and a {shape}",
                                       f" on a {rng.choice(list(demo.BACKGROUNDS))} background"])  # fmt: skip
            a["caption"] = caption
    tmp = ann_zip + ".tmp"
    with zipfile.ZipFile(tmp, "w") as z:
        for name, ann in files.items():
            z.writestr(name, json.dumps(ann))
    os.replace(tmp, ann_zip)


# --- (a) decoding -----------------------------------------------------------------------------------------------
def _decode_one(path: str) -> int:
    return images.load_image(path, IMAGE_SIZE).shape[0]


def bench_decode(data_dir: str, cache_dir: str, workers: int) -> dict[str, float]:
    """Cold cache build (into an empty folder) vs decoding the same images on the fly with as many processes."""
    unique, _ = image_table(load_coco_split(data_dir, "train").columns["image_path"])
    shutil.rmtree(cache_dir, ignore_errors=True)
    t = time.perf_counter()
    images.build_cache(unique, IMAGE_SIZE, cache_dir, workers=workers)
    build = len(unique) / (time.perf_counter() - t)
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        sum(pool.map(_decode_one, unique, chunksize=16))
    fly = len(unique) / (time.perf_counter() - t)
    return {"images": len(unique), "build": build, "fly": fly}


# --- (b), (c) training runs -------------------------------------------------------------------------------------
def _tree_memory(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over a process and all its descendants, from /proc/*/smaps_rollup."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def run_config(args: list[str], log_path: str, env: dict[str, str]) -> dict:
    """Run run_clip.py with ``args`` and watch its process tree's memory; returns all_results.json + peaks."""
    peak = {"rss": 0, "pss": 0}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        cmd = [sys.executable, "run_clip.py", *args]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, env={**os.environ, **env})
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                rss, pss = _tree_memory(proc.pid)
                peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
                done.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rc = proc.wait()
        done.set()
        watcher.join()
    if rc != 0:
        with open(log_path) as f:
            raise RuntimeError(f"run_clip.py failed ({rc}); end of {log_path}:\n{f.read()[-3000:]}")
    out = args[args.index("--output_dir") + 1]
    with open(os.path.join(out, "all_results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "trainer_state.json")) as f:
        steps = json.load(f)["global_step"]
    batch = int(next(x.split("=")[1] for x in args if x.startswith("--per_device_train_batch_size=")))
    return {**results, "steps": steps, "samples": steps * batch, "wall_s": time.perf_counter() - t0,
            "peak_rss": peak["rss"], "peak_pss": peak["pss"]}  # fmt: skip


def train_args(
    data_dir: str, model_dir: str, out: str, cache_dir: str, workers: int | None, extra: list[str]
) -> list:
    """The recipe's command line (demo.recipe_args) without evaluation, sized by ``extra``.

    ``workers``: loader workers of both modes; None leaves the count to run_clip.py, which picks it for the input
    path (on CPU: none with the image cache, one per core when decoding on the fly).
    """
    args = demo.recipe_args(data_dir, model_dir, out)
    args.remove("--do_eval")
    i = args.index("--dataloader_num_workers")
    del args[i : i + 2]
    if workers is not None:
        args += ["--dataloader_num_workers", str(workers)]
    args += ["--image_cache_dir", cache_dir, "--report_to", "none"]
    args += ["--save_strategy", "no", "--logging_steps", "50"]
    return args + extra


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil
    import torch

    return (
        f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(REPO, ".cache", "bench"), help="data, models, caches, logs")
    p.add_argument("--images", type=int, default=2000, help="train images (5 captions each)")
    p.add_argument("--workers", type=int, help="loader workers of every run (default: run_clip.py's choice)")
    p.add_argument("--build-processes", type=int, default=2, help="processes of the decode comparison (a)")
    p.add_argument("--epochs", type=float, default=2, help="epochs of the tiny model, fast path")
    p.add_argument("--reference-epochs", type=float, default=0.5,
                   help="epochs of the tiny model, reference mode (it has no state across epochs: its rate is "
                        "the same over 2 epochs, only slower to measure)")  # fmt: skip
    p.add_argument(
        "--full-steps", type=int, default=2, help="steps of the full-size runs (the first is not timed)"
    )
    p.add_argument("--models", default="tiny,full-size", help="which of tiny,full-size to train")
    p.add_argument("--tiny-threads", type=int, default=0,
                   help="torch threads of the tiny runs (0: torch's default, one per core, as users run it). On a "
                        "busy shared machine several threads of tiny ops wait on each other whenever one is "
                        "descheduled (step times swing several-fold with other jobs' load): 1 is steadier there")  # fmt: skip
    p.add_argument(
        "--repeat", type=int, default=1, help="runs of each mode, alternating; the table shows medians"
    )
    p.add_argument("--only", choices=["fast", "reference"], help="run only one mode (for profiling)")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also the tiny model with the cache or padding only, and the fast path with 2 loader workers",
    )
    a = p.parse_args(argv)
    paths = prepare(a.root, a.images)
    cache_dir = os.path.join(a.root, "cache")
    print(f"machine: {describe_machine()}", flush=True)
    dec = bench_decode(paths["coco"], cache_dir, a.build_processes)
    print(f"(a) {dec['images']} images, {a.build_processes} processes: cold cache build {dec['build']:.0f} img/s, "
          f"on the fly {dec['fly']:.0f} img/s (load {load()})", flush=True)  # fmt: skip

    short = ["--num_train_epochs", str(a.reference_epochs)]
    tiny = {
        "fast": ["--num_train_epochs", str(a.epochs)],
        "reference": short,
        **{h: short for h, _ in HALVES},
        "fast, 2 workers": ["--num_train_epochs", str(a.epochs)],
    }
    full = ["--max_steps", str(a.full_steps), "--skip_steps", "1"]
    configs = [("tiny", paths["tiny"], tiny), ("full-size", paths["full"], {"fast": full, "reference": full})]
    modes = [m for m in (("fast", []), ("reference", REFERENCE)) if a.only in (None, m[0])]
    runs: dict[tuple[str, str], list[dict]] = {}
    for model, model_dir, length in configs:
        if model not in a.models.split(","):
            continue
        # The modes alternate, so a change of load hits every mode alike (full-size: one run each, steps are long).
        for _ in range(a.repeat if model == "tiny" else 1):
            for mode, flags in modes + (HALVES if a.breakdown and model == "tiny" else []):
                out = tempfile.mkdtemp(prefix=f"{model}-{mode}-", dir=a.root)
                args = train_args(paths["coco"], model_dir, out, cache_dir, a.workers, length[mode] + flags)
                before = load()
                threads = (
                    {"OMP_NUM_THREADS": str(a.tiny_threads)} if model == "tiny" and a.tiny_threads else {}
                )
                r = run_config(args, os.path.join(a.root, f"{model}-{mode}.log"), threads)
                shutil.rmtree(out, ignore_errors=True)
                r["load"] = f"{before} -> {load()}"
                # End to end: every trained sample over the training loop's time, plus the cold cache build for
                # the fast path of the epoch-long runs (it decoded once what the reference decodes every epoch).
                build = dec["images"] / dec["build"] if mode.startswith("fast") and model == "tiny" else 0.0
                r["e2e"] = r["samples"] / (r["train_runtime"] + build)
                r["e2e_warm"] = r["samples"] / r["train_runtime"]  # a later run: the cache is already built
                r["length"] = f"{r['epoch']:.2g} epochs" if model == "tiny" else f"{r['steps']} steps"
                r["length"] += f", {threads.get('OMP_NUM_THREADS', 'default')} thread(s)"
                runs.setdefault((model, mode), []).append(r)
                print(f"    {model:9s} {mode:15s}: {r['train_samples_per_second']:8.2f} samples/s, peak RSS "
                      f"{r['peak_rss'] / 2**30:.2f} GiB (load {r['load']})", flush=True)  # fmt: skip
    rows = [(model, mode, median_run(rs), rs) for (model, mode), rs in runs.items()]
    print_table(rows, dec, a.build_processes)
    return 0


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["train_samples_per_second"])[(len(runs) - 1) // 2]


def print_table(rows: list[tuple], dec: dict, workers: int) -> None:
    """One line per model and mode: its median run (with --repeat, the range of samples/s over the runs)."""
    ref = {model: r for model, mode, r, _ in rows if mode == "reference"}
    print("\n| model | mode | run | samples/s after skip_steps (range) | speed-up | end-to-end samples/s, cold cache "
          "| speed-up | end-to-end, warm cache | speed-up | peak RSS, tree (GiB) | peak PSS, tree (GiB) "
          "| load 1-min (start -> end) |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for model, mode, r, every in rows:
        base = ref.get(model)
        fps, e2e = r["train_samples_per_second"], r["e2e"]
        up = f"{fps / base['train_samples_per_second']:.2f}x" if base else "-"
        up_e2e = f"{e2e / base['e2e']:.2f}x" if base else "-"
        warm = r["e2e_warm"]
        up_warm = f"{warm / base['e2e_warm']:.2f}x" if base else "-"
        each = [x["train_samples_per_second"] for x in every]
        spread = f" ({min(each):.0f}-{max(each):.0f}, {len(each)} runs)" if len(each) > 1 else ""
        print(f"| {model} | {mode} | {r['length']} | {fps:.2f}{spread} | {up} | {e2e:.2f} | {up_e2e} | {warm:.2f} | {up_warm} | "
              f"{r['peak_rss'] / 2**30:.2f} | {r['peak_pss'] / 2**30:.2f} | {r['load']} |")  # fmt: skip
    print(f"\n(a) {dec['images']} COCO-sized JPEGs, {workers} processes: cold cache build {dec['build']:.0f} "
          f"images/s; on-the-fly decode {dec['fly']:.0f} images/s. The cache decodes each image once, then every "
          f"epoch, run and rank reuses it; the on-the-fly path decodes it once per caption per epoch: "
          f"{5 * 2 * dec['images']} decodes for 2 epochs of 5 captions an image.")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
