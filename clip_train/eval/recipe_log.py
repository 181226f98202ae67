"""Metrics printed as the recipe's users grep them (``grep "train_samples_per_second ="``, ``eval_loss``)."""

from __future__ import annotations


def recipe_blocks(split: str, metrics: dict) -> list[dict]:
    """``metrics`` as the blocks to print with ``Trainer.log_metrics``, the recipe's grep contract kept.

    log_metrics pads every key to the longest key of its block, and the recipe reads the FPS with
    ``grep "train_samples_per_second ="``: so no key longer than that one shares its block. The longer ones
    (per-device FPS, skip counts) get a second block.
    """
    width = len(f"{split}_samples_per_second")
    first = {k: v for k, v in metrics.items() if len(k) <= width}
    rest = {k: v for k, v in metrics.items() if len(k) > width}
    return [block for block in (first, rest) if block]
