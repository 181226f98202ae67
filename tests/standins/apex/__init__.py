"""STAND-IN for Ascend's apex (no NPU exists on this machine): amp and NpuFusedAdamW, computing on CPU."""

from . import amp, optimizers  # noqa: F401

IS_STANDIN = True
