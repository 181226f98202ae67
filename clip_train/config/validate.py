"""Every argument checked up front, before any model, data or output folder is touched.

A failure is one ``ArgumentError`` whose message names the argument, the value, what was expected and how to fix
it (run_clip.cli prints it as one ``run_clip.py: error: ...`` line, exit code 2). A legal but surprising value gets
one warning line (``SURPRISES``). Adding a check is one line in ``RULES``: ``Rule(argument, check, expected, fix)``, where
``check(value, args)`` returns None when the value is fine, else what is wrong ("" when ``expected`` says it all).
A rule whose argument no dataclass declares is skipped, so rules for flags still on other branches do no harm.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from clip_train.config.tables import table_file
from clip_train.data.coco import COLUMNS
from clip_train.data.feeding import available_cpus
from clip_train.device.backend import OPT_LEVELS, parse_loss_scale
from clip_train.errors import ArgumentError

logger = logging.getLogger(__name__)

HELP = "python3 run_clip.py --help lists every flag"


Check = Callable[[Any, Any], "str | None"]


class Rule(NamedTuple):
    arg: str  # the dataclass field, i.e. the flag without its dashes
    check: Check
    expected: str
    fix: str = ""


# --- checks: each returns None (fine) or what is wrong ---------------------------------------------------------------
def whole(lo: int, hi: int | None = None) -> Check:
    def check(v: Any, a: Any) -> str | None:
        ok = v is None or (
            isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
        )
        return None if ok else ""

    return check


def number(lo: float, *, above: bool = False, below: float | None = None) -> Check:
    """A finite number >= lo (> lo with ``above``), and < ``below`` when given; None passes."""

    def check(v: Any, a: Any) -> str | None:
        if v is None:
            return None
        ok = math.isfinite(v) and (v > lo if above else v >= lo) and (below is None or v < below)
        return None if ok else ""

    return check


def one_of(*choices: str) -> Check:
    return lambda v, a: None if v in choices else ""


def when(condition: Callable[[Any], bool], check: Check) -> Check:
    """``check`` only where ``condition(args)`` holds (e.g. epochs matter only without --max_steps)."""
    return lambda v, a: check(v, a) if condition(a) else None


def steps_or_minus_one(v: Any, a: Any) -> str | None:
    return None if v == -1 or v >= 1 else ""


def loss_scale(v: Any, a: Any) -> str | None:
    try:
        parse_loss_scale(v)
    except ValueError:
        return ""
    return None


def non_empty(v: Any, a: Any) -> str | None:
    return None if v is None or str(v).strip() else "empty"


def folder(v: Any, a: Any) -> str | None:
    if v is None:
        return None
    if not os.path.exists(v):
        return "is not a folder (nothing is there)"
    return None if os.path.isdir(v) else "is not a folder (it is a file)"


def local_folder(v: Any, a: Any) -> str | None:
    """A folder when the value is a path (absolute, ./, ../, ~ or existing); a hub id is left to the loader."""
    if v is None or not (os.path.isabs(v) or v.startswith(("./", "../", "~")) or os.path.exists(v)):
        return None
    return folder(os.path.expanduser(v), a)


def checkpoint(v: Any, a: Any) -> str | None:
    problem = folder(v, a)
    if problem is None and v is not None and not os.path.isfile(os.path.join(v, "trainer_state.json")):
        return "not a checkpoint folder (no trainer_state.json)"
    return problem


def creatable_folder(v: Any, a: Any) -> str | None:
    """An existing writable folder, or one whose nearest existing parent is a writable folder. Creates nothing."""
    if v is None:
        return None
    if not str(v).strip():
        return "is empty"
    path = os.path.abspath(os.path.expanduser(v))
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "is not writable (it is a file, not a folder)"
        return None if os.access(path, os.W_OK | os.X_OK) else "is not writable (permission denied)"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"is not writable (cannot be created: {parent} is a file, not a folder)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"is not writable (cannot be created in {parent}: permission denied)"
    return None


def reporters(v: Any, a: Any) -> str | None:
    """Every --report_to name known to transformers and installed here (else the Trainer fails after set-up)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [v] if isinstance(v, str) else list(v or [])
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK and n not in ("none", "all")]
    if unknown:
        return f"{', '.join(unknown)} is not a reporting integration"
    missing = [
        n for n in names if n in INTEGRATION_TO_CALLBACK and n not in get_available_reporting_integrations()
    ]
    return f"{', '.join(missing)} is not installed (pip install it, or report_to none)" if missing else None


def json_object(v: Any, a: Any) -> str | None:
    """A dict option given on the command line must be a JSON object (the parser leaves any other text a string)."""
    return None if v is None or isinstance(v, dict) else "is not a JSON object"


