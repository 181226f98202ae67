"""One code path for Ascend NPU, NVIDIA GPU and CPU: what to run on, in which precision, with which optimizer.

`make_backend_plan` is pure: it turns the device family and the recipe's flags into a `BackendPlan`. `training_args_overrides` /
`apply_plan` hand the plan to a transformers `TrainingArguments`; `apex_amp.BackendTrainerMixin` does the rest
(apex amp on Ascend, a static GradScaler for the native fp16 path).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from clip_train.device.families import FAMILIES

OPT_LEVELS = ("O0", "O1", "O2", "O3")
RECIPE_APEX_OPTIM = "adamw_apex_fused_npu"  # the recipe's --optim; not a transformers 5 name
APEX_OPTIMIZER = (
    "apex_npu_fused"  # BackendPlan.optimizer value: apex.optimizers.NpuFusedAdamW, built by the mixin
)
# What TrainingArguments.optim says while the mixin builds the apex optimizer itself.
PLACEHOLDER_OPTIM = "adamw_torch"
FUSED_ADAMW = {"npu": "adamw_torch_npu_fused", "cuda": "adamw_torch_fused", "cpu": "adamw_torch_fused"}
DIST_BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
# The recipe's start-up settings (ModelZoo CLIP_for_PyTorch run_clip.py, `__main__`).
NPU_OPTIONS = {"ACL_OP_SELECT_IMPL_MODE": "high_performance", "ACL_OPTYPELIST_FOR_IMPLMODE": "LayerNorm"}


@dataclass
class BackendPlan:
    family: str  # npu | cuda | cpu
    device: str  # the torch device this process trains on
    dist_backend: str | None  # hccl | nccl | gloo when distributed, else None
    world_size: int
    precision: str  # fp32 | fp16 | bf16
    amp: str  # apex | native | none
    opt_level: str | None  # apex opt level; None off the apex path
    loss_scale: float | str | None  # a number = static; "dynamic"; None = no loss scaling
    optimizer: str  # a transformers optim name, or APEX_OPTIMIZER
    combine_grad: (
        bool  # combined grad buffers (apex, or torch_npu's fused optimizer) + fused global-norm clip
    )
    init_scale: float | None = None  # first scale of a dynamic GradScaler (None: library default 2**16)
    notes: list[str] = field(default_factory=list)  # one-line messages for the user
    instead_of: str | None = (
        None  # what was asked and does not run here (e.g. "apex O2: Ascend apex not installed")
    )
    settings: dict[str, Any] = field(
        default_factory=dict
    )  # DDP / TF32 / logging choices (device/settings.py)

    @property
    def distributed(self) -> bool:
        return self.dist_backend is not None


def detect_family() -> str:
    """'npu' when torch_npu imports and sees a device, else 'cuda' when CUDA has one, else 'cpu'."""
    if _npu_device_count() > 0:
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _npu_device_count() -> int:
    try:
        import torch_npu
    except Exception:  # not installed, or installed without CANN: either way no NPU to use
        return 0
    try:
        return int(torch_npu.npu.device_count()) if torch_npu.npu.is_available() else 0
    except RuntimeError:
        return 0


def ascend_apex_available() -> bool:
    """True when Ascend's apex (amp + NpuFusedAdamW) imports; NVIDIA apex lacks NpuFusedAdamW and is not used."""
    try:
        from apex import amp  # noqa: F401
        from apex.optimizers import NpuFusedAdamW  # noqa: F401
    except Exception:
        return False
    return True


