#!/usr/bin/env python3
"""The one prepared accelerator check: run_clip.py's real input path, eager vs compiled, fp16 at 64 and bf16 at 256
and 1024, side by side with open_clip's own training app on the same data (benchmarks/peer_open_clip.py).

    python3 benchmarks/gpu_check.py --out $OUT                       # a GPU host: full-size shapes, ~9 minutes
    python3 benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gc  # tiny shapes on CPU, about a minute

1. Builds (once, under --root) a demo-format COCO folder of 224-px JPEGs with COCO-like caption lengths and a
   random-init clip-roberta: full-size (ViT-B/32 + roberta-base shapes, bench_input.py's) or tiny; then the
   decoded-image cache with every core, so every run starts with the cache warm.
2. Trains each configuration with run_clip.py in its own subprocess (its own timeout; a failure is recorded with
   its last log lines and the check goes on): the recipe's command line with per-batch caption padding,
   ``--max_steps skip+steps --skip_steps skip`` so compilation and warm-up are not timed. The eager runs at the
   smallest batch also evaluate (in-batch loss + retrieval): the precision cells (bf16, and the recipe's fp16
   flags) must go train -> eval -> exit 0.
3. Profiles a few steps of the fastest configuration with torch.profiler (top 25 ops by device time).
4. Writes gpu_check.md (the table, the machine, failures), gpu_check.json and profile.txt to --out and prints the
   table. ``--budget_s`` bounds the whole check: configurations that no longer fit are marked skipped.

MFU: forward FLOPs per sample of both towers (matmuls + attention at the mean padded caption width of the batch
size, measured on these captions with the collator), x3 for forward + backward, over --peak_tflops (990: H200
dense bf16/fp16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from bench_runs import run_one, tail  # noqa: E402
from flops import flops_per_sample  # noqa: E402

OUT_FILES = ("gpu_check.md", "gpu_check.json", "profile.txt")
RESERVE_S = 20  # kept back from the budget for the table


# --- data and model ---------------------------------------------------------------------------------------------
def prepare(root: str, n_train: int, n_val: int, model: str) -> dict[str, str]:
    """The COCO folder, the model (tiny or full-size) and a warm image cache under ``root`` (made once per size)."""
    import bench_input

    from clip_train import demo
    from clip_train.data import images
    from clip_train.data.coco import load_coco_split
    from clip_train.data.dataset import image_table
    from clip_train.data.feeding import available_cpus

    tag = f"{n_train}-{n_val}-{model}"
    base = os.path.join(root, tag)
    paths = {"coco": os.path.join(base, "coco"), "model": os.path.join(base, "model"),
             "cache": os.path.join(base, "cache")}  # fmt: skip
    if os.path.isfile(os.path.join(base, "READY")):
        return paths
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    t = time.perf_counter()
    captions = demo.write_coco(paths["coco"], n_train, n_val, image_size=(bench_input.IMAGE_SIZE,) * 2)
    _, text_dir = demo.write_tiny_towers(os.path.join(base, "towers"), captions)  # for its tokenizer
    shapes = bench_input.TINY if model == "tiny" else bench_input.FULL
    bench_input.random_model(paths["model"], text_dir, **shapes)
    bench_input.lengthen_captions(paths["coco"], text_dir)
    for split in ("train", "validation"):
        unique, _ = image_table(load_coco_split(paths["coco"], split).columns["image_path"])
        images.build_cache(unique, bench_input.IMAGE_SIZE, paths["cache"], workers=min(32, available_cpus()))
    with open(os.path.join(base, "READY"), "w") as f:
        f.write("ok\n")
    print(f"data + model + image cache built in {time.perf_counter() - t:.0f} s under {base}", flush=True)
    return paths


def mean_widths(coco: str, model_dir: str, batches: list[int]) -> dict[int, float]:
    from bench_step import caption_widths

    return {b: sum(w := caption_widths(coco, model_dir, 50, b)) / len(w) for b in batches}


# --- one configuration ------------------------------------------------------------------------------------------
def set_flag(args: list[str], name: str, value: str | None) -> list[str]:
    """``args`` with ``--name value`` (or ``--name=value``) replaced, added, or removed (value None)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == f"--{name}":
            i += 2
            continue
        if not a.startswith(f"--{name}="):
            out.append(a)
        i += 1
    return out if value is None else [*out, f"--{name}", value]


