"""save_plots on a Trainer-shaped log_history: valid PNGs, empty plots skipped, failures only warn."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from clip_train.eval.plots import save_plots


def realistic_history() -> list[dict]:
    """What Trainer.state.log_history holds after a short run with evals (plus our per-step throughput)."""
    history: list[dict] = []
    for step in range(10, 310, 10):
        history.append(
            {
                "loss": 4.2 - step / 150,
                "grad_norm": 20.0 / (1 + step / 50),
                "learning_rate": 5e-5 * (1 - step / 300),
                "epoch": step / 100,
                "step": step,
                "train_step_samples_per_second": 55.0 + step % 7,
            }
        )
        if step % 100 == 0:
            history.append(
                {
                    "eval_loss": 3.9 - step / 200,
                    "eval_image_to_text_R@1": step / 30,
                    "eval_text_to_image_R@1": step / 40,
                    "eval_image_to_text_median_rank": 300 / step,
                    "eval_runtime": 3.2,
                    "eval_samples_per_second": 100.0,
                    "eval_steps_per_second": 3.1,
                    "epoch": step / 100,
                    "step": step,
                }
            )
    history.append(
        {
            "train_runtime": 100.0,
            "train_samples_per_second": 60.0,
            "train_steps_per_second": 1.0,
            "total_flos": 0.0,
            "train_loss": 3.5,
            "epoch": 3.0,
            "step": 300,
        }
    )
    return history


def assert_png(path: str) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (700, 450)
        assert len(im.convert("L").getcolors(maxcolors=1 << 16) or ()) > 2  # something was drawn


def test_writes_every_plot_as_png(tmp_path: Path) -> None:
    out = tmp_path / "run"  # does not exist yet
    paths = save_plots(realistic_history(), str(out))
    names = {"train_loss", "eval_loss", "learning_rate", "grad_norm", "throughput", "retrieval"}
    assert sorted(paths) == sorted(str(out / f"{n}.png") for n in names)
    for path in paths:
        assert_png(path)


def test_skips_plots_without_data(tmp_path: Path) -> None:
    train_only = [e for e in realistic_history() if "loss" in e]
    paths = save_plots(train_only, str(tmp_path))
    assert sorted(Path(p).name for p in paths) == [
        "grad_norm.png",
        "learning_rate.png",
        "throughput.png",
        "train_loss.png",
    ]
    assert not (tmp_path / "eval_loss.png").exists()


def test_empty_history_writes_nothing(tmp_path: Path) -> None:
    assert save_plots([], str(tmp_path / "run")) == []
    assert not (tmp_path / "run").exists()


def test_odd_entries_are_skipped_not_fatal(tmp_path: Path) -> None:
    history = [
        {"loss": float("nan"), "step": 1},  # an fp16 overflow step
        {"loss": "4.0", "step": 2},
        {"loss": 4.0},  # no step
        {"loss": True, "step": 3},
        {"loss": None, "step": 4},
        {"loss": 3.0, "step": 5},
        "not a dict",
    ]
    assert save_plots(history, str(tmp_path)) == [str(tmp_path / "train_loss.png")]
    assert_png(str(tmp_path / "train_loss.png"))
    assert save_plots([{"loss": float("inf"), "step": 1}], str(tmp_path / "inf")) == []


def test_failure_warns_and_returns(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="clip_train.eval.plots"):
        assert save_plots(realistic_history(), str(blocker)) == []
    assert "could not write the plot" in caplog.text
