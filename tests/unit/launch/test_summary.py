"""clip_train.launch.summary: the launchers' summary file and closing console lines, from a run's results files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from clip_train.launch import summary


def read_summary(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    assert all(" = " in line for line in lines), lines
    return dict(line.split(" = ", 1) for line in lines)


def _results_dir(tmp_path: Path, results: dict, log_history: list[dict] | None = None) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "all_results.json").write_text(json.dumps(results))
    if log_history is not None:
        (out / "trainer_state.json").write_text(json.dumps({"log_history": log_history}))
    return out


def _summarise(out: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    target = tmp_path / "clip_bs32_2p_acc.log"
    argv = [
        "--results_dir",
        str(out),
        "--summary_file",
        str(target),
        "--rank_size",
        "2",
        "--batch_size",
        "32",
    ]
    argv += ["--device_type", "x86_64", "--case_name", "clip_bs32_2p_acc", "--e2e_seconds", "41", *extra]
    return summary.main(argv), target


def test_summary_lines_follow_the_recipe(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = {
        "train_samples_per_second": 640.0,
        "train_samples_per_second_per_device": 320.0,
        "train_loss": 2.5,
        "eval_loss": 1.875,
        "eval_image_to_text_R@1": 0.25,
        "eval_text_to_image_R@1": 0.125,
    }
    history = [
        {"loss": 3.0, "step": 5},
        {"eval_loss": 1.9, "step": 5},
        {"loss": 2.0, "step": 10},
        {"step": 10},
    ]
    code, target = _summarise(_results_dir(tmp_path, results, history), tmp_path)
    assert code == 0
    assert read_summary(target) == {
        "Network": "clip",
        "RankSize": "2",
        "BatchSize": "32",
        "DeviceType": "x86_64",
        "CaseName": "clip_bs32_2p_acc",
        "ActualFPS": "640.0",
        "ActualFPSPerDevice": "320.0",
        "TrainingTime": "50.0",  # 32 * 1000 / 640, the recipe's formula
        "ActualLoss": "2.0",  # the last logged loss, not the run's mean
        "E2ETrainingTime": "41",
        "TrainAccuracy": "1.875",
        "eval_image_to_text_R@1": "0.25",
        "eval_text_to_image_R@1": "0.125",
    }
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "Final Performance images/sec : 640.0",
        "Final Train Loss : 2.0",
    ]


def test_summary_falls_back_to_the_mean_train_loss(tmp_path: Path) -> None:
    out = _results_dir(tmp_path, {"train_samples_per_second": 100, "train_loss": 2.5})
    code, target = _summarise(out, tmp_path)
    fields = read_summary(target)
    assert code == 0
    assert fields["ActualLoss"] == "2.5" and fields["ActualFPSPerDevice"] == "50.0"
    assert fields["TrainAccuracy"] == "NA" and "eval_image_to_text_R@1" not in fields


@pytest.mark.parametrize(
    ("results", "started_at", "message"),
    [
        (None, None, "all_results.json not found"),
        ({"train_loss": 1.0}, None, "no usable train_samples_per_second"),
        ({"train_samples_per_second": 0.0}, None, "no usable train_samples_per_second"),
        ({"train_samples_per_second": 9.0}, 60.0, "predates this run"),  # the run started 60 s after it
    ],
)
def test_summary_refuses_missing_or_stale_results(
    results: dict | None,
    started_at: float | None,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    out = _results_dir(tmp_path, results) if results is not None else tmp_path / "ckpt"
    extra = ["--started_at", str(time.time() + started_at)] if started_at else []
    code, target = _summarise(out, tmp_path, *extra)
    assert code == 1 and not target.exists()
    assert message in capsys.readouterr().err


def test_a_run_shorter_than_skip_steps_gets_a_summary_without_fps(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A 5-step smoke test with --skip_steps 10 trained fine: exit 0, FPS marked not measured, one line why."""
    results = {"train_samples_per_second": 0.0, "train_samples_per_second_per_device": 0.0}
    results.update(train_timed_steps=0, train_loss=2.5, eval_loss=1.5)
    out = _results_dir(tmp_path, results, [{"loss": 2.4, "step": 5}])
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": [{"loss": 2.4}]}))
    code, target = _summarise(out, tmp_path)
    fields = read_summary(target)
    assert code == 0
    assert fields["ActualFPS"] == fields["ActualFPSPerDevice"] == fields["TrainingTime"] == "NA"
    assert fields["ActualLoss"] == "2.4" and fields["TrainAccuracy"] == "1.5"
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "skip_steps" in line] == [
        "[Warning] ActualFPS = NA: the run timed no step past --skip_steps (it ended at step 5); give it more "
        "steps than --skip_steps to measure the throughput"
    ]
    assert lines[-2:] == ["Final Performance images/sec : NA", "Final Train Loss : 2.4"]


def test_zero_shot_figures_join_the_summary_when_the_run_had_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    results = {"train_samples_per_second": 640.0, "eval_loss": 1.875}
    code, target = _summarise(_results_dir(tmp_path, results), tmp_path)
    assert code == 0 and "eval_zeroshot_top1" not in read_summary(target)
    (tmp_path / "ckpt" / "all_results.json").write_text(
        json.dumps({**results, "eval_zeroshot_top1": 41.6667, "eval_zeroshot_top5": 100.0})
    )
    code, target = _summarise(tmp_path / "ckpt", tmp_path)
    fields = read_summary(target)
    assert code == 0 and (fields["eval_zeroshot_top1"], fields["eval_zeroshot_top5"]) == ("41.6667", "100.0")
    assert "eval_zeroshot_top1 : 41.6667" in capsys.readouterr().out
