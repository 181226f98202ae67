"""Every bad argument: exit code 2, one ``run_clip.py: error:`` line naming it, no traceback, nothing written.

One row per bad input, run in this process through ``run_clip.cli`` (as tests/runs/test_bad_setup.py does, which covers
bad data folders and model folders; tests/runs/test_run_clip.py covers the process plumbing). Every row must fail before
anything is loaded or written: the output folder must not even be created.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import pytest

import run_clip
from clip_train.config import args as clip_args


def files(tmp) -> dict[str, str]:
    """Bad and good table files, and a plain file to point folder arguments at."""
    made = {
        "a-file": "just a file\n",
        "bad.jsonl": '{"image_path": "a.jpg", "caption": "a cat"}\n{"image_path": "b.jpg", "caption": "a dog"}\n'
        '{"image_path": "c.jpg", caption: oops}\n',
        "ragged.csv": "image_path,caption\na.jpg,a cat\nb.jpg,a dog,extra\n",
        "nocaption.csv": "image_path,text\na.jpg,a cat\n",
        "nocolumn.jsonl": '{"image_path": "a.jpg", "caption": "a cat"}\n{"image_path": "b.jpg"}\n',
        "notalist.json": "[1, 2]\n",
        "empty.csv": "",
        "captions.txt": "a.jpg\ta cat\n",
        "good.csv": "image_path,caption\na.jpg,a cat\n",
    }
    for name, text in made.items():
        (tmp / name).write_text(text)
    return {name: str(tmp / name) for name in made}


# (extra arguments; {file} names are filled from files(); the words the error line must hold)
ROWS: list[tuple[list[str], str]] = [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: expected a whole number >= 1"),
    (["--per_device_train_batch_size", "-4"], "--per_device_train_batch_size -4: expected"),
    (["--per_device_train_batch_size", "abc"], "--per_device_train_batch_size abc: expected a whole number"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0: expected"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: expected"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1: expected a whole number >= 0"),
    (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers 0: expected"),
    (["--skip_steps", "-3"], "--skip_steps -3: expected a whole number of steps >= 0"),
    (["--train_shards", "/nonexistent/{00..03}.tar"], "--train_shards /nonexistent/{00..03}.tar: 4 of 4 shards not found"),
    (["--validation_shards", "/nonexistent/val.tar"], "--validation_shards /nonexistent/val.tar: 1 of 1 shards not found"),
    (["--train_shards", "{a-file}", "--train_file", "{good.csv}"], "--train_file gives the same split; expected one source for the train split"),
    (["--validation_shards", "{a-file}", "--validation_file", "{good.csv}"], "--validation_file gives the same split"),
    (["--train_num_samples", "0"], "--train_num_samples 0: expected a whole number of samples >= 1"),
    (["--shuffle_buffer", "-1"], "--shuffle_buffer -1: expected a whole number of samples >= 0"),
    (["--accumulation_mode", "sum"], "--accumulation_mode sum: expected contrastive or mean"),
    (["--max_seq_length", "0"], "--max_seq_length 0: expected a whole number of tokens >= 1"),
    (["--pad_to_multiple_of", "0"], "--pad_to_multiple_of 0: expected a whole number of tokens >= 1"),
    (["--max_train_samples", "0"], "--max_train_samples 0: expected"),
    (["--max_eval_samples", "-1"], "--max_eval_samples -1: expected"),
    (["--max_steps", "-5"], "--max_steps -5: expected a number of steps >= 1, or -1"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs 0.0: expected a number of epochs > 0"),
    (["--learning_rate", "-1"], "--learning_rate -1.0: expected a number >= 0"),
    (["--learning_rate", "nan"], "--learning_rate nan: expected a number >= 0"),
    (["--learning_rate", "fast"], "--learning_rate fast: expected a number"),
    (["--weight_decay", "-0.1"], "--weight_decay -0.1: expected a number >= 0"),
    (["--warmup_steps", "-1"], "--warmup_steps -1: Got warmup_steps = -1.0, Expected value warmup_steps >= 0"),
    (["--adam_beta1", "1.5"], "--adam_beta1 1.5: expected a number in [0, 1)"),
    (["--seed", "-1"], "--seed -1: expected"),
    (["--max_logit_scale", "0.5"], "--max_logit_scale 0.5: expected the multiplier"),
    (["--loss_scale", "abc"], "--loss_scale abc: expected a number > 0 (a static scale) or dynamic"),
    (["--loss_scale", "-5"], "--loss_scale -5: expected"),
    (["--fp16_opt_level", "O4"], "--fp16_opt_level O4: expected one of O0, O1, O2, O3"),
    (["--loss_scope", "world"], "--loss_scope world: expected local or global"),
    (["--lr_scheduler_type", "zigzag"], "--lr_scheduler_type zigzag: expected one of linear, cosine"),
    (["--do_train", "maybe"], "--do_train: Truthy value expected: got maybe"),
    (["--save_steps", "-1"], "--save_steps"),
    (["--save_total_limit", "-2"], "--save_total_limit -2: expected"),
    (["--logging_steps", "-10"], "--logging_steps"),
    (["--eval_strategy", "steps", "--eval_steps", "-5"], "--eval_steps"),
    (["--image_column", ""], "--image_column : empty; expected a column name"),
    (["--image_cache_dir", "{a-file}"], "--image_cache_dir {a-file}: is not writable (it is a file, not a folder)"),
    (["--image_cache_dir", "{a-file}/cache"], "--image_cache_dir {a-file}/cache: is not writable (cannot be created"),
    (["--cache_dir", "/dev/null/hub"], "--cache_dir /dev/null/hub: is not writable"),
    (["--data_dir", "{a-file}"], "--data_dir {a-file}: is not a folder (it is a file)"),
    (["--model_name_or_path", "/nonexistent/clip-roberta"], "--model_name_or_path /nonexistent/clip-roberta: is not a folder"),
    (["--tokenizer_name", "{a-file}"], "--tokenizer_name {a-file}: is not a folder"),
    (["--train_file", "{tmp}/missing.csv"], "--train_file {tmp}/missing.csv: no such file"),
    (["--train_file", "{bad.jsonl}"], "--train_file {bad.jsonl}: line 3 is not valid JSON"),
    (["--train_file", "{ragged.csv}"], "--train_file {ragged.csv}: line 3 has 3 fields, the header has 2"),
    (["--train_file", "{nocaption.csv}"], "--train_file {nocaption.csv}: has no column caption"),
    (["--train_file", "{empty.csv}"], "--train_file {empty.csv}: is empty"),
    (["--train_file", "{notalist.json}"], "--train_file {notalist.json}: row 1 is not a JSON object"),
    (["--train_file", "{captions.txt}"], "--train_file {captions.txt}: has the extension .txt"),
    (["--validation_file", "{nocolumn.jsonl}"], "--validation_file {nocolumn.jsonl}: line 2 has no caption"),
    (["--resume_from_checkpoint", "{tmp}/checkpoint-9"], "--resume_from_checkpoint {tmp}/checkpoint-9: is not a folder"),
    (["--output_dir", "{a-file}"], "--output_dir {a-file}: is not writable (it is a file"),
    (["--caption_column", "text"], "--caption_column text: is not a COCO column"),
    (["--report_to", "no-such-tracker"], "--report_to no-such-tracker: no-such-tracker is not a reporting integration"),
    (["--lr_scheduler_kwargs", "cycles=2"], "--lr_scheduler_kwargs cycles=2: is not a JSON object"),
    (["--logging_steps", "0"], "--logging_steps 0: logging strategy IntervalStrategy.STEPS requires non-zero"),
    (["--fp16", "--bf16"], "--fp16: At most one of fp16 and bf16"),
    (["--per_device_train_batch_size"], "--per_device_train_batch_size: expected one argument"),
]  # fmt: skip


def base_args(data_dir: str, model_dir: str, out: str) -> list[str]:
    return [
        "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_train", "--do_eval",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none",
    ]  # fmt: skip


def with_extra(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with ``extra`` appended; a flag given in both takes extra's value (argparse keeps the last)."""
    return base + extra


