"""STAND-IN for Ascend apex.amp (no NPU exists on this machine).

Keeps the contracts the project relies on and records every call: `initialize` once per optimizer (patching the
optimizer like apex does), `scale_loss` as a context manager that scales, then unscales after backward, grads
"combined" after the first backward (with combine_grad or an NPU fused optimizer) that must stay the params' `.grad`
tensors from then on, `clip_optimizer_grad_norm_fused` on those grads, and `master_params`. With O2/O3 the model's
forward is patched like apex patches it: outputs pass through apex's `applier`, so a ModelOutput comes back as a
plain dict (attribute access fails) with float32 tensors. The fp16 casts themselves are skipped on this CPU.
"""

from __future__ import annotations

import collections.abc
import types
from contextlib import contextmanager

import torch
from standin_clip import clip_grads_

CALLS: list[tuple] = []
DYNAMIC_INIT_SCALE = 2.0**16


class _Stash:
    def __init__(self, loss_scale, combine: bool):
        self.scale = DYNAMIC_INIT_SCALE if loss_scale in (None, "dynamic") else float(loss_scale)
        self.combine = combine
        self.combined = None  # [(param, grad tensor)] once grads are combined


def _params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_combined(optimizer) -> None:
    stash = optimizer._amp_stash
    for param, grad in stash.combined or ():
        if param.grad is not grad:
            raise RuntimeError(
                "stand-in apex: a param's .grad is no longer its combined-buffer tensor (set to None or replaced); "
                "real apex would keep stepping on stale combined buffers"
            )


def _apex_applier(value):
    """apex's output caster: tensors to float32; Mappings (ModelOutput included) to plain dicts."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, str) or hasattr(value, "to"):
        return value
    if isinstance(value, collections.abc.Mapping):
        return {k: _apex_applier(v) for k, v in value.items()}
    if isinstance(value, collections.abc.Iterable):
        return type(value)(_apex_applier(v) for v in value)
    return value


def initialize(
    models, optimizers=None, enabled=True, opt_level="O1", loss_scale=None, combine_grad=None, **kwargs
):
    if hasattr(optimizers, "_amp_stash"):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")
    CALLS.append(
        (
            "initialize",
            {
                "opt_level": opt_level,
                "loss_scale": loss_scale,
                "combine_grad": combine_grad,
                "model": models,
                "optimizer": optimizers,
            },
        )
    )
    combine = bool(combine_grad) or getattr(optimizers, "is_npu_fused_optimizer", False)
    optimizers._amp_stash = _Stash(loss_scale, combine)
    original_step = optimizers.step

    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError("Currently, Amp does not support closure use with optimizers.")
        _check_combined(self)
        CALLS.append(("step",))
        return original_step()

    def zero_grad(self):  # apex's patched zero_grad takes no arguments and zeroes in place
        for param in _params(self):
            if param.grad is not None:
                param.grad.zero_()

    if opt_level in ("O2", "O3"):
        forward = models.forward
        models.forward = lambda *args, **kw: _apex_applier(forward(*args, **kw))
    optimizers.step = types.MethodType(step, optimizers)
    optimizers.zero_grad = types.MethodType(zero_grad, optimizers)
    optimizers.clip_optimizer_grad_norm_fused = types.MethodType(_clip_optimizer_grad_norm_fused, optimizers)
    return models, optimizers


@contextmanager
def scale_loss(loss, optimizers, loss_id=0, model=None, delay_unscale=False):
    stash = optimizers._amp_stash
    _check_combined(optimizers)
    CALLS.append(("scale_loss", stash.scale))
    yield loss.float() * stash.scale
    with torch.no_grad():
        for param in _params(optimizers):
            if param.grad is not None:
                param.grad.div_(stash.scale)
    if stash.combine and stash.combined is None:
        stash.combined = [(p, p.grad) for p in _params(optimizers) if p.grad is not None]


def _clip_optimizer_grad_norm_fused(self, max_norm, norm_type=2):
    stash = self._amp_stash
    if not stash.combined:
        raise RuntimeError("stand-in apex: no combined grads (needs combine_grad=True and a backward first)")
    _check_combined(self)
    total = clip_grads_([grad for _, grad in stash.combined], max_norm, norm_type)
    CALLS.append(("clip_optimizer_grad_norm_fused", float(max_norm)))
    return total


def master_params(optimizer):
    CALLS.append(("master_params",))
    yield from _params(optimizer)
