"""The launchers (test/train_clip_*.sh over clip_train/launch/): flags, the command they build, the run folders.

Argument handling and the command are checked in-process through ``make_launch_plan`` (nothing launched); the device
probe is replaced there by a stated answer, because no NPU or GPU exists on this machine (one dry run goes through
bash with a stand-in torch_npu package to cover the real probe). Training runs are real bash, real torchrun, real
gloo processes on the embedded demo, with a handful of steps.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import launch_sh, launcher_env

from clip_train.checkpoint.layout import MARKER, last_complete_step
from clip_train.demo import classes_dir
from clip_train.errors import LaunchError
from clip_train.eval.recipe_log import recipe_blocks
from clip_train.launch import cli as launch
from clip_train.launch import options, runfolder
from clip_train.launch import plan as launch_plan

REPO = Path(__file__).resolve().parents[3]
TEST_DIR = REPO / "test"
SCRIPTS = list(options.PROFILES)
CLUSTER_FLAGS = ["--nnodes=2", "--node_rank=0", "--master_addr=127.0.0.1"]
WORKER = str(REPO / "clip_train/launch/worker.py")  # torchrun starts it; it becomes run_clip.py


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Stand-in data and model folders for plans (they only need to exist)."""
    (tmp_path / "coco").mkdir()
    (tmp_path / "clip-roberta").mkdir()
    return tmp_path / "coco", tmp_path / "clip-roberta"


def plan(script: str, dirs, *args: str, env: dict[str, str], devices=("cpu", 0)) -> launch_plan.LaunchPlan:
    """The launch a user's line would make; ``devices`` is what the probe would find (no accelerator here)."""
    data, model = dirs
    opts = options.parse(script, [f"--data_path={data}", f"--model_path={model}", *args])
    return launch_plan.make_launch_plan(opts, env, probe=lambda env: devices)


# The recipe's run_clip.py flags (its 1p script, less --overwrite_output_dir: the launchers resume by default).
RECIPE = {
    "num_train_epochs": ["3"], "dataset_name": ["ydshieh/coco_dataset_script"], "dataset_config_name": ["2017"],
    "image_column": ["image_path"], "caption_column": ["caption"], "remove_unused_columns": ["False"],
    "do_train": [], "do_eval": [], "fp16": [], "dataloader_drop_last": [], "fp16_opt_level": ["O2"],
    "loss_scale": ["12800000"], "optim": ["adamw_apex_fused_npu"], "use_combine_grad": [],
    "per_device_train_batch_size": ["64"], "per_device_eval_batch_size": ["64"], "learning_rate": ["5e-5"],
    "warmup_steps": ["0"], "weight_decay": ["0.1"], "skip_steps": ["10"], "save_steps": ["150000"],
}  # fmt: skip