@pytest.mark.parametrize(("extra", "message"), ROWS, ids=[" ".join(r[0]) or "empty" for r in ROWS])
def test_bad_argument(demo, tmp_path, capfd, extra, message) -> None:
    names = {**files(tmp_path), "tmp": str(tmp_path)}

    def fill(text: str) -> str:
        for name, path in names.items():
            text = text.replace("{" + name + "}", path)
        return text

    out = tmp_path / "out"
    argv = with_extra(base_args(*demo, str(out)), [fill(a) for a in extra])
    rc = run_clip.cli(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("run_clip.py: error:")]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and fill(message) in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert not out.exists(), "the output folder was created before the arguments were checked"
    assert len(ROWS) >= 25


def test_every_rule_names_an_argument_the_parser_knows() -> None:
    """A typo in RULES would silently check nothing: every rule's argument must be a field of the dataclasses."""
    import dataclasses

    from clip_train.config.validate import RULES, SURPRISES

    fields = {f.name for cls in clip_args.ARG_CLASSES for f in dataclasses.fields(cls)}
    assert [r.arg for r in [*RULES, *SURPRISES] if r.arg not in fields] == []


def test_surprising_values_get_one_warning_each_and_the_run_goes_on(demo, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    extra = ["--learning_rate", "5", "--warmup_steps", "4", "--dataloader_num_workers", "999"]
    clip_args.parse_args(base_args(*demo, str(tmp_path / "out")) + extra)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all(w.startswith("run_clip.py: warning: --") for w in warnings), warnings
    assert "--learning_rate 5.0 is unusually large" in warnings[0]
    assert "--dataloader_num_workers 999 is more than the" in warnings[1]
    assert "--warmup_steps 4 is not below --max_steps 2" in warnings[2]
    assert not (tmp_path / "out").exists()


def test_max_seq_length_above_the_text_tower_is_capped_with_one_warning(demo, tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    *_, model_dir = demo
    text = json.load(open(os.path.join(model_dir, "config.json")))["text_config"]
    limit = text["max_position_embeddings"] - (
        text["pad_token_id"] + 1
    )  # RoBERTa numbers from padding_idx + 1
    parsed = clip_args.parse_args(base_args(*demo, str(tmp_path / "out")) + ["--max_seq_length", "1000"])
    assert parsed[1].max_seq_length == limit
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"run_clip.py: warning: --max_seq_length 1000 is above what the text tower can take ({limit} tokens): "
        f"capped to {limit}"
    ]
    caplog.clear()
    assert clip_args.parse_args(base_args(*demo, str(tmp_path / "out")) + ["--max_seq_length", str(limit)])
    assert not caplog.records


def test_good_table_files_pass_and_train(demo, tmp_path, capfd) -> None:
    """The checks refuse no valid file: a CSV (quoted commas, an empty caption) and a JSON-lines file train."""
    from PIL import Image

    *_, model_dir = demo
    rows = []
    for i in range(12):
        Image.new("RGB", (40, 30), (20 * i, 255 - 20 * i, 7 * i)).save(tmp_path / f"img{i}.jpg")
        rows.append((f"img{i}.jpg", f'a picture, number {i}, "quoted"'))
    with open(tmp_path / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([("image_path", "caption"), *rows, ("img0.jpg", "")])
    with open(tmp_path / "val.jsonl", "w") as f:
        f.writelines(json.dumps({"image_path": p, "caption": c}) + "\n\n" for p, c in rows[:8])
    out = tmp_path / "out"
    argv = [
        "--output_dir", str(out), "--model_name_or_path", model_dir, "--train_file", str(tmp_path / "train.csv"),
        "--validation_file", str(tmp_path / "val.jsonl"), "--do_train", "--do_eval", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--report_to", "none",
    ]  # fmt: skip
    rc = run_clip.cli(argv)
    assert rc == 0, capfd.readouterr().err[-3000:]
    results = json.load(open(out / "all_results.json"))
    assert results["train_samples"] == 12 and results["train_skipped_empty_caption"] == 1
    assert results["eval_samples"] == 8 and "eval_text_to_image_R@1" in results
