#!/usr/bin/env python3
"""What one evaluation costs next to a training epoch, measured here and scaled to COCO 2017 by rate.

For the demo's tiny clip-roberta and a full-size-shape one (CLIP ViT-B/32 + roberta-base shapes, projection
512, random init: nothing is downloaded), on the demo's data, through the real ClipTrainer:

  train      global samples/s of training steps after --skip steps (the recipe's FPS)
  eval loss  rows/s of the in-batch eval-loss pass (the Trainer's evaluate)
  images     images/s and captions/s embedded for retrieval (distinct captions; each embedded once)
  ranks      the score/rank step itself, timed at the full COCO size with random embeddings

then prints, per model, a COCO train2017 epoch (591,753 caption rows) next to one evaluation on val2017
(25,014 rows, 5,000 images; all captions taken as distinct). Every part but the rank step splits over
ranks; every rank ranks the gathered embeddings in full.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_eval.py --threads 1 --clock cpu
    python3 benchmarks/bench_eval.py --models tiny --train_batch 64

Figures it printed (2026-11, the shared 2-core x86 CPU machine, torch 2.13 CPU, 1 thread, CPU clock, train
batch 16, eval batch 64, demo val 100 images / 500 rows; demo captions are 8 tokens on average, COCO's are
longer, which raises the caption parts of both sides):

| model | train samples/s | eval-loss rows/s | retrieval images/s / captions/s | rank step | COCO train epoch | COCO eval: loss + embed + rank | eval / epoch |
|---|---|---|---|---|---|---|---|
| tiny (0.3 M) | 666.2 | 3248.2 | 8708.3 / 9655.8 | 4.4 s | 14.8 min | 7.7 s + 3.2 s + 4.4 s = 15.2 s | 1.72% |
| full (212.9 M) | 2.2 | 6.9 | 8.5 / 35.9 | 4.5 s | 74.5 h | 1.0 h + 21.4 min + 4.5 s = 1.4 h | 1.84% |
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TrainerCallback  # noqa: E402

from clip_train.data.coco import load_coco_split  # noqa: E402
from clip_train.data.dataset import Collator, build_dataset  # noqa: E402
from clip_train.demo import default_root, prepare  # noqa: E402
from clip_train.eval.evaluation import unique_captions  # noqa: E402
from clip_train.eval.retrieval import retrieval_metrics  # noqa: E402
from clip_train.train import trainer as trainer_module  # noqa: E402
from clip_train.train.trainer import ClipTrainer, retrieval_eval  # noqa: E402

COCO_TRAIN_ROWS, COCO_VAL_ROWS, COCO_VAL_IMAGES = 591_753, 25_014, 5_000
# The clock: wall time, or this process's CPU time. On a shared machine, a 1-thread run's CPU time is what
# the same work takes on an idle core; wall time there says more about the neighbours than about us.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
now = time.perf_counter


def full_size_model(tiny_dir: str, out: str) -> str:
    """A clip-roberta folder with ViT-B/32 + roberta-base shapes, random weights, the demo's tokenizer."""
    from bench_input import FULL, random_model  # the input benchmark's builder: one definition of "full size"

    random_model(out, tiny_dir, **FULL)
    return out


def _timed(fn: Any, clock: dict, key: str) -> Any:
    """``fn`` that adds its time to clock[key] and the rows it was given to clock[key + "_rows"]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        batch = kwargs.get("pixel_values", kwargs.get("input_ids"))
        if batch is not None:  # rows computed, fill rows included (see evaluation.py): their rate scales
            clock[key + "_rows"] = clock.get(key + "_rows", 0) + batch.shape[0]
        start = now()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[key] = clock.get(key, 0.0) + now() - start

    return wrapper


class _StepTimer(TrainerCallback):
    """Clock readings at the end of step ``skip`` and of the last step."""

    def __init__(self, skip: int, clock: dict) -> None:
        self.skip, self.clock = skip, clock

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.clock["t0" if state.global_step == self.skip else "t1"] = now()


def rank_seconds(dim: int) -> float:
    """The score/rank step at COCO val2017's size (random unit embeddings; captions 5 per image)."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(COCO_VAL_IMAGES, dim, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(COCO_VAL_ROWS, dim, generator=g), dim=-1)
    t2i = torch.arange(COCO_VAL_ROWS) % COCO_VAL_IMAGES
    start = now()
    retrieval_metrics(images, texts, t2i)
    return now() - start


