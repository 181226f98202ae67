"""Command-line arguments: the reference run_clip.py's, the Ascend recipe's, and ours."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

from clip_train.config import validate
from clip_train.device import backend
from clip_train.errors import ArgumentError


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "The clip-roberta folder (see save_clip_roberta.py) or a hub id."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config name or path, if not the model's."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the model's."}
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor name or path."})
    feature_extractor_name: str | None = field(
        default=None, metadata={"help": "Old name of --image_processor_name."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where hub downloads and our caches are stored."}
    )
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)."})
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer."}
    )
    token: str | None = field(default=None, metadata={"help": "Hub token for private models."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the model folder/hub to run."}
    )
    freeze_vision_model: bool = field(default=False, metadata={"help": "Do not train the vision tower."})
    freeze_text_model: bool = field(default=False, metadata={"help": "Do not train the text tower."})


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "ydshieh/coco_dataset_script (or none): the local COCO builder reading --data_dir."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "COCO year, e.g. 2017."})
    data_dir: str | None = field(
        default=None, metadata={"help": "COCO folder: the zips or their extracted content."}
    )
    image_column: str | None = field(
        default="image_path", metadata={"help": "Column holding image file paths."}
    )
    caption_column: str | None = field(default="caption", metadata={"help": "Column holding the captions."})
    train_file: str | None = field(default=None, metadata={"help": "csv or json-lines training file."})
    validation_file: str | None = field(default=None, metadata={"help": "csv or json-lines validation file."})
    test_file: str | None = field(default=None, metadata={"help": "csv or json-lines test file."})
    max_seq_length: int | None = field(
        default=128, metadata={"help": "Longest caption in tokens (truncated)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation rows."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Rebuild the token and image caches."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for cache building."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every caption to max_seq_length (the reference); else per batch."},
    )
    pad_to_multiple_of: int = field(
        default=8,
        metadata={
            "help": "Round each batch's caption width up to a multiple of N (capped at max_seq_length): fewer "
            "distinct shapes for torch.compile / CUDA graphs (open_clip's --text-pad-multiple)."
        },
    )
    image_cache: bool = field(
        default=True,
        metadata={"help": "Decode each image once into a uint8 cache; False decodes per sample."},
    )
    image_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the token/image caches live (default ~/.cache/clip_for_pytorch)."},
    )
    # WebDataset shards (clip_train/shard_input.py, shard_stream.py); replace the COCO folder / files of a split.
    train_shards: str | None = field(
        default=None,
        metadata={"help": "Train shards: brace patterns joined with ::, e.g. /d/{00000..00331}.tar"},
    )
    validation_shards: str | None = field(
        default=None, metadata={"help": "Validation shards, as --train_shards."}
    )
    train_num_samples: int | None = field(
        default=None, metadata={"help": "Samples in the train shards (default: sizes.json / *_stats.json)."}
    )
    image_key: str = field(
        default="jpg;png;webp", metadata={"help": "Image file extensions in a shard sample."}
    )
    caption_key: str = field(default="txt", metadata={"help": "Caption file extension in a shard sample."})
    shuffle_buffer: int = field(
        default=1000, metadata={"help": "Samples in each loader worker's shuffle buffer."}
    )


@dataclass
class RecipeArguments:
    """Flags the Ascend recipe passes that transformers 5 no longer knows, and this package's own."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start fresh: ignore and delete earlier checkpoints in output_dir."}
    )
    skip_steps: int = field(default=0, metadata={"help": "FPS leaves out the first N steps (warm-up)."})
    device_id: int = field(default=0, metadata={"help": "The card of a 1-card run (npu:N / cuda:N)."})
    fp16_opt_level: str = field(
        default="O2", metadata={"help": "apex opt level O0-O3 (see README's precision table)."}
    )
    loss_scale: str = field(
        default="dynamic", metadata={"help": "Loss scale for fp16: a number (static) or dynamic."}
    )
    use_combine_grad: bool = field(
        default=False, metadata={"help": "apex combine_grad (flat gradient buffers)."}
    )
    loss_scope: str = field(
        default="local",
        metadata={
            "help": "local: in-batch negatives per device (the recipe); global: over all ranks' batches."
        },
    )
    accumulation_mode: str = field(
        default="contrastive",
        metadata={
            "help": "With --gradient_accumulation_steps K > 1: contrastive scores the K micro-batches as one "
            "batch (one extra forward each); mean: the Trainer's mean of K in-batch losses."
        },
    )
    max_logit_scale: float | None = field(
        default=None,
        metadata={"help": "Largest exp(logit_scale), clamped after each step; CLIP uses 100. Off."},
    )
    retrieval_eval: bool = field(
        default=True,
        metadata={"help": "At each evaluation also compute image<->text R@1/5/10 on the validation split."},
    )
    save_minutes: float = field(
        default=15.0,
        metadata={
            "help": "Also save a checkpoint whenever this many minutes passed since the last one, whatever "
            "--save_steps says, so a killed run loses at most that much (0: off)."
        },
    )
    requested_optim: str | None = field(default=None, metadata={"help": "(set internally from --optim)"})