# ---- argument handling (in-process) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch_size=big"], "--batch_size must be a positive integer"),
        (["--batch_size=08"], "--batch_size must be a positive integer"),
        (["--nproc_per_node=0"], "--nproc_per_node must be a positive integer or 'auto'"),
        (["--nnodes=2", "--node_rank=2"], "--node_rank must be 0..1"),
        (["--max_restarts=-1"], "--max_restarts must be 0 or a positive integer"),
        (["stray"], "unexpected argument 'stray'"),
        (["--demo=yes"], "--demo takes no value"),
        (["--data_path", "a", "b"], "--data_path needs one value"),
    ],
)
def test_bad_flags_name_the_fix(args: list[str], message: str, capsys) -> None:
    assert launch.main(["full_1p", "--model_path=m", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"[Error] {message}") and "usage: bash test/train_clip_full_1p.sh" in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_paths_print_usage_and_exit_1(script: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("OUTPUT_ROOT", str(tmp_path / "out"))
    assert launch.main([script, *(CLUSTER_FLAGS if script == "cluster" else [])]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "--data_path is required" in err
    assert f"usage: bash test/train_clip_{script}.sh --data_path=" in err
    assert not (tmp_path / "out").exists()


def test_cluster_needs_its_node_flags(capsys) -> None:
    assert launch.main(["cluster", "--data_path=d", "--model_path=m", "--nnodes=2"]) == 1
    assert "train_clip_cluster.sh needs --node_rank" in capsys.readouterr().err


def test_missing_folders_are_named(tmp_path: Path, capsys) -> None:
    assert launch.main(["full_1p", f"--data_path={tmp_path}/nope", f"--model_path={tmp_path}"]) == 1
    assert f"--data_path={tmp_path}/nope is not a directory" in capsys.readouterr().err


def test_help_goes_to_stdout(capsys) -> None:
    assert launch.main(["performance_8p", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--nproc_per_node=8" in out and "--train_epochs=1" in out and "--max_restarts=3" in out


def test_full_1p_runs_the_recipe_command_in_its_case_folder(dirs, tmp_path: Path) -> None:
    p = plan("full_1p", dirs, env=launcher_env(tmp_path, ASCEND_DEVICE_ID="5"))
    data, model = dirs
    assert (p.family, p.world, p.managed) == ("cpu", 1, True)
    # One node: c10d on this host, so that every restart gets a fresh store (see make_launch_plan).
    port = p.command[10].rsplit(":", 1)[1]
    assert p.command[:17] == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--nnodes", "1",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--local_addr", "127.0.0.1",
        "--max_restarts", "0", WORKER,
        str(REPO / "run_clip.py"),
    ]  # fmt: skip
    assert p.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    run_dir = tmp_path / "out/5/clip_bs64_1p_acc"
    paths = {"output_dir": [str(run_dir)], "model_name_or_path": [str(model)], "data_dir": [str(data)]}
    # Exactly the recipe, plus use_cpu (CPU host): no --overwrite_output_dir, --max_steps, --ddp_bucket_cap_mb,
    # --dataloader_num_workers (run_clip.py picks them on CPU), nor --device_id (device visibility picks cards).
    assert p.run_args == {**RECIPE, **paths, "use_cpu": []}
    assert p.paths == runfolder.RunPaths(
        tmp_path / "out/5", run_dir, tmp_path / "out/5/train_5.log", tmp_path / "out/5/clip_bs64_1p_acc.log"
    )
    assert "HCCL_CONNECT_TIMEOUT" not in p.env_set  # HCCL settings belong to Ascend hosts only


def test_user_flags_win_over_the_defaults(dirs, tmp_path: Path) -> None:
    user = f"--output_dir={tmp_path}/mine --save_steps=5 --learning_rate 1e-4 --fp16=False --overwrite_output_dir "
    user += (
        "--report_to tensorboard none --batch_size=16 --model_name=clipx --max_steps=7 --nproc_per_node=auto"
    )
    p = plan("performance_8p", dirs, *shlex.split(user), env=launcher_env(tmp_path))
    assert p.world == 1 and p.command[p.command.index("--max_restarts") + 1] == "0"  # auto on CPU: 1 process
    flags = p.run_args
    assert flags["output_dir"] == [f"{tmp_path}/mine"] and not p.managed  # a user's folder is never renamed
    assert flags["save_steps"] == ["5"] and flags["learning_rate"] == ["1e-4"] and flags["fp16"] == ["False"]
    assert flags["overwrite_output_dir"] == [] and flags["report_to"] == ["tensorboard", "none"]
    assert flags["per_device_eval_batch_size"] == ["16"] and flags["max_steps"] == ["7"]
    assert flags["num_train_epochs"] == ["1"] and "ddp_bucket_cap_mb" not in flags  # 150 MB: Ascend only
    assert p.paths.summary_file == tmp_path / "out/0/clipx_bs16_1p_perf.log"
    assert list(p.command).count("--output_dir") == 1  # replaced in place, never "last one wins"


def test_multi_card_profiles_restart_and_use_the_8p_recipe(dirs, tmp_path: Path) -> None:
    p = plan("cluster", dirs, *CLUSTER_FLAGS, "--master_port=29611", env=launcher_env(tmp_path))
    assert p.world == 16  # 2 nodes x the default 8 processes (gloo allows any count)
    # c10d across nodes too: node 0 hosts the rendezvous store; every node's agent re-forms the group on a failure.
    assert p.command[3:22] == [
        "--nproc_per_node", "8", "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29611",
        "--rdzv_id", "clip-127.0.0.1-29611", "--rdzv_conf", "is_host=true", "--local_addr", "127.0.0.1",
        "--max_restarts", "3", WORKER, str(REPO / "run_clip.py"), "--output_dir",
    ]  # fmt: skip
    assert p.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # a fresh worker store at every restart
    assert p.paths.log_file.name == "train_0.node0.log"  # nodes sharing OUTPUT_ROOT keep their own console
    assert p.run_args["save_steps"] == ["15000"] and "ddp_bucket_cap_mb" not in p.run_args  # CPU host
    assert "max_steps" not in p.run_args and p.case == "clip_bs64_16p_acc"
    p = plan("full_8p", dirs, "--max_restarts=0", env=launcher_env(tmp_path))
    assert p.command[p.command.index("--max_restarts") + 1] == "0"


@pytest.mark.parametrize(
    ("family", "var"), [("npu", "ASCEND_RT_VISIBLE_DEVICES"), ("cuda", "CUDA_VISIBLE_DEVICES")]
)
def test_the_card_ascend_device_id_names_is_the_visible_one(
    family: str, var: str, dirs, tmp_path: Path
) -> None:
    p = plan("full_1p", dirs, env=launcher_env(tmp_path, ASCEND_DEVICE_ID="3"), devices=(family, 8))
    assert p.env[var] == "3" and p.env_set[var] == "3" and p.card == f"{var}=3"
    assert "device_id" not in p.run_args and "use_cpu" not in p.run_args  # the process sees it as <family>:0
    # The user narrowed the cards already: ASCEND_DEVICE_ID indexes their list.
    p = plan(
        "full_1p",
        dirs,
        env=launcher_env(tmp_path, ASCEND_DEVICE_ID="2", **{var: "4,5,6,7"}),
        devices=(family, 4),
    )
    assert p.env[var] == "6"
    with pytest.raises(LaunchError, match=f"ASCEND_DEVICE_ID=3 but this node has 2 {family.upper()}"):
        plan(
            "full_1p",
            dirs,
            env=launcher_env(tmp_path, ASCEND_DEVICE_ID="3", **{var: "4,5"}),
            devices=(family, 2),
        )
    # Several processes keep every visible card: LOCAL_RANK picks each one's.
    p = plan("full_8p", dirs, env=launcher_env(tmp_path, ASCEND_DEVICE_ID="3"), devices=(family, 8))
    assert var not in p.env_set and p.card == ""
    with pytest.raises(LaunchError, match=f"this node has 8 {family.upper()} device"):
        plan("full_8p", dirs, "--nproc_per_node=9", env=launcher_env(tmp_path), devices=(family, 8))


def test_hccl_timeouts_are_never_lowered(dirs, tmp_path: Path) -> None:
    p = plan("full_8p", dirs, env=launcher_env(tmp_path), devices=("npu", 8))
    assert p.env["HCCL_CONNECT_TIMEOUT"] == "1200" and "HCCL_EXEC_TIMEOUT" not in p.env  # Ascend's 1836 stays
    assert p.env["HCCL_WHITELIST_DISABLE"] == "1" and "HCCL_IF_IP" not in p.env and not p.notes
    assert p.run_args["ddp_bucket_cap_mb"] == ["150"]  # the recipe's Ascend bucket, on Ascend only
    p = plan("full_8p", dirs, env=launcher_env(tmp_path, HCCL_EXEC_TIMEOUT="600"), devices=("npu", 8))
    assert p.env["HCCL_EXEC_TIMEOUT"] == "600" and "below Ascend's default (1836 s)" in p.notes[0]
    p = plan("cluster", dirs, *CLUSTER_FLAGS, env=launcher_env(tmp_path), devices=("npu", 8))
    assert p.env["HCCL_IF_IP"].count(".") == 3


def test_recipe_blocks_keep_the_grep_contract() -> None:
    metrics = {
        "epoch": 1.0,
        "train_samples_per_second": 314.999,
        "train_samples_per_second_per_device": 157.5,
    }
    metrics["train_skipped_undecodable_samples"] = 0
    first, rest = recipe_blocks("train", metrics)
    assert max(map(len, first)) == len("train_samples_per_second")
    assert set(rest) == {"train_samples_per_second_per_device", "train_skipped_undecodable_samples"}


def test_finished_runs_are_set_aside_with_their_finish_time(tmp_path: Path) -> None:
    run = tmp_path / "clip_bs8_1p_perf"
    (run / "checkpoint-4").mkdir(parents=True)
    assert runfolder.set_aside(run) is None and last_complete_step(run) is None  # interrupted: stays
    (run / "checkpoint-4" / MARKER).write_text("{}")
    (run / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert last_complete_step(run) == 4
    (run / runfolder.FINISHED).write_text("{}")
    os.utime(run / runfolder.FINISHED, (0, 1700000000))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(1700000000))
    assert runfolder.set_aside(run) == tmp_path / f"clip_bs8_1p_perf.finished-{stamp}"
    assert (
        not run.exists() and (tmp_path / f"clip_bs8_1p_perf.finished-{stamp}" / runfolder.FINISHED).is_file()
    )


# ---- the shell side ----------------------------------------------------------------------------------------------


def _fake_npu(tmp_path: Path) -> Path:
    """A stand-in torch_npu (no NPU can exist here): importing it registers torch.npu with 8 devices."""
    package = tmp_path / "fake_npu" / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import types\nimport torch\ntorch.npu = types.SimpleNamespace(device_count=lambda: 8)\n"
    )
    return package.parent


def test_bash_dry_run_probes_the_npu_and_picks_the_card(dirs, tmp_path: Path) -> None:
    env = launcher_env(tmp_path, PYTHONPATH=str(_fake_npu(tmp_path)), ASCEND_DEVICE_ID="3")
    data, model = dirs
    proc = launch_sh("full_1p", f"--data_path={data}", f"--model_path={model}", "--dry_run", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "family=npu devices=8 world_size=1"
    assert "env: ASCEND_RT_VISIBLE_DEVICES=3" in lines and "env: HCCL_CONNECT_TIMEOUT=1200" in lines
    assert f"run_dir={tmp_path}/out/3/clip_bs64_1p_acc" in lines
    command = shlex.split(lines[-1].removeprefix("command: "))
    assert "--device_id" not in command and command[2] == "torch.distributed.run"


def test_no_python_is_one_line(tmp_path: Path) -> None:
    proc = launch_sh("full_1p", "--demo", env=launcher_env(tmp_path, PYTHON=str(tmp_path / "nope")))
    assert proc.returncode == 1 and proc.stderr.startswith("[Error] no python at")


def test_env_npu_is_silent_and_harmless_without_cann(tmp_path: Path) -> None:
    script = f"set -u; env -0 > {tmp_path}/before; source {TEST_DIR}/env_npu.sh; env -0 > {tmp_path}/after"
    proc = subprocess.run(["bash", "-c", script], env=launcher_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert (tmp_path / "before").read_bytes() == (tmp_path / "after").read_bytes()


def test_env_npu_sources_cann_quietly(tmp_path: Path) -> None:
    toolkit = tmp_path / "cann" / "ascend-toolkit"
    toolkit.mkdir(parents=True)
    (toolkit / "set_env.sh").write_text(f"echo noisy; export ASCEND_TOOLKIT_HOME={toolkit}\n")
    (tmp_path / "cann/driver/lib64/driver").mkdir(parents=True)
    script = (
        f"set -u; source {TEST_DIR}/env_npu.sh; echo $ASCEND_TOOLKIT_HOME $TASK_QUEUE_ENABLE $LD_LIBRARY_PATH"
    )
    env = launcher_env(tmp_path, CANN_ROOT=str(tmp_path / "cann"), LD_LIBRARY_PATH="/x")
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.split() == [str(toolkit), "2", f"{tmp_path}/cann/driver/lib64/driver:/x"]
    proc = subprocess.run(
        ["bash", "-c", script], env={**env, "TASK_QUEUE_ENABLE": "1"}, capture_output=True, text=True
    )
    assert proc.stdout.split()[1] == "1"  # the user's setting stays


def test_failed_training_exits_nonzero_and_leaves_no_summary(dirs, tmp_path: Path) -> None:
    data, model = dirs
    stale = tmp_path / "out/0/clip_bs64_1p_acc.log"
    stale.parent.mkdir(parents=True)
    stale.write_text("ActualFPS = 999\n")
    args = (f"--data_path={data}", f"--model_path={model}", "--learning_rate=fast")
    proc = launch_sh("full_1p", *args, env=launcher_env(tmp_path))
    assert proc.returncode != 0 and not stale.exists()
    log = (tmp_path / "out/0/train_0.log").read_text()
    # A bad argument (exit 2) is not worth a restart: the launcher says so and passes the status on.
    assert proc.returncode == 2 and "Final Performance" not in log
    assert "[Error] training stopped with status 2 (--learning_rate fast: expected a number" in log


def test_preemption_guard_turns_a_signal_into_save_and_stop(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from transformers import TrainerControl

    from clip_train.checkpoint.preemption import Preempted, PreemptionHandler

    guard, args, control = PreemptionHandler(), SimpleNamespace(save_strategy="steps"), TrainerControl()
    before = signal.getsignal(signal.SIGTERM)
    guard.on_train_begin(args, SimpleNamespace(), control)
    guard.on_step_end(args, SimpleNamespace(global_step=3, max_steps=10), control)
    assert not control.should_training_stop  # no signal yet: nothing changes
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the process lives on until the step ends
    guard.on_step_end(args, SimpleNamespace(global_step=4, max_steps=10), control)
    assert control.should_save and control.should_training_stop
    guard.on_train_end(args, SimpleNamespace(), control)
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(
        Preempted, match=f"stopped by SIGTERM after step 4; {tmp_path}/checkpoint-4 is complete"
    ) as e:
        guard.check(str(tmp_path))
    assert e.value.exit_code == 143


def test_the_demo_launch_evaluates_zero_shot_on_the_demos_class_folder(demo, tmp_path: Path) -> None:
    """--demo builds (or finds) the demo and its class folder; the command evaluates zero-shot on it."""
    proc = launch_sh("full_1p", "--demo", "--dry_run", env=launcher_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.splitlines()[-1]
    assert f"--zeroshot_dir {classes_dir(demo[0])}" in command, command
    assert "--zeroshot_templates simple" in command
