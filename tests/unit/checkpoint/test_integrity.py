"""Checkpoints that check themselves: a damaged newest checkpoint is moved aside (never deleted) and the run
resumes from the one before it with an uninterrupted run's losses; every rank agrees; nothing resumable is one
clear error; a resume of another shape stops with one line. Real runs, real checkpoint folders, real gloo ranks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO
from runner import finish, losses, start, train_cmd

from clip_train.checkpoint.integrity import HASH, MARKER, verify
from clip_train.errors import SetupError

STEPS = 12  # saves at 4, 8, 12; the last two are kept
FILES = ["model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"]


def cmd(demo: tuple[str, str], out: str, *extra: str) -> list[str]:
    return train_cmd(demo, out, 1) + ["--max_steps", str(STEPS), *extra]  # the last --max_steps wins


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> dict:
    """One uninterrupted 12-step run; its output folder is copied for every damage below."""
    root = tmp_path_factory.mktemp("integrity")
    out, log = str(root / "reference"), str(root / "reference.log")
    output = finish(start(cmd(demo, out), log), log)
    return {"out": out, "output": output, "losses": losses(out), "root": root}


def interrupted_copy(reference: dict, dest: str, keep: tuple[int, ...] = (8, 12)) -> str:
    """The reference folder as a run killed after its last save would leave it: checkpoints only."""
    os.makedirs(dest)
    for step in keep:
        shutil.copytree(
            os.path.join(reference["out"], f"checkpoint-{step}"), os.path.join(dest, f"checkpoint-{step}")
        )
    return dest


def damage(path: str, kind: str) -> None:
    if kind == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "zero":  # same size: only the hash can tell
        size = os.path.getsize(path)
        at, n = size // 3, max(1, min(4096, size // 4))
        with open(path, "r+b") as f:
            f.seek(at)
            assert any(f.read(n)), "the range must hold bytes that zeroing changes"
            f.seek(at)
            f.write(bytes(n))
    else:
        os.remove(path)


def prepare(out: str, *extra: str):
    from clip_train.checkpoint.output_dir import prepare_output_dir
    from clip_train.config.args import parse_args

    *_, training_args, recipe_args = parse_args(
        [
            "--model_name_or_path",
            "m",
            "--output_dir",
            out,
            "--do_train",
            "--use_cpu",
            "--max_steps",
            "100",
            *extra,
        ]
    )
    return prepare_output_dir(training_args, recipe_args)


def aside(out: str) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("damaged-"))


def test_markers_record_every_file_and_the_run(reference):
    ckpt = os.path.join(reference["out"], "checkpoint-12")
    marker = json.load(open(os.path.join(ckpt, MARKER)))
    on_disk = {n for n in os.listdir(ckpt) if n != MARKER}
    assert set(marker["files"]) == on_disk and set(FILES) <= on_disk
    assert all(rec["size"] == os.path.getsize(os.path.join(ckpt, n)) and len(rec[HASH]) == 32
               for n, rec in marker["files"].items())  # fmt: skip
    run = marker["run"]
    assert (run["world_size"], run["per_device_train_batch_size"], run["gradient_accumulation_steps"]) == (
        1,
        8,
        1,
    )
    assert run["loss_scope"] and run["train_rows"] == 96 and len(run["train_rows_fingerprint"]) == 16
    assert os.path.isabs(run["model"])
    assert verify(ckpt) == (None, True)


def test_damaged_newest_checkpoint_falls_back_and_matches_an_uninterrupted_run(reference, demo):
    """model.safetensors of the newest checkpoint cut short (the issue's case): the rerun of the same command
    moves it aside, resumes from checkpoint-8 and ends at step 12 with the reference's per-step losses."""
    out = interrupted_copy(reference, str(reference["root"] / "cut"))
    damage(os.path.join(out, "checkpoint-12", "model.safetensors"), "truncate")
    log = str(reference["root"] / "cut.log")
    output = finish(start(cmd(demo, out), log), log)
    assert "checkpoint-12 is damaged (model.safetensors: " in output and "cut short" in output
    assert f"Resuming from {os.path.join(out, 'checkpoint-8')}" in output
    got, want = losses(out), reference["losses"]
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), (s, got[s], want[s])
    # Still there after the run's own saves and rotation (save_total_limit 2), with the cut file as it was.
    (moved,) = aside(out)
    assert moved.startswith("damaged-checkpoint-12-")
    assert "cut short" in verify(os.path.join(out, moved)).problem
    assert verify(os.path.join(out, "checkpoint-12")) == (None, True)  # the one written again


