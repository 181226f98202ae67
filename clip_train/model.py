"""The clip-roberta model: its parts loaded from a folder (one clear line when one is missing), frozen or
checkpointed towers, and the folder itself put together from a vision and a text checkpoint."""

from __future__ import annotations

import logging
import os
from typing import Any

from clip_train.errors import SetupError

logger = logging.getLogger(__name__)


def load_part(cls: Any, path: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path)`` with one clear message when the folder lacks that part."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if "trust_remote_code" in str(e):
            raise SetupError(
                f"The {what} in {path!r} needs Python code from that folder (its auto_map), which is never run "
                "unless you pass --trust_remote_code; pass it only for a folder you trust."
            ) from e
        hint = (
            f"Could not load the {what} from {path!r}: {str(e).splitlines()[0]}\n"
            "Give --model_name_or_path a clip-roberta folder made by save_clip_roberta.py (config.json, "
            "model.safetensors, tokenizer files, preprocessor_config.json); nothing is downloaded here."
        )
        raise SetupError(hint) from e


def freeze_towers(model: Any, vision: bool, text: bool) -> None:
    """Frozen towers get requires_grad=False, so autograd does no work for them."""
    for flag, tower in ((vision, model.vision_model), (text, model.text_model)):
        if flag:
            for p in tower.parameters():
                p.requires_grad_(False)


def checkpoint_towers(model: Any, kwargs: dict | None = None) -> None:
    """--gradient_checkpointing for the dual encoder, which declares no support for it (the Trainer would raise):
    checkpoint its two towers instead (both support it). config/settle.py leaves the Trainer's flag off."""
    for tower in (model.vision_model, model.text_model):
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


class AssembleError(Exception):
    """A tower or its processor could not be loaded; the message says how to pass local folders."""


def _load(cls: Any, name: str, what: str, flag: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(name, **kwargs)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types; all mean the same to the user
        local = os.path.isdir(name)
        where = (
            f"the local folder {name!r}"
            if local
            else f"{name!r} (not a local folder, and the hub is unreachable or has no such model)"
        )
        raise AssembleError(
            f"could not load the {what} from {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}\n"
            f"Pass local folders instead, e.g. {flag} /path/to/{os.path.basename(name.rstrip('/')) or 'model'} "
            "(a folder holding config.json, the weights and the tokenizer / preprocessor files)."
        ) from e


def build_clip_roberta(vision_model: str, text_model: str, output_dir: str) -> list[str]:
    """Build, save and re-check the dual encoder + processor the recipe trains. Returns the files written."""
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoTokenizer,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
    )

    tokenizer = _load(AutoTokenizer, text_model, "tokenizer", "--text_model")
    image_processor = _load(AutoImageProcessor, vision_model, "image processor", "--vision_model")
    try:
        model = VisionTextDualEncoderModel.from_vision_text_pretrained(vision_model, text_model)
    except Exception as e:  # noqa: BLE001
        raise AssembleError(
            f"could not build the dual encoder from {vision_model!r} + {text_model!r}: {str(e).splitlines()[0]}\n"
            "Pass local folders with --vision_model and --text_model."
        ) from e
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)  # preprocessor_config.json, which older readers look for

    # Re-read what was written: a folder that does not reload is worse than no folder.
    again = AutoModel.from_pretrained(output_dir)
    if not isinstance(again, VisionTextDualEncoderModel):
        raise AssembleError(f"{output_dir} reloads as {type(again).__name__}, not VisionTextDualEncoderModel")
    tok = AutoTokenizer.from_pretrained(output_dir)
    if len(tok) != len(tokenizer):
        raise AssembleError(
            f"{output_dir}: tokenizer reloads with {len(tok)} tokens, expected {len(tokenizer)}"
        )
    AutoImageProcessor.from_pretrained(output_dir)
    return sorted(os.listdir(output_dir))
