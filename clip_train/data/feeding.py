"""DataLoader settings the user did not give, chosen for the device and the input path."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def given_options(argv: Sequence[str] | None = None) -> set[str]:
    """Names of the options a command line sets (``--no_x`` counts as x), or the keys of a lone .json file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as f:
            return set(json.load(f))
    names = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    return names | {n[3:] for n in names if n.startswith("no_")}


def feeding_defaults(
    training_args: Any, given: set[str], accelerator: bool, image_cache: bool = True
) -> dict[str, Any]:
    """The DataLoader options the user did not give, as {flag: value} where it differs from now (nothing is set
    here: config/settle.py applies them; ``accelerator_config.non_blocking`` names a field of that flag).

    - pin_memory only with an accelerator (on CPU it is wasted work and a warning), there with non-blocking copies;
    - persistent workers stay off (the user may turn them on): with them, a run resumed mid-epoch does not see
      the batches an uninterrupted run sees (measured by tests/runs/test_resume.py), and the fork they save is cheap
      here because a worker only holds the memory-mapped image cache;
    - with an accelerator, a few workers (up to 4 per rank) and a deeper prefetch (4 batches), to ride out jitter;
    - on CPU the workers share the cores with the model's threads: with the image cache a batch is a copy of
      cached bytes, so it is read in the training process (0 workers: 660 vs 532 samples/s with 2 workers, tiny
      model, 2 cores, medians of 3 in benchmarks/README.md); on the fly, decoding needs the cores (one worker per core).
    """
    changed: dict[str, Any] = {}

    def choose(name: str, value: Any) -> None:
        if name not in given and getattr(training_args, name) != value:
            changed[name] = value

    def now(name: str) -> Any:
        return changed.get(name, getattr(training_args, name))

    per_rank = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if accelerator:
        choose("dataloader_num_workers", min(4, max(1, per_rank - 1)))
    else:
        choose("dataloader_num_workers", 0 if image_cache else min(8, max(1, per_rank)))
    choose("dataloader_pin_memory", accelerator)
    if now("dataloader_num_workers") > 0 and accelerator:
        choose("dataloader_prefetch_factor", 4)
    config = training_args.accelerator_config
    if (
        accelerator
        and now("dataloader_pin_memory")
        and "accelerator_config" not in given
        and not config.non_blocking
    ):
        changed["accelerator_config.non_blocking"] = True  # copies from pinned memory overlap with compute
    return changed
