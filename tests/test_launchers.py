"""The launchers in test/ as a user runs them: real bash, real torch.distributed.run, real gloo processes.

Argument handling is checked through --dry_run (the exact command the launcher would run); training runs use the
embedded demo (CLIP_DEMO_ROOT, built once per session) with a handful of steps. The only stand-in is a fake
torch_npu package, because no NPU can exist on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DIR = REPO / "test"
SCRIPTS = ["full_1p", "performance_1p", "full_8p", "performance_8p", "cluster"]
CLUSTER_FLAGS = ["--nnodes=2", "--node_rank=0", "--master_addr=127.0.0.1"]
TIMEOUT = 600


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HCCL_", "ASCEND_"))}
    env.update(PYTHON=sys.executable, OUTPUT_ROOT=str(tmp / "out"), CANN_ROOT=str(tmp / "no-cann"))
    env.update(extra)
    return env


def launch(script: str, *args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(TEST_DIR / f"train_clip_{script}.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        **kw,
    )


def read_summary(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    assert all(" = " in line for line in lines), lines
    return dict(line.split(" = ", 1) for line in lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Stand-in data and model folders for dry runs (they only need to exist)."""
    (tmp_path / "coco").mkdir()
    (tmp_path / "clip-roberta").mkdir()
    return tmp_path / "coco", tmp_path / "clip-roberta"


