import json
import os

from conftest import run_py
from runner import recipe_cmd


def history(out: str) -> list[dict]:
    return json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]


def test_recipe_command_line_trains_evaluates_and_saves(demo, tmp_path):
    data_dir, model_dir = demo
    out = str(tmp_path / "out")
    args = recipe_cmd(
        data_dir, model_dir, out, "--max_steps", "60", "--logging_steps", "10", "--learning_rate=1e-3"
    )
    args[args.index("--per_device_train_batch_size=16")] = "--per_device_train_batch_size=32"
    # random-init towers: warm up, then a large step
    args[args.index("--warmup_steps=0")] = "--warmup_steps=10"
    r = run_py(args)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "train_samples_per_second" in log and "eval_loss" in log
    assert "world_size=1" in log
    results = json.load(open(os.path.join(out, "all_results.json")))
    assert results["train_samples_per_second"] > 0 and results["eval_loss"] > 0
    assert results["train_timed_steps"] == 60 - 2  # FPS leaves out the first skip_steps steps
    for f in ("train_results.json", "eval_results.json", "trainer_state.json", "model.safetensors",
              "preprocessor_config.json", "tokenizer.json"):  # fmt: skip
        assert os.path.isfile(os.path.join(out, f)), f
    losses = [h["loss"] for h in history(out) if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses


def test_rerun_resumes_from_last_checkpoint_unless_overwrite(demo, tmp_path):
    data_dir, model_dir = demo
    out = str(tmp_path / "out")
    args = recipe_cmd(
        data_dir,
        model_dir,
        out,
        "--max_steps",
        "6",
        "--save_steps",
        "3",
        "--do_eval=False",
        "--logging_steps",
        "1",
    )
    args.remove("--overwrite_output_dir")
    assert run_py(args).returncode == 0
    os.makedirs(
        os.path.join(out, "checkpoint-9")
    )  # a checkpoint half-written at kill time: no trainer_state.json
    args[args.index("6")] = "8"
    r = run_py(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming from" in r.stderr and "checkpoint-6" in r.stderr
    steps = [h["step"] for h in history(out) if "loss" in h]
    assert max(steps) == 8
    before = sorted(os.listdir(out))
    # Once more: the run is finished; resuming it would train a step past --max_steps. One clear error instead.
    r = run_py(args)
    assert r.returncode == 2 and "holds a finished run: its last checkpoint, checkpoint-8" in r.stderr, (
        r.stderr
    )
    assert "--overwrite_output_dir" in r.stderr and "--max_steps" in r.stderr
    assert sorted(os.listdir(out)) == before
    r = run_py(args + ["--resume_from_checkpoint", os.path.join(out, "checkpoint-8")])
    assert r.returncode == 2 and "checkpoint-8 is the end of a finished run" in r.stderr, r.stderr[-2000:]
    r = run_py(args + ["--overwrite_output_dir"])
    assert r.returncode == 0 and "Resuming from" not in r.stderr
    assert "Deleting" in r.stderr and "--overwrite_output_dir" in r.stderr


def test_bad_setups_get_one_clear_error(demo, tmp_path):
    data_dir, model_dir = demo
    cases = [
        (["--data_dir", str(tmp_path / "missing")], "is not a folder"),
        (["--max_steps", "0"], "--max_steps 0"),
        (["--no_such_flag", "1"], "unknown arguments: --no_such_flag"),
        (["--model_name_or_path", data_dir], "Could not load the tokenizer"),
    ]
    for extra, message in cases:
        r = run_py(recipe_cmd(data_dir, model_dir, str(tmp_path / "o"), *extra))
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        assert message in r.stderr, (extra, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, extra
