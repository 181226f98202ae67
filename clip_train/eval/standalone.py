"""Evaluating a saved model without training (``python3 -m clip_train.evaluate``): its parts, its data, its report.

The figures come from the training-time code: the COCO validation split through data/rows.py (read by the command,
which may use config/), eval loss and retrieval by ClipTrainer.evaluate, the class folder through eval/zeroshot.py. A model folder may be any
VisionTextDualEncoderModel (ours, the recipe's clip-roberta) or a transformers CLIPModel: both have
``get_image_features`` / ``get_text_features`` and return ``image_embeds`` / ``text_embeds`` and ``logit_scale``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from clip_train.data.images import default_cache_dir
from clip_train.errors import SetupError
from clip_train.eval import zeroshot
from clip_train.model import load_part

# Figures the table shows, in order (key without the eval_ prefix, label).
TABLE = (
    ("loss", "eval loss (in-batch, eval batch size)"),
    ("image_to_text_R@1", "image→text R@1 (%)"),
    ("image_to_text_R@5", "image→text R@5 (%)"),
    ("image_to_text_R@10", "image→text R@10 (%)"),
    ("text_to_image_R@1", "text→image R@1 (%)"),
    ("text_to_image_R@5", "text→image R@5 (%)"),
    ("text_to_image_R@10", "text→image R@10 (%)"),
    ("retrieval_images", "retrieval images"),
    ("retrieval_captions", "retrieval captions"),
    ("zeroshot_top1", "zero-shot top-1 (%)"),
    ("zeroshot_top5", "zero-shot top-5 (%)"),
    ("zeroshot_images", "zero-shot images"),
    ("zeroshot_classes", "zero-shot classes"),
    ("zeroshot_skipped_images", "zero-shot images skipped (unreadable)"),
)


def load_model(model_dir: str) -> tuple[Any, Any, Any]:
    """(model in fp32, tokenizer, image processor) of a local folder; SetupError (one line) if one is missing."""
    if not os.path.isdir(model_dir):
        raise SetupError(
            f"--model {model_dir}: not a folder; give a saved model folder (config.json, weights, tokenizer)"
        )
    tokenizer = load_part(AutoTokenizer, model_dir, "tokenizer")
    processor = load_part(AutoImageProcessor, model_dir, "image processor")
    model = load_part(AutoModel, model_dir, "model", dtype=torch.float32)
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise SetupError(f"--model {model_dir}: a {type(model).__name__} is not an image-text dual encoder")
    return model, tokenizer, processor


def image_size(model: Any) -> int:
    size = model.config.vision_config.image_size
    return size if isinstance(size, int) else size[0]


def class_folder(args: Any, tokenizer: Any, size: int) -> zeroshot.ZeroShotSet:
    return zeroshot.prepare_zeroshot(
        args.zeroshot_dir, tokenizer, image_size=size, classnames_file=args.zeroshot_classnames,
        templates=args.zeroshot_templates, cache_dir=args.cache_dir or default_cache_dir(None),
    )  # fmt: skip


def table(metrics: dict) -> str:
    """The figures as a two-column text table."""
    rows = [(label, metrics[f"eval_{key}"]) for key, label in TABLE if f"eval_{key}" in metrics]
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {value:>10.4f}" if isinstance(value, float) else f"{label:<{width}}  {value:>10}"
                     for label, value in rows)  # fmt: skip


def write_json(path: str, metrics: dict, **about: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump({**about, "metrics": metrics}, f, indent=2)
    os.replace(path + ".partial", path)
