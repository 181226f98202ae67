#!/usr/bin/env python3
"""What an ImageNet-val zero-shot evaluation costs, measured on a slice at full size and scaled by rate.

ImageNet val: 1,000 classes x 80 templates = 80,000 prompts and 50,000 images (JPEGs of ~500x375). With full-size
random-init towers (ViT-B/32 + roberta-base shapes, projection 512; bench_input.py's builder, nothing downloaded)
through eval/zeroshot.py's own functions, this measures

  prompts/s   class_embeddings on --prompts prompts of --prompt_tokens tokens (with <s> and </s>; OpenAI's templates
              with ImageNet's class names are ~9-14 roberta-base tokens: batches pad to 16)
  decode/s    images decoded, resized (shorter side 224, bicubic) and center-cropped into the image cache (one
              process; 500x375 photo-like JPEGs, demo.draw with grain)
  images/s    image_embeddings on --images cached images
  scoring     topk_accuracy at the full size (50,000 x 1,000, random unit embeddings)

and prints the full evaluation next to a COCO train2017 epoch at --train_sps (default: bench_eval.py's full-size
figure on the same machine, 1 thread, CPU clock). Embedding splits over ranks; scoring runs on every rank.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_zeroshot.py --threads 1 --clock cpu

Figures it printed (2026-12-07, the shared 2-core x86 CPU machine (AMD EPYC), torch 2.13 CPU, 1 thread, CPU clock;
full size 212.9 M params; slices of 240 prompts of 12 tokens, 200 JPEGs, 128 images, batch 64):

| prompts/s | decode/s | images/s | ImageNet val: 80k prompts + 50k decodes + 50k images + scoring | COCO train epoch at 2.2 samples/s | eval / epoch |
|---|---|---|---|---|---|
| 27.2 | 249.6 | 7.93 | 49.1 min + 3.3 min + 1.75 h + 0.7 s = 2.63 h | 74.72 h | 3.5% |
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clip_train import demo  # noqa: E402
from clip_train.data.images import build_cache  # noqa: E402
from clip_train.eval.zeroshot import ZeroShotSet, class_embeddings, image_embeddings, topk_accuracy  # noqa: E402
from clip_train.train.trainer import normalize_pixels  # noqa: E402

CLASSES, TEMPLATES, IMAGES = 1_000, 80, 50_000
COCO_TRAIN_ROWS = 591_753
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def hm(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=256, help="prompts embedded (a slice of the 80,000)")
    p.add_argument("--prompt_tokens", type=int, default=12, help="tokens per prompt, <s> and </s> included")
    p.add_argument("--images", type=int, default=128, help="images embedded (a slice of the 50,000)")
    p.add_argument("--decode", type=int, default=200, help="JPEGs decoded into the cache (one process)")
    p.add_argument("--batch", type=int, default=64, help="eval batch size")
    p.add_argument("--train_sps", type=float, default=2.2,
                   help="full-size training samples/s to compare with (bench_eval.py, same machine and clock)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = p.parse_args(argv)
    now = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_input import FULL, random_model
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench-zeroshot-") as work:
        captions = [t.format(c=c, s=s, b="gray", size="big") for c in demo.COLOURS for s in demo.SHAPES
                    for t in demo.TEMPLATES]  # fmt: skip
        _, text_dir = demo.write_tiny_towers(os.path.join(work, "towers"), captions)
        random_model(os.path.join(work, "full"), text_dir, **FULL)
        model = AutoModel.from_pretrained(os.path.join(work, "full")).eval()
        size = model.config.vision_config.image_size
        params = sum(x.numel() for x in model.parameters()) / 1e6

        # Photo-like JPEGs at ImageNet val's typical size, decoded by the training code into the cache.
        rng = random.Random(0)
        paths = []
        for i in range(args.decode):
            img = demo.draw("red", "circle", "gray", True, rng, size=(500, 375), grain=10.0)
            paths.append(os.path.join(work, f"{i:05d}.jpg"))
            img.save(paths[-1], "JPEG", quality=90)
        start = now()
        images, _ = build_cache(paths, size, os.path.join(work, "cache"), workers=1)
        decode_ps = args.decode / (now() - start)

        # Prompts of a fixed realistic length; the class set is cut to whole classes of 80 templates.
        g = np.random.default_rng(0)
        n_classes = max(1, args.prompts // TEMPLATES)
        prompts = [np.concatenate([[0], g.integers(5, 300, args.prompt_tokens - 2), [2]]).astype(np.int32)
                   for _ in range(n_classes * TEMPLATES)]  # fmt: skip
        labels = np.arange(args.images) % n_classes
        zs = ZeroShotSet([f"c{i}" for i in range(n_classes)], ["{}"] * TEMPLATES, prompts,
                         [images[i % args.decode] for i in range(args.images)], labels)  # fmt: skip
        mean, std = (
            torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1),
            torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1),
        )
        common = {"batch_size": args.batch, "device": "cpu", "rank": 0, "world": 1}
        start = now()
        class_embeddings(model, zs, pad_id=1, **common)
        prompts_ps = len(prompts) / (now() - start)
        start = now()
        image_embeddings(model, zs, pixels=lambda x: normalize_pixels(x, mean, std), **common)
        images_ps = args.images / (now() - start)

    unit = torch.nn.functional.normalize
    emb = unit(torch.randn(IMAGES, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    classes = unit(torch.randn(CLASSES, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    start = now()
    topk_accuracy(emb, classes, torch.arange(IMAGES) % CLASSES)
    scoring = now() - start

    text_s, decode_s = CLASSES * TEMPLATES / prompts_ps, IMAGES / decode_ps
    image_s = IMAGES / images_ps
    total = text_s + decode_s + image_s + scoring
    epoch = COCO_TRAIN_ROWS / args.train_sps
    print(f"\nfull size ({params:.1f} M params), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {args.clock} clock; slices: {len(prompts)} prompts of {args.prompt_tokens} tokens, "
          f"{args.decode} JPEGs decoded, {args.images} images embedded, batch {args.batch}\n")  # fmt: skip
    print(
        "| prompts/s | decode/s | images/s | ImageNet val: 80k prompts + 50k decodes + 50k images + scoring "
        f"| COCO train epoch at {args.train_sps} samples/s | eval / epoch |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| {prompts_ps:.1f} | {decode_ps:.1f} | {images_ps:.2f} | {hm(text_s)} + {hm(decode_s)} + {hm(image_s)} + "
          f"{hm(scoring)} = {hm(total)} | {hm(epoch)} | {100 * total / epoch:.1f}% |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
