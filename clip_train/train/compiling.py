"""--torch_compile with per-batch caption widths: a bounded number of compilations, and the start-up line.

The Trainer (through accelerate) wraps the whole VisionTextDualEncoderModel in torch.compile(dynamic=None). Each
batch is padded to its own longest caption rounded up to ``--pad_to_multiple_of`` (8 by default), so the text tower
sees a new width every few steps. Left alone, dynamo compiles the first width statically, recompiles once the width
changes, and only then treats the width as dynamic ("automatic dynamic shapes"). Two policies instead:

- ``dynamic`` (modes default / max-autotune-no-cudagraphs): the caption width is marked dynamic from the first batch
  (``mark_caption_width``): one graph for training, whatever the widths.
- ``static`` (modes reduce-overhead / max-autotune, i.e. CUDA graphs): a CUDA graph replays fixed shapes, so each
  width is marked static and gets its own graph; the collator's rounding bounds the widths to
  ceil(max_seq_length / pad_to_multiple_of) buckets, and dynamo's recompile limit is raised to cover them
  (``allow_static_widths``), so no bucket falls back to eager.

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


STATIC_MODES = ("reduce-overhead", "max-autotune")  # the modes that capture CUDA graphs


def width_policy(mode: str | None) -> str:
    """ "static" (one graph per caption-width bucket) where the mode captures CUDA graphs, else "dynamic"."""
    return "static" if mode in STATIC_MODES else "dynamic"


def mark_caption_width(inputs: dict[str, Any], static: bool = False) -> None:
    """Tell dynamo whether the caption width (the last dim of input_ids and of the 2-D or 4-D attention mask)
    varies (``maybe_mark_dynamic``: the first compilation covers every width; no error if the model specialises it
    after all) or is fixed per graph (``mark_static``: one graph per width, what CUDA graphs need)."""
    for key in ("input_ids", "attention_mask"):
        x = inputs.get(key)
        if isinstance(x, torch.Tensor) and x.dim() in (2, 4):
            if static:
                torch._dynamo.mark_static(x, x.dim() - 1)
            else:
                torch._dynamo.maybe_mark_dynamic(x, x.dim() - 1)


def mark_caption_width_dynamic(inputs: dict[str, Any]) -> None:
    """The dynamic policy (benchmarks/bench_step.py's name for it)."""
    mark_caption_width(inputs, static=False)


def allow_static_widths(max_len: int, multiple: int) -> int:
    """Raise dynamo's recompile limit to the number of width buckets (x2: with and without a padding mask, + 4 for
    a last short batch and evaluation), so every bucket gets its graph; returns the limit now in force."""
    buckets = -(-max_len // max(1, multiple))
    need = 2 * buckets + 4
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), need))
    return getattr(config, name)


def compilations() -> int:
    """Graphs dynamo has compiled in this process so far (every recompilation counts)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def describe(args: Any) -> str:
    """The start-up line: what runs compiled and what runs eager."""
    if not getattr(args, "torch_compile", False):
        return "compile: off (eager); --torch_compile True compiles the model's forward"
    widths = (
        "caption widths static per --pad_to_multiple_of bucket (one graph each, for CUDA graphs)"
        if width_policy(args.torch_compile_mode) == "static"
        else "caption width marked dynamic (one graph for every width)"
    )
    return (
        f"compile: model forward (train and eval loss) with torch.compile(backend={args.torch_compile_backend}, "
        f"mode={args.torch_compile_mode or 'default'}), {widths}; eager: loss, optimizer, retrieval"
    )
