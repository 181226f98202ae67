"""The launchers as a user runs them: real bash, real torchrun, real gloo processes on the embedded demo.

Each case in its own run folder, a finished run kept aside, the recipe's greps on a real log, a killed worker healed
by torchrun's restart, SIGTERM saving where it stopped (through the launcher and for run_clip.py alone), two nodes.
A handful of steps each; the argument handling is tests/unit/launch/test_launchers.py's.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LAUNCH_TIMEOUT, launch_sh, launcher_env

from clip_train.checkpoint.layout import last_complete_step
from clip_train.launch import runfolder
from clip_train.launch.plan import _free_port

REPO = Path(__file__).resolve().parents[2]
TEST_DIR = REPO / "test"


# ---- real training runs on the embedded demo -----------------------------------------------------------------------

# A few steps of the tiny demo: throughput, an eval on 40 captions and a logged loss per step.
TRAIN = ["--demo", "--skip_steps=1", "--logging_steps=1", "--batch_size=8", "--max_eval_samples=40"]
TRAIN += ["--disable_tqdm=True", "--log_level=info"]
# Two processes, a checkpoint every 5 steps; 38 is no multiple of 5, so the end is never a checkpoint to refuse.
HEAL = [*TRAIN, "--nproc_per_node=2", "--max_steps=38", "--save_steps=5"]


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One demo build and one token/image cache shared by every training test of the session; the demo is made
    before any launcher asks for it, so that the two nodes of the cluster test do not race to build it."""
    root = tmp_path_factory.mktemp("clip-demo")
    env = {"CLIP_DEMO_ROOT": str(root / "demo"), "CLIP_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "clip_train.demo", "--print-paths"]
    subprocess.run(
        command, env={**os.environ, **env, "PYTHONPATH": str(REPO)}, check=True, timeout=LAUNCH_TIMEOUT
    )
    return env


def grep_recipe(log: Path, pattern: str) -> str:
    """The recipe's own pipeline, e.g. grep "train_samples_per_second =" train_0.log | tail -1 | awk '{print $3}'."""
    pipeline = f"grep {shlex.quote(pattern)} {shlex.quote(str(log))} | tail -1 | awk '{{print $3}}'"
    return subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, check=True).stdout.strip()


def check_run(
    out: Path, case: str, console: str, steps: int, log: Path | None = None
) -> tuple[dict[str, str], list[float]]:
    """The summary, the logs and the recipe's greps of a finished launch; returns the summary and per-step losses.
    ``log``: the launcher's console log when not train_$ASCEND_DEVICE_ID.log (one per node on several nodes)."""
    lines = (out / f"{case}.log").read_text().splitlines()
    fields = dict(line.split(" = ", 1) for line in lines)
    run = out / case
    results = json.loads((run / "all_results.json").read_text())
    assert fields["CaseName"] == case and fields["DeviceType"] == os.uname().machine
    assert float(fields["ActualFPS"]) == results["train_samples_per_second"] > 0
    assert float(fields["TrainAccuracy"]) == round(results["eval_loss"], 4)
    assert float(fields["TrainingTime"]) == pytest.approx(8 * 1000 / float(fields["ActualFPS"]), rel=1e-3)
    log = log or out / f"train_{out.name}.log"
    # The recipe's log contract, on the real log: the same numbers as the summary.
    assert grep_recipe(log, "train_samples_per_second =") == fields["ActualFPS"]
    assert grep_recipe(log, "eval_loss") == fields["TrainAccuracy"]
    tail = [
        f"Final Performance images/sec : {fields['ActualFPS']}",
        f"Final Train Loss : {fields['ActualLoss']}",
    ]
    assert console.splitlines()[-2:] == tail and log.read_text().splitlines()[-2:] == tail
    assert (run / runfolder.SUMMARY).read_text() == (out / f"{case}.log").read_text()  # the run keeps its own
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == steps and float(fields["ActualLoss"]) == losses[-1]
    return fields, losses


