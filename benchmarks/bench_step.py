#!/usr/bin/env python3
"""The model's own step time, no input path: what bounds bench_input.py's fast/reference speed-up on this machine.

    python benchmarks/bench_step.py                  # tiny model, 1 and 2 torch threads
    python benchmarks/bench_step.py --model full-size --steps 2 --threads 2
    python benchmarks/bench_step.py --model full-size --device cuda --precision bf16 --batch 256 --threads 8

A training step (normalisation of a uint8 batch, forward, contrastive loss, backward, AdamW; on any device, in fp32
or under bf16/fp16 autocast) of the benchmark's model is timed with the fast path's caption widths (each batch
padded to its longest caption, a multiple of 8, batches drawn from the benchmark's captions) and at the reference's
128, with the peak memory of each. With data free, the reference mode can be no slower than its 128-token step: the
ratio of the two is the largest speed-up the fast path can show while the reference mode is limited by compute
rather than by decoding. On an accelerator it is also the model's own samples/s and memory at that batch size.
Data and models: bench_input.py's, under .cache/bench (made on first use).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def caption_widths(coco_dir: str, model_dir: str, batches: int, batch: int, seed: int = 0) -> list[int]:
    """Padded widths of random batches of the benchmark's captions, as the fast path's collator pads them."""
    import numpy as np
    from transformers import AutoTokenizer

    from clip_train.data.coco import load_coco_split
    from clip_train.data.dataset import Collator

    tok = AutoTokenizer.from_pretrained(model_dir)
    captions = load_coco_split(coco_dir, "train").columns["caption"]
    ids = [np.asarray(x) for x in tok(list(captions), max_length=128, truncation=True)["input_ids"]]
    rng = np.random.default_rng(seed)
    collate = Collator(tok.pad_token_id, 128)
    dummy = np.zeros((1, 1, 3), np.uint8)
    widths = []
    for _ in range(batches):
        rows = rng.choice(len(ids), batch, replace=False)
        widths.append(
            collate([{"input_ids": ids[r], "pixel_values": dummy} for r in rows])["input_ids"].shape[1]
        )
    return widths


def peak_memory_gb(device: str) -> float:
    """Peak memory of this process so far: allocated on the accelerator, else the process's peak RSS."""
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    if device == "npu":
        return torch.npu.max_memory_allocated() / 2**30  # torch_npu registers torch.npu
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_steps(
    model_dir: str,
    widths: list[int],
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    precision: str,
    compile_mode: str = "none",
) -> tuple[float, float, int, int]:
    """(mean seconds of a training step over ``steps`` steps cycling through the caption ``widths``, peak GB,
    compilations during warm-up, compilations during the timed steps).

    As run_clip.py trains: uint8 images normalised on the device, the contrastive loss, AdamW; bf16/fp16 under
    autocast (fp16 with a dynamic loss scale). ``compile_mode`` (see COMPILE_MODES): the forward eager, or
    torch.compile'd with dynamo's automatic dynamic shapes, with the caption width marked dynamic, or with the
    widths padded up to clip_train.compile's buckets.
    """
    import torch
    from transformers import VisionTextDualEncoderModel

    from clip_train.device.backend import synchronize
    from clip_train.train import compiling as clip_compile
    from clip_train.train.loss import clip_loss
    from clip_train.train.trainer import normalize_pixels

    if device == "npu":
        import torch_npu  # noqa: F401  (registers the device)
    torch.manual_seed(0)
    model = VisionTextDualEncoderModel.from_pretrained(model_dir).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = model.config.vision_config.image_size
    vocab = model.config.text_config.vocab_size
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).to(device)
    mean, std = torch.full((1, 3, 1, 1), 0.45, device=device), torch.full((1, 3, 1, 1), 0.27, device=device)
    pixels = torch.empty(batch, 3, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    forward = model if compile_mode == "none" else torch.compile(model)

    def step(width: int) -> None:
        if compile_mode == "buckets":
            width = clip_compile.bucket_width(width, 128)
        # Real padding: each caption as long as the collator could have made it, the longest filling the width.
        lengths = torch.randint(min(8, width), width + 1, (batch,), device=device)
        lengths[0] = width
        mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
        ids = torch.randint(3, vocab, (batch, width), device=device).masked_fill(mask == 0, 1)
        if compile_mode == "dynamic":
            clip_compile.mark_caption_width_dynamic({"input_ids": ids, "attention_mask": mask})
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            out = forward(input_ids=ids, attention_mask=mask,
                        pixel_values=normalize_pixels(images, mean, std, out=pixels), return_loss=False)  # fmt: skip
            loss = clip_loss(out["image_embeds"], out["text_embeds"], model.logit_scale)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=False)

    for i in range(warmup):
        step(widths[i % len(widths)])
    synchronize(device)
    warm_compiles = clip_compile.compilations()
    start = time.perf_counter()
    for i in range(steps):
        step(widths[(warmup + i) % len(widths)])
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, peak_memory_gb(device), warm_compiles, clip_compile.compilations() - warm_compiles


