"""--torch_compile with per-batch caption widths: a bounded number of compilations, and the start-up line.

The Trainer (through accelerate) wraps the whole VisionTextDualEncoderModel in torch.compile(dynamic=None). Each
batch is padded to its own longest caption (a multiple of 8), so the text tower sees a new width every few
steps. Left alone, dynamo compiles the first width statically, recompiles once the width changes, and only
then treats the width as dynamic ("automatic dynamic shapes"). We mark the caption width dynamic from the
first batch instead (``mark_caption_width_dynamic``): one graph for training, whatever the widths.
Padding to a few fixed widths (``bucket_width``, used by benchmarks/bench_step.py --compile buckets) was measured
too and saved no compilation (benchmarks/README.md, "Compiling"), so the collator does not bucket.

Everything outside the model's forward stays eager: the loss (a few small ops), the optimizer (fused AdamW), and
retrieval (``get_image_features``/``get_text_features`` on the plain module; each runs once per evaluation).
"""

from __future__ import annotations

from typing import Any

import torch

BUCKETS = (16, 32, 48, 64, 96, 128)


def bucket_width(width: int, max_len: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket that holds ``width`` tokens (never above ``max_len``, never below ``width``)."""
    for b in buckets:
        if b >= width:
            return max(width, min(b, max_len))
    return max(width, max_len)


def mark_caption_width_dynamic(inputs: dict[str, Any]) -> None:
    """Tell dynamo the caption width (dim 1) varies, so the first compilation already covers every width.

    ``maybe_mark_dynamic``: no error if the model specialises the width after all (it then recompiles as usual).
    """
    for key in ("input_ids", "attention_mask"):
        x = inputs.get(key)
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            torch._dynamo.maybe_mark_dynamic(x, 1)


def compilations() -> int:
    """Graphs dynamo has compiled in this process so far (every recompilation counts)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def describe(args: Any) -> str:
    """The start-up line: what runs compiled and what runs eager."""
    if not getattr(args, "torch_compile", False):
        return "compile: off (eager); --torch_compile True compiles the model's forward"
    return (
        f"compile: model forward (train and eval loss) with torch.compile(backend={args.torch_compile_backend}, "
        f"mode={args.torch_compile_mode or 'default'}), caption width marked dynamic (one graph for every width); "
        "eager: loss, optimizer, retrieval"
    )
