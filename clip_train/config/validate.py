"""The checks that no single argument dataclass of ours can make: TrainingArguments' values (transformers' class),
rules that read several dataclasses, surprising values, and the parser's own errors; all before anything is
loaded or written.

Our dataclasses check their own fields in ``__post_init__`` (config/args.py, with config/checks.py's ``Rule``).
A failure is one ``ArgumentError`` naming the argument, the value, what was expected and the fix (run_clip.cli
prints it as one ``run_clip.py: error: ...`` line, exit code 2). A legal but surprising value gets one warning line
(``SURPRISES``). A rule here whose argument no dataclass declares is skipped, so rules for flags still on other
branches do no harm.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from clip_train.config.checks import (
    Rule,
    checkpoint,
    creatable_folder,
    json_object,
    number,
    problem,
    reporters,
    steps_or_minus_one,
    when,
    whole,
)
from clip_train.data.feeding import available_cpus
from clip_train.errors import ArgumentError

logger = logging.getLogger(__name__)

HELP = "python3 run_clip.py --help lists every flag"


# --- the rules of TrainingArguments, one line each (our dataclasses check themselves: config/args.py) -------------
def _training(a: Any) -> bool:
    return bool(a.do_train)


RULES: list[Rule] = [
    Rule("output_dir", creatable_folder, "a folder that exists or can be created, writable", "choose another folder"),
    Rule("resume_from_checkpoint", when(_training, checkpoint), "a checkpoint-N folder of an earlier run", "give one, or leave it out to resume from --output_dir's last"),
    # sizes and counts
    Rule("per_device_train_batch_size", whole(1), "a whole number >= 1", "e.g. 64, the recipe's; lower it if memory runs out"),
    Rule("per_device_eval_batch_size", whole(1), "a whole number >= 1", "e.g. 64"),
    Rule("gradient_accumulation_steps", whole(1), "a whole number >= 1", "1 (the default) steps after every batch"),
    Rule("dataloader_num_workers", whole(0), "a whole number >= 0", "0 loads in the training process; leave it out to let run_clip choose"),
    Rule("dataloader_prefetch_factor", whole(1), "a whole number >= 1", "e.g. 2, or leave it out"),
    Rule("max_steps", steps_or_minus_one, "a number of steps >= 1, or -1 to train --num_train_epochs", "0 trains nothing"),
    Rule("num_train_epochs", when(lambda a: a.do_train and a.max_steps < 1, number(0, above=True)), "a number of epochs > 0", "e.g. 3, the recipe's"),
    Rule("seed", whole(0, 2**32 - 1), "a whole number in [0, 2**32 - 1]", "e.g. 42"),
    # optimisation (a learning rate of 0 is legal: the loss of a model left unchanged, a frozen baseline)
    Rule("learning_rate", number(0), "a number >= 0", "e.g. 5e-5"),
    Rule("weight_decay", number(0), "a number >= 0", "e.g. 0.1, the recipe's, or 0"),
    Rule("warmup_steps", number(0), "a number of steps >= 0 (below 1: a fraction of the run)", "e.g. 0, the recipe's"),
    Rule("max_grad_norm", number(0), "a number >= 0 (0: no clipping)", "e.g. 1.0"),
    Rule("adam_beta1", number(0, below=1), "a number in [0, 1)", "e.g. 0.9"),
    Rule("adam_beta2", number(0, below=1), "a number in [0, 1)", "e.g. 0.999"),
    Rule("adam_epsilon", number(0, above=True), "a number > 0", "e.g. 1e-8"),
    # reporting and other Trainer options
    Rule("report_to", reporters, "none, all, or installed integrations such as tensorboard", "e.g. --report_to none"),
    Rule("lr_scheduler_kwargs", json_object, 'a JSON object, e.g. \'{"num_cycles": 2}\'', "quote it for the shell"),
    # cadence
    Rule("save_steps", number(0, above=True), "a number of steps > 0 (below 1: a fraction of the run)", "e.g. 500"),
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
        error = problem(rule, getattr(a, rule.arg), a)
        if error is not None:
            raise error
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
