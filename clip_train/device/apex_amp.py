"""Trainer mixin that runs the Ascend recipe's apex amp path inside a transformers 5 Trainer.

transformers 5 dropped apex, so with `plan.amp == "apex"` this mixin does what the recipe's forked Trainer did:
apex's NpuFusedAdamW over the Trainer's weight-decay groups, `amp.initialize(model, optimizer, opt_level,
loss_scale, combine_grad)` before DDP wraps the model, backward through `amp.scale_loss`, and the global-norm clip
on the combined grad buffers. Off the apex path it swaps in the GradScaler the plan asks for (static on NPU) and,
with torch_npu's fused optimizer, clips on its combined buffers.

Grads in combined buffers (apex, torch_npu's fused optimizers) must stay those buffers' views: the Trainer's
`model.zero_grad()` sets them to None in torch 2, so the mixin makes it zero them in place, as torch 1.x did.

Overrides: `create_optimizer`, `training_step` (a one-time hook, then the Trainer's own), `_clip_grad_norm` and
`_load_optimizer_and_scheduler` (apex O2: the fp32 master weights exist before Adam's moments are loaded, so the
moments keep fp32). The non-finite step check (device/nonfinite.py) comes with it; its apex hooks are here.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from clip_train.device.backend import APEX_OPTIMIZER, BackendPlan, describe_precision, make_grad_scaler
from clip_train.device.nonfinite import STATIC_BACKOFF, NonFiniteStepMixin, logger


class BackendTrainerMixin(NonFiniteStepMixin):
    """Put before `Trainer` in the bases: `class ClipTrainer(BackendTrainerMixin, Trainer)`; pass `backend_plan=`."""

    def __init__(self, *args: Any, backend_plan: BackendPlan | None = None, **kwargs: Any) -> None:
        self.backend_plan = backend_plan
        self._amp = None  # the apex.amp module once amp.initialize ran
        self._raw_optimizer = None  # the optimizer before accelerate wraps it
        self._zero_grads_in_place = False
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        plan = self.backend_plan
        if plan is None or self.optimizer is not None:
            return super().create_optimizer(model)
        if plan.amp == "apex":
            return self._create_apex_optimizer(model)
        optimizer = super().create_optimizer(model)
        self._raw_optimizer = optimizer
        self._zero_grads_in_place = bool(getattr(optimizer, "is_fused_optimizer", False))  # torch_npu's fused
        scaler = make_grad_scaler(plan)
        # accelerate made a default scaler in Trainer.__init__; the optimizer takes it at prepare(), after this.
        if scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler = scaler
        return optimizer

    def _create_apex_optimizer(self, model: torch.nn.Module | None) -> torch.optim.Optimizer:
        from apex import amp

        plan = self.backend_plan
        if plan.optimizer == APEX_OPTIMIZER and self.optimizer_cls_and_kwargs is None:
            from apex.optimizers import NpuFusedAdamW

            # The Trainer's create_optimizer still builds the decay / no-decay groups around this class.
            args = self.args
            adam = {
                "lr": args.learning_rate,
                "betas": (args.adam_beta1, args.adam_beta2),
                "eps": args.adam_epsilon,
            }
            self.optimizer_cls_and_kwargs = (NpuFusedAdamW, adam)
        optimizer = super().create_optimizer(model)
        # Before accelerate.prepare wraps the model in DDP, as apex requires.
        model_out, self.optimizer = amp.initialize(
            self.model,
            optimizer,
            opt_level=plan.opt_level,
            loss_scale=plan.loss_scale,
            combine_grad=plan.combine_grad,
        )
        if model_out is not self.model:
            self.model = self.model_wrapped = model_out
        self._amp, self._raw_optimizer, self._zero_grads_in_place = amp, self.optimizer, True
        # training_step ends in accelerator.backward(loss); under apex that one call goes through scale_loss.
        self.accelerator.backward = self._apex_backward
        return self.optimizer

    def _apex_backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        with self._amp.scale_loss(loss, self._raw_optimizer) as scaled_loss:
            scaled_loss.backward(**kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        if self._zero_grads_in_place and "zero_grad" not in vars(model):
            # `model` is the object the training loop calls zero_grad() on (DDP-wrapped or not).
            model.zero_grad = functools.partial(torch.nn.Module.zero_grad, model, set_to_none=False)
        return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model: torch.nn.Module, max_norm: float | None = None):
        plan, optimizer = self.backend_plan, self._raw_optimizer
        max_norm = self.args.max_grad_norm if max_norm is None else max_norm
        if plan is None or optimizer is None:
            return super()._clip_grad_norm(model)
        if self._amp is not None:
            if plan.combine_grad:
                return optimizer.clip_optimizer_grad_norm_fused(max_norm)
            # apex unscales into the fp32 master grads; those are what the optimizer steps on.
            return torch.nn.utils.clip_grad_norm_(self._amp.master_params(optimizer), max_norm)
        if plan.combine_grad and hasattr(optimizer, "clip_grad_norm_fused_"):
            self.accelerator.unscale_gradients()  # a no-op without a GradScaler
            return optimizer.clip_grad_norm_fused_(max_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None and self._amp is not None:
            # Clipping off (--max_grad_norm 0): the Trainer would take the norm of the fp16 model grads, which under
            # O2 still carry the loss scale: in fp16 it is inf whenever scale x |g| > 65504, and the non-finite check
            # would skip a sound step (and halve a static scale) for it. The fp32 master grads are what the optimizer steps on.
            grad_norm = self._clip_grad_norm(model, max_norm=float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint and self._amp is not None:
            # apex makes its fp32 master params lazily (at the first scale_loss). Loaded before that, torch casts
            # Adam's moments to the fp16 model params' dtype and small second moments underflow to zero; loaded
            # after, they land on the fp32 masters bit for bit.
            self._raw_optimizer._amp_lazy_init()
        super()._load_optimizer_and_scheduler(checkpoint)

    def backend_metrics(self, prefix: str = "train") -> dict[str, Any]:
        """What ran (precision, and what was asked instead when it cannot run here) and the skipped non-finite
        steps, for all_results.json."""
        metrics: dict[str, Any] = dict(self.nonfinite_metrics(prefix))
        if self.backend_plan is not None:
            metrics[f"{prefix}_precision"] = describe_precision(self.backend_plan)
        return metrics

    # --- apex's part of the non-finite check ------------------------------------------------------------------
    def _backend_skip_pending(self) -> bool:
        # apex's dynamic scaler found the overflow in scale_loss and armed a one-shot skipping optimizer.step.
        return self._amp is not None and bool(self._raw_optimizer._amp_stash.already_patched)

    def _apex_scaler(self) -> Any:
        if self._amp is None:
            return None
        from apex.amp._amp_state import _amp_state

        return _amp_state.loss_scalers[0]

    def _lower_static_scale(self) -> None:
        old = self._static_scale()
        if old is None:
            return  # no apex, or its dynamic scaler backed off already
        self._set_static_scale(old * STATIC_BACKOFF)
        logger.warning("apex static loss scale lowered from %.10g to %.10g", old, old * STATIC_BACKOFF)

    def _static_scale(self) -> float | None:
        scaler = self._apex_scaler()
        if scaler is None:
            return super()._static_scale()
        return None if scaler.dynamic else float(scaler.loss_scale())

    def _set_static_scale(self, value: float) -> None:
        scaler = self._apex_scaler()
        if scaler is None:
            return super()._set_static_scale(value)
        scaler._loss_scale = value

    def _loss_scaler_state(self) -> dict | None:
        # apex's scale (static or dynamic) and its count towards the next dynamic growth: not in any Trainer file.
        scaler = self._apex_scaler()
        return None if scaler is None else {"loss_scale": scaler._loss_scale, "unskipped": scaler._unskipped}

    def _restore_loss_scaler(self, state: dict) -> None:
        scaler = self._apex_scaler()
        if scaler is not None:
            scaler._loss_scale, scaler._unskipped = state["loss_scale"], state["unskipped"]
            logger.info("apex loss scale restored from the checkpoint: %.10g", scaler._loss_scale)

    def _drop_nonfinite_grads(self) -> None:
        if self._amp is not None:
            # apex's patched zero_grad: zeroes the model grads and clears the fp32 master grads (which its step
            # would have cleared), so the next step does not add this step's infs to its own.
            self._raw_optimizer.zero_grad()
