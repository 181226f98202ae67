"""The non-finite step check: an optimizer step whose gradients are not finite is not applied, on every precision path.

One mechanism for apex (static and dynamic scale), the torch_npu and CUDA GradScalers (static or dynamic), bf16
and fp32. The Trainer computes the gradient norm of every step (`_get_grad_norm`, after the clip; with a GradScaler
on unscaled grads); the norm is finite exactly when every gradient is. Before the optimizer step the check reads
that one flag (one host-device sync per optimizer step: GradScalers and apex's dynamic scaler already sync there,
bf16/fp32 pay it on CPU and NPU; on CUDA with torch's fused AdamW the flag is read a step later, at the same step
on every rank, nearly always without a stall, see "the sync-free path" below) and, when it is not finite:

- does not call the optimizer (weights, Adam moments and the step counter stay as they were);
- marks the step skipped for accelerate, so the Trainer does not advance the LR schedule (with a fused AdamW
  the GradScaler calls ``optimizer.step`` even when it skips, so accelerate alone never sees a skip);
- lowers the loss scale: a dynamic scaler backs off by itself; a static one (apex's number, torch_npu's
  ``GradScaler(dynamic=False)``) is halved here, and the log says so, and doubled again (never above the scale
  asked for) after ``STATIC_GROWTH_INTERVAL`` applied steps in a row, as dynamic scalers grow theirs;
- counts the step (``train_skipped_nonfinite_steps``) and logs it with its number;
- after ``max_consecutive`` such steps in a row stops with `TrainingDiverged`: the weights were never updated
  with a non-finite step, and the last checkpoint on disk is left as it is.

A checkpoint or final model with non-finite weights is never written (`check_finite_weights`). Every checkpoint
carries the check's state (``nonfinite_state.json``: the skipped steps, the lowered scale and apex's scaler), which a
resume restores: the scale goes on from where the run had lowered it, and the skip count covers the whole run.

The Trainer's `logging_nan_inf_filter` (replace a non-finite micro-step loss in the logged mean by the mean so far)
costs a host sync per micro-step; device/settings.py turns it off on accelerators and `training_step` here does the
same replacement on the device (`torch.where`), so logged losses stay finite without the sync.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any

import torch

from clip_train.errors import TrainingDiverged

logger = logging.getLogger(__name__)

# A dynamic scale from 2**24 reaches 1 in 24 halvings: 32 non-finite steps in a row means the gradients are not
# finite at any scale (divergence), not an overflow the scale can fix.
MAX_CONSECUTIVE_SKIPS = 32
STATIC_BACKOFF = 0.5
# A static scale only ever lowered ratchets down with every scattered overflow, towards scales at which small
# gradients vanish in fp16. apex's dynamic scaler (scale_window) and torch's GradScaler (growth_interval) double
# theirs after 2000 overflow-free steps; a lowered static scale grows back at the same pace, up to the one asked for.
STATIC_GROWTH_INTERVAL = 2000
STATIC_GROWTH = 2.0
STATE_FILE = "nonfinite_state.json"  # the check's state, in every checkpoint folder (covered by its marker)


def is_finite(norm: torch.Tensor | float | None) -> bool:
    """Whether a gradient norm is finite (None: no gradients this step, nothing to guard)."""
    if norm is None:
        return True
    if isinstance(norm, torch.Tensor):
        return bool(torch.isfinite(norm).all())  # the check's one host sync per optimizer step
    return math.isfinite(float(norm))


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Refuse to save non-finite weights: raise TrainingDiverged naming the first bad parameter."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                raise TrainingDiverged(
                    f"not saving the {what}: parameter {name} is not finite; the checkpoints already in the output "
                    "folder are left as they are (resume from the last one with a lower --learning_rate)"
                )


class NonFiniteStepMixin:
    """Trainer mixin (before `Trainer` in the bases). Subclasses may override `_backend_skip_pending` and
    `_lower_static_scale` for scalers the Trainer does not know (apex)."""

    max_consecutive_skips = MAX_CONSECUTIVE_SKIPS
    static_growth_interval = STATIC_GROWTH_INTERVAL
    lazy_devices: tuple[str, ...] = ("cuda",)  # where the sync-free path is used when it applies

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._guard_norm: Any = None
        self._guarded_optimizer: Any = None
        self._lazy: bool | None = None  # decided at the first step
        self._pending: list[tuple[int, Any]] = []  # (step, _DeviceFlag) of lazily guarded steps not yet read
        self._skipped_steps: list[int] = []  # the steps (1-based, as logged) whose update was not applied
        self._consecutive_skips = 0
        self._clean_steps = 0  # applied steps since the last skip (a lowered static scale grows back)
        self._scale_ceiling: float | None = None  # the static scale asked for (recorded when first lowered)
        super().__init__(*args, **kwargs)

    # --- the Trainer's hooks --------------------------------------------------------------------------------
    def training_step(
        self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        running = getattr(self, "_tr_loss", None)  # the Trainer's on-device sum since the last log
        if self.args.logging_nan_inf_filter or not isinstance(running, torch.Tensor):
            return loss  # the Trainer filters itself (with its sync), or keeps its sum elsewhere
        mean_so_far = running.detach() / (1 + self.state.global_step - self._globalstep_last_logged)
        return torch.where(torch.isfinite(loss), loss, mean_so_far.to(loss.dtype))

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm)
        self._guard_norm = norm
        if self._guarded_optimizer is not self.optimizer:  # once per optimizer (after accelerate wrapped it)
            self._guard_optimizer(self.optimizer)
        return norm

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        self._resolve_pending()  # the saved LR schedule and counts include every step so far
        check_finite_weights(self.model, f"checkpoint of step {self.state.global_step}")
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # before on_save, whose marker then lists (and hashes) this file too
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            tmp = os.path.join(folder, f".{STATE_FILE}.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(self._guard_state(), f, indent=1)
            os.replace(tmp, os.path.join(folder, STATE_FILE))

    def _load_scaler(self, checkpoint: str | None) -> None:
        super()._load_scaler(checkpoint)  # a GradScaler's scale comes back from the Trainer's scaler.pt
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint else ""
        if not os.path.isfile(path):
            return  # saved before the check kept its state
        with open(path) as f:
            state = json.load(f)
        self._skipped_steps = list(state["skipped_steps"])
        self._consecutive_skips, self._clean_steps = state["consecutive_skips"], state["clean_steps"]
        self._scale_ceiling = state["scale_ceiling"]
        if state.get("loss_scaler") is not None:
            self._restore_loss_scaler(state["loss_scaler"])

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        check_finite_weights(self.model, "model")
        super().save_model(output_dir, _internal_call)

    def nonfinite_metrics(self, prefix: str = "train") -> dict[str, int]:
        """``{prefix}_skipped_nonfinite_steps``: optimizer steps not applied (the same on every rank)."""
        self._resolve_pending()
        return {f"{prefix}_skipped_nonfinite_steps": len(self._skipped_steps)}

    # --- the check --------------------------------------------------------------------------------------------
    def _guard_optimizer(self, optimizer: Any) -> None:
        original = optimizer.step

        @functools.wraps(original)  # keeps the LR scheduler's step-tracking marks on the method
        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            return self._guarded_step(optimizer, original, *args, **kwargs)

        optimizer.step = guarded_step
        self._guarded_optimizer = optimizer

    def _guarded_step(self, optimizer: Any, original: Any, *args: Any, **kwargs: Any) -> Any:
        self._resolve_pending()  # the previous step's flag, at this fixed lag on every rank
        if self._lazy is None:
            self._lazy = self._lazy_applies(optimizer)
        if self._lazy:
            return self._lazy_step(optimizer, original, *args, **kwargs)
        pending = self._backend_skip_pending()
        if not pending and is_finite(self._guard_norm):
            if hasattr(optimizer, "_is_overflow"):
                optimizer._is_overflow = False  # accelerate resets it only when it has a GradScaler
            out = original(*args, **kwargs)
            self._consecutive_skips = 0
            self._grow_static_scale()
            return out
        if pending:
            original(*args, **kwargs)  # apex's own armed skip: it skips, clears its master grads, disarms
        else:
            self._drop_nonfinite_grads()
        self._back_off_scale()
        if hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = True  # accelerate.optimizer_step_was_skipped: the LR schedule holds
        self._record_skip(pending)
        return None

    def _record_skip(self, by_backend: bool = False, lazy_step: int | None = None) -> None:
        # The Trainer counts the step after this call; a lazily read flag names its own step.
        step = self.state.global_step + 1 if lazy_step is None else lazy_step
        self._skipped_steps.append(step)
        self._consecutive_skips += 1
        self._clean_steps = 0
        if lazy_step is not None:
            found = "inf/NaN, skipped on the device"
        else:
            norm = self._guard_norm.item() if isinstance(self._guard_norm, torch.Tensor) else self._guard_norm
            found = "the loss scaler found inf/NaN" if by_backend else f"grad norm {norm}"
        logger.warning(
            "step %d: non-finite gradients (%s): update not applied, LR schedule held "
            "(%d step(s) skipped so far, %d in a row)",
            step, found, len(self._skipped_steps), self._consecutive_skips,
        )  # fmt: skip
        if self._consecutive_skips >= self.max_consecutive_skips:
            first = self._skipped_steps[-self._consecutive_skips]
            raise TrainingDiverged(
                f"{self._consecutive_skips} optimizer steps in a row (steps {first}-{step}) had non-finite "
                f"gradients: training diverged (or the loss scale cannot recover); no non-finite update was "
                f"applied and the checkpoints in {self.args.output_dir} are intact: resume from the last one with "
                "a lower --learning_rate (or --loss_scale dynamic)"
            )

    def _back_off_scale(self) -> None:
        """A dynamic GradScaler backs off in update(); a static one is halved here (and said)."""
        if self._scale_ceiling is None:
            self._scale_ceiling = self._static_scale()  # the scale asked for, before its first lowering
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            if getattr(scaler, "_dynamic", True):
                scaler.update()  # found_inf was recorded when the grads were unscaled for the norm
            else:
                old = scaler.get_scale()
                scaler.update(new_scale=old * STATIC_BACKOFF)
                logger.warning("static loss scale lowered from %.10g to %.10g", old, old * STATIC_BACKOFF)
            return
        self._lower_static_scale()

    def _grow_static_scale(self) -> None:
        """After ``static_growth_interval`` applied steps in a row, double a lowered static scale (up to the one
        asked for)."""
        self._clean_steps += 1
        if self._scale_ceiling is None or self._clean_steps < self.static_growth_interval:
            return
        self._clean_steps = 0
        old = self._static_scale()
        if old is None or old >= self._scale_ceiling:
            return
        new = min(old * STATIC_GROWTH, self._scale_ceiling)
        self._set_static_scale(new)
        logger.info("static loss scale raised from %.10g to %.10g after %d steps without an overflow",
                    old, new, self.static_growth_interval)  # fmt: skip

    def _guard_state(self) -> dict[str, Any]:
        """What a resume needs to go on as if never stopped (saved with every checkpoint)."""
        return {
            "skipped_steps": self._skipped_steps, "consecutive_skips": self._consecutive_skips,
            "clean_steps": self._clean_steps, "scale_ceiling": self._scale_ceiling,
            "loss_scaler": self._loss_scaler_state(),
        }  # fmt: skip

    # --- backend hooks (apex overrides them) ------------------------------------------------------------------
    def _backend_skip_pending(self) -> bool:
        """True when the backend already detected the overflow and will skip the step itself."""
        return False

    def _lower_static_scale(self) -> None:
        """Halve a static loss scale the Trainer does not own (apex's)."""

    def _drop_nonfinite_grads(self) -> None:
        """Clear gradients the Trainer's model.zero_grad() does not reach (apex's fp32 master grads)."""

    def _static_scale(self) -> float | None:
        """The static loss scale in use (None: none, or a dynamic one)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled() and not getattr(scaler, "_dynamic", True):
            return float(scaler.get_scale())
        return None

    def _set_static_scale(self, value: float) -> None:
        self.accelerator.scaler.update(new_scale=value)

    def _loss_scaler_state(self) -> dict | None:
        """A scaler's state the Trainer does not save (apex's; a GradScaler's is in scaler.pt)."""
        return None

    def _restore_loss_scaler(self, state: dict) -> None:
        """Put back what `_loss_scaler_state` saved."""

    # --- the sync-free path (CUDA, torch's fused AdamW, no static scale) -------------------------------------------
    # The fused AdamW kernel takes a `found_inf` tensor and skips the update (and its step count) on the device. The
    # check hands it the step's non-finite flag, copies the flag to pinned host memory behind a CUDA event, and reads
    # it at a fixed lag: step n's flag at step n+1's optimizer step, before that update is queued, waiting for the
    # event if need be (one recorded a whole step earlier: the GPU has nearly always passed it, and waiting for it
    # still leaves step n+1's forward and backward queued, so the GPU never idles). A skipped step's LR-schedule
    # advance is then taken back before step n+1's update. Every rank reads at the same step whatever its own GPU's
    # pace, so replicas apply the same learning rates (reading "when ready" let one rank rewind a step later than
    # another and the replicas drift apart). Counting, logging and the limit follow the same rules.
    def _lazy_applies(self, optimizer: Any) -> bool:
        raw = getattr(optimizer, "optimizer", optimizer)
        scaler = getattr(self.accelerator, "scaler", None)
        sched = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        return (
            self.args.device.type in self.lazy_devices
            and getattr(raw, "_step_supports_amp_scaling", False)
            and isinstance(self._guard_norm, torch.Tensor)
            and not self._backend_skip_pending()
            and (scaler is None or getattr(scaler, "_dynamic", True))  # a static scale is lowered eagerly
            and isinstance(sched, torch.optim.lr_scheduler.LambdaLR)  # rewindable (all of HF's schedules)
        )

    def _lazy_step(self, optimizer: Any, original: Any, *args: Any, **kwargs: Any) -> Any:
        flag = (~torch.isfinite(self._guard_norm)).to(torch.float32)
        raw = getattr(optimizer, "optimizer", optimizer)
        if hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = False  # the Trainer steps the schedule; a skip found later is rewound
        if getattr(self.accelerator, "scaler", None) is not None:
            out = original(*args, **kwargs)  # the GradScaler hands its own found_inf to the fused kernel
        else:
            raw.grad_scale, raw.found_inf = None, flag  # read by torch's fused Adam(W).step
            try:
                out = original(*args, **kwargs)
            finally:
                del raw.grad_scale, raw.found_inf
        self._pending.append((self.state.global_step + 1, _DeviceFlag(flag)))
        return out

    def _resolve_pending(self) -> None:
        """Read every flag not yet read (at most the previous step's), in step order."""
        while self._pending:
            step, flag = self._pending.pop(0)
            if not flag.value():
                self._consecutive_skips = 0
                continue
            self._rewind_schedule()
            self._record_skip(lazy_step=step)

    def _rewind_schedule(self) -> None:
        sched = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)
        sched.last_epoch -= 1
        lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs, strict=True)]
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs


class _DeviceFlag:
    """A 0-d device tensor's value, copied to host memory without a stall (CUDA: pinned buffer + event); reading it
    waits for the event (a step after it was recorded, nearly always passed)."""

    def __init__(self, flag: torch.Tensor) -> None:
        self.event = None
        if flag.device.type == "cuda":
            self.host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flag

    def value(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host.item())
