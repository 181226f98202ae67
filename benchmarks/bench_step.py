#!/usr/bin/env python3
"""The model's own step time, no input path: what bounds bench_input.py's fast/reference speed-up on this machine.

    python benchmarks/bench_step.py                  # tiny model, 1 and 2 torch threads
    python benchmarks/bench_step.py --model full-size --steps 2 --threads 2

A training step (normalisation of a uint8 batch, forward, contrastive loss, backward, AdamW) of the benchmark's
model at batch 64 is timed with the fast path's caption widths (each batch padded to its longest caption, a
multiple of 8, batches drawn from the benchmark's captions) and at the reference's 128. With data free, the
reference mode can be no slower than its 128-token step: the ratio of the two is the largest speed-up the fast
path can show while the reference mode is limited by compute rather than by decoding.
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

    from clip_train.coco import load_coco_split
    from clip_train.data import Collator

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


def time_steps(model_dir: str, widths: list[int], batch: int, steps: int, warmup: int) -> float:
    """Mean seconds of a full training step over ``steps`` steps, cycling through the caption ``widths``."""
    import torch
    from transformers import VisionTextDualEncoderModel

    from clip_train.loss import clip_loss
    from clip_train.trainer import normalize_pixels

    torch.manual_seed(0)
    model = VisionTextDualEncoderModel.from_pretrained(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = model.config.vision_config.image_size
    vocab = model.config.text_config.vocab_size
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.45), torch.full((1, 3, 1, 1), 0.27)
    pixels = torch.empty(batch, 3, size, size)

    def step(width: int) -> None:
        ids = torch.randint(3, vocab, (batch, width))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values=normalize_pixels(images, mean, std, out=pixels), return_loss=False)  # fmt: skip
        clip_loss(out["image_embeds"], out["text_embeds"], model.logit_scale).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for i in range(warmup):
        step(widths[i % len(widths)])
    start = time.perf_counter()
    for i in range(steps):
        step(widths[i % len(widths)])
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(REPO, ".cache", "bench"), help="bench_input.py's root")
    p.add_argument("--model", choices=["tiny", "full-size"], default="tiny")
    p.add_argument("--threads", default="1,2", help="torch thread counts to time, each in its own process")
    p.add_argument("--steps", type=int, default=30, help="timed steps per width setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--one", nargs=2, metavar=("THREADS", "WIDTHS"), help=argparse.SUPPRESS)  # a child run
    a = p.parse_args(argv)

    import bench_input

    paths = bench_input.prepare(a.root, 2000)
    model_dir = paths["tiny" if a.model == "tiny" else "full"]
    if a.one:  # child: time one thread count (the thread pool is fixed once torch has started)
        import torch

        torch.set_num_threads(int(a.one[0]))
        widths = [int(w) for w in a.one[1].split(",")]
        print(time_steps(model_dir, widths, a.batch, a.steps, a.warmup))
        return 0

    widths = caption_widths(paths["coco"], model_dir, 200, a.batch)
    share = {w: widths.count(w) / len(widths) for w in sorted(set(widths))}
    print(f"machine: {bench_input.describe_machine()}")
    print("fast path caption widths over 200 random batches: "
          + ", ".join(f"{w} tokens {s:.0%}" for w, s in share.items()))  # fmt: skip
    print(
        "\n| model | torch threads | step, fast widths (ms) | step, 128 tokens (ms) | ceiling | load 1-min |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for threads in a.threads.split(","):
        before = bench_input.load()
        timed = {}
        for name, ws in (("fast", widths), ("reference", [128])):
            cmd = [sys.executable, __file__, "--root", a.root, "--model", a.model, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--batch", str(a.batch), "--one", threads, ",".join(map(str, ws))]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            timed[name] = float(out.split()[-1])
        ceiling = timed["reference"] / timed["fast"]
        print(f"| {a.model} | {threads} | {1000 * timed['fast']:.1f} | {1000 * timed['reference']:.1f} | "
              f"{ceiling:.2f}x | {before} -> {bench_input.load()} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
