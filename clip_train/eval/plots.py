"""Plots of a run from the Trainer's ``state.log_history``: losses, learning rate, grad norm, throughput, recall."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)

# (file name, title, y label, which log keys go on it)
PLOTS: tuple[tuple[str, str, str, Callable[[str], bool]], ...] = (
    ("train_loss.png", "Training loss", "loss", lambda k: k == "loss"),
    (
        "eval_loss.png",
        "Eval loss (in-batch contrastive, eval batch size)",
        "loss",
        lambda k: k == "eval_loss",
    ),
    ("learning_rate.png", "Learning rate", "learning rate", lambda k: k == "learning_rate"),
    ("grad_norm.png", "Gradient norm (before clipping)", "norm", lambda k: k == "grad_norm"),
    ("throughput.png", "Throughput", "samples / s", lambda k: k.endswith("_samples_per_second")),
    (
        "retrieval.png",
        "Retrieval recall (eval)",
        "recall (%)",
        lambda k: k.startswith("eval_") and "_R@" in k,
    ),
    (
        "zeroshot.png",
        "Zero-shot classification accuracy (eval)",
        "accuracy (%)",
        lambda k: k in ("eval_zeroshot_top1", "eval_zeroshot_top5"),
    ),
)


def _series(
    log_history: list[dict], wanted: Callable[[str], bool]
) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) for the wanted keys; entries without a step and non-finite values are left out."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for entry in log_history:
        step = entry.get("step") if isinstance(entry, dict) else None
        if not isinstance(step, int | float) or isinstance(step, bool):
            continue
        for key, value in entry.items():
            if not wanted(key) or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                steps, values = out.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return out


def save_plots(log_history: list[dict], output_dir: str) -> list[str]:
    """Write one PNG per kind of logged data into ``output_dir``; return the paths written.

    A plot with no data is skipped. Never raises: a failure is logged as a warning, so a finished
    training run is not lost to a plotting problem.
    """
    written: list[str] = []
    try:
        # The object API with no pyplot: no global backend switch, no figure registry to leak from.
        from matplotlib.figure import Figure

        for name, title, ylabel, wanted in PLOTS:
            series = _series(log_history, wanted)
            if not series:
                continue
            path = os.path.join(output_dir, name)
            try:
                os.makedirs(output_dir, exist_ok=True)
                fig = Figure(figsize=(7, 4.5), dpi=100)
                ax = fig.add_subplot()
                for key, (steps, values) in sorted(series.items()):
                    # Markers where points are few (evals, the final summary), else they hide the line.
                    ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, label=key)
                ax.set(title=title, xlabel="step", ylabel=ylabel)
                ax.grid(alpha=0.3)
                ax.legend(fontsize="small")
                fig.tight_layout()
                fig.savefig(path, format="png")
                written.append(path)
            except Exception as e:  # a plot is never worth the run
                logger.warning("could not write the plot %s: %s", path, e)
    except Exception as e:
        logger.warning("could not write plots to %s: %s", output_dir, e)
    return written
