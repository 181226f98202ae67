"""TrainingArguments settled once, at start-up, and only read afterwards.

What this host and these flags call for is decided where that knowledge lives — the backend plan (device/backend.py),
the per-family DDP / loss-filter / TF32 settings (device/settings.py), the DataLoader settings (data/feeding.py),
the checkpoints kept (checkpoint/saving.py), checkpointing the towers (model.py) — and each returns its choices
rather than setting them. ``settle`` applies them all here, with one re-validation by TrainingArguments'
``__post_init__``, and returns a ``Settled`` record of what was chosen, which run_clip.py logs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from clip_train.checkpoint.saving import settle_save_args
from clip_train.data.feeding import feeding_defaults
from clip_train.device import backend
from clip_train.device import settings as device_settings
from clip_train.device.families import VISIBLE_DEVICES_ENV, pinned_card_problem
from clip_train.errors import ArgumentError


@dataclass(frozen=True)
class Settled:
    """What start-up chose for this run, and why (the plan's notes); run_clip.py logs it once logging is set."""

    plan: backend.BackendPlan  # device, precision, optimizer; its notes say what was changed and why
    device_settings: dict[str, Any] = field(default_factory=dict)  # DDP / loss filter / TF32 flags chosen
    feeding: dict[str, Any] = field(default_factory=dict)  # DataLoader settings chosen (not given)
    kept_checkpoints: int | None = None  # --save_total_limit chosen (None: the user's stands)
    checkpoint_towers: bool = False  # --gradient_checkpointing: model.checkpoint_towers does it per tower


def make_plan(family: str, training_args: Any, recipe_args: Any) -> backend.BackendPlan:
    """The device/precision plan for these flags on this host (the family detected once, by run_clip.py)."""
    try:
        return backend.make_backend_plan(
            family,
            fp16=training_args.fp16,
            bf16=training_args.bf16,
            fp16_opt_level=recipe_args.fp16_opt_level,
            loss_scale=recipe_args.loss_scale,
            optim=recipe_args.requested_optim or training_args.optim.value,
            use_combine_grad=recipe_args.use_combine_grad,
            apex_available=backend.ascend_apex_available(),
            # From torchrun's environment: asking training_args would set up the process group before the plan.
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", -1)),
        )
    except ValueError as e:
        raise ArgumentError(str(e)) from e


def settle(
    training_args: TrainingArguments,
    recipe_args: Any,
    data_args: Any,
    family: str,
    given: set[str],
    pinned: Mapping[str, str | None] | None = None,
) -> tuple[TrainingArguments, Settled]:
    """The TrainingArguments this run trains with (a settled copy), and the record of what was chosen.

    ``given``: the flags on the command line (feeding.given_options); ``pinned``: what families.pin_card set
    for --device_id before the family was detected.
    """
    problem = pinned_card_problem(recipe_args.device_id, pinned or {}, family)
    if problem:
        raise ArgumentError(problem)
    plan = make_plan(family, training_args, recipe_args)
    chosen_device = device_settings.choose(training_args, plan, given)
    feeding = feeding_defaults(
        training_args, given, accelerator=plan.family != "cpu",
        image_cache=data_args.image_cache and not data_args.train_shards,  # shards decode in the loader
    )  # fmt: skip
    keep = settle_save_args(training_args)
    towers = bool(training_args.activation_checkpointing)
    overrides = {
        **backend.training_args_overrides(plan),
        **chosen_device,
        **_fields(training_args, feeding),
        **keep,
        # The dual encoder declares no checkpointing support (the Trainer would raise): its towers are
        # checkpointed instead (model.checkpoint_towers), so the Trainer's flag stays off.
        **({"activation_checkpointing": False, "gradient_checkpointing": False} if towers else {}),
    }
    settled = dataclasses.replace(training_args, **overrides)  # re-validated by its __post_init__
    one_device = device_settings.one_device_per_process(settled, plan)
    if one_device:
        settled._n_gpu = 1  # the Trainer wraps the model in nn.DataParallel when n_gpu > 1
    notes = [*plan.notes, *([one_device] if one_device else [])]
    if pinned:
        notes.append(
            f"--device_id {recipe_args.device_id}: {VISIBLE_DEVICES_ENV[family]}={pinned[VISIBLE_DEVICES_ENV[family]]} "
            f"leaves that card the only one visible; this process sees it as {plan.device}"
        )
    plan = dataclasses.replace(plan, settings=device_settings.describe(settled, plan), notes=notes)
    record = Settled(plan, chosen_device, feeding, keep.get("save_total_limit"), towers)
    return settled, record


def _fields(training_args: Any, chosen: dict[str, Any]) -> dict[str, Any]:
    """``chosen`` as TrainingArguments fields: 'accelerator_config.non_blocking' becomes a new accelerator_config."""
    out = {k: v for k, v in chosen.items() if "." not in k}
    nested = {k.split(".", 1)[1]: v for k, v in chosen.items() if k.startswith("accelerator_config.")}
    if nested:
        out["accelerator_config"] = dataclasses.replace(training_args.accelerator_config, **nested)
    return out
