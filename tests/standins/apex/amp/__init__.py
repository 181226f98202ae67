"""STAND-IN for Ascend apex.amp (no NPU exists on this machine), computing on CPU.

Models Ascend apex as of gitee ascend/apex master 49a7994 (2023-11; patch/npu.patch over NVIDIA apex 4ef930c):
apex/amp/frontend.py, _initialize.py, _process_optimizer.py, handle.py, scaler.py. What it keeps, because the
project's numerics depend on it:

- opt levels: O0 fp32; O1 fp32 weights, dynamic scale (its per-op casts are NOT modelled: O1 computes fp32 here);
  O2 model cast to fp16 (BatchNorm excepted), fp32 master weights made lazily, dynamic scale; O3 fp16, no masters,
  scale 1.0. Inputs are cast to fp16 and outputs back to fp32 with apex's `applier` under O2/O3 (a ModelOutput
  comes back as a plain dict).
- restrictions: an NPU fused optimizer only with O1/O2, combine_grad only with O1/O2 (RuntimeError), one
  initialize per optimizer.
- O2 master weights: created at the first scale_loss / zero_grad / `_amp_lazy_init`, replacing the fp16 params in
  the optimizer's param groups, moving their state and recasting it with `load_state_dict(state_dict())` (what
  lazy_init_with_master_weights does). State loaded BEFORE that is cast by torch to the fp16 params' dtype.
- loss scaling (scaler.py): fp16 grads overflow to inf past fp16's range (the CPU computes that naturally: the
  "inf/NaN mode" of 910B chips). Dynamic: an overflow is detected after backward, the scale is halved and a
  one-shot skipping `optimizer.step` is armed (`_amp_stash.already_patched`). STATIC: no check and no skip — the
  inf/NaN grads reach the optimizer (what turns the weights into NaN on a real 910B).
- O2 step: the optimizer steps on the fp32 masters, copies them into the fp16 model params, then clears the
  master grads; the patched `optimizer.zero_grad` zeroes model grads in place and clears master grads.
- combine_grad or an NPU fused optimizer: `torch.nn.Module.zero_grad` is replaced GLOBALLY by an in-place version
  that asserts `set_to_none is False` (tests/standins restores it); the model's grads become combined buffers that
  must stay the params' `.grad` tensors; `clip_optimizer_grad_norm_fused` clips the optimizer's (master) grads.
"""

from __future__ import annotations

import collections.abc
import types
import warnings
from contextlib import contextmanager

import torch
from standin_clip import clip_grads_

from ._amp_state import _amp_state, master_params  # noqa: F401 - apex.amp exports master_params

CALLS: list[tuple] = []
ORIGINAL_MODULE_ZERO_GRAD = torch.nn.Module.zero_grad  # restored by tests/standins.uninstall()
LEVELS = {  # opt_level -> (model dtype, master_weights, default loss_scale)
    "O0": (torch.float32, False, 1.0),
    "O1": (None, False, "dynamic"),
    "O2": (torch.float16, True, "dynamic"),
    "O3": (torch.float16, False, 1.0),
}


class LossScaler:
    """apex/amp/scaler.py LossScaler: `_loss_scale`, `dynamic`, backoff 0.5, window 2000, init 2**16."""

    def __init__(self, loss_scale, init_scale=2.0**16, scale_window=2000, max_loss_scale=2.0**24):
        self.dynamic = loss_scale == "dynamic"
        self._loss_scale = min(max_loss_scale, init_scale) if self.dynamic else float(loss_scale)
        self._max_loss_scale, self._scale_seq_len = max_loss_scale, scale_window
        self._unskipped = 0
        self._has_overflow = False

    def loss_scale(self) -> float:
        return self._loss_scale

    def unscale(self, model_grads, master_grads, add: bool) -> None:
        """master = model / scale (+ master when `add`); a dynamic scaler first checks for inf/NaN and stops."""
        if self.dynamic:
            self._has_overflow = any(not bool(torch.isfinite(g).all()) for g in model_grads)
            if self._has_overflow:
                return
        for model, master in zip(model_grads, master_grads, strict=True):
            value = model.to(master.dtype) / self._loss_scale
            if add:
                master.add_(value)
            else:
                master.copy_(value)

    def update_scale(self) -> bool:
        """True when the step must be skipped (dynamic + overflow); the static scaler never skips."""
        if self._has_overflow and self.dynamic:
            self._loss_scale *= 0.5
            self._unskipped = 0
            return True
        self._unskipped += 1
        if self.dynamic and self._unskipped == self._scale_seq_len:
            self._loss_scale = min(self._max_loss_scale, self._loss_scale * 2.0)
            self._unskipped = 0
        return False