def dry_run(script: str, dirs: tuple[Path, Path], *args: str, env: dict[str, str]) -> tuple[dict, list[str]]:
    """The launcher's report (key=value lines) and the command it would run, as argv."""
    data, model = dirs
    proc = launch(script, f"--data_path={data}", f"--model_path={model}", "--dry_run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    info, command = {}, []
    for line in proc.stdout.splitlines():
        if line.startswith("command:"):
            command = shlex.split(line[len("command:") :])
        elif line.startswith("env: "):
            key, value = line[5:].split("=", 1)
            info[key] = value
        else:
            info.update(dict(item.split("=", 1) for item in line.split()))
    return info, command


def run_clip_flags(command: list[str]) -> dict[str, list[str]]:
    """The run_clip.py part of a launch command as {flag: values}; each flag must occur once (user flags replace
    the launcher's defaults in place rather than relying on "last one wins")."""
    args = command[next(i for i, c in enumerate(command) if c.endswith("run_clip.py")) + 1 :]
    flags: dict[str, list[str]] = {}
    for token in args:
        if token.startswith("--"):
            assert token[2:] not in flags, f"{token} given twice"
            flags[name := token[2:]] = []
        else:
            flags[name].append(token)
    return flags


# The recipe's run_clip.py flags (its 1p script, less --overwrite_output_dir: the launchers resume by default).
RECIPE = run_clip_flags(
    shlex.split(
        "run_clip.py --num_train_epochs 3 --dataset_name ydshieh/coco_dataset_script --dataset_config_name=2017 "
        "--image_column image_path --caption_column caption --remove_unused_columns=False --do_train --do_eval "
        "--fp16 --dataloader_drop_last --fp16_opt_level O2 --loss_scale 12800000 --optim adamw_apex_fused_npu "
        "--use_combine_grad --per_device_train_batch_size=64 --per_device_eval_batch_size=64 --learning_rate=5e-5 "
        "--warmup_steps=0 --weight_decay 0.1 --skip_steps 10 --save_steps 150000".replace("=", " ")
    )
)


# ---- argument handling -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_paths_print_usage_and_exit_1(script: str, tmp_path: Path) -> None:
    extra = CLUSTER_FLAGS if script == "cluster" else []
    proc = launch(script, *extra, env=_env(tmp_path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "--data_path is required" in proc.stderr
    assert f"usage: bash test/train_clip_{script}.sh --data_path=" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch_size=big"], "--batch_size must be a positive integer"),
        (["--batch_size=08"], "--batch_size must be a positive integer"),
        (["--nproc_per_node=0"], "--nproc_per_node must be a positive integer or 'auto'"),
        (["--nnodes=2", "--node_rank=2"], "--node_rank must be 0..1"),
        (["stray"], "unexpected argument 'stray'"),
        (["--demo=yes"], "--demo takes no value"),
        (["--data_path", "a", "b"], "--data_path needs one value"),
    ],
)
def test_bad_flags_name_the_fix(args: list[str], message: str, tmp_path: Path) -> None:
    proc = launch("full_1p", "--model_path=m", *args, env=_env(tmp_path))
    assert proc.returncode == 1
    assert message in proc.stderr


def test_cluster_needs_its_node_flags(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = dirs
    proc = launch("cluster", f"--data_path={data}", f"--model_path={model}", "--nnodes=2", env=_env(tmp_path))
    assert proc.returncode == 1
    assert "train_clip_cluster.sh needs --node_rank" in proc.stderr


def test_missing_folders_are_named(tmp_path: Path) -> None:
    proc = launch("full_1p", f"--data_path={tmp_path}/nope", f"--model_path={tmp_path}", env=_env(tmp_path))
    assert proc.returncode == 1
    assert f"--data_path={tmp_path}/nope is not a directory" in proc.stderr


def test_help_goes_to_stdout(tmp_path: Path) -> None:
    proc = launch("performance_8p", "--help", env=_env(tmp_path))
    assert proc.returncode == 0
    assert "--nproc_per_node=8" in proc.stdout and "--train_epochs=1" in proc.stdout


def test_full_1p_runs_the_recipe_command(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    info, command = dry_run("full_1p", dirs, env=_env(tmp_path, ASCEND_DEVICE_ID="5"))
    data, model = dirs
    assert info["family"] == "cpu" and info["world_size"] == "1"
    assert not [key for key in info if key.startswith("HCCL_")]  # HCCL settings belong to Ascend hosts only
    assert command[:13] == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--nnodes", "1",
        "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", command[12],
    ]  # fmt: skip
    flags = run_clip_flags(command)
    # On CPU run_clip.py picks the loader workers (tests/test_cache.py), the launcher does not.
    assert "dataloader_num_workers" not in flags
    paths = {
        "output_dir": [str(tmp_path / "out/5/ckpt")],
        "model_name_or_path": [str(model)],
        "data_dir": [str(data)],
    }
    # Exactly the recipe, plus use_cpu (CPU host): no --overwrite_output_dir, --max_steps, --ddp_bucket_cap_mb,
    # nor --device_id (no card to pick).
    assert flags == {**RECIPE, **paths, "use_cpu": []}
    assert info["log"] == str(tmp_path / "out/5/train_5.log")
    assert info["summary"] == str(tmp_path / "out/5/clip_bs64_1p_acc.log")


def test_user_flags_win_over_the_defaults(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    user = f"--output_dir={tmp_path}/mine --save_steps=5 --learning_rate 1e-4 --fp16=False --overwrite_output_dir "
    user += (
        "--report_to tensorboard none --batch_size=16 --model_name=clipx --max_steps=7 --nproc_per_node=auto"
    )
    info, command = dry_run("performance_8p", dirs, *shlex.split(user), env=_env(tmp_path))
    assert info["world_size"] == "1"  # auto on a CPU host: one process
    flags = run_clip_flags(command)
    assert flags["output_dir"] == [f"{tmp_path}/mine"] and flags["save_steps"] == ["5"]
    assert (
        flags["learning_rate"] == ["1e-4"]
        and flags["fp16"] == ["False"]
        and flags["overwrite_output_dir"] == []
    )
    assert flags["report_to"] == ["tensorboard", "none"] and flags["per_device_eval_batch_size"] == ["16"]
    assert (
        flags["max_steps"] == ["7"]
        and flags["num_train_epochs"] == ["1"]
        and flags["ddp_bucket_cap_mb"] == ["150"]
    )
    assert info["summary"].endswith("/0/clipx_bs16_1p_perf.log")


def test_multi_card_profiles_use_the_8p_recipe(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    port = str(free_port())
    info, command = dry_run("cluster", dirs, *CLUSTER_FLAGS, f"--master_port={port}", env=_env(tmp_path))
    assert info["world_size"] == "16"  # 2 nodes x the default 8 processes (gloo allows any count)
    assert command[3:13] == [
        "--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "0",
        "--master_addr", "127.0.0.1", "--master_port", port,
    ]  # fmt: skip
    flags = run_clip_flags(command)
    assert (
        flags["save_steps"] == ["15000"]
        and flags["ddp_bucket_cap_mb"] == ["150"]
        and "max_steps" not in flags
    )


def _fake_npu(tmp_path: Path) -> Path:
    """A stand-in torch_npu (no NPU can exist here): importing it registers torch.npu with 8 devices."""
    package = tmp_path / "fake_npu" / "torch_npu"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import types\nimport torch\ntorch.npu = types.SimpleNamespace(device_count=lambda: 8)\n"
    )
    return package.parent


def test_ascend_host_gets_hccl_settings_and_the_device_id(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    env = _env(tmp_path, PYTHONPATH=str(_fake_npu(tmp_path)), ASCEND_DEVICE_ID="3")
    info, command = dry_run("full_1p", dirs, env=env)
    assert info["family"] == "npu" and info["devices"] == "8"
    assert info["HCCL_WHITELIST_DISABLE"] == "1" and "HCCL_IF_IP" not in info
    flags = run_clip_flags(command)
    assert flags["device_id"] == ["3"] and "use_cpu" not in flags

    info, command = dry_run("cluster", dirs, *CLUSTER_FLAGS, "--nproc_per_node=auto", env=env)
    assert info["world_size"] == "16"
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", info["HCCL_IF_IP"])
    assert "device_id" not in run_clip_flags(command)

    data, model = dirs
    proc = launch("full_8p", f"--data_path={data}", f"--model_path={model}", "--nproc_per_node=9", env=env)
    assert proc.returncode == 1 and "this node has 8 NPU device(s)" in proc.stderr


def test_env_npu_is_silent_and_harmless_without_cann(tmp_path: Path) -> None:
    script = f"set -u; env -0 > {tmp_path}/before; source {TEST_DIR}/env_npu.sh; env -0 > {tmp_path}/after"
    proc = subprocess.run(["bash", "-c", script], env=_env(tmp_path), capture_output=True, text=True)
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
    env = _env(tmp_path, CANN_ROOT=str(tmp_path / "cann"), LD_LIBRARY_PATH="/x")
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.split() == [str(toolkit), "1", f"{tmp_path}/cann/driver/lib64/driver:/x"]


def test_failed_training_exits_nonzero_and_leaves_no_summary(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = dirs
    stale = tmp_path / "out/0/clip_bs64_1p_acc.log"
    stale.parent.mkdir(parents=True)
    stale.write_text("ActualFPS = 999\n")
    proc = launch(
        "full_1p", f"--data_path={data}", f"--model_path={model}", "--learning_rate=fast", env=_env(tmp_path)
    )
    assert proc.returncode != 0
    assert not stale.exists()
    log = (tmp_path / "out/0/train_0.log").read_text()
    assert "[Error] training exited with status" in log and "Final Performance" not in log


# ---- real training runs on the embedded demo -------------------------------------------------------------------

# A few steps of the tiny demo: enough for throughput, an eval and a logged loss; info logs show the world size.
TRAIN_FLAGS = [
    "--demo",
    "--max_steps=4",
    "--skip_steps=1",
    "--logging_steps=1",
    "--batch_size=8",
    "--log_level=info",
]


@pytest.fixture(scope="session")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One demo build and one token/image cache shared by every training test of the session; the demo is made
    before any launcher asks for it, so that the two nodes of the cluster test do not race to build it."""
    root = tmp_path_factory.mktemp("clip-demo")
    env = {"CLIP_DEMO_ROOT": str(root / "demo"), "CLIP_CACHE": str(root / "cache")}
    command = [sys.executable, "-m", "clip_train.demo", "--print-paths"]
    subprocess.run(command, env={**os.environ, **env, "PYTHONPATH": str(REPO)}, check=True, timeout=TIMEOUT)
    return env


def _check_summary(out: Path, device_id: str, case: str, console: str) -> dict[str, str]:
    fields = read_summary(out / device_id / f"{case}.log")
    results = json.loads((out / device_id / "ckpt" / "all_results.json").read_text())
    assert fields["CaseName"] == case and fields["DeviceType"] == os.uname().machine
    assert float(fields["ActualFPS"]) == results["train_samples_per_second"] > 0
    assert fields["TrainAccuracy"] == str(results["eval_loss"])
    for key in ("eval_image_to_text_R@1", "eval_text_to_image_R@1"):  # retrieval is on by default
        assert fields[key] == str(results[key])
    assert float(fields["TrainingTime"]) == pytest.approx(8 * 1000 / float(fields["ActualFPS"]), rel=1e-3)
    assert float(fields["ActualLoss"]) > 0 and int(fields["E2ETrainingTime"]) > 0
    tail = [
        f"Final Performance images/sec : {fields['ActualFPS']}",
        f"Final Train Loss : {fields['ActualLoss']}",
    ]
    assert console.splitlines()[-2:] == tail
    assert (out / device_id / f"train_{device_id}.log").read_text().splitlines()[-2:] == tail
    return fields


def test_performance_1p_demo_run_writes_the_summary(demo_env: dict[str, str], tmp_path: Path) -> None:
    proc = launch("performance_1p", *TRAIN_FLAGS, env=_env(tmp_path, **demo_env))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    fields = _check_summary(tmp_path / "out", "0", "clip_bs8_1p_perf", proc.stdout)
    assert fields["RankSize"] == "1" and fields["BatchSize"] == "8"
    state = json.loads((tmp_path / "out/0/ckpt/trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert float(fields["ActualLoss"]) == [e["loss"] for e in state["log_history"] if "loss" in e][-1]


def test_full_8p_with_two_processes_is_one_ddp_run(demo_env: dict[str, str], tmp_path: Path) -> None:
    env = _env(tmp_path, **demo_env)
    proc = launch("full_8p", *TRAIN_FLAGS, "--nproc_per_node=2", env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    fields = _check_summary(tmp_path / "out", "0", "clip_bs8_2p_acc", proc.stdout)
    assert fields["RankSize"] == "2"
    assert "world_size=2 rank=0" in (tmp_path / "out/0/train_0.log").read_text()
    assert float(fields["ActualFPSPerDevice"]) == pytest.approx(float(fields["ActualFPS"]) / 2, abs=1e-3)


def test_cluster_two_nodes_make_one_training(demo_env: dict[str, str], tmp_path: Path) -> None:
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        env = _env(tmp_path, **demo_env, ASCEND_DEVICE_ID=str(rank))
        flags = ["--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
        command = [
            "bash",
            str(TEST_DIR / "train_clip_cluster.sh"),
            *TRAIN_FLAGS,
            *flags,
            "--nproc_per_node=1",
        ]
        nodes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    out = tmp_path / "out"
    fields = _check_summary(out, "0", "clip_bs8_2p_acc", outputs[0])
    assert fields["RankSize"] == "2"
    for rank in (0, 1):  # each node's log shows its own process in the one world
        assert f"world_size=2 rank={rank}" in (out / str(rank) / f"train_{rank}.log").read_text()
    assert not list((out / "1").glob("clip_*.log"))  # the summary is node 0's alone
    assert "Final Performance" not in outputs[1]


def test_demo_reruns_start_fresh(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    # The demo's output is disposable: a second --demo run must train again, not be refused as a finished run.
    _, command = dry_run("full_1p", dirs, "--demo", env=_env(tmp_path))
    flags = run_clip_flags(command)
    assert flags["overwrite_output_dir"] == [] and flags["learning_rate"] == ["5e-4"]
    _, command = dry_run("full_1p", dirs, env=_env(tmp_path))
    assert "overwrite_output_dir" not in run_clip_flags(command)  # the recipe's own runs resume
