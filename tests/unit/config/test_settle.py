"""Start-up settles the arguments once (config/settle.py): the family detected once, the parsed TrainingArguments
left as parsed, every choice in one settled copy and its record; each argument dataclass checks itself; what a
new user meets at start-up (a cache folder under /proc, a broken COCO folder, an error under torchrun, a zero
learning rate) ends before any folder is made, in one line, or runs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile

import pytest

import run_clip
from clip_train.config import args as clip_args
from clip_train.config.args import DataTrainingArguments, ModelArguments, RecipeArguments
from clip_train.config.settle import settle
from clip_train.data.feeding import available_cpus, given_options
from clip_train.device import backend
from clip_train.errors import ArgumentError, DataError, says_errors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def base_args(data_dir: str, model_dir: str, out: str) -> list[str]:
    return [
        "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_train",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none",
    ]  # fmt: skip


def one_error(capfd, argv: list[str]) -> tuple[int, list[str], str]:
    rc = run_clip.cli(argv)
    err = capfd.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("run_clip.py: error:")], err


def test_settle_returns_a_settled_copy_and_leaves_the_parsed_arguments_alone(demo, tmp_path) -> None:
    argv = base_args(*demo, str(tmp_path / "out")) + [
        "--gradient_checkpointing",
        "--dataloader_num_workers",
        "2",
    ]
    _, data_args, training_args, recipe_args = clip_args.parse_args(argv, "cpu")
    before = training_args.to_dict()
    settled, record = settle(training_args, recipe_args, data_args, "cpu", given_options(argv))
    assert training_args.to_dict() == before  # nothing edited in place
    assert settled is not training_args
    # The choices, applied in the copy and stated in the record.
    assert settled.save_total_limit == 2 and record.kept_checkpoints == 2
    assert (
        record.checkpoint_towers
        and not settled.activation_checkpointing
        and not settled.gradient_checkpointing
    )
    assert (
        settled.dataloader_num_workers == 2 and "dataloader_num_workers" not in record.feeding
    )  # given: kept
    assert record.plan.family == "cpu" and settled.use_cpu
    # Left out, decoding on the fly: one loader worker per core (up to 8), chosen and applied.
    argv = base_args(*demo, str(tmp_path / "o")) + ["--image_cache", "False"]
    _, data_args, training_args, recipe_args = clip_args.parse_args(argv, "cpu")
    settled, record = settle(training_args, recipe_args, data_args, "cpu", given_options(argv))
    workers = min(8, available_cpus())
    assert record.feeding == {"dataloader_num_workers": workers} and settled.dataloader_num_workers == workers
    assert training_args.dataloader_num_workers == 0
    assert not record.checkpoint_towers and training_args.save_total_limit is None


def test_the_device_family_is_detected_once_per_start(demo, tmp_path, capfd, monkeypatch) -> None:
    calls = []
    real = backend.detect_family
    monkeypatch.setattr(backend, "detect_family", lambda: calls.append(1) or real())
    bad = str(tmp_path / "coco")
    os.makedirs(bad)  # an empty COCO folder: stops after the arguments are settled, before the output folder
    rc, lines, err = one_error(capfd, base_args(bad, demo[1], str(tmp_path / "out")))
    assert rc == 2 and len(lines) == 1 and "No caption annotations in" in lines[0], err[-2000:]
    assert len(calls) == 1


def test_each_argument_dataclass_checks_itself() -> None:
    with pytest.raises(ArgumentError, match=r"^--max_seq_length 0: expected a whole number of tokens >= 1"):
        DataTrainingArguments(max_seq_length=0)
    with pytest.raises(ArgumentError, match=r"^--loss_scope world: expected local or global"):
        RecipeArguments(loss_scope="world")
    with pytest.raises(ArgumentError, match=r"^--model_name_or_path /nonexistent/m: is not a folder"):
        ModelArguments(model_name_or_path="/nonexistent/m")
    assert (
        ModelArguments("hub/id", feature_extractor_name="p").image_processor_name == "p"
    )  # the old flag name


def test_a_learning_rate_of_zero_is_accepted(demo, tmp_path) -> None:
    """A frozen-model baseline (the loss of a model left unchanged); only negative rates are wrong."""
    *_, training_args, _ = clip_args.parse_args(
        base_args(*demo, str(tmp_path / "out")) + ["--learning_rate", "0"]
    )
    assert training_args.learning_rate == 0.0
    with pytest.raises(ArgumentError, match=r"--learning_rate -0.5: expected a number >= 0"):
        clip_args.parse_args(base_args(*demo, str(tmp_path / "out")) + ["--learning_rate", "-0.5"])


def test_a_cache_folder_that_cannot_be_made_is_one_line(demo, tmp_path, capfd) -> None:
    """/proc passes os.access but refuses mkdir: said at argument time, not as os.makedirs' traceback."""
    out = tmp_path / "out"
    rc, lines, err = one_error(capfd, base_args(*demo, str(out)) + ["--image_cache_dir", "/proc/nope"])
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "--image_cache_dir /proc/nope: is not writable (cannot be created in /proc" in lines[0]
    assert not out.exists()


