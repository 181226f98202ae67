"""Trainer mixin that runs the Ascend recipe's apex amp path inside a transformers 5 Trainer.

transformers 5 dropped apex, so with `plan.amp == "apex"` this mixin does what the recipe's forked Trainer did:
apex's NpuFusedAdamW over the Trainer's weight-decay groups, `amp.initialize(model, optimizer, opt_level,
loss_scale, combine_grad)` before DDP wraps the model, backward through `amp.scale_loss`, and the global-norm clip
on the combined grad buffers. Off the apex path it swaps in the GradScaler the plan asks for (static on NPU) and,
with torch_npu's fused optimizer, clips on its combined buffers.

Grads in combined buffers (apex, torch_npu's fused optimizers) must stay those buffers' views: the Trainer's
`model.zero_grad()` sets them to None in torch 2, so the mixin makes it zero them in place, as torch 1.x did.

Overrides: `create_optimizer`, `training_step` (a one-time hook, then the Trainer's own) and `_clip_grad_norm`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from clip_train.backend import APEX_OPTIMIZER, Plan, make_grad_scaler


class BackendTrainerMixin:
    """Put before `Trainer` in the bases: `class ClipTrainer(BackendTrainerMixin, Trainer)`; pass `backend_plan=`."""

    def __init__(self, *args: Any, backend_plan: Plan | None = None, **kwargs: Any) -> None:
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

    def _clip_grad_norm(self, model: torch.nn.Module):
        plan, optimizer, max_norm = self.backend_plan, self._raw_optimizer, self.args.max_grad_norm
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
