"""Kill -9 a real run (one process, and two DDP processes on gloo) mid-training, rerun the same command: it
resumes by itself from the last complete checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
from runner import KILL_AFTER, MAX_STEPS, finish, kill_all, losses, start, train_cmd
from safetensors.torch import load_file

from clip_train.checkpoint.layout import MARKER, complete_checkpoints, is_complete


def wait_for_checkpoint(p: subprocess.Popen, out: str, log_path: str, deadline: float) -> bool:
    """False while the run has no complete checkpoint at or past KILL_AFTER; fails if it ends first."""
    assert p.poll() is None, "the run ended before the kill:\n" + open(log_path).read()[-4000:]
    assert time.monotonic() < deadline, "no checkpoint in time"
    return any(int(c.rsplit("-", 1)[1]) >= KILL_AFTER for c in complete_checkpoints(out))


def add_half_written_checkpoint(out: str, world: int) -> str:
    """What a kill during a save leaves: rank 0's files (trainer_state.json too) but another rank's RNG file cut
    short and no completion marker. Placed after every existing checkpoint, at a step no save will reuse."""
    newest = complete_checkpoints(out)[-1]
    steps = [int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")]
    half = os.path.join(out, f"checkpoint-{max(steps) + 1}")
    shutil.copytree(newest, half)
    os.remove(os.path.join(half, MARKER))
    rng = os.path.join(half, "rng_state_1.pth" if world > 1 else "rng_state.pth")
    data = open(rng, "rb").read()
    open(rng, "wb").write(data[: len(data) // 2])
    return half


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory) -> dict:
    """For 1 and 2 processes at once (the machine is small; most of a run's time is start-up): an uninterrupted
    run, and the same command killed at a random moment after KILL_AFTER steps, then run again as it was."""
    root = tmp_path_factory.mktemp("resume")
    found, started = {}, []
    for world in (1, 2):
        for kind in ("reference", "killed"):
            out, log = str(root / f"{kind}{world}"), str(root / f"{kind}{world}.log")
            found[kind, world] = {"cmd": train_cmd(demo, out, world), "out": out, "log": log}
            found[kind, world]["p"] = start(found[kind, world]["cmd"], log)
            started.append(found[kind, world]["p"])
    try:
        deadline, waiting = time.monotonic() + 300, {1, 2}
        while waiting:
            for world in sorted(waiting):
                run = found["killed", world]
                if wait_for_checkpoint(run["p"], run["out"], run["log"], deadline):
                    time.sleep(random.Random(world).uniform(0.0, 0.3))  # a few steps on, maybe mid-save
                    kill_all(run["p"])
                    assert run["p"].returncode == -signal.SIGKILL
                    assert not os.path.exists(os.path.join(run["out"], "all_results.json"))
                    run["last_complete"] = complete_checkpoints(run["out"])[-1]
                    run["half"] = add_half_written_checkpoint(run["out"], world)
                    run["p"] = start(run["cmd"], run["log"] + ".rerun")  # the same command, nothing added
                    started.append(run["p"])
                    waiting.discard(world)
            time.sleep(0.05)
        for run in found.values():
            run["output"] = finish(run["p"], run["log"] + (".rerun" if "half" in run else ""))
        yield found
    finally:
        for p in started:
            if p.poll() is None:
                kill_all(p)


@pytest.mark.parametrize("world", [1, 2], ids=["1-process", "2-ddp-processes"])
def test_kill_and_rerun_resumes_and_matches_an_uninterrupted_run(runs, world):
    killed, reference = runs["killed", world], runs["reference", world]
    assert f"Resuming from {killed['last_complete']}" in killed["output"]
    # The deletion line lists our half-written folder, and the kill's own one when it struck mid-save.
    deleted = [line.rsplit(": ", 1)[1].split(", ") for line in killed["output"].splitlines()
               if f"unfinished (no {MARKER})" in line]  # fmt: skip
    assert deleted and os.path.basename(killed["half"]) in deleted[0], (
        "unfinished ones go, their steps redone"
    )
    got, want = losses(killed["out"]), losses(reference["out"])
    assert sorted(got) == list(range(1, MAX_STEPS + 1)) == sorted(want)
    resumed_from = int(killed["last_complete"].rsplit("-", 1)[1])
    assert KILL_AFTER <= resumed_from < MAX_STEPS
    for s in got:  # before resumed_from: the killed run's own losses; after: the resumed run's
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), (s, resumed_from, got[s], want[s])
    assert all(is_complete(c) for c in complete_checkpoints(killed["out"]))
    assert json.load(open(os.path.join(killed["out"], "all_results.json")))["epoch"] == pytest.approx(4.0)


def test_weights_are_saved_as_safetensors(runs):
    out = runs["reference", 1]["out"]
    folders = [out, *complete_checkpoints(out)]
    assert len(folders) == 3  # the final model and the last two checkpoints (save_total_limit defaults to 2)
    for folder in folders:
        names = os.listdir(folder)
        assert "model.safetensors" in names, folder
        assert not [n for n in names if n.endswith(".bin") and n != "training_args.bin"], names
        assert "logit_scale" in load_file(os.path.join(folder, "model.safetensors"))


def test_timed_saves_agree_across_ranks(runs):
    """The DDP runs pass the recipe's --save_steps 150000 ("never") and --save_minutes 0.005: checkpoints still
    come, at steps both ranks agreed on (or the marker's barrier would hang), and are resumed from."""
    killed = runs["killed", 2]
    before_kill = open(killed["log"]).read()
    steps = [
        int(line.rsplit("-", 1)[1]) for line in before_kill.splitlines() if "Checkpoint complete:" in line
    ]
    assert len(steps) >= 2 and steps == sorted(set(steps)), steps
    last = int(killed["last_complete"].rsplit("-", 1)[1])
    assert last in steps or last > steps[-1]  # the kill may land between its marker and its log line


def make_checkpoint(out: str, step: int, *, state: bool = True, marker: bool = True) -> str:
    path = os.path.join(out, f"checkpoint-{step}")
    os.makedirs(path)
    if state:
        open(os.path.join(path, "trainer_state.json"), "w").write(json.dumps({"global_step": step}))
    if marker:
        open(os.path.join(path, MARKER), "w").write(json.dumps({"global_step": step}))
    return path


def test_output_dir_rules(tmp_path):
    """Which checkpoint a rerun uses and what it deletes, on real folders with real parsed arguments."""
    from clip_train.checkpoint.output_dir import prepare_output_dir
    from clip_train.config.args import parse_args

    out = str(tmp_path / "out")

    def prepare(*extra: str) -> str | None:
        *_, training_args, recipe_args = parse_args(
            ["--model_name_or_path", "m", "--output_dir", out, "--do_train", "--use_cpu", *extra]
        )
        return prepare_output_dir(training_args, recipe_args)

    def left() -> list[str]:
        return sorted((n for n in os.listdir(out) if n != "run.lock"), key=lambda n: int(n.split("-")[1]))

    # Only unfinished folders (a kill during the first save, or another program's): fresh start, nothing deleted.
    make_checkpoint(out, 3, marker=False)
    assert prepare() is None and left() == ["checkpoint-3"]
    # Finished ones: the newest is resumed; unfinished ones after it (steps to redo) go, older ones stay.
    done = [make_checkpoint(out, s) for s in (4, 8)]
    make_checkpoint(out, 10, marker=False)
    make_checkpoint(out, 12, state=False, marker=False)
    assert prepare() == done[-1]
    assert left() == ["checkpoint-3", "checkpoint-4", "checkpoint-8"]
    # Asked for explicitly: used as given, even without the marker.
    assert prepare("--resume_from_checkpoint", os.path.join(out, "checkpoint-3")).endswith("checkpoint-3")
    # --overwrite_output_dir: a fresh start, and every checkpoint is deleted.
    assert prepare("--overwrite_output_dir") is None and left() == []


def test_save_clock_projects_saves_and_looks_again_after_an_evaluation(tmp_path):
    """CheckpointMarker alone, driven like the Trainer drives it, with real sleeps as the steps' work."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from clip_train.checkpoint.saving import CheckpointMarker

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    state, control = TrainerState(), TrainerControl()
    guard = CheckpointMarker(save_minutes=0.005)  # 300 ms
    guard.on_train_begin(args, state, control)
    saved = []

    def step(seconds: float) -> bool:
        time.sleep(seconds)
        state.global_step += 1
        control.should_save = False
        guard.on_step_end(args, state, control)
        if control.should_save:  # what the Trainer then does: write the folder, call on_save
            saved.append(state.global_step)
            make_checkpoint(str(tmp_path), state.global_step, marker=False)
            guard.on_save(args, state, control)
        return control.should_save

    while state.global_step < 60 or not saved or saved[-1] != state.global_step:
        step(0.02)
    assert len(saved) >= 3, saved  # >= 60 steps of >= 20 ms: >= 1.2 s, a save every ~300 ms
    assert all(is_complete(os.path.join(str(tmp_path), f"checkpoint-{s}")) for s in saved)
    assert not any(step(0.0) for _ in range(5))  # right after a save: not yet; the clock is read at 1, 2, 4
    time.sleep(0.5)  # an evaluation longer than the whole interval, before step 6 (next read due at 8)
    guard.on_evaluate(args, state, control)
    assert step(0.0), "the step after a long evaluation saves"