def measure(model_dir: str, data_dir: str, args: argparse.Namespace, work: str) -> dict[str, float]:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, TrainingArguments

    tokenizer, processor = (
        AutoTokenizer.from_pretrained(model_dir),
        AutoImageProcessor.from_pretrained(model_dir),
    )
    model = AutoModel.from_pretrained(model_dir)
    size = model.config.vision_config.image_size
    splits = {}
    for split, limit in (("train", None), ("validation", args.val_rows)):
        rows = load_coco_split(data_dir, split)
        caps, paths = rows.columns["caption"][:limit], rows.columns["image_path"][:limit]
        splits[split], _, _ = build_dataset(
            caps,
            paths,
            tokenizer,
            image_size=size,
            max_len=128,
            use_cache=True,
            cache_dir=os.path.join(work, "cache"),
            num_proc=1,
            overwrite_cache=False,
            skipped=Counter(),
        )
    targs = TrainingArguments(
        output_dir=os.path.join(work, "out"),
        per_device_train_batch_size=args.train_batch,
        per_device_eval_batch_size=args.eval_batch,
        max_steps=args.skip + args.steps,
        learning_rate=5e-5,
        report_to="none",
        save_strategy="no",
        logging_steps=10_000,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    trainer = ClipTrainer(
        model=model,
        args=targs,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=Collator(tokenizer.pad_token_id, 128),
        image_mean=processor.image_mean,
        image_std=processor.image_std,
        skip_steps=args.skip,
        pad_id=tokenizer.pad_token_id,
    )
    clock: dict[str, float] = {}
    trainer.add_callback(_StepTimer(args.skip, clock))
    trainer.train()
    fps = args.steps * args.train_batch / (clock["t1"] - clock["t0"])
    model.get_image_features = _timed(model.get_image_features, clock, "images")
    model.get_text_features = _timed(model.get_text_features, clock, "captions")
    # evaluate() = the loss pass + retrieval_eval; timing the latter gives the former.
    trainer_module.retrieval_eval = _timed(retrieval_eval, clock, "retrieval")
    start = now()
    metrics = trainer.evaluate()
    clock["evaluate"] = now() - start
    val = splits["validation"]
    n_images, n_captions = metrics["eval_retrieval_images"], len(unique_captions(val)[0])
    tokens = (val.offsets[1:] - val.offsets[:-1]).mean()
    return {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "train_sps": fps,
        # The loss pass is what evaluate() spends outside retrieval.
        "loss_rps": len(val) / (clock["evaluate"] - clock["retrieval"]),
        "images_ps": clock["images_rows"] / clock["images"],
        "captions_ps": clock["captions_rows"] / clock["captions"],
        "rank_s": rank_seconds(model.config.projection_dim),
        "tokens": float(tokens),
        "val": f"{n_images} images, {len(val)} rows, {n_captions} distinct captions",
    }


def coco_table(name: str, m: dict[str, float]) -> list[str]:
    epoch = COCO_TRAIN_ROWS / m["train_sps"]
    loss = COCO_VAL_ROWS / m["loss_rps"]
    embed = COCO_VAL_IMAGES / m["images_ps"] + COCO_VAL_ROWS / m["captions_ps"]
    total = loss + embed + m["rank_s"]

    def hm(s: float) -> str:
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"

    return [
        f"| {name} ({m['params_M']:.1f} M) | {m['train_sps']:.1f} | {m['loss_rps']:.1f} | "
        f"{m['images_ps']:.1f} / "
        f"{m['captions_ps']:.1f} | {m['rank_s']:.1f} s | {hm(epoch)} | {hm(loss)} + {hm(embed)} + "
        f"{hm(m['rank_s'])} = {hm(total)} | {100 * total / epoch:.2f}% |"
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,full", help="comma list of tiny, full")
    p.add_argument("--train_batch", type=int, default=16)
    p.add_argument("--eval_batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="timed training steps (after --skip)")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the training rate")
    p.add_argument("--val_rows", type=int, default=None, help="use the first N validation rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (1 thread)")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - {"tiny", "full"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}; choose from tiny, full")
    global now
    now = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data_dir, tiny_dir = prepare(default_root())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as work:
        for name in args.models.split(","):
            model_dir = tiny_dir if name == "tiny" else full_size_model(tiny_dir, os.path.join(work, "full"))
            m = measure(model_dir, data_dir, args, os.path.join(work, name))
            print(f"{name}: {m}", flush=True)
            rows += coco_table(name, m)
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{args.clock} clock; "
        f"train batch {args.train_batch}, eval batch {args.eval_batch}; COCO 2017: train epoch "
        f"{COCO_TRAIN_ROWS:,} rows, val {COCO_VAL_IMAGES:,} images / {COCO_VAL_ROWS:,} captions\n"
    )
    print(
        "| model | train samples/s | eval-loss rows/s | retrieval images/s / captions/s | rank step (COCO) "
        "| COCO train epoch | COCO eval: loss + embed + rank | eval / epoch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
