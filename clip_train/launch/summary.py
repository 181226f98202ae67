"""The launchers' run summary (the Ascend ModelZoo contract), read from a finished run's results files.

launch/run.py calls ``report`` on the node whose worker held global rank 0, after the run (``python3 -m
clip_train.launch.summary ...`` does the same). It reads
``all_results.json`` (global FPS after skip_steps, FPS per device, train and eval loss, retrieval R@1, zero-shot
top-1/top-5 when the run had a class folder) and
``trainer_state.json`` (the last logged train loss) from the run's output_dir, writes one ``key = value`` a line
to the summary file and ends the console with the two lines the recipe's users grep for.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RECALL_KEYS = ("eval_image_to_text_R@1", "eval_text_to_image_R@1")
ZEROSHOT_KEYS = ("eval_zeroshot_top1", "eval_zeroshot_top5")  # when the run had --zeroshot_dir


def log_figure(value: float) -> float:
    """A float as Trainer.log_metrics prints it (rounded to 4 places), so the log's grep and the summary agree."""
    return round(value, 4)


NOT_MEASURED = (
    "NA"  # the recipe's word for a figure the run has not got (as ActualLoss without a logged loss)
)


def fps_not_measured(results: dict) -> bool:
    """Whether the run trained but timed no step past --skip_steps (a smoke test shorter than skip_steps):
    run_clip.py then reports a throughput of exactly 0 over 0 timed steps, which is no failure."""
    return results.get("train_samples_per_second") == 0 and results.get("train_timed_steps") == 0


class SummaryError(Exception):
    """A results file is missing, stale or lacks a figure the summary needs."""


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise SummaryError(f"{path} not found: did run_clip.py finish training in this output_dir?") from exc
    except json.JSONDecodeError as exc:
        raise SummaryError(f"{path} is not valid JSON ({exc})") from exc


def read_results(results_dir: Path, started_at: float | None = None) -> dict:
    """all_results.json of a run; with started_at (epoch seconds), refuse one written before the run began."""
    path = results_dir / "all_results.json"
    results = _load_json(path)
    if started_at is not None and path.stat().st_mtime < started_at:
        raise SummaryError(f"{path} predates this run: it is a previous run's, so this run wrote no results")
    return results


def last_train_loss(results_dir: Path, results: dict) -> float | None:
    """The last train loss the Trainer logged (trainer_state.json), else the run's mean train_loss."""
    state_path = results_dir / "trainer_state.json"
    if state_path.is_file():
        logged = [entry["loss"] for entry in _load_json(state_path).get("log_history", []) if "loss" in entry]
        if logged:
            return float(logged[-1])
    return float(results["train_loss"]) if "train_loss" in results else None


def _final_step(results_dir: Path) -> object:
    try:
        return _load_json(results_dir / "trainer_state.json").get("global_step", "?")
    except SummaryError:
        return "?"


def summary_fields(
    results: dict,
    loss: float | None,
    *,
    network: str,
    rank_size: int,
    batch_size: int,
    device_type: str,
    case_name: str,
    e2e_seconds: int,
) -> dict[str, str]:
    """The summary's lines, in the recipe's order; TrainingTime = batch_size * 1000 / FPS as the recipe has it."""
    fps = results.get("train_samples_per_second")
    measured = not fps_not_measured(results)
    if measured and (not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0):
        raise SummaryError(f"all_results.json has no usable train_samples_per_second (got {fps!r})")
    per_device = results.get("train_samples_per_second_per_device", fps / rank_size) if measured else 0
    eval_loss = results.get("eval_loss")
    fields = {
        "Network": network,
        "RankSize": str(rank_size),
        "BatchSize": str(batch_size),
        "DeviceType": device_type,
        "CaseName": case_name,
        "ActualFPS": str(log_figure(fps)) if measured else NOT_MEASURED,
        "ActualFPSPerDevice": str(round(per_device, 3)) if measured else NOT_MEASURED,
        "TrainingTime": str(round(batch_size * 1000 / fps, 3)) if measured else NOT_MEASURED,
        "ActualLoss": "NA" if loss is None else str(loss),
        "E2ETrainingTime": str(e2e_seconds),
        "TrainAccuracy": "NA" if eval_loss is None else str(log_figure(eval_loss)),
    }
    fields.update({key: str(results[key]) for key in (*RECALL_KEYS, *ZEROSHOT_KEYS) if key in results})
    return fields


def write_summary(path: Path, fields: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {value}\n" for key, value in fields.items()), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results_dir", type=Path, required=True, help="the run's output_dir")
    parser.add_argument("--summary_file", type=Path, required=True)
    parser.add_argument("--network", default="clip")
    parser.add_argument(
        "--rank_size", type=int, required=True, help="world size: nnodes x processes per node"
    )
    parser.add_argument("--batch_size", type=int, required=True, help="per device")
    parser.add_argument("--device_type", required=True, help="uname -m")
    parser.add_argument("--case_name", required=True)
    parser.add_argument("--e2e_seconds", type=int, required=True, help="wall time of the launcher")
    parser.add_argument("--started_at", type=float, help="epoch seconds the launcher started (stale check)")
    args = parser.parse_args(argv)
    return report(
        args.results_dir,
        args.summary_file,
        started_at=args.started_at,
        network=args.network,
        rank_size=args.rank_size,
        batch_size=args.batch_size,
        device_type=args.device_type,
        case_name=args.case_name,
        e2e_seconds=args.e2e_seconds,
    )


def report(
    results_dir: Path, summary_file: Path, *, started_at: float | None = None, out=None, **run: object
) -> int:
    """Write the summary file and print its closing lines (to ``out``, default stdout); 1 with one line if not."""
    out = out or sys.stdout
    try:
        results = read_results(results_dir, started_at)
        loss = last_train_loss(results_dir, results)
        fields = summary_fields(results, loss, **run)  # type: ignore[arg-type]
    except SummaryError as exc:
        print(f"[Error] no summary: {exc}", file=out if out is not sys.stdout else sys.stderr)
        return 1
    write_summary(summary_file, fields)
    if fields["ActualFPS"] == NOT_MEASURED:
        print(
            f"[Warning] ActualFPS = {NOT_MEASURED}: the run timed no step past --skip_steps (it ended at step "
            f"{_final_step(results_dir)}); give it more steps than --skip_steps to measure the throughput",
            file=out,
        )
    for key in ("TrainAccuracy", *RECALL_KEYS, *ZEROSHOT_KEYS):
        if key in fields:
            print(f"{key} : {fields[key]}", file=out)
    print(f"E2E Training Duration sec : {fields['E2ETrainingTime']}", file=out)
    print(f"Summary : {summary_file}", file=out)
    print(f"Final Performance images/sec : {fields['ActualFPS']}", file=out)
    print(f"Final Train Loss : {fields['ActualLoss']}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
