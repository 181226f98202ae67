"""Evaluate any saved model without training: COCO retrieval + eval loss, zero-shot classification, or both.

    python3 -m clip_train.evaluate --model OUT --coco /data/coco --zeroshot_dir /data/imagenet/val --output figures.json
    torchrun --nproc_per_node 8 -m clip_train.evaluate --model OUT --zeroshot_dir /data/imagenet/val

``--model`` is any VisionTextDualEncoderModel folder (run_clip.py's output, the recipe's clip-roberta) or a
transformers CLIPModel folder. The figures are training's own (ClipTrainer.evaluate: the same eval loss, retrieval and
zero-shot code); under torchrun every rank shares the work (gloo on CPU). Rank 0 prints a table and writes the JSON;
``--model_card`` also writes the model folder's README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from typing import Any

from transformers import TrainingArguments

from clip_train.config.args import DataTrainingArguments
from clip_train.data import rows as loading
from clip_train.data.dataset import Collator
from clip_train.data.images import default_cache_dir
from clip_train.device import backend
from clip_train.errors import ArgumentError, DataError, SetupError, says_errors
from clip_train.eval import model_card, standalone
from clip_train.eval.templates import BUILT_IN
from clip_train.train.trainer import ClipTrainer

DIST_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m clip_train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="a saved model folder (dual encoder or CLIPModel)")
    p.add_argument(
        "--coco", help="COCO 2017 folder (or a csv/json-lines validation file): eval loss + retrieval"
    )
    p.add_argument("--zeroshot_dir", help="class folder (one subfolder per class): zero-shot top-1/top-5")
    p.add_argument("--zeroshot_classnames", help="class names, one a line, in sorted-folder order")
    p.add_argument(
        "--zeroshot_templates",
        default="openai",
        help=f"{' | '.join(BUILT_IN)} | FILE (one a line, with {{}})",
    )
    p.add_argument("--output", help="write the figures here as JSON (default: print only)")
    p.add_argument(
        "--batch_size", type=int, default=64, help="per device (the eval loss is in-batch at this size)"
    )
    p.add_argument("--max_eval_samples", type=int, help="use only the first N validation rows")
    p.add_argument(
        "--cache_dir", help="token and image caches (default ~/.cache/clip_for_pytorch or $CLIP_CACHE)"
    )
    p.add_argument("--model_card", action="store_true", help="also write MODEL/README.md with these figures")
    args = p.parse_args(argv)
    if not (args.coco or args.zeroshot_dir):
        raise ArgumentError("nothing to evaluate: give --coco DIR, --zeroshot_dir DIR or both")
    if args.batch_size < 1:
        raise ArgumentError(f"--batch_size {args.batch_size}: expected a whole number >= 1")
    return args


def coco_split(
    coco: str, tokenizer: Any, size: int, *, cache_dir: str | None, max_samples: int | None
) -> Any:
    """The validation split as run_clip.py reads it (COCO folder, or a csv/json-lines file)."""
    table = coco if os.path.isfile(coco) else None
    data_args = DataTrainingArguments(
        data_dir=None if table else coco, validation_file=table, image_cache_dir=cache_dir
    )
    rows = loading.load_rows(data_args, "validation")
    dataset, _, skipped = loading.make_split(rows, tokenizer, data_args, image_size=size,
                                             cache_dir=cache_dir or default_cache_dir(None), limit=max_samples,
                                             name="validation")  # fmt: skip
    return dataset, skipped


def data_line(args: argparse.Namespace) -> str:
    zeroshot = args.zeroshot_dir and f"zero-shot on {args.zeroshot_dir} ({args.zeroshot_templates} templates)"
    return "; ".join(x for x in (args.coco, zeroshot) if x)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    family = backend.detect_family()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory(prefix="clip-evaluate-") as scratch:
        targs = TrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=args.batch_size, report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, use_cpu=family == "cpu", ddp_backend=DIST_BACKENDS[family] if world > 1 else None,
        )  # fmt: skip
        model, tokenizer, processor = standalone.load_model(args.model)
        size = standalone.image_size(model)
        split = classes = None
        skipped: dict = {}
        with targs.main_process_first(desc="evaluation caches"):
            if args.coco:
                split, skipped = coco_split(args.coco, tokenizer, size, cache_dir=args.cache_dir,
                                              max_samples=args.max_eval_samples)  # fmt: skip
            if args.zeroshot_dir:
                classes = standalone.class_folder(args, tokenizer, size)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        trainer = ClipTrainer(
            model=model, args=targs, eval_dataset=split,
            data_collator=Collator(pad_id, 128), image_mean=processor.image_mean, image_std=processor.image_std,
            pad_id=pad_id, zeroshot=classes,
        )  # fmt: skip
        metrics = trainer.evaluate()
    if split is not None:
        metrics["eval_samples"] = len(split)
        metrics.update({f"eval_skipped_{k}": v for k, v in skipped.items()})
    if targs.process_index == 0:
        print(f"{args.model} ({type(model).__name__}, {world} process{'es' if world > 1 else ''})")
        print(standalone.table(metrics), flush=True)
        command = shlex.join(["python3", "-m", "clip_train.evaluate", *model_card.without_secrets(argv)])
        if args.output:
            standalone.write_json(args.output, metrics, model=args.model, command=command)
        if args.model_card:
            model_card.write(
                args.model, command=command, hardware_line=model_card.hardware(targs.device),
                precision="fp32 (evaluation; scores in fp32)", figures=metrics, data_line=data_line(args),
            )  # fmt: skip
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """main() with bad input as one line on stderr (rank 0 says it under torchrun) and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(argv)
        return 0
    except (ArgumentError, DataError, SetupError) as e:
        if says_errors(e):
            print(f"clip_train.evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        backend.leave_process_group()


if __name__ == "__main__":
    sys.exit(cli())