def coco_column(v: Any, a: Any) -> str | None:
    """Without --train_file / --validation_file the rows are COCO's, so the column must be one of them."""

    if a.train_file or a.validation_file or v is None or v in COLUMNS:
        return None
    return f"is not a COCO column ({', '.join(COLUMNS)})"


def _training(a: Any) -> bool:
    return bool(a.do_train)


def shards(v: Any, a: Any) -> str | None:
    """A shard pattern whose local shards all exist (remote URLs are opened when read)."""
    if v is None:
        return None
    from webdataset.shardlists import expand_urls

    try:
        urls = [u for u in expand_urls(v) if u]
    except (ValueError, IndexError) as e:
        return f"not a shard pattern ({e})"
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if not urls:
        return "it names no shard"
    return f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}" if missing else None


# --- the rules: one line each ----------------------------------------------------------------------------------------
COCO = "the COCO 2017 folder (the zips or their extracted folders)"
RULES: list[Rule] = [
    # paths
    Rule("data_dir", folder, COCO, "check the path (launchers: --data_path)"),
    Rule("model_name_or_path", local_folder, "a clip-roberta folder (save_clip_roberta.py makes one)", "check the path (launchers: --model_path)"),
    Rule("tokenizer_name", local_folder, "a folder with tokenizer files", "check the path, or leave it out to use the model's"),
    Rule("image_processor_name", local_folder, "a folder with preprocessor_config.json", "check the path, or leave it out to use the model's"),
    Rule("train_file", table_file, "a .csv or .json/.jsonl file with the image and caption columns", "fix the file or the path"),
    Rule("validation_file", table_file, "a .csv or .json/.jsonl file with the image and caption columns", "fix the file or the path"),
    Rule("test_file", table_file, "a .csv or .json/.jsonl file with the image and caption columns", "fix the file or the path"),
    Rule("train_shards", shards, "tar shards: a path or brace pattern, several joined with ::", "e.g. /data/cc3m/{00000..00331}.tar"),
    Rule("validation_shards", shards, "tar shards: a path or brace pattern, several joined with ::", "e.g. /data/val/{0000..0009}.tar"),
    Rule("output_dir", creatable_folder, "a folder that exists or can be created, writable", "choose another folder"),
    Rule("image_cache_dir", creatable_folder, "a folder that exists or can be created, writable", "choose another folder, or leave it out"),
    Rule("cache_dir", creatable_folder, "a folder that exists or can be created, writable", "choose another folder, or leave it out"),
    Rule("resume_from_checkpoint", when(_training, checkpoint), "a checkpoint-N folder of an earlier run", "give one, or leave it out to resume from --output_dir's last"),
    Rule("image_column", non_empty, "a column name", "e.g. image_path"),
    Rule("caption_column", non_empty, "a column name", "e.g. caption"),
    Rule("image_column", coco_column, "a column of the rows", "image_path for COCO"),
    Rule("caption_column", coco_column, "a column of the rows", "caption for COCO"),
    # sizes and counts
    Rule("per_device_train_batch_size", whole(1), "a whole number >= 1", "e.g. 64, the recipe's; lower it if memory runs out"),
    Rule("per_device_eval_batch_size", whole(1), "a whole number >= 1", "e.g. 64"),
    Rule("gradient_accumulation_steps", whole(1), "a whole number >= 1", "1 (the default) steps after every batch"),
    Rule("dataloader_num_workers", whole(0), "a whole number >= 0", "0 loads in the training process; leave it out to let run_clip choose"),
    Rule("dataloader_prefetch_factor", whole(1), "a whole number >= 1", "e.g. 2, or leave it out"),
    Rule("preprocessing_num_workers", whole(1), "a whole number >= 1", "e.g. 4, or leave it out for one process"),
    Rule("max_seq_length", whole(1), "a whole number of tokens >= 1", "e.g. 77 (CLIP's) or 128 (the recipe's)"),
    Rule("pad_to_multiple_of", whole(1), "a whole number of tokens >= 1", "e.g. 8 (the default) or 16; 1 pads to the longest caption"),
    Rule("max_train_samples", whole(1), "a whole number of rows >= 1", "leave it out to use every row"),
    Rule("max_eval_samples", whole(1), "a whole number of rows >= 1", "leave it out to use every row"),
    Rule("max_steps", steps_or_minus_one, "a number of steps >= 1, or -1 to train --num_train_epochs", "0 trains nothing"),
    Rule("num_train_epochs", when(lambda a: a.do_train and a.max_steps < 1, number(0, above=True)), "a number of epochs > 0", "e.g. 3, the recipe's"),
    Rule("train_num_samples", whole(1), "a whole number of samples >= 1 (the epoch length)", "or leave it out to read sizes.json next to the shards"),
    Rule("shuffle_buffer", whole(0), "a whole number of samples >= 0", "e.g. 1000; 0 turns the sample shuffle off"),
    Rule("skip_steps", whole(0), "a whole number of steps >= 0 left out of the FPS", "e.g. 10, the recipe's, or 0"),
    Rule("seed", whole(0, 2**32 - 1), "a whole number in [0, 2**32 - 1]", "e.g. 42"),
    Rule("device_id", whole(0), "a card number >= 0", "e.g. 0"),
    # optimisation
    Rule("learning_rate", number(0, above=True), "a number > 0", "e.g. 5e-5"),
    Rule("weight_decay", number(0), "a number >= 0", "e.g. 0.1, the recipe's, or 0"),
    Rule("warmup_steps", number(0), "a number of steps >= 0 (below 1: a fraction of the run)", "e.g. 0, the recipe's"),
    Rule("max_grad_norm", number(0), "a number >= 0 (0: no clipping)", "e.g. 1.0"),
    Rule("adam_beta1", number(0, below=1), "a number in [0, 1)", "e.g. 0.9"),
    Rule("adam_beta2", number(0, below=1), "a number in [0, 1)", "e.g. 0.999"),
    Rule("adam_epsilon", number(0, above=True), "a number > 0", "e.g. 1e-8"),
    Rule("max_logit_scale", number(1, above=True), "the multiplier exp(logit_scale), a number > 1", "CLIP uses 100; leave it out for no clamp"),
    # precision
    Rule("loss_scale", loss_scale, "a number > 0 (a static scale) or dynamic", "the recipe passes 12800000"),
    Rule("fp16_opt_level", one_of(*OPT_LEVELS), f"one of {', '.join(OPT_LEVELS)}", "the recipe passes O2"),
    Rule("loss_scope", one_of("local", "global"), "local or global", "global for multi-card runs (see README)"),
    Rule("accumulation_mode", one_of("contrastive", "mean"), "contrastive or mean",
         "contrastive keeps every micro-batch's negatives (see README)"),
    # reporting and other Trainer options
    Rule("report_to", reporters, "none, all, or installed integrations such as tensorboard", "e.g. --report_to none"),
    Rule("lr_scheduler_kwargs", json_object, 'a JSON object, e.g. \'{"num_cycles": 2}\'', "quote it for the shell"),
    # cadence
    Rule("save_steps", number(0, above=True), "a number of steps > 0 (below 1: a fraction of the run)", "e.g. 500"),
    Rule("save_minutes", number(0), "minutes >= 0 (0 turns it off)", "e.g. 15"),
    Rule("save_total_limit", whole(0), "a whole number >= 2, or 0 to keep all", "e.g. 2"),
    Rule("logging_steps", number(0, above=True), "a number of steps > 0 (below 1: a fraction of the run)", "e.g. 10"),
    Rule("eval_steps", number(0, above=True), "a number of steps > 0 (below 1: a fraction of the run)", "e.g. 500, or leave it out"),
]  # fmt: skip


