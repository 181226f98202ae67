"""STAND-IN for torch_npu.npu (Ascend/pytorch, torch_npu 2.x: torch_npu/npu/npu_config.py, torch_npu/npu/amp/
grad_scaler.py); no NPU exists here. Every call is recorded in CALLS.

- `config` is setter-only, like torch_npu's npuConfig (a class whose __setattr__ turns `allow_internal_format` into
  set_option({"ALLOW_INTERNAL_FORMAT": ...}) and stores nothing): reading the attribute fails.
- `amp.GradScaler(init_scale, growth_factor, backoff_factor, growth_interval, dynamic, enabled)`: dynamic=True is
  torch's scaler; dynamic=False multiplies the grads by 1/scale WITHOUT an inf/NaN check, never skips a step, and
  its update() leaves the scale alone unless given new_scale. Computes on CPU (torch.amp.GradScaler("cpu")).
"""

import os

import torch

CALLS: list[tuple] = []
DEVICE_COUNT = 0  # a test sets this to pretend an NPU is present


def is_available() -> bool:
    return device_count() > 0


def device_count() -> int:
    """The cards this process sees: as the Ascend runtime does, ASCEND_RT_VISIBLE_DEVICES (when set) keeps the
    listed ones of the DEVICE_COUNT present, up to the first id that is not a present card."""
    listed = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    if listed is None:
        return DEVICE_COUNT
    seen = 0
    for card in listed.split(","):
        if not (card.strip().isdigit() and int(card) < DEVICE_COUNT):
            break
        seen += 1
    return seen


def set_option(options: dict) -> None:
    if not isinstance(options, dict):
        raise TypeError("npu option must be a dict.")
    CALLS.append(("set_option", {k: str(v) for k, v in options.items()}))


def set_compile_mode(jit_compile: bool = False) -> None:
    CALLS.append(("set_compile_mode", jit_compile))


def synchronize(device=None) -> None:
    CALLS.append(("synchronize", device))


class _NpuConfig:
    def __setattr__(self, name, value):
        if name == "allow_internal_format":
            set_option({"ALLOW_INTERNAL_FORMAT": "enable" if value else "disable"})


config = _NpuConfig()


class _GradScaler(torch.amp.GradScaler):
    def __init__(
        self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, dynamic=True,
        enabled=True,
    ):  # fmt: skip
        super().__init__("cpu", init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        self._dynamic = dynamic
        CALLS.append(("GradScaler", {"init_scale": init_scale, "dynamic": dynamic}))

    @property
    def dynamic(self) -> bool:
        return self._dynamic

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        if self._dynamic:
            return super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.mul_(inv_scale)  # no inf/NaN check: found_inf stays 0
        return {found_inf.device: found_inf}

    def update(self, new_scale=None):
        if self._dynamic or new_scale is not None:
            return super().update(new_scale)
        from collections import defaultdict

        from torch.amp.grad_scaler import _refresh_per_optimizer_state

        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        return None


class amp:  # noqa: N801 - mirrors torch_npu.npu.amp
    GradScaler = _GradScaler
