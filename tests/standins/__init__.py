"""Stand-in torch_npu / apex for tests (no NPU exists here); see README.md."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

_MODULE_ZERO_GRAD = torch.nn.Module.zero_grad  # the stand-in apex replaces it globally, as real apex does

HERE = Path(__file__).resolve().parent
NAMES = ("torch_npu", "apex")


def _drop_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in NAMES:
            del sys.modules[name]


def install(monkeypatch) -> None:
    """Make `import torch_npu` / `import apex` find the stand-ins (fresh call records); undo with `uninstall`."""
    _drop_modules()
    monkeypatch.syspath_prepend(str(HERE))
    importlib.invalidate_caches()


def uninstall() -> None:
    """Forget the imported stand-ins so later tests see the real environment (monkeypatch restores sys.path)."""
    torch.nn.Module.zero_grad = _MODULE_ZERO_GRAD
    _drop_modules()
    importlib.invalidate_caches()
