"""Settings chosen per device family: DDP, TF32, the loss-logging filter, one process per device.

Each is chosen only when the user did not give its TrainingArguments flag (`--ddp_find_unused_parameters`,
`--ddp_broadcast_buffers`, `--ddp_bucket_cap_mb`, `--logging_nan_inf_filter`, `--tf32`); `choose` returns the
choices and config/settle.py applies them, once; `describe` states the settled values for the start-up line.

- find_unused_parameters off: every trainable parameter of the dual encoder gets a gradient at every step (frozen
  towers have requires_grad=False, which DDP leaves out; tests/unit/device/test_device_settings.py checks it on 2 gloo
  ranks), so the Trainer's default (on) only costs a graph traversal per step.
- broadcast_buffers off: the model's buffers (position / token-type ids) are constants; re-sending them each
  forward is wasted traffic.
- bucket size: the recipe's 150 MB on Ascend (HCCL's per-call cost favours few, large all-reduces); on CUDA
  torch's 25 MB, stated: NCCL on NVLink/PCIe starts the first all-reduce earlier with small buckets, so more of it
  overlaps the backward pass (150 MB would hold ~40 M fp32 gradients, a quarter of clip-roberta, before the first
  all-reduce starts). Not measured here (no multi-GPU host was available): pass --ddp_bucket_cap_mb to tune it.
- logging_nan_inf_filter off on accelerators: it syncs host and device at every micro-step; the non-finite
  check (nonfinite.py) skips and counts non-finite steps instead, and keeps their loss out of the logged mean on the
  device (no sync).
- TF32 on for fp32 runs on CUDA GPUs that have it (matmuls and convolutions in TF32, ~8x the fp32 rate on Ampere+).
- A single process that sees several CUDA GPUs (`python3 run_clip.py` without torchrun) trains on cuda:0 only
  instead of the Trainer's nn.DataParallel over all of them (slow, and its images would be normalised on cuda:0
  and scattered as fp32); the log says to use the launcher or torchrun for all of them.
"""

from __future__ import annotations

from typing import Any

from clip_train.device.backend import BackendPlan

BUCKET_CAP_MB = {"npu": 150, "cuda": 25}


def choose(training_args: Any, plan: BackendPlan, given: set[str]) -> dict[str, Any]:
    """The per-family values of the TrainingArguments flags not in `given` (nothing is set here)."""
    chosen: dict[str, Any] = {}
    if plan.distributed:
        chosen.update(ddp_find_unused_parameters=False, ddp_broadcast_buffers=False)
        if plan.family in BUCKET_CAP_MB:
            chosen["ddp_bucket_cap_mb"] = BUCKET_CAP_MB[plan.family]
    if plan.family != "cpu":
        chosen["logging_nan_inf_filter"] = False
    if plan.family == "cuda" and plan.precision == "fp32" and _tf32_available():
        chosen["tf32"] = True  # TrainingArguments(tf32=True) switches torch's TF32 on when applied
    return {name: value for name, value in chosen.items() if name not in given}


def describe(training_args: Any, plan: BackendPlan) -> dict[str, str]:
    """The settled DDP / loss-filter / TF32 values, for the plan's start-up line (`plan.settings`)."""
    settings = {}
    if plan.distributed:
        settings["ddp"] = (
            f"find_unused_parameters={training_args.ddp_find_unused_parameters} "
            f"broadcast_buffers={training_args.ddp_broadcast_buffers} "
            f"bucket_cap_mb={training_args.ddp_bucket_cap_mb or 25}"
        )
    if plan.family != "cpu":
        settings["nan/inf loss filter"] = "Trainer's" if training_args.logging_nan_inf_filter else "on device"
    if plan.family == "cuda":
        settings["tf32"] = "on" if training_args.tf32 else "off"
    return settings


def one_device_per_process(training_args: Any, plan: BackendPlan) -> str | None:
    """Without torchrun, train on one GPU (cuda:0) however many are visible: the note to log when that applies
    (settle then sets the Trainer's GPU count to 1; with more it wraps the model in nn.DataParallel)."""
    if plan.distributed or plan.family != "cuda":
        return None
    visible = training_args.n_gpu
    if visible <= 1:
        return None
    return (
        f"{visible} GPUs visible but one process (no torchrun): training on cuda:0 only, not nn.DataParallel; "
        f"for all of them use the launcher (test/train_clip_*_8p.sh) or torchrun --nproc_per_node {visible}"
    )


def _tf32_available() -> bool:
    from transformers.utils import is_torch_tf32_available

    return bool(is_torch_tf32_available())