COMPILE_MODES = ("none", "auto", "dynamic", "buckets")


def child(a: argparse.Namespace, threads: str, widths: list[int], mode: str = "none") -> list[float]:
    """Run one timing in a fresh process (torch's thread pool and dynamo's caches start clean)."""
    cmd = [sys.executable, __file__, "--root", a.root, "--model", a.model, "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--batch", str(a.batch), "--device", a.device, "--precision", a.precision,
           "--compile-mode", mode, "--one", threads, ",".join(map(str, widths))]  # fmt: skip
    run = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"bench_step.py: the timing {mode} {widths[:3]}... failed:\n{run.stderr[-3000:]}")
    return [float(x) for x in run.stdout.split()[-4:]]


def compare_compile(a: argparse.Namespace, widths: list[int]) -> int:
    """Step time with the fast path's widths: eager vs torch.compile (automatic dynamic / width marked dynamic /
    bucketed widths), with the compilations during warm-up and during the timed steps."""
    import bench_input

    print("\n| model | device, precision, batch | torch threads | compile | step (ms) | vs eager | "
          "compilations warm-up / timed | peak memory (GB) | load 1-min |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|---|---:|---|")
    for threads in a.threads.split(","):
        eager = None
        for mode in a.compile.split(","):
            before = bench_input.load()
            seconds, peak, warm, timed = child(a, threads, widths, mode)
            eager = seconds if mode == "none" else eager
            ratio = f"{eager / seconds:.2f}x" if eager else "-"
            print(f"| {a.model} | {a.device}, {a.precision}, {a.batch} | {threads} | {mode} | {1000 * seconds:.1f} | "
                  f"{ratio} | {warm:.0f} / {timed:.0f} | {peak:.2f} | {before} -> {bench_input.load()} |", flush=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(REPO, ".cache", "bench"), help="bench_input.py's root")
    p.add_argument("--model", choices=["tiny", "full-size"], default="tiny")
    p.add_argument("--threads", default="1,2", help="torch thread counts to time, each in its own process")
    p.add_argument("--steps", type=int, default=30, help="timed steps per width setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "npu"], default="auto",
                   help="where to train (auto: an NPU, else a GPU, else the CPU)")  # fmt: skip
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    p.add_argument("--compile", metavar="MODES",
                   help=f"compare compile modes instead (comma list of {','.join(COMPILE_MODES)}), fast widths only")  # fmt: skip
    p.add_argument(
        "--compile-mode", default="none", choices=COMPILE_MODES, help=argparse.SUPPRESS
    )  # a child's
    p.add_argument("--one", nargs=2, metavar=("THREADS", "WIDTHS"), help=argparse.SUPPRESS)  # a child run
    a = p.parse_args(argv)

    import bench_input

    paths = bench_input.prepare(a.root, 2000)
    model_dir = paths["tiny" if a.model == "tiny" else "full"]
    if a.device == "auto":
        from clip_train.device.backend import detect_family

        a.device = detect_family()
    if a.precision == "fp16" and a.device == "cpu":
        p.error("--precision fp16 needs an accelerator; on CPU use bf16")
    if a.one:  # child: time one thread count (the thread pool is fixed once torch has started)
        import torch

        torch.set_num_threads(int(a.one[0]))
        widths = [int(w) for w in a.one[1].split(",")]
        timed = time_steps(
            model_dir, widths, a.batch, a.steps, a.warmup, a.device, a.precision, a.compile_mode
        )
        print(*timed)
        return 0

    widths = caption_widths(paths["coco"], model_dir, 200, a.batch)
    share = {w: widths.count(w) / len(widths) for w in sorted(set(widths))}
    print(f"machine: {bench_input.describe_machine()}")
    print("fast path caption widths over 200 random batches: "
          + ", ".join(f"{w} tokens {s:.0%}" for w, s in share.items()))  # fmt: skip
    if a.compile:
        return compare_compile(a, widths)
    print("\n| model | device, precision, batch | torch threads | step, fast widths (ms) | step, 128 tokens (ms) "
          "| ceiling | peak memory, fast / 128 (GB) | load 1-min |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|---|")
    for threads in a.threads.split(","):
        before = bench_input.load()
        timed, peak = {}, {}
        for name, ws in (("fast", widths), ("reference", [128])):
            timed[name], peak[name] = child(a, threads, ws)[:2]
        ceiling = timed["reference"] / timed["fast"]
        print(f"| {a.model} | {a.device}, {a.precision}, {a.batch} | {threads} | {1000 * timed['fast']:.1f} | "
              f"{1000 * timed['reference']:.1f} | {ceiling:.2f}x | {peak['fast']:.2f} / {peak['reference']:.2f} | "
              f"{before} -> {bench_input.load()} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
