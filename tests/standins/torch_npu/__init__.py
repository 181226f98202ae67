"""STAND-IN for torch_npu (no Ascend NPU exists on this machine): records calls; see ../README.md."""

from . import npu, optim  # noqa: F401

IS_STANDIN = True