class _Stash:
    def __init__(self, properties: dict, combine: bool):
        self.master_weights = properties["master_weights"]
        self.combine = combine
        self.lazy_init_called = False
        self.already_patched = False
        self.fp16_params: list = []  # O2: the model's fp16 params ...
        self.masters: list = []  # ... and their fp32 master copies, pairwise
        self.combined: list | None = None  # [(param, grad)] of the model once grads are combined


def _module_zero_grad(self, set_to_none: bool = False) -> None:
    """apex/amp/_initialize.py `zero_grad`, installed as torch.nn.Module.zero_grad with combined grads."""
    assert set_to_none is False, "For combined grad, `set_to_none` must be False."
    for p in self.parameters():
        if p.grad is not None:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


def _applier(value, fn):
    """apex/amp/_initialize.py applier: tensors through fn; Mappings (a ModelOutput too) become plain dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, str):
        return value
    if isinstance(value, collections.abc.Mapping):
        return {k: _applier(v, fn) for k, v in value.items()}
    if isinstance(value, collections.abc.Iterable):
        return type(value)(_applier(v, fn) for v in value)
    return value


def _to(dtype):
    return lambda t: t.to(dtype) if t.is_floating_point() else t


def _cast_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """apex convert_network: every module's floating params and buffers to dtype, affine BatchNorm excepted."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                setattr(module, name, buf.to(dtype))
    forward = model.forward

    def new_forward(*args, **kwargs):
        args, kwargs = _applier(args, _to(dtype)), _applier(kwargs, _to(dtype))
        return _applier(forward(*args, **kwargs), _to(torch.float32))

    model.forward = new_forward


def _warn_or_err(msg: str) -> None:
    if _amp_state.hard_override:
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


def initialize(
    models, optimizers=None, enabled=True, opt_level="O1", loss_scale=None, combine_grad=None, **_
):
    if opt_level not in LEVELS:
        raise RuntimeError(f"Unexpected optimization level {opt_level}. Options are 'O0', 'O1', 'O2', 'O3'.")
    if combine_grad and opt_level not in ("O1", "O2"):
        _warn_or_err(
            "Currently, combine_grad=True or check_combined_tensors=True should only be set "
            "by selecting opt_level='O1' or opt_level='O2'."
        )
    if hasattr(optimizers, "_amp_stash"):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")
    fused = getattr(optimizers, "is_npu_fused_optimizer", False)
    if fused and opt_level not in ("O1", "O2"):
        raise RuntimeError(
            "Currently, npu fused optimizer can only be used when opt_level='O1' or opt_level='O2'"
        )
    dtype, master_weights, default_scale = LEVELS[opt_level]
    scale = default_scale if loss_scale is None else loss_scale
    CALLS.append(
        ("initialize", {"opt_level": opt_level, "loss_scale": loss_scale, "combine_grad": combine_grad,
                        "model": models, "optimizer": optimizers})
    )  # fmt: skip
    _amp_state.loss_scalers = [LossScaler(scale)]
    if dtype is not None:
        _cast_model(models, dtype)
    optimizers._amp_stash = _Stash({"master_weights": master_weights}, bool(combine_grad) or fused)
    _process_optimizer(optimizers)
    if combine_grad or fused:
        torch.nn.Module.zero_grad = _module_zero_grad  # global, as apex does
    return models, optimizers


