"""STAND-IN for Ascend's apex (gitee ascend/apex master 49a7994, 2023-11; no NPU exists on this machine): amp and
NpuFusedAdamW, computing on CPU. Real Ascend apex builds for Python 3.7-3.10 only (scripts/build.sh)."""

from . import amp, optimizers  # noqa: F401

IS_STANDIN = True