@pytest.fixture(scope="session")
def sequence(demo_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """performance_1p, full_1p, then full_8p on 2 processes, in one OUTPUT_ROOT, as a user runs them."""
    tmp = tmp_path_factory.mktemp("sequence")
    env, runs = launcher_env(tmp, **demo_env), {}
    for script, flags, case, steps in [
        ("performance_1p", [*TRAIN, "--max_steps=4"], "clip_bs8_1p_perf", 4),
        ("full_1p", [*TRAIN, "--max_steps=3"], "clip_bs8_1p_acc", 3),
        ("full_8p", HEAL, "clip_bs8_2p_acc", 38),
    ]:
        proc = launch_sh(script, *flags, env=env)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        runs[case] = (proc, *check_run(tmp / "out/0", case, proc.stdout, steps))
    return {"env": env, "out": tmp / "out/0", "runs": runs}


def test_each_case_trains_from_the_model_folder_in_its_own_run_folder(sequence: dict) -> None:
    out = sequence["out"]
    for case in sequence["runs"]:
        history = (out / case / runfolder.LAUNCH_LOG).read_text()
        assert f"[launch] run folder: {out / case}" in history
        assert (
            "Resuming" not in history and "resuming" not in history
        )  # no run continued another's checkpoint
    assert "world_size=2 rank=0" in sequence["runs"]["clip_bs8_2p_acc"][0].stdout
    assert float(sequence["runs"]["clip_bs8_2p_acc"][1]["ActualFPSPerDevice"]) == pytest.approx(
        float(sequence["runs"]["clip_bs8_2p_acc"][1]["ActualFPS"]) / 2, abs=1e-3
    )


def test_the_same_case_again_trains_anew_and_keeps_the_first(sequence: dict) -> None:
    out, first = sequence["out"], sequence["runs"]["clip_bs8_1p_perf"]
    proc = launch_sh("performance_1p", *TRAIN, "--max_steps=4", env=sequence["env"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    kept = [p for p in out.glob("clip_bs8_1p_perf.finished-*")]
    assert (
        len(kept) == 1 and f"the finished run there is kept as {kept[0]}; starting a new run" in proc.stdout
    )
    assert (kept[0] / runfolder.SUMMARY).read_text().splitlines()[5] == f"ActualFPS = {first[1]['ActualFPS']}"
    _, losses = check_run(out, "clip_bs8_1p_perf", proc.stdout, 4)
    assert "Resuming" not in proc.stdout
    assert losses == pytest.approx(first[2], abs=1e-5)  # trained anew from the model folder, same seed


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftovers():
    """A failed test must not leave its launch running: torchrun and its workers run in sessions of their own."""
    yield
    import psutil

    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                child.kill()


def _start(args: list[str], env: dict[str, str], script: str = "full_8p") -> subprocess.Popen:
    command = ["bash", str(TEST_DIR / f"train_clip_{script}.sh"), *args]
    STARTED.append(
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )
    return STARTED[-1]


def _finish(proc: subprocess.Popen) -> str:
    return proc.communicate(timeout=LAUNCH_TIMEOUT)[0]


def _workers(launcher_pid: int) -> list[int]:
    import psutil

    (torchrun,) = psutil.Process(launcher_pid).children()  # its children: the workers (not their loaders)
    return [p.pid for p in torchrun.children() if any(arg.endswith("run_clip.py") for arg in p.cmdline())]


def _wait_for(log: Path, text: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {log}")


def test_a_killed_worker_restarts_every_worker_and_the_run_ends_as_asked(
    sequence: dict, tmp_path: Path
) -> None:
    env = {**sequence["env"], "OUTPUT_ROOT": str(tmp_path / "out")}
    proc = _start(HEAL, env)
    _wait_for(tmp_path / "out/0/train_0.log", "Checkpoint complete", proc)
    os.kill(_workers(proc.pid)[-1], signal.SIGKILL)
    console = _finish(proc)
    assert proc.returncode == 0, console[-4000:]
    assert "failed (exitcode: -9)" in console and "Resuming from" in console
    _, losses = check_run(tmp_path / "out/0", "clip_bs8_2p_acc", console, 38)
    assert losses == pytest.approx(sequence["runs"]["clip_bs8_2p_acc"][2], abs=1e-5)


def test_sigterm_saves_the_step_it_stopped_at_and_the_rerun_resumes_there(
    sequence: dict, tmp_path: Path
) -> None:
    env = {**sequence["env"], "OUTPUT_ROOT": str(tmp_path / "out")}
    proc = _start(HEAL, env)
    _wait_for(tmp_path / "out/0/train_0.log", "Checkpoint complete", proc)
    proc.send_signal(signal.SIGTERM)
    console = _finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, console[-4000:]
    run = tmp_path / "out/0/clip_bs8_2p_acc"
    step = last_complete_step(run)
    assert step is not None and 5 <= step < 38
    assert console.splitlines()[-1] == (
        f"[launch] stopped by SIGTERM; the last complete checkpoint is {run}/checkpoint-{step}: "
        "run the same command again to resume from it"
    )
    assert (
        f"run_clip.py: stopped by SIGTERM after step {step}; {run}/checkpoint-{step} is complete" in console
    )
    rerun = launch_sh("full_8p", *HEAL, env=env)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert f"[launch] resuming the interrupted run in {run} from checkpoint-{step}" in rerun.stdout
    _, losses = check_run(tmp_path / "out/0", "clip_bs8_2p_acc", rerun.stdout, 38)
    assert losses == pytest.approx(sequence["runs"]["clip_bs8_2p_acc"][2], abs=1e-5)


def test_a_smoke_test_shorter_than_skip_steps_ends_with_a_summary(
    demo_env: dict[str, str], tmp_path: Path
) -> None:
    """3 steps with the recipe's --skip_steps 10: no step is timed, which is no failure (issue 25, item 11)."""
    proc = launch_sh(
        "performance_1p", *TRAIN, "--skip_steps=10", "--max_steps=3", env=launcher_env(tmp_path, **demo_env)
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = tmp_path / "out/0"
    fields = dict(line.split(" = ", 1) for line in (out / "clip_bs8_1p_perf.log").read_text().splitlines())
    assert fields["ActualFPS"] == fields["TrainingTime"] == "NA" and float(fields["TrainAccuracy"]) > 0
    assert (
        "[Warning] ActualFPS = NA: the run timed no step past --skip_steps (it ended at step 3); give it more "
        "steps than --skip_steps to measure the throughput"
    ) in proc.stdout
    assert proc.stdout.splitlines()[-2] == "Final Performance images/sec : NA"


def test_a_diverged_run_is_not_restarted(demo_env: dict[str, str], tmp_path: Path) -> None:
    """run_clip.py exits 2 on divergence; torchrun restarts on any failure, but a rerun only diverges again: the
    run trains once, every restart ends at once, and the launcher exits 2 with the reason."""
    diverge = [
        "--max_steps=60",
        "--learning_rate=1e30",
        "--max_restarts=2",
    ]  # non-finite from step 2: 32 skips
    proc = launch_sh("full_1p", *TRAIN, *diverge, env=launcher_env(tmp_path, **demo_env))
    console = proc.stdout
    assert proc.returncode == 2, console[-4000:]
    assert console.count("world_size=1 rank=0") == 1  # one attempt trained
    assert console.count("run_clip.py: error: 32 optimizer steps in a row") == 1
    assert console.count("run_clip.py: not restarted: this run stopped for good (its error is above)") == 2
    assert console.splitlines()[-1].startswith(
        "[Error] training stopped with status 2 (32 optimizer steps in a row (steps 2-33) had non-finite gradients"
    )
    assert console.splitlines()[-1].endswith(
        f"not restarted: a rerun would only repeat it. The whole log is {tmp_path}/out/0/train_0.log"
    )


def test_run_clip_alone_saves_and_stops_on_sigterm(demo: tuple[str, str], tmp_path: Path) -> None:
    data_dir, model_dir = demo
    out = tmp_path / "run"
    command = [sys.executable, "run_clip.py", "--output_dir", str(out), "--model_name_or_path", model_dir]
    command += [
        "--data_dir",
        data_dir,
        "--do_train",
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "500",
    ]
    command += ["--logging_steps", "1", "--save_steps", "1000", "--use_cpu", "--disable_tqdm", "True"]
    log = tmp_path / "log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        STARTED.append(proc)
        _wait_for(log, "'loss'", proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=LAUNCH_TIMEOUT)
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    step = last_complete_step(out)
    assert step is not None and 1 <= step < 500
    assert text.splitlines()[-1] == (
        f"run_clip.py: stopped by SIGTERM after step {step}; {out}/checkpoint-{step} is complete: "
        "run the same command again to resume from it"
    )


def test_cluster_two_nodes_make_one_training(demo_env: dict[str, str], tmp_path: Path) -> None:
    """The node flags typed per node, each node with its own folder (ASCEND_DEVICE_ID): one training, one summary,
    and each node says its run folder is not shared (checkpoints and resumes need one folder)."""
    port = str(_free_port())
    nodes = []
    for rank in (0, 1):
        env = launcher_env(tmp_path, **demo_env, ASCEND_DEVICE_ID=str(rank))
        flags = ["--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        nodes.append(_start([*TRAIN, "--max_steps=4", *flags, "--nproc_per_node=1"], env, "cluster"))
    outputs = [_finish(node) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    out = tmp_path / "out"
    rank0 = next(r for r in (0, 1) if "world_size=2 rank=0" in outputs[r])  # c10d numbers the nodes itself
    fields, _ = check_run(
        out / str(rank0), "clip_bs8_2p_acc", outputs[rank0], 4, out / f"{rank0}/train_{rank0}.node{rank0}.log"
    )
    assert fields["RankSize"] == "2"
    for rank in (0, 1):  # each node's log shows its own process in the one world
        assert "world_size=2 rank=" in (out / str(rank) / f"train_{rank}.node{rank}.log").read_text()
        warning = [line for line in outputs[rank].splitlines() if "is not shared" in line]
        assert warning == [
            f"[Warning] the run folder {out}/{rank}/clip_bs8_2p_acc is not shared by every node: node {rank} does "
            f"not see node(s) {1 - rank} start in it. Put OUTPUT_ROOT (or --output_dir) on storage every node "
            "sees: checkpoints, resumes and the summary need one folder"
        ]
    assert not list((out / str(1 - rank0)).glob("clip_*.log"))  # the summary is the rank-0 node's alone
    assert "Final Performance" not in outputs[1 - rank0]


# ---- SLURM: two "nodes" on loopback with SLURM's variables faked, no rank or address flag ---------------------------

# Node 0 is 127.0.0.2 (the master: it hosts the rendezvous), node 1 is 127.0.0.1: c10d ranks the nodes by address, so
# global rank 0 lands on node 1, which must then write the summary.
NODELIST = "127.0.0.2,127.0.0.1"
SLURM_HEAL = [*TRAIN, "--nproc_per_node=1", "--max_steps=38", "--save_steps=5"]


def _srun(tmp: Path, demo_env: dict[str, str]) -> list[subprocess.Popen]:
    """What srun --nodes=2 --ntasks-per-node=1 bash test/train_clip_cluster.sh ... starts: one launcher per node,
    both with the same OUTPUT_ROOT (shared storage). The port is given: one derived from a made-up job id could be
    taken on this shared machine."""
    port, launchers = str(_free_port()), []
    for node in (0, 1):
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": str(node)}
        env = launcher_env(tmp, **demo_env, **slurm, SLURM_JOB_NODELIST=NODELIST, SLURM_STEP_NUM_TASKS="2")
        launchers.append(_start([*SLURM_HEAL, f"--master_port={port}"], env, "cluster"))
    return launchers


@pytest.fixture(scope="module")
def slurm_run(demo_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("slurm")
    launchers = _srun(tmp, demo_env)
    outputs = [_finish(p) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    fields, losses = check_run(
        tmp / "out/0", "clip_bs8_2p_acc", outputs[1], 38, tmp / "out/0/train_0.node1.log"
    )
    return {"tmp": tmp, "outputs": outputs, "fields": fields, "losses": losses, "pid1": launchers[1].pid}


def test_slurm_two_nodes_make_one_training_summarised_by_the_rank_0_node(slurm_run: dict) -> None:
    out, (node0, node1) = slurm_run["tmp"] / "out/0", slurm_run["outputs"]
    assert slurm_run["fields"]["RankSize"] == "2"
    assert (
        "[launch] nodes: nnodes=2 (SLURM_NNODES), node_rank=0 (SLURM_NODEID), master_addr=127.0.0.2 (first "
        "host of SLURM_JOB_NODELIST)" in node0
    )
    assert "world_size=2 rank=0" in node1 and "Final Performance" not in node0  # one summary, node 1's
    assert "[launch] node 1's worker held global rank 0: it writes the summary" in node1
    said = [line for line in node0.splitlines() if "the summary is written by" in line]
    assert said == [
        "[launch] node 0 finished; its workers did not hold global rank 0, so the summary is written by node 1 on "
        f"{socket.gethostname()} (launcher pid {slurm_run['pid1']}) into {out}/clip_bs8_2p_acc.log"
    ]
    assert not any("is not shared" in o for o in (node0, node1))  # one folder, seen by both


def test_slurm_a_killed_worker_on_one_node_heals_every_node(
    slurm_run: dict, demo_env: dict[str, str], tmp_path: Path
) -> None:
    launchers = _srun(tmp_path, demo_env)
    run = tmp_path / "out/0/clip_bs8_2p_acc"
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while last_complete_step(run) is None and time.monotonic() < deadline and launchers[1].poll() is None:
        time.sleep(0.05)
    os.kill(
        _workers(launchers[1].pid)[0], signal.SIGKILL
    )  # node 1's worker: global rank 0, the one that saves
    outputs = [_finish(p) for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "failed (exitcode: -9)" in outputs[1] and "Resuming from" in outputs[1]
    assert outputs[0].count("world_size=2 rank=1") == 2  # node 0's worker, not killed, was restarted too
    _, losses = check_run(
        tmp_path / "out/0", "clip_bs8_2p_acc", outputs[1], 38, tmp_path / "out/0/train_0.node1.log"
    )
    assert losses == pytest.approx(slurm_run["losses"], abs=1e-5)  # resumed exactly where it was saved
