"""Put a clip-roberta folder together from a vision checkpoint and a text checkpoint (hub ids or local folders)."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


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