def broken_coco(demo_data: str, root: str, what: str) -> str:
    shutil.copytree(demo_data, root)
    ann, train = os.path.join(root, "annotations_trainval2017.zip"), os.path.join(root, "train2017.zip")
    if what == "no-annotations":
        os.remove(ann)
    elif what == "cut-zip":  # an interrupted download
        blob = open(train, "rb").read()
        open(train, "wb").write(blob[: len(blob) // 2])
    else:  # the annotations' JSON cut short, inside a zip that opens
        with zipfile.ZipFile(ann, "w") as z:
            z.writestr("annotations/captions_train2017.json", '{"images": [')
    return root


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("no-annotations", "No caption annotations in"),
        ("cut-zip", "train2017.zip is not a valid zip"),
        ("bad-json", "captions_train2017.json is not valid JSON"),
    ],
)
def test_coco_content_errors_stop_before_the_output_folder_is_made(
    demo, tmp_path, capfd, what, message
) -> None:
    data = broken_coco(demo[0], str(tmp_path / "coco"), what)
    out = tmp_path / "out"
    rc, lines, err = one_error(capfd, base_args(data, demo[1], str(out)))
    assert rc == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err[-2000:]
    assert not out.exists(), "the output folder was made before the data was checked"


def test_under_torchrun_only_rank_0_prints_the_error(demo, tmp_path, capfd, monkeypatch) -> None:
    argv = base_args(*demo, str(tmp_path / "out")) + ["--max_seq_length", "0"]
    monkeypatch.setenv("RANK", "1")
    rc, lines, err = one_error(capfd, argv)
    assert rc == 2 and lines == [], err[-2000:]  # still a failure on every rank, said once
    monkeypatch.setenv("RANK", "0")
    rc, lines, _ = one_error(capfd, argv)
    assert rc == 2 and len(lines) == 1 and "--max_seq_length 0: expected" in lines[0]
    # A data or set-up problem may be one node's own (its disk): each node's first rank says it too.
    for rank, local, error, said in (("1", "1", DataError("x"), False), ("8", "0", DataError("x"), True),
                                     ("8", "0", ArgumentError("x"), False)):  # fmt: skip
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local)
        assert says_errors(error) is said


def test_python_version_is_the_tested_one() -> None:
    """The pinned requirements (numpy 2.4, ...) need Python 3.11: pyproject and ruff say so."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"


def test_two_torchrun_ranks_say_a_bad_argument_once(demo, tmp_path) -> None:
    """Real torchrun, 2 CPU ranks: both exit non-zero, one error line in all (not one per rank)."""
    args = base_args(*demo, str(tmp_path / "out")) + ["--max_seq_length", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "run_clip.py", *args],
        cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    err = r.stdout + r.stderr
    assert r.returncode != 0
    assert len([ln for ln in err.splitlines() if ln.startswith("run_clip.py: error:")]) == 1, err[-3000:]
    assert "--max_seq_length 0: expected" in err and not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_accelerator_run_gets_its_loader_and_device_choices_in_the_copy(demo, tmp_path) -> None:
    """The GPU choices (workers, prefetch, pinned non-blocking copies, no per-step loss filter), settled on this
    CPU host as a one-process CUDA run would get them: applied to the copy, the parsed arguments untouched."""
    argv = base_args(*demo, str(tmp_path / "out"))
    _, data_args, training_args, recipe_args = clip_args.parse_args(argv, "cuda")
    settled, record = settle(training_args, recipe_args, data_args, "cuda", given_options(argv))
    assert record.plan.device == "cuda:0" and record.device_settings["logging_nan_inf_filter"] is False
    assert not settled.logging_nan_inf_filter and training_args.logging_nan_inf_filter
    assert settled.dataloader_num_workers == min(4, max(1, available_cpus() - 1)) > 0
    assert settled.dataloader_prefetch_factor == 4 and settled.dataloader_pin_memory
    assert settled.accelerator_config.non_blocking and not training_args.accelerator_config.non_blocking
    assert record.feeding["accelerator_config.non_blocking"] is True
    assert record.plan.settings["nan/inf loss filter"] == "on device"


def test_a_split_without_a_source_stops_before_anything_is_built(demo, tmp_path, capfd) -> None:
    """--train_file and --do_eval with no validation source: said before the train caches are built, naming the flags."""
    table = tmp_path / "train.csv"
    table.write_text("image_path,caption\na.jpg,a cat\n")
    out = tmp_path / "out"
    argv = [a for a in base_args("", demo[1], str(out)) if a not in ("--data_dir", "")]
    rc, lines, err = one_error(capfd, [*argv, "--train_file", str(table), "--do_eval"])
    assert rc == 2 and len(lines) == 1, err[-2000:]
    assert "no validation data: give --data_dir" in lines[0] and "--validation_shards" in lines[0]
    assert not out.exists()
