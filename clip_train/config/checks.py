"""The vocabulary of argument checks: ``Rule(argument, check, expected, fix)`` and the checks themselves.

``check(value, args)`` returns None when the value is fine, else what is wrong ("" when ``expected`` says it all).
Each argument dataclass runs its own rules in ``__post_init__`` (config/args.py); rules that need another
dataclass, or TrainingArguments (transformers' class, not ours), stand in validate.RULES. A failure is one
``ArgumentError`` naming the flag, the value, what was expected and the fix: run_clip.cli prints it as one line.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from clip_train.data.coco import COLUMNS
from clip_train.device.backend import parse_loss_scale
from clip_train.errors import ArgumentError, DataError
from clip_train.eval.zeroshot import class_names, load_templates, read_folder

Check = Callable[[Any, Any], "str | None"]


class Rule(NamedTuple):
    arg: str  # the dataclass field, i.e. the flag without its dashes
    check: Check
    expected: str
    fix: str = ""


def problem(rule: Rule, value: Any, args: Any) -> ArgumentError | None:
    """The error for ``value`` of ``rule.arg`` (args: every argument the check may read), or None."""
    found = rule.check(value, args)
    if found is None:
        return None
    shown = value.value if hasattr(value, "value") else value
    shown = " ".join(map(str, shown)) if isinstance(shown, list | tuple) else shown
    what = f": {found}; expected" if found else ": expected"
    fix = f"; {rule.fix}" if rule.fix else ""
    return ArgumentError(f"--{rule.arg} {shown}{what} {rule.expected}{fix}")


def check(args: Any, rules: Sequence[Rule]) -> None:
    """Raise the first broken rule's ArgumentError (a rule naming no field of ``args`` is a typo: AttributeError)."""
    for rule in rules:
        error = problem(rule, getattr(args, rule.arg), args)
        if error is not None:
            raise error


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
    """An existing writable folder, or one that can be made in its nearest existing parent (tried with a
    temporary folder, removed at once: /proc and read-only mounts pass os.access but refuse mkdir)."""
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
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".clip-probe-", dir=parent))
    except OSError as e:
        return f"is not writable (cannot be created in {parent}: {e.strerror})"
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


def not_with(other: str) -> Check:
    """A source of a split given once: shards and a table file for the same split cannot both be read."""

    def check(v: Any, a: Any) -> str | None:
        return f"--{other} gives the same split" if v and getattr(a, other) else None

    return check


def _zeroshot(v: Any, read: Callable[[Any], Any]) -> str | None:
    """The problem eval/zeroshot.py finds in a --zeroshot_* value (its one-line DataError, less the flag)."""
    if v is None:
        return None
    try:
        read(v)
    except DataError as e:
        problem = str(e).split(": expected")[0].removeprefix(f"--zeroshot_dir {v}")
        return problem.split(f"{v}", 1)[-1].lstrip(": ,")
    return None


def zeroshot_folder(v: Any, a: Any) -> str | None:
    return _zeroshot(v, read_folder)


def zeroshot_templates(v: Any, a: Any) -> str | None:
    return _zeroshot(v, load_templates)


def zeroshot_classnames(v: Any, a: Any) -> str | None:
    """A readable file with one name per class folder of --zeroshot_dir (checked by the rule before)."""
    if v is not None and not a.zeroshot_dir:
        return "given without --zeroshot_dir"
    return _zeroshot(v, lambda f: class_names(read_folder(a.zeroshot_dir)[0], f))