def run_args(paths: dict, out: str, cell: dict, workers: int | None) -> list[str]:
    """The recipe's command line (demo.recipe_args) for one cell of the grid."""
    from clip_train import demo

    args = demo.recipe_args(paths["coco"], paths["model"], out)
    if not cell["eval"]:
        args.remove("--do_eval")
    if cell["precision"] == "bf16":
        args[args.index("--fp16")] = "--bf16"  # the recipe's other fp16 flags then only log a note
    args = set_flag(args, "dataloader_num_workers", None if workers is None else str(workers))
    for name, value in (
        ("per_device_train_batch_size", cell["batch"]), ("per_device_eval_batch_size", cell["batch"]),
        ("max_steps", cell["skip"] + cell["steps"]), ("skip_steps", cell["skip"]),
        ("logging_steps", max(10, cell["steps"] // 4)), ("save_strategy", "no"), ("report_to", "none"),
        ("image_cache_dir", paths["cache"]), ("torch_compile", str(cell["compiled"])),
    ):  # fmt: skip
        args = set_flag(args, name, str(value))
    return args


def train_cell(paths: dict, cell: dict, root: str, timeout: float, env: dict, workers: int | None) -> dict:
    out = os.path.join(root, "runs", cell["name"])
    shutil.rmtree(out, ignore_errors=True)
    log_path = os.path.join(root, "logs", cell["name"] + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [sys.executable, "run_clip.py", *run_args(paths, out, cell, workers)]
    status, seconds = run_one(cmd, log_path, timeout, env)
    row = {**cell, "status": status, "wall_s": round(seconds, 1), "log": log_path}
    try:
        with open(os.path.join(out, "all_results.json")) as f:
            row["results"] = json.load(f)
    except (OSError, ValueError):
        row["results"] = {}
    if status == "ok" and not row["results"].get("train_timed_steps"):
        row["status"] = "failed (no timed steps)"
    if row["status"] != "ok":
        row["tail"] = tail(log_path)
    shutil.rmtree(out, ignore_errors=True)  # a full-size model is ~0.8 GB a run
    return row


# --- the grid ---------------------------------------------------------------------------------------------------
def grid(cells: list[tuple[str, int]], modes: list[str], steps: int, skip: dict, peer: bool) -> list[dict]:
    """Every cell, most important first: the target (the largest batch, eager then compiled), the precision cells
    (eager, smallest batch of each precision, with evaluation), then the rest; each of ours followed by its peer
    (open_clip's app, same precision, batch and mode) when ``peer``. Steps scale down with the batch (at least
    30): about the same samples per cell."""
    smallest = {p: min(b for q, b in cells if q == p) for p, _ in cells}
    largest = max(b for _, b in cells)
    out = []
    for p, b in cells:
        for m in modes:
            compiled = m == "compiled"
            n = max(min(steps, 30), steps * min(1, 256 / b)) if b > 256 else steps
            cell = {"name": f"{p}-b{b}-{m}", "precision": p, "batch": b, "compiled": compiled, "peer": False,
                    "eval": not compiled and b == smallest[p], "steps": int(n), "skip": skip[m]}  # fmt: skip
            out.append(cell)

    def rank(c: dict) -> tuple:
        return (0 if c["batch"] == largest and c["precision"] == cells[-1][0] else 1 if c["eval"] else 2,
                c["compiled"], -c["batch"])  # fmt: skip

    ordered = []
    for c in sorted(out, key=rank):
        ordered.append(c)
        if peer:
            ordered.append({**c, "name": "open_clip-" + c["name"], "peer": True, "eval": False})
    return ordered


def parse_cells(text: str) -> list[tuple[str, int]]:
    """``fp16:64,bf16:256`` -> [("fp16", 64), ("bf16", 256)]."""
    out = []
    for part in text.split(","):
        p, b = part.split(":")
        if p not in ("bf16", "fp16"):
            raise SystemExit(f"gpu_check.py: --cells {text}: precision {p!r} is not bf16 or fp16")
        out.append((p, int(b)))
    return out


# --- the table --------------------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(
    rows: list[dict], widths: dict[int, float], flops: dict[int, float], peak_tflops: float | None, busy: dict
) -> str:
    head = ("| config | precision | batch | mode | status | samples/s | ours / open_clip | step ms | MFU | GPU busy | "
            "peak device GB | caption width | train loss | eval loss | R@1 i2t / t2i | wall s |")  # fmt: skip
    lines = [head, "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    fps_of = {
        r["name"]: r.get("results", {}).get("train_samples_per_second") if r["status"] == "ok" else None
        for r in rows
    }
    for r in rows:
        res = r.get("results", {})
        fps = fps_of[r["name"]]
        peer_fps = None if r["peer"] else fps_of.get("open_clip-" + r["name"])
        ratio = f"{fps / peer_fps:.2f}x" if fps and peer_fps else "-"
        width = (
            77.0 if r["peer"] else widths[r["batch"]]
        )  # open_clip pads every caption to its context length
        mfu = fps * flops[width] / (peak_tflops * 1e12) if fps and peak_tflops else None
        i2t, t2i = res.get("eval_image_to_text_R@1"), res.get("eval_text_to_image_R@1")
        recall = f"{i2t:.1f} / {t2i:.1f}" if i2t is not None and t2i is not None else "-"
        lines.append(
            f"| {r['name']} | {r['precision']} | {r['batch']} | {'compiled' if r['compiled'] else 'eager'} | "
            f"{r['status']} | {fmt(fps)} | {ratio} | {fmt(1000 * r['batch'] / fps if fps else None)} | "
            f"{fmt(100 * mfu if mfu else None, '.1f')}{'%' if mfu else ''} | {busy.get(r['name'], '-')} | "
            f"{fmt(res.get('train_peak_device_memory_gb'), '.2f')} | {width:.1f} | "
            f"{fmt(res.get('train_loss'), '.4f')} | {fmt(res.get('eval_loss'), '.4f')} | {recall} | "
            f"{r.get('wall_s', '-')} |"
        )  # fmt: skip
    return "\n".join(lines)


def profile_busy(prof_file: str) -> str:
    """profile_run.py's "gpu busy: X% of Y ms" line, as X% ("-" on CPU or when missing)."""
    try:
        with open(prof_file) as f:
            line = next((x for x in f if x.startswith("gpu busy:")), "")
    except OSError:
        return "-"
    return line.split()[2] if line else "-"


def describe(device: str) -> str:
    """GPU, CPU, memory and versions (no psutil: a fresh GPU host may lack it)."""
    import platform

    import torch
    import transformers

    cpu, mem = platform.machine(), 0.0
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")  # fmt: skip
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        text = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}; " + text
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.md, gpu_check.json, profile.txt")
    p.add_argument("--root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "clip_gpu_check"),
                   help="data, model, caches, run logs (made once, reused)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny shapes, small data, a short grid (CPU, CI)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--budget_s", type=float, default=540, help="the whole check stays within this")
    p.add_argument("--config_timeout_s", type=float, default=240, help="the most one configuration may take")
    p.add_argument("--steps", type=int, help="timed steps per configuration (default 200; tiny 6)")
    p.add_argument("--images", type=int, help="train images, 5 captions each (default 6000; tiny 120)")
    p.add_argument("--cells", help="precision:batch list (default fp16:64,bf16:256,bf16:1024; tiny "
                   "bf16:16,fp16:16); fp16 = the recipe's flags")  # fmt: skip
    p.add_argument("--peer", choices=["auto", "on", "off"], default="auto",
                   help="open_clip's app side by side (auto: when open_clip is installed)")  # fmt: skip
    p.add_argument(
        "--modes",
        help="comma list of eager,compiled (default both; tiny: eager, since compiling takes "
        "minutes on a small CPU)",
    )
    p.add_argument(
        "--workers", type=int, help="loader workers (default: run_clip.py's choice for the device)"
    )
    p.add_argument(
        "--peak_tflops", type=float, help="device peak for MFU (default 990 on CUDA: H200 bf16 dense)"
    )
    p.add_argument("--no_profile", action="store_true")
    a = p.parse_args(argv)
    started = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    peak = a.peak_tflops or (990.0 if a.device == "cuda" else None)
    steps = a.steps or (6 if a.tiny else 200)
    skip = {"eager": 2 if a.tiny else 10, "compiled": 3 if a.tiny else 30}
    cells = parse_cells(a.cells or ("bf16:16,fp16:16" if a.tiny else "fp16:64,bf16:256,bf16:1024"))
    batches = sorted({b for _, b in cells})
    import peer_open_clip

    if a.peer == "on" and not peer_open_clip.available():
        sys.exit("gpu_check.py: --peer on needs open_clip: pip install -r benchmarks/requirements-bench.txt")
    peer = a.peer == "on" or (a.peer == "auto" and peer_open_clip.available())
    modes = (a.modes or ("eager" if a.tiny else "eager,compiled")).split(",")
    model = "tiny" if a.tiny else "full-size"
    paths = prepare(a.root, a.images or (120 if a.tiny else 6000), 40 if a.tiny else 500, model)
    widths = mean_widths(paths["coco"], paths["model"], batches)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(paths["model"])
    flops = {w: flops_per_sample(config, w) for w in [*widths.values(), 77.0]}
    peer_paths = (
        peer_open_clip.prepare(paths, os.path.join(os.path.dirname(paths["model"]), "peer")) if peer else {}
    )
    peer_workers = a.workers if a.workers is not None else (2 if a.tiny else min(8, os.cpu_count() or 1))
    machine = describe(a.device)
    print(f"machine: {machine}\nmodel: {model}, train FLOPs/sample: "
          + ", ".join(f"b{b} {flops[w] / 1e9:.1f} G (width {w:.1f})" for b, w in widths.items())
          + f"; open_clip (width 77) {flops[77.0] / 1e9:.1f} G; peer: {'on' if peer else 'off'}", flush=True)  # fmt: skip

    rows = []
    for cell in grid(cells, modes, steps, skip, peer):
        left = a.budget_s - (time.perf_counter() - started) - RESERVE_S
        if left < 15:
            rows.append({**cell, "status": "skipped (budget)", "results": {}})
            continue
        timeout = min(a.config_timeout_s, left)
        if cell["peer"]:
            row = peer_open_clip.peer_cell(peer_paths, cell, a.root, timeout, env, peer_workers)
        else:
            row = train_cell(paths, cell, a.root, timeout, env, a.workers)
        rows.append(row)
        fps = row["results"].get("train_samples_per_second")
        print(f"{cell['name']}: {row['status']}, {fmt(fps if row['status'] == 'ok' else None)} samples/s, "
              f"{row['wall_s']} s", flush=True)  # fmt: skip

    ok = [r for r in rows if r["status"] == "ok" and not r["peer"]]
    busy: dict[str, str] = {}
    profile_note = "no profile (--no_profile)" if a.no_profile else "no profile: no configuration succeeded"
    if ok and not a.no_profile:
        best = max(ok, key=lambda r: r["results"]["train_samples_per_second"])
        left = a.budget_s - (time.perf_counter() - started) - RESERVE_S
        prof_steps = 3 if a.tiny else 5
        cell = {**best, "name": "profile", "steps": prof_steps + 2}
        out = os.path.join(a.root, "runs", "profile")
        shutil.rmtree(out, ignore_errors=True)
        prof_file = os.path.join(a.out, "profile.txt")
        cmd = [sys.executable, os.path.join(HERE, "profile_run.py"), prof_file, str(best["skip"] + 1),
               str(prof_steps), "--", *run_args(paths, out, {**cell, "eval": False}, a.workers)]  # fmt: skip
        if left >= 15:
            status, seconds = run_one(cmd, os.path.join(a.root, "logs", "profile.log"), left, env)
            profile_note = (
                f"profile of {best['name']} ({prof_steps} steps): {status}, {seconds:.0f} s -> profile.txt"
            )
            busy[best["name"]] = profile_busy(prof_file)
        else:
            profile_note = "no profile: out of budget"
        shutil.rmtree(out, ignore_errors=True)

    md = table(rows, widths, flops, peak, busy)
    notes = [
        f"machine: {machine}",
        f"model: {model} random init; data: {a.images or (120 if a.tiny else 6000)} train images (224 px, 5 "
        f"captions each, COCO-like lengths), image cache warm; per-batch caption padding (multiple of 8)",
        f"timed: {steps} steps after {skip['eager']} (eager) / {skip['compiled']} (compiled) untimed ones; "
        f"samples/s = run_clip.py's train_samples_per_second; peak = torch.cuda.max_memory_allocated",
        "MFU: "
        + (f"train FLOPs/sample x samples/s / {peak:g} TFLOP/s" if peak else "- (no device peak on CPU)"),
        "open_clip: "
        + (
            "its own app (python -m open_clip_train.main via benchmarks/peer_open_clip.py), model config "
            "roberta-ViT-B-32 with a local random-init roberta of the same shapes, csv of the same images "
            "and captions, its loader (decodes per sample, captions padded to 77), same batch, AMP "
            "precision, AdamW lr/wd; samples/s = batch / mean logged step time after the same untimed "
            "steps; ours / open_clip compares the same precision, batch and mode"
            if peer
            else "not run (open_clip not installed, or --peer off)"
        ),
        profile_note,
        f"total {time.perf_counter() - started:.0f} s of --budget_s {a.budget_s:g}",
    ]
    failures = [
        f"### {r['name']}: {r['status']}\n```\n" + "\n".join(r["tail"]) + "\n```"
        for r in rows
        if r.get("tail")
    ]
    report = "# gpu_check\n\n" + md + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if failures:
        report += "\n## Failures (last log lines)\n\n" + "\n\n".join(failures) + "\n"
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(report)
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump({"rows": rows, "widths": widths, "flops_per_sample": flops, "notes": notes}, f, indent=1)
    print("\n" + report, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