@pytest.mark.parametrize("kind", ["truncate", "zero", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_each_damage_is_found_and_the_previous_checkpoint_chosen(reference, tmp_path, name, kind):
    out = interrupted_copy(reference, str(tmp_path / "out"))
    damage(os.path.join(out, "checkpoint-12", name), kind)
    problem = verify(os.path.join(out, "checkpoint-12")).problem
    why = {"truncate": "cut short", "zero": "bytes changed", "delete": "missing"}[kind]
    assert problem.startswith(f"{name}: ") and why in problem, problem
    assert prepare(str(out)) == os.path.join(out, "checkpoint-8")
    (moved,) = aside(out)
    assert not os.path.exists(os.path.join(out, "checkpoint-12"))
    assert verify(os.path.join(out, moved)).problem == problem  # moved as it was, nothing deleted


def test_explicit_damaged_checkpoint_is_an_error_without_fallback(reference, tmp_path):
    out = interrupted_copy(reference, str(tmp_path / "out"))
    damage(os.path.join(out, "checkpoint-12", "optimizer.pt"), "zero")
    asked = os.path.join(out, "checkpoint-12")
    with pytest.raises(SetupError, match=r"checkpoint-12 is damaged: optimizer.pt: its bytes changed"):
        prepare(str(out), "--resume_from_checkpoint", asked)
    assert sorted(n for n in os.listdir(out) if n != "run.lock") == ["checkpoint-12", "checkpoint-8"]


def test_old_marker_without_hashes_resumes_with_a_note(reference, tmp_path, caplog):
    out = interrupted_copy(reference, str(tmp_path / "out"), keep=(8,))
    ckpt = os.path.join(out, "checkpoint-8")
    json.dump({"global_step": 8, "world_size": 1, "saved_at": 0.0}, open(os.path.join(ckpt, MARKER), "w"))
    caplog.set_level(logging.INFO, logger="clip_train")
    assert prepare(str(out)) == ckpt
    notes = [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()]
    assert notes == [f"{ckpt} was saved before markers recorded file hashes: resuming from it unverified"]


def test_nothing_resumable_and_another_shape_stop_with_one_line(reference, demo):
    """Every checkpoint damaged: exit 2, one line naming both, nothing moved. A resume with another batch size:
    exit 2, one line naming the difference and the three ways on. (Both at once: start-up is most of it.)"""
    root = reference["root"]
    broken = interrupted_copy(reference, str(root / "all-broken"))
    damage(os.path.join(broken, "checkpoint-12", "rng_state.pth"), "delete")
    damage(os.path.join(broken, "checkpoint-8", "trainer_state.json"), "zero")
    before = {n: sorted(os.listdir(os.path.join(broken, n))) for n in os.listdir(broken) if n != "run.lock"}
    other = interrupted_copy(reference, str(root / "other-shape"), keep=(8,))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in (cmd(demo, broken), cmd(demo, other, "--per_device_train_batch_size", "4"))
    ]
    (_, err_broken), (_, err_other) = (p.communicate(timeout=300) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], (err_broken[-3000:], err_other[-3000:])
    for err in (err_broken, err_other):
        assert len([ln for ln in err.splitlines() if ln.startswith("run_clip.py: error:")]) == 1
        assert "Traceback" not in err
    line = next(ln for ln in err_broken.splitlines() if ln.startswith("run_clip.py: error:"))
    assert (
        "checkpoint-12: rng_state.pth: missing" in line
        and "checkpoint-8: trainer_state.json: its bytes" in line
    )
    assert "--overwrite_output_dir" in line and "--resume_from_checkpoint" in line
    assert {
        n: sorted(os.listdir(os.path.join(broken, n))) for n in os.listdir(broken) if n != "run.lock"
    } == before
    line = next(ln for ln in err_other.splitlines() if ln.startswith("run_clip.py: error:"))
    assert "--per_device_train_batch_size 8 then, 4 now" in line
    assert "same settings" in line and "new --output_dir" in line and "--overwrite_output_dir" in line


AGREE = """
import json, os, sys
from clip_train.config.args import parse_args
from clip_train.checkpoint.output_dir import prepare_output_dir
out, per_node, answers = sys.argv[1], sys.argv[2] == "per-node", sys.argv[3]
rank = os.environ["RANK"]
*_, ta, ra = parse_args(["--model_name_or_path", "m", "--output_dir", out + (rank if per_node else ""),
                         "--do_train", "--use_cpu", "--max_steps", "100", "--save_on_each_node", str(per_node)])
assert ta.world_size == 2 and ta.should_save == (per_node or rank == "0")
json.dump(prepare_output_dir(ta, ra), open(os.path.join(answers, "rank" + rank), "w"))
import torch.distributed as dist  # torn down as run_clip.py does: left to exit, gloo's threads can abort a rank
dist.barrier()
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("layout", ["shared", "per-node"])
def test_two_gloo_ranks_agree_on_the_fallback(reference, tmp_path, layout):
    """Two real torchrun ranks on gloo; the newest checkpoint is damaged in a way only its hash shows.
    shared: one node, one folder; rank 0 alone verifies and moves it, rank 1 receives the verdict.
    per-node: two loopback nodes with a folder each (--save_on_each_node, as with per-node disks); only node 1's
    copy is damaged, yet node 0 falls back too, so both resume from the same step."""
    base = str(tmp_path / "out")
    outs = [base] if layout == "shared" else [base + "0", base + "1"]
    for out in outs:
        interrupted_copy(reference, out)
    damage(os.path.join(outs[-1], "checkpoint-12", "model.safetensors"), "zero")
    script, answers = tmp_path / "agree.py", tmp_path / "answers"
    script.write_text(AGREE)
    answers.mkdir()
    port, env = free_port(), {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]
    tail = [str(script), base, layout, str(answers)]
    if layout == "shared":
        cmds = [run + ["--nproc_per_node", "2", *tail]]
    else:
        cmds = [
            run + ["--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", *tail] for n in (0, 1)
        ]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for c in cmds]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), errs[-1][-4000:]
    got = [json.load(open(answers / f"rank{r}")) for r in (0, 1)]
    assert got == [os.path.join(outs[0], "checkpoint-8"), os.path.join(outs[-1], "checkpoint-8")]
    for out in outs:  # each folder's own verifier moved its copy aside: the same checkpoints everywhere
        assert len(aside(out)) == 1
        assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-8"]


def test_identity_differences_and_a_foreign_marker(reference, tmp_path):
    from clip_train.checkpoint.integrity import differences

    saved = json.load(open(os.path.join(reference["out"], "checkpoint-12", MARKER)))["run"]
    assert differences(saved, dict(saved)) == []
    now = {**saved, "world_size": 2, "train_rows": 90, "train_rows_fingerprint": "0" * 16}
    assert differences(saved, now) == [
        "processes (world size) 1 then, 2 now",
        "training rows 96 then, 90 now",
    ]
    now = {**saved, "train_rows_fingerprint": "0" * 16}  # same count, other rows: the fingerprint says so
    assert differences(saved, now) == [
        f"training rows' fingerprint {saved['train_rows_fingerprint']} then, {'0' * 16} now"
    ]
    out = interrupted_copy(reference, str(tmp_path / "out"), keep=(8,))
    ckpt = os.path.join(out, "checkpoint-8")
    json.dump({"global_step": 8, "files": {"model.safetensors": 5}}, open(os.path.join(ckpt, MARKER), "w"))
    assert "file list is not one this version wrote" in verify(ckpt).problem