def parse_loss_scale(value: float | int | str | None) -> float | str:
    """--loss_scale as given: a positive number (static scale) or None / 'dynamic'."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "dynamic"):
        return "dynamic"
    try:
        scale = float(value)
    except (TypeError, ValueError):
        scale = float("nan")
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"--loss_scale must be a positive number or 'dynamic', got {value!r}")
    return scale


def make_backend_plan(
    family: str,
    *,
    fp16: bool,
    bf16: bool,
    fp16_opt_level: str = "O1",
    loss_scale: float | int | str | None = None,
    optim: str = "adamw_torch_fused",
    use_combine_grad: bool = False,
    apex_available: bool = False,
    world_size: int = 1,
    local_rank: int = -1,
) -> BackendPlan:
    """Decide device, distribution, precision, loss scaling and optimizer for one process."""
    if family not in FAMILIES:
        raise ValueError(f"unknown device family {family!r}; expected one of {', '.join(FAMILIES)}")
    if fp16 and bf16:
        raise ValueError("--fp16 and --bf16 were both given; pass only one of them")
    if fp16_opt_level not in OPT_LEVELS:
        raise ValueError(f"--fp16_opt_level must be one of {', '.join(OPT_LEVELS)}, got {fp16_opt_level!r}")
    scale = parse_loss_scale(loss_scale)
    _check_apex_combinations(fp16, fp16_opt_level, optim, use_combine_grad)
    notes: list[str] = []
    device, dist_backend = _device(family, world_size, local_rank)
    plan = BackendPlan(
        family, device, dist_backend, world_size, "fp32", "none", None, None, optim, False, notes=notes
    )

    if fp16 and family == "npu" and apex_available:
        _apex_fp16(plan, fp16_opt_level, scale, use_combine_grad)
        return plan
    if fp16 and fp16_opt_level == "O0":
        notes.append("--fp16_opt_level O0 is fp32 training: running fp32")
    elif fp16 and family == "cpu":
        plan.instead_of = f"fp16 {fp16_opt_level}: no fp16 training on CPU"
        notes.append(
            "--fp16 on CPU: running fp32 (accelerate has no CPU fp16 path and would ignore the flag silently); "
            "pass --bf16 for CPU autocast"
        )
    elif fp16:
        _native_fp16(plan, fp16_opt_level, scale, apex_available)
    elif bf16:
        plan.precision, plan.amp = "bf16", "native"
        notes.append(f"bf16: torch.autocast({family}, bfloat16), fp32 weights, no loss scaling")
        if family == "npu" and apex_available:
            notes.append("apex amp is fp16-only; --bf16 uses native autocast instead")
    if isinstance(scale, float) and plan.loss_scale is None:
        notes.append(f"--loss_scale {loss_scale} ignored: no fp16 loss scaling in this run")
    _native_optimizer(plan, use_combine_grad)
    return plan


def _check_apex_combinations(fp16: bool, opt_level: str, optim: str, combine_grad: bool) -> None:
    """Ascend apex refuses these inside amp.initialize (its NPU fused optimizers only with O1/O2, combine_grad only
    with O1/O2); refused here on every host, so a command line means the same everywhere."""
    if not fp16 or opt_level in ("O1", "O2"):
        return
    if optim == RECIPE_APEX_OPTIM:
        raise ValueError(
            f"--fp16_opt_level {opt_level} with --optim {RECIPE_APEX_OPTIM}: apex runs its NPU fused optimizer "
            "only with O1 or O2; give --fp16_opt_level O1/O2 or another --optim"
        )
    if combine_grad:
        raise ValueError(
            f"--fp16_opt_level {opt_level} with --use_combine_grad: apex combines gradients only with O1 or O2; "
            "give --fp16_opt_level O1/O2 or drop --use_combine_grad"
        )


def _device(family: str, world_size: int, local_rank: int) -> tuple[str, str | None]:
    """Under torchrun one process per device, LOCAL_RANK picks it; alone, <family>:0 (the card --device_id named,
    made the only visible one before start-up: families.pin_card)."""
    if world_size > 1 or local_rank != -1:
        device = "cpu" if family == "cpu" else f"{family}:{max(local_rank, 0)}"
        return device, DIST_BACKENDS[family]
    return ("cpu" if family == "cpu" else f"{family}:0"), None


def _apex_fp16(plan: BackendPlan, opt_level: str, scale: float | str, combine_grad: bool) -> None:
    plan.amp, plan.opt_level, plan.loss_scale, plan.combine_grad = "apex", opt_level, scale, combine_grad
    plan.precision = "fp32" if opt_level == "O0" else "fp16"
    if opt_level in ("O2", "O3"):
        kept = "fp32 master weights in the optimizer" if opt_level == "O2" else "no fp32 master weights"
        plan.notes.append(f"apex {opt_level}: model weights cast to fp16, {kept}")
    if isinstance(scale, float):
        plan.notes.append(
            f"apex static loss scale {scale:.10g} (never adjusted; a step that overflows is not skipped)"
        )
    if plan.optimizer == RECIPE_APEX_OPTIM:
        plan.optimizer = APEX_OPTIMIZER
    if combine_grad:
        plan.notes.append(
            "combine_grad: grads live in flat combined buffers; the global norm is clipped on them"
        )


def _native_fp16(plan: BackendPlan, opt_level: str, scale: float | str, apex_available: bool) -> None:
    family = plan.family
    plan.precision, plan.amp = "fp16", "native"
    if family == "npu" and not apex_available:
        plan.instead_of = f"apex {opt_level}: Ascend apex not installed"
        plan.notes.append(
            "Ascend apex not installed (it builds for Python 3.7-3.10 only): native torch.autocast(npu, fp16) + "
            "torch_npu GradScaler"
        )
    elif opt_level in ("O2", "O3"):
        plan.instead_of = f"apex {opt_level}: apex amp runs only on Ascend"
    if opt_level in ("O2", "O3"):
        plan.notes.append(
            f"--fp16_opt_level {opt_level} has no native twin: autocast keeps fp32 weights and casts per op (like O1), "
            "no fp16 weights, no fp32 master copy"
        )
    if scale == "dynamic":
        plan.loss_scale = "dynamic"
    elif family == "npu":
        plan.loss_scale = scale
        plan.notes.append(f"static loss scale {scale:.10g}: torch_npu GradScaler(dynamic=False)")
    else:
        # CUDA fp16 has no saturation mode: a fixed 1.28e7 overflows and every step would be skipped.
        plan.loss_scale, plan.init_scale = "dynamic", scale
        plan.notes.append(
            f"CUDA: --loss_scale {scale:.10g} is the first scale of a dynamic GradScaler (fp16 overflow backs it off)"
        )


def _native_optimizer(plan: BackendPlan, combine_grad: bool) -> None:
    family, requested = plan.family, plan.optimizer
    fused = FUSED_ADAMW[family]
    if requested == RECIPE_APEX_OPTIM:
        plan.optimizer = fused
        plan.notes.append(f"--optim {RECIPE_APEX_OPTIM} needs Ascend apex with --fp16: using {fused}")
    elif requested == "adamw_torch_npu_fused" and family != "npu":
        plan.optimizer = fused
        plan.notes.append(f"--optim adamw_torch_npu_fused needs torch_npu: using {fused}")
    if not combine_grad:
        return
    if plan.optimizer == "adamw_torch":
        plan.optimizer = fused
    if plan.optimizer == "adamw_torch_npu_fused":
        # torch_npu's fused optimizers flatten params and grads into combined buffers themselves.
        plan.combine_grad = True
        plan.notes.append(
            "--use_combine_grad without apex: torch_npu's NpuFusedAdamW keeps combined grad buffers; "
            "the global norm is clipped on them (clip_grad_norm_fused_)"
        )
    else:
        plan.notes.append(
            f"--use_combine_grad without apex: {plan.optimizer} updates all params in one fused step and "
            "torch's clip_grad_norm_ uses multi-tensor kernels; there are no combined grad buffers"
        )


def describe_precision(plan: BackendPlan) -> str:
    """What computes in which precision, and what was asked instead when that cannot run here."""
    precision = plan.precision
    if plan.amp == "apex":
        precision += f" (apex amp {plan.opt_level})"
    elif plan.amp == "native":
        precision += " (torch.autocast, fp32 weights)"
    if plan.instead_of:
        precision += f" INSTEAD OF {plan.instead_of}"
    return precision


def describe(plan: BackendPlan) -> str:
    """The one start-up line: family, device, world size, backend, precision, loss scaling, optimizer, settings."""
    precision = describe_precision(plan)
    if plan.loss_scale is None:
        scaling = "none"
    elif plan.loss_scale == "dynamic":
        scaling = "dynamic" + (f" from {plan.init_scale:.10g}" if plan.init_scale else "")
    else:
        scaling = f"static {plan.loss_scale:.10g}"
    optimizer = "apex NpuFusedAdamW" if plan.optimizer == APEX_OPTIMIZER else plan.optimizer
    if plan.combine_grad:
        optimizer += " + combined grads"
    settings = "".join(f" | {key} {value}" for key, value in plan.settings.items())
    return (
        f"backend: {plan.family} | device {plan.device} | world size {plan.world_size} | "
        f"dist {plan.dist_backend or 'none'} | precision {precision} | loss scale {scaling} | optimizer {optimizer}"
        + settings
    )


def parser_defaults(family: str) -> dict[str, Any]:
    """Defaults for HfArgumentParser.set_defaults before parsing: on CPU, `--bf16` only parses with use_cpu, and
    without use_cpu torchrun on a CPU machine runs undistributed copies."""
    return {"use_cpu": True} if family == "cpu" else {}


def training_args_overrides(plan: BackendPlan) -> dict[str, Any]:
    """TrainingArguments fields that make a transformers 5 Trainer do what the plan says."""
    overrides: dict[str, Any] = {
        # apex does its own casting and scaling: accelerate must not autocast or GradScale on top of it.
        "fp16": plan.precision == "fp16" and plan.amp == "native",
        "bf16": plan.precision == "bf16",
        "use_cpu": plan.family == "cpu",
        "optim": PLACEHOLDER_OPTIM if plan.optimizer == APEX_OPTIMIZER else plan.optimizer,
    }
    # Only when distributed: in a single process a backend makes accelerate query a process group that is not there.
    if plan.distributed:
        overrides["ddp_backend"] = plan.dist_backend
    return overrides


def apply_plan(training_args: Any, plan: BackendPlan) -> Any:
    """A copy of `training_args` (re-validated by its __post_init__) with the plan's fields set."""
    return dataclasses.replace(training_args, **training_args_overrides(plan))