def _process_optimizer(optimizer) -> None:
    stash = optimizer._amp_stash
    original_step, original_zero_grad = optimizer.step, optimizer.zero_grad

    def lazy_init(self):
        if stash.lazy_init_called:
            return
        stash.lazy_init_called = True
        if not stash.master_weights:
            return
        for group in self.param_groups:
            for i, param in enumerate(group["params"]):
                if param.requires_grad and param.dtype == torch.float16:
                    master = param.detach().clone().float()
                    master.requires_grad = True
                    group["params"][i] = master
                    stash.fp16_params.append(param)
                    stash.masters.append(master)
                    if param in self.state:
                        self.state[master] = self.state.pop(param)
        # "Leverage state_dict() and load_state_dict() to recast preexisting per-param state tensors"
        self.load_state_dict(self.state_dict())

    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError("Currently, Amp does not support closure use with optimizers.")
        _check_combined(self)
        CALLS.append(("step",))
        retval = original_step()
        if stash.master_weights:
            with torch.no_grad():
                for model, master in zip(stash.fp16_params, stash.masters, strict=True):
                    model.copy_(master)
            for (
                master
            ) in stash.masters:  # "Clear the master grads that wouldn't be zeroed by model.zero_grad()"
                master.grad = None
        return retval

    def zero_grad(self):  # apex's patched zero_grad takes no arguments and zeroes model grads in place
        self._amp_lazy_init()
        if not stash.master_weights:
            if stash.combine:
                for param in master_params(self):
                    if param.grad is not None:
                        param.grad.zero_()
                return
            return original_zero_grad()
        for param in stash.fp16_params:
            if param.grad is not None:
                param.grad.detach_()
                param.grad.zero_()
        for master in stash.masters:
            master.grad = None

    optimizer._amp_lazy_init = types.MethodType(lazy_init, optimizer)
    optimizer.step = types.MethodType(step, optimizer)
    optimizer.zero_grad = types.MethodType(zero_grad, optimizer)
    optimizer.clip_optimizer_grad_norm_fused = types.MethodType(_clip_optimizer_grad_norm_fused, optimizer)


def _check_combined(optimizer) -> None:
    for param, grad in optimizer._amp_stash.combined or ():
        if param.grad is not grad:
            raise RuntimeError(
                "stand-in apex: a param's .grad is no longer its combined-buffer tensor (set to None or replaced); "
                "real apex would keep stepping on stale combined buffers"
            )


def _model_params(optimizer) -> list:
    stash = optimizer._amp_stash
    return stash.fp16_params + [p for p in master_params(optimizer) if all(p is not m for m in stash.masters)]


@contextmanager
def scale_loss(loss, optimizers, loss_id=0, model=None, delay_unscale=False):
    stash, scaler = optimizers._amp_stash, _amp_state.loss_scalers[0]
    optimizers._amp_lazy_init()
    _check_combined(optimizers)
    if stash.master_weights and not stash.combine:
        for param in stash.fp16_params:  # prepare_backward_with_master_weights: grad copy elision
            param.grad = None
    CALLS.append(("scale_loss", scaler.loss_scale()))
    yield loss.float() * scaler.loss_scale()
    scaler._has_overflow = False
    with torch.no_grad():
        if stash.master_weights:
            pairs = [
                (p, m) for p, m in zip(stash.fp16_params, stash.masters, strict=True) if p.grad is not None
            ]
            fresh = [m for _, m in pairs if m.grad is None]
            for _, master in pairs:
                if master.grad is None:
                    master.grad = torch.zeros_like(master)
            scaler.unscale([p.grad for p, _ in pairs], [m.grad for _, m in pairs], add=True)
            if scaler._has_overflow:
                for master in fresh:
                    master.grad = None
        else:
            grads = [p.grad for p in master_params(optimizers) if p.grad is not None]
            scaler.unscale(grads, grads, add=False)
    if stash.combine and stash.combined is None:
        stash.combined = [(p, p.grad) for p in _model_params(optimizers) if p.grad is not None]
    if scaler.update_scale() and not stash.already_patched:
        _arm_skip(optimizers, scaler)


def _arm_skip(optimizer, scaler) -> None:
    """handle.py: patch optimizer.step to skip once, clear the master grads, and restore itself."""
    stash, step = optimizer._amp_stash, optimizer.step

    def skip_step(closure=None):
        print(
            f"Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to {scaler.loss_scale()}"
        )
        CALLS.append(("skip_step",))
        for master in stash.masters:
            master.grad = None
        optimizer.step = step
        stash.already_patched = False

    optimizer.step = skip_step
    stash.already_patched = True


def _clip_optimizer_grad_norm_fused(self, max_norm, norm_type=2):
    if not self._amp_stash.combine:
        raise RuntimeError(
            "stand-in apex: no combined grads (needs combine_grad=True or an NPU fused optimizer)"
        )
    _check_combined(self)
    grads = [p.grad for p in master_params(self) if p.grad is not None]
    total = clip_grads_(grads, max_norm, norm_type)
    CALLS.append(("clip_optimizer_grad_norm_fused", float(max_norm)))
    return total
