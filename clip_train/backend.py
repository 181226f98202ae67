"""Device family and precision (interim: CPU/CUDA basics; the full NPU/apex plan lands with issue 4)."""

from __future__ import annotations

from typing import Any

import torch


def configure(training_args: Any, recipe_args: Any) -> dict:
    family = "cuda" if torch.cuda.is_available() else "cpu"
    if family == "cpu" and training_args.fp16:
        training_args.fp16 = False
    return {
        "family": family,
        "precision": "fp16" if training_args.fp16 else "bf16" if training_args.bf16 else "fp32",
    }


def describe(plan: dict) -> str:
    return f"backend: {plan}"
