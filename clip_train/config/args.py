"""Command-line arguments: the reference run_clip.py's, the Ascend recipe's, and ours."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

from clip_train.config import validate
from clip_train.config.checks import (
    Rule,
    check,
    coco_column,
    creatable_folder,
    folder,
    local_folder,
    loss_scale,
    non_empty,
    not_with,
    number,
    one_of,
    shards,
    whole,
    zeroshot_classnames,
    zeroshot_folder,
    zeroshot_templates,
)
from clip_train.config.tables import table_file
from clip_train.device import backend
from clip_train.device.backend import OPT_LEVELS
from clip_train.errors import ArgumentError

WRITABLE = "a folder that exists or can be created, writable"


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

    def __post_init__(self) -> None:
        check(self, [
            Rule("model_name_or_path", local_folder, "a clip-roberta folder (save_clip_roberta.py makes one)", "check the path (launchers: --model_path)"),
            Rule("tokenizer_name", local_folder, "a folder with tokenizer files", "check the path, or leave it out to use the model's"),
            Rule("image_processor_name", local_folder, "a folder with preprocessor_config.json", "check the path, or leave it out to use the model's"),
            Rule("cache_dir", creatable_folder, WRITABLE, "choose another folder, or leave it out"),
        ])  # fmt: skip
        if self.feature_extractor_name and not self.image_processor_name:  # the old name of the flag
            self.image_processor_name = self.feature_extractor_name


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
    # WebDataset shards (clip_train/data/shard_reader.py, shard_stream.py); replace the COCO folder / files of a split.
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
    # Zero-shot classification at every evaluation (clip_train/eval/zeroshot.py).
    zeroshot_dir: str | None = field(
        default=None,
        metadata={"help": "A class folder (ImageFolder: one subfolder per class) for zero-shot top-1/top-5."},
    )
    zeroshot_classnames: str | None = field(
        default=None,
        metadata={
            "help": "Class names, one a line in sorted-folder order (default: folder names, _ as space)."
        },
    )
    zeroshot_templates: str = field(
        default="openai",
        metadata={
            "help": "openai (CLIP's 80 ImageNet templates), simple ('a photo of a {}.') or a file, one a line."
        },
    )

    def __post_init__(self) -> None:
        table = "a .csv or .json/.jsonl file with the image and caption columns"
        shard_list = "tar shards: a path or brace pattern, several joined with ::"
        check(self, [
            Rule("data_dir", folder, "the COCO 2017 folder (the zips or their extracted folders)", "check the path (launchers: --data_path)"),
            Rule("image_column", non_empty, "a column name", "e.g. image_path"),
            Rule("caption_column", non_empty, "a column name", "e.g. caption"),
            Rule("train_file", table_file, table, "fix the file or the path"),
            Rule("validation_file", table_file, table, "fix the file or the path"),
            Rule("test_file", table_file, table, "fix the file or the path"),
            Rule("train_shards", shards, shard_list, "e.g. /data/cc3m/{00000..00331}.tar"),
            Rule("validation_shards", shards, shard_list, "e.g. /data/val/{0000..0009}.tar"),
            Rule("image_cache_dir", creatable_folder, WRITABLE, "choose another folder, or leave it out"),
            Rule("zeroshot_dir", zeroshot_folder, "a class folder: one subfolder per class, its images inside", "e.g. the ImageNet val folder sorted into class folders"),
            Rule("zeroshot_templates", zeroshot_templates, "openai, simple or a file of templates, one a line, each with {}", "e.g. --zeroshot_templates simple"),
            Rule("zeroshot_classnames", zeroshot_classnames, "a file with one class name a line, one per class folder", "in the order of the sorted folder names"),
            Rule("image_column", coco_column, "a column of the rows", "image_path for COCO"),
            Rule("caption_column", coco_column, "a column of the rows", "caption for COCO"),
            Rule("preprocessing_num_workers", whole(1), "a whole number >= 1", "e.g. 4, or leave it out for one process"),
            Rule("max_seq_length", whole(1), "a whole number of tokens >= 1", "e.g. 77 (CLIP's) or 128 (the recipe's)"),
            Rule("pad_to_multiple_of", whole(1), "a whole number of tokens >= 1", "e.g. 8 (the default) or 16; 1 pads to the longest caption"),
            Rule("max_train_samples", whole(1), "a whole number of rows >= 1", "leave it out to use every row"),
            Rule("max_eval_samples", whole(1), "a whole number of rows >= 1", "leave it out to use every row"),
            Rule("train_num_samples", whole(1), "a whole number of samples >= 1 (the epoch length)", "or leave it out to read sizes.json next to the shards"),
            Rule("shuffle_buffer", whole(0), "a whole number of samples >= 0", "e.g. 1000; 0 turns the sample shuffle off"),
            Rule("train_shards", not_with("train_file"), "one source for the train split", "drop --train_file or --train_shards"),
            Rule("validation_shards", not_with("validation_file"), "one source for the validation split", "drop --validation_file or --validation_shards"),
        ])  # fmt: skip


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

    def __post_init__(self) -> None:
        check(self, [
            Rule("skip_steps", whole(0), "a whole number of steps >= 0 left out of the FPS", "e.g. 10, the recipe's, or 0"),
            Rule("device_id", whole(0), "a card number >= 0", "e.g. 0"),
            Rule("max_logit_scale", number(1, above=True), "the multiplier exp(logit_scale), a number > 1", "CLIP uses 100; leave it out for no clamp"),
            Rule("loss_scale", loss_scale, "a number > 0 (a static scale) or dynamic", "the recipe passes 12800000"),
            Rule("fp16_opt_level", one_of(*OPT_LEVELS), f"one of {', '.join(OPT_LEVELS)}", "the recipe passes O2"),
            Rule("loss_scope", one_of("local", "global"), "local or global", "global for multi-card runs (see README)"),
            Rule("accumulation_mode", one_of("contrastive", "mean"), "contrastive or mean", "contrastive keeps every micro-batch's negatives (see README)"),
            Rule("save_minutes", number(0), "minutes >= 0 (0 turns it off)", "e.g. 15"),
        ])  # fmt: skip


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


def device_id_given(argv: list[str]) -> int:
    """--device_id as the command line (or its lone .json file) gives it, read before parsing: the card is picked
    by device visibility, which must be set before torch first looks at the devices (parsing TrainingArguments
    does). 0 when absent or not a whole number >= 0 (the parser then says so)."""
    value: object = 0
    if len(argv) == 1 and argv[0].endswith(".json"):
        try:
            with open(argv[0]) as f:
                value = json.load(f).get("device_id", 0)
        except (OSError, ValueError, AttributeError):
            return 0  # the parser reports the file
    for i, token in enumerate(argv):
        if token == "--device_id" and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith("--device_id="):
            value = token.split("=", 1)[1]
    try:
        card = int(str(value))
    except ValueError:
        return 0
    return card if card >= 0 else 0


def parse_args(argv: list[str] | None = None, family: str | None = None) -> tuple:
    """(model_args, data_args, training_args, recipe_args) from argv (or a single .json file of them).

    ``family``: the device family run_clip.py detected (detected here when not given). Each of our dataclasses
    checks its own values as it is built (``__post_init__``); validate.check_args then checks TrainingArguments
    and the rules that span dataclasses. Every value is checked before anything is loaded or written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARG_CLASSES)
    # On CPU hosts transformers 5 needs use_cpu for --bf16 and for torchrun to set up gloo DDP.
    parser.set_defaults(**backend.parser_defaults(family or backend.detect_family()))
    parser.error = validate.parser_error  # one line naming the flag, not usage + message
    if len(argv) == 1 and argv[0].endswith(".json"):
        try:
            parsed = parser.parse_json_file(json_file=argv[0])
        except ValueError as e:
            raise validate.value_error(e, argv) from e
        parsed[3].requested_optim = parsed[3].requested_optim or parsed[2].optim.value
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
    validate.check_args(model_args, data_args, training_args, recipe_args)
    return model_args, data_args, training_args, recipe_args
