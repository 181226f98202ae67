"""The model card: ``README.md`` in the Hub's format, written next to a trained or evaluated model. No network.

A YAML header (library, pipeline tag, the towers as base models when their names are hub ids, the dataset), then
how the model was made (command line, hardware, precision) and what it scores (train loss, eval loss, retrieval,
zero-shot), and how to load it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
from typing import Any

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
FIGURES = (  # (key, what it is), in the card's order
    ("train_loss_last", "train loss (last logged)"),
    ("train_loss", "train loss (mean over the run)"),
    ("eval_loss", "eval loss (in-batch contrastive, eval batch size)"),
    ("eval_image_to_text_R@1", "image→text R@1 (%)"),
    ("eval_image_to_text_R@5", "image→text R@5 (%)"),
    ("eval_image_to_text_R@10", "image→text R@10 (%)"),
    ("eval_text_to_image_R@1", "text→image R@1 (%)"),
    ("eval_text_to_image_R@5", "text→image R@5 (%)"),
    ("eval_text_to_image_R@10", "text→image R@10 (%)"),
    ("eval_retrieval_images", "retrieval images"),
    ("eval_retrieval_captions", "retrieval captions"),
    ("eval_zeroshot_top1", "zero-shot top-1 (%)"),
    ("eval_zeroshot_top5", "zero-shot top-5 (%)"),
    ("eval_zeroshot_images", "zero-shot images"),
    ("eval_zeroshot_classes", "zero-shot classes"),
)


SECRET_FLAGS = ("--token", "--hub_token")


def without_secrets(argv: list[str]) -> list[str]:
    """The command line with the values of --token / --hub_token blanked: the card ships with the model."""
    out, hide = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if hide:
            out.append("***")
        elif name in SECRET_FLAGS and "=" in arg:
            out.append(f"{name}=***")
        else:
            out.append(arg)
        hide = name in SECRET_FLAGS and "=" not in arg
    return out


def base_models(config: dict) -> list[str]:
    """The towers' names_or_paths recorded in a dual encoder's config, where they are hub ids (not local paths)."""
    names = [(config.get(k) or {}).get("_name_or_path", "") for k in ("vision_config", "text_config")]
    return [n for n in names if n and HUB_ID.match(n) and not os.path.exists(n)]


def hardware(device: Any) -> str:
    """Device family and name, e.g. ``cuda: NVIDIA H100 80GB HBM3`` or ``cpu: AMD EPYC``."""
    kind = getattr(device, "type", str(device).split(":")[0])
    try:
        if kind == "cuda":
            import torch

            return f"cuda: {torch.cuda.get_device_name(device)}"
        if kind == "npu":
            import torch

            return f"npu: {torch.npu.get_device_name(device)}"  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a name is a nicety, never worth the card
        return kind
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"cpu: {name or os.uname().machine}, {os.cpu_count()} CPUs"


def _figure(value: Any) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def render(
    *,
    name: str,
    config: dict,
    command: str,
    hardware_line: str,
    precision: str,
    figures: dict,
    dataset: str | None = None,
    data_line: str = "",
) -> str:
    """The card's text."""
    header = ["---", "library_name: transformers", "pipeline_tag: zero-shot-image-classification",
              "tags:", "- clip", "- vision-text-dual-encoder", "- contrastive-image-text"]  # fmt: skip
    bases = base_models(config)
    if bases:
        header += ["base_model:", *[f"- {b}" for b in bases]]
    if dataset and HUB_ID.match(dataset) and not os.path.exists(dataset):
        header += ["datasets:", f"- {dataset}"]
    header.append("---")
    arch = ", ".join(config.get("architectures") or [config.get("model_type", "model")])
    towers = " + ".join(
        (config.get(k) or {}).get("model_type", "?") for k in ("vision_config", "text_config") if k in config
    )
    rows = [f"| {what} | {_figure(figures[key])} |" for key, what in FIGURES if figures.get(key) is not None]
    body = [
        f"# {name}", "",
        f"A CLIP-style image-text model ({arch}{f': {towers}' if towers else ''}) trained or evaluated with "
        "CLIP_for_PyTorch (contrastive image-text training with the Hugging Face Trainer).", "",
        "## How it was made", "",
        "```bash", command, "```", "",
        f"- Hardware: {hardware_line}",
        f"- Precision: {precision}",
        *([f"- Data: {data_line}"] if data_line else []),
        *([f"- Base models: {', '.join(bases)}"] if bases else []), "",
        "## Results", "",
        *(["| figure | value |", "|---|---|", *rows] if rows else ["No evaluation was run."]), "",
        "Retrieval: every validation image and caption embedded once; image→text counts a hit when any of the image's "
        "captions is in the top K. Zero-shot: class embeddings are the normalised mean of the templates' text "
        "embeddings; ties count against the model.", "",
        "## How to use", "",
        "```python",
        "from transformers import AutoModel, AutoProcessor, pipeline",
        "",
        'model = AutoModel.from_pretrained("PATH_TO_THIS_FOLDER")',
        'processor = AutoProcessor.from_pretrained("PATH_TO_THIS_FOLDER")',
        'classifier = pipeline("zero-shot-image-classification", model="PATH_TO_THIS_FOLDER")',
        'classifier("cat.jpg", candidate_labels=["cat", "dog"], hypothesis_template="a photo of a {}.")',
        "```", "",
        "Evaluate it again (COCO retrieval and eval loss, zero-shot on a class folder):",
        "`python3 -m clip_train.evaluate --model PATH_TO_THIS_FOLDER --coco /data/coco --zeroshot_dir /data/imagenet/val`.",
    ]  # fmt: skip
    return "\n".join(header + [""] + body) + "\n"


def write(output_dir: str, **kwargs: Any) -> str | None:
    """Write ``output_dir/README.md`` (see ``render``); returns its path, None (with a warning) if it failed."""
    path = os.path.join(output_dir, "README.md")
    try:
        with open(os.path.join(output_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        config = {}
    try:
        text = render(name=os.path.basename(os.path.abspath(output_dir)), config=config, **kwargs)
        with open(path + ".partial", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".partial", path)
    except OSError as e:  # a card is never worth a finished run
        logger.warning("could not write the model card %s: %s", path, e)
        return None
    logger.info("model card written: %s", path)
    return path


def after_training(
    trainer: Any, results: dict, argv: list[str] | None, precision: str, data_args: Any
) -> str | None:
    """run_clip.py's card (rank 0, end of training): the run's command (``argv``, default sys.argv), device,
    precision and figures."""
    argv = sys.argv[1:] if argv is None else argv
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    figures = {**results, "train_loss_last": losses[-1] if losses else None}
    world = trainer.args.world_size
    data = data_args.data_dir or data_args.train_file or data_args.train_shards or ""
    if data_args.zeroshot_dir:
        data += f"; zero-shot on {data_args.zeroshot_dir} ({data_args.zeroshot_templates} templates)"
    return write(
        trainer.args.output_dir,
        command=shlex.join(["python3", "run_clip.py", *without_secrets(argv)]),
        hardware_line=f"{hardware(trainer.args.device)}" + (f", {world} processes" if world > 1 else ""),
        precision=precision,
        figures=figures,
        dataset=data_args.dataset_name,
        data_line=data,
    )