class Surprise(NamedTuple):
    arg: str
    surprising: Callable[[Any, Any], bool]
    message: str  # formatted with v (the value) and a (all arguments)


def _cpus() -> int:

    return available_cpus()


# Legal but surprising: one warning line each, the run goes on.
SURPRISES: list[Surprise] = [
    Surprise("learning_rate", lambda v, a: v >= 1, "--learning_rate {v} is unusually large (CLIP fine-tuning uses about 1e-5 to 1e-3): expect the loss to diverge"),
    Surprise("dataloader_num_workers", lambda v, a: v > _cpus(), "--dataloader_num_workers {v} is more than the {a.cpus} CPUs this process may use: the workers will compete for them"),
    Surprise("warmup_steps", lambda v, a: v >= 1 and 0 < a.max_steps <= v, "--warmup_steps {v:g} is not below --max_steps {a.max_steps}: the learning rate never reaches --learning_rate"),
]  # fmt: skip


class _Args:
    """Attribute look-up across the argument dataclasses, first match wins."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self._parts = parts

    def has(self, name: str) -> bool:
        return any(hasattr(p, name) for p in self._parts)

    def set(self, name: str, value: Any) -> None:
        setattr(next(p for p in self._parts if hasattr(p, name)), name, value)

    @property
    def cpus(self) -> int:
        return _cpus()

    def __getattr__(self, name: str) -> Any:
        for p in self._parts:
            if hasattr(p, name):
                return getattr(p, name)
        raise AttributeError(name)


def check_args(*parts: Any, rules: Sequence[Rule] = RULES, surprises: Sequence[Surprise] = SURPRISES) -> None:
    """Raise ArgumentError for the first argument that breaks a rule; then warn about surprising values."""
    a = _Args(parts)
    for rule in rules:
        if not a.has(rule.arg):
            continue
        value = getattr(a, rule.arg)
        problem = rule.check(value, a)
        if problem is not None:
            shown = value.value if hasattr(value, "value") else value
            shown = " ".join(map(str, shown)) if isinstance(shown, list | tuple) else shown
            what = f": {problem}; expected" if problem else ": expected"
            fix = f"; {rule.fix}" if rule.fix else ""
            raise ArgumentError(f"--{rule.arg} {shown}{what} {rule.expected}{fix}")
    for surprise in surprises:
        if a.has(surprise.arg) and surprise.surprising(getattr(a, surprise.arg), a):
            _warn(surprise.message.format(v=getattr(a, surprise.arg), a=a))
    _cap_max_seq_length(a)


def _cap_max_seq_length(a: Any) -> None:
    """Captions longer than the text tower's positions would index past its position table: cap and say so."""
    limit = text_positions(a.model_name_or_path)
    if limit is not None and a.max_seq_length is not None and a.max_seq_length > limit:
        _warn(
            f"--max_seq_length {a.max_seq_length} is above what the text tower can take ({limit} tokens): capped to {limit}"
        )
        a.set("max_seq_length", limit)