ARG_CLASSES = (ModelArguments, DataTrainingArguments, TrainingArguments, RecipeArguments)
# Optimizer names of the recipe's Trainer fork that transformers 5 does not know; the backend maps them.
RECIPE_OPTIMS = {"adamw_apex_fused_npu", "adamw_apex_fused", "adamw_hf"}


def _take_recipe_optim(argv: list[str]) -> tuple[list[str], str | None]:
    """Replace a recipe-only --optim value by adamw_torch for the parser; return the name asked for."""
    known = {o.value for o in OptimizerNames}
    out, asked = [], None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--optim" and i + 1 < len(argv) and argv[i + 1] not in known:
            asked = argv[i + 1]
            out += ["--optim", "adamw_torch"]
            i += 2
            continue
        if a.startswith("--optim=") and a.split("=", 1)[1] not in known:
            asked = a.split("=", 1)[1]
            a = "--optim=adamw_torch"
        out.append(a)
        i += 1
    if asked is not None and asked not in RECIPE_OPTIMS:
        raise ArgumentError(
            f"--optim {asked}: unknown optimizer. Known: {', '.join(sorted(known | RECIPE_OPTIMS))}"
        )
    return out, asked


def parse_args(argv: list[str] | None = None) -> tuple:
    """(model_args, data_args, training_args, recipe_args) from argv (or a single .json file of them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARG_CLASSES)
    # On CPU hosts transformers 5 needs use_cpu for --bf16 and for torchrun to set up gloo DDP.
    parser.set_defaults(**backend.parser_defaults(backend.detect_family()))
    parser.error = validate.parser_error  # one line naming the flag, not usage + message
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=argv[0])
        validate.check_args(*parsed)
        return parsed
    argv, asked = _take_recipe_optim(argv)
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:
        raise validate.value_error(e, argv) from e
    if rest:
        raise ArgumentError(f"unknown arguments: {' '.join(rest)} (python3 run_clip.py --help lists them)")
    model_args, data_args, training_args, recipe_args = parsed
    recipe_args.requested_optim = asked or training_args.optim.value
    if model_args.feature_extractor_name and not model_args.image_processor_name:
        model_args.image_processor_name = model_args.feature_extractor_name
    # Every value checked before anything is loaded or written (clip_train/validate.py).
    validate.check_args(model_args, data_args, training_args, recipe_args)
    return model_args, data_args, training_args, recipe_args


def plan_backend(training_args: TrainingArguments, recipe_args: RecipeArguments) -> tuple:
    """The device/precision plan for these flags on this host, and TrainingArguments that carry it out."""
    try:
        plan = backend.make_backend_plan(
            backend.detect_family(),
            fp16=training_args.fp16,
            bf16=training_args.bf16,
            fp16_opt_level=recipe_args.fp16_opt_level,
            loss_scale=recipe_args.loss_scale,
            optim=recipe_args.requested_optim,
            use_combine_grad=recipe_args.use_combine_grad,
            apex_available=backend.ascend_apex_available(),
            # From torchrun's environment: asking training_args would set up the process group before the plan.
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", -1)),
            device_id=recipe_args.device_id,
        )
    except ValueError as e:
        raise ArgumentError(str(e)) from e
    return plan, backend.apply_plan(training_args, plan)