def make_grad_scaler(plan: BackendPlan) -> Any | None:
    """The GradScaler the native fp16 path needs when accelerate's default (dynamic, 2**16) is not it."""
    if plan.amp != "native" or plan.precision != "fp16":
        return None
    if plan.family == "npu" and isinstance(plan.loss_scale, float):
        import torch_npu

        scaler_cls = torch_npu.npu.amp.GradScaler
        if "dynamic" in inspect.signature(scaler_cls).parameters:
            return scaler_cls(init_scale=plan.loss_scale, dynamic=False)
        # A torch_npu without `dynamic`: never grow; it still backs off on a real overflow.
        return scaler_cls(init_scale=plan.loss_scale, growth_interval=2**31 - 1)
    if plan.family == "cuda" and plan.init_scale:
        return torch.amp.GradScaler("cuda", init_scale=plan.init_scale)
    return None


def set_npu_options(family: str) -> bool:
    """The recipe's Ascend start-up settings; a no-op (False) off NPU. Call first, before the arguments are parsed:
    TrainingArguments sets the device and the process group up, and the recipe set these before both."""
    if family != "npu":
        return False
    import torch_npu

    torch_npu.npu.set_option(dict(NPU_OPTIONS))
    torch_npu.npu.set_compile_mode(jit_compile=False)  # eager op dispatch, as the recipe ran
    # torch_npu's npuConfig only has a __setattr__ (no readable attribute): set it, never test for it.
    torch_npu.npu.config.allow_internal_format = False
    return True


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels so wall-clock timings are real; nothing to wait for on CPU."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "npu":
        import torch_npu

        torch_npu.npu.synchronize(device)


def leave_process_group() -> None:
    """Tear the process group down before exit. Left to interpreter exit, its threads can abort the process after a
    finished run ("terminate called without an active exception"), and torchrun then reports the run as failed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
