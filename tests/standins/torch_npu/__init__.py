"""STAND-IN for torch_npu (no Ascend NPU exists on this machine): records calls, computes nothing."""

from . import npu, optim  # noqa: F401

IS_STANDIN = True