def text_positions(model_dir: str | None) -> int | None:
    """Longest input of the text tower in a local model folder: max_position_embeddings, less RoBERTa's offset."""
    path = os.path.join(model_dir or "", "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None  # not a local folder (or unreadable): the model loader says so
    text = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    positions = text.get("max_position_embeddings") if isinstance(text, dict) else None
    if not isinstance(positions, int):
        return None
    # RoBERTa-style towers number positions from padding_idx + 1 (pad_token_id 1 -> 2 positions unused).
    roberta = "roberta" in str(text.get("model_type", "")) or "camembert" in str(text.get("model_type", ""))
    return positions - (int(text.get("pad_token_id") or 0) + 1 if roberta else 0)


def _warn(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once per run, not once per rank
        logger.warning("run_clip.py: warning: %s", message)


# --- the parser's own errors, as one line ----------------------------------------------------------------------------
KINDS = {"int": "a whole number", "float": "a number", "string_to_bool": "true or false"}


def parser_error(message: str) -> None:
    """argparse's error(): instead of usage + message + exit, one ArgumentError naming the flag."""
    m = re.match(r"argument (--[\w.-]+)(?:/--[\w.-]+)*: invalid (\w+) value: '(.*)'$", message)
    if m:
        flag, kind, value = m.groups()
        raise ArgumentError(f"{flag} {value}: expected {KINDS.get(kind, kind)}; {HELP}")
    m = re.match(
        r"argument (--[\w.-]+)(?:/--[\w.-]+)*: invalid choice: '(.*)' \(choose from (.*)\)$", message
    )
    if m:
        flag, value, choices = m.groups()
        raise ArgumentError(f"{flag} {value}: expected one of {choices.replace(chr(39), '')}")
    m = re.match(r"argument (--[\w.-]+)(?:/--[\w.-]+)*: (.*)$", message)
    raise ArgumentError(f"{m.group(1)}: {m.group(2)}; {HELP}" if m else f"{message.rstrip('.')}; {HELP}")


def value_error(e: ValueError, argv: Sequence[str]) -> ArgumentError:
    """A ValueError the argument dataclasses raised while building, as one line naming the flag when it can."""
    text = " ".join(str(e).split())
    m = re.match(r"'(.*?)' is not a valid (\w+)", text)
    if m:
        value = m.group(1)
        for i, token in enumerate(argv):
            given = token.split("=", 1)
            if (len(given) == 2 and given[1] == value) or (
                token == value and i and argv[i - 1].startswith("--")
            ):
                flag = given[0] if len(given) == 2 else argv[i - 1]
                return ArgumentError(f"{flag} {value}: not a valid choice ({text})")
    for i, token in enumerate(argv):  # the first flag given whose name the message mentions
        name, _, value = token.partition("=")
        if name.startswith("--") and re.search(rf"\b{re.escape(name[2:])}\b", text):
            value = value or (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "")
            return ArgumentError(f"{name}{' ' + value if value else ''}: {text}; {HELP}")
    return ArgumentError(f"{text} ({HELP})")
