"""clip_train.launch.nodes: the node layout from the flags or, inside a SLURM allocation, from SLURM's variables.

In-process through ``make_launch_plan`` with SLURM's variables faked (no SLURM here) and loopback addresses, which
resolve on any host; the two-node runs under these variables are tests/runs/test_launch_runs.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import launcher_env

from clip_train.errors import LaunchError
from clip_train.launch import cli as launch
from clip_train.launch import options
from clip_train.launch import plan as launch_plan
from clip_train.launch.nodes import SLURM_PORT_BASE, expand_nodelist


def slurm(node: int, nodelist: str = "127.0.0.[1-2]", **extra: str) -> dict[str, str]:
    """What srun --nodes=2 --ntasks-per-node=1 puts in each launcher's environment (the part we read)."""
    env = {"SLURM_JOB_ID": "81234", "SLURM_NNODES": "2", "SLURM_NODEID": str(node)}
    return {**env, "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NUM_TASKS": "2", **extra}


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    (tmp_path / "coco").mkdir()
    (tmp_path / "clip-roberta").mkdir()
    return [f"--data_path={tmp_path / 'coco'}", f"--model_path={tmp_path / 'clip-roberta'}"]


def plan(dirs: list[str], *args: str, env: dict[str, str]) -> launch_plan.LaunchPlan:
    opts = options.parse("cluster", [*dirs, "--nproc_per_node=1", *args])
    return launch_plan.make_launch_plan(opts, env, probe=lambda env: ("cpu", 0))


def arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_node_list_syntax_expands_with_python_hostlist() -> None:
    assert expand_nodelist("gpu[01-04,07]") == ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
    assert expand_nodelist("a1,b[2-3]") == ["a1", "b2", "b3"]


def test_inside_slurm_no_node_flag_is_needed(dirs, tmp_path: Path) -> None:
    port = str(SLURM_PORT_BASE + 81234 % 10000)
    nodes = [plan(dirs, env=launcher_env(tmp_path, **slurm(rank))) for rank in (0, 1)]
    for rank, p in enumerate(nodes):
        assert (p.nodes.nnodes, p.nodes.node_rank, p.world) == (2, rank, 2)
        assert (
            arg(p.command, "--rdzv_endpoint") == f"127.0.0.1:{port}"
        )  # the first host, a port from the job id
        assert arg(p.command, "--rdzv_id") == "slurm-81234" and arg(p.command, "--rdzv_backend") == "c10d"
        assert arg(p.command, "--local_addr") == f"127.0.0.{rank + 1}"  # its own entry of the node list
        assert arg(p.command, "--rdzv_conf") == f"is_host={'true' if rank == 0 else 'false'}"
    assert nodes[1].nodes.describe() == (
        "nnodes=2 (SLURM_NNODES), node_rank=1 (SLURM_NODEID), master_addr=127.0.0.1 (first host of "
        f"SLURM_JOB_NODELIST), master_port={port} (from SLURM_JOB_ID=81234)"
    )
    assert "nodes: nnodes=2 (SLURM_NNODES)" in launch_plan.dry_run_text(nodes[1])


def test_flags_win_over_slurm_and_say_so(dirs, tmp_path: Path) -> None:
    p = plan(dirs, "--master_port=29777", "--master_addr=localhost", env=launcher_env(tmp_path, **slurm(1)))
    assert arg(p.command, "--rdzv_endpoint") == "localhost:29777"
    assert p.nodes.describe().endswith(
        "master_addr=localhost (--master_addr), master_port=29777 (--master_port)"
    )
    assert "nnodes=2 (SLURM_NNODES), node_rank=1 (SLURM_NODEID)" in p.nodes.describe()
    # Outside SLURM the cluster launcher still needs its flags.
    with pytest.raises(LaunchError, match="needs --nnodes .* or run it through srun"):
        plan(dirs, env=launcher_env(tmp_path))


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (["--nnodes=3"], slurm(0), "[Error] --nnodes=3 but this SLURM allocation (job 81234) has SLURM_NNODES=2 "
         "nodes: leave --nnodes out, or allocate 3 nodes"),
        ([], slurm(0, "gpu[01-"), "[Error] SLURM_JOB_NODELIST='gpu[01-' does not expand (unbalanced brackets): "
         "run the launcher through srun inside the allocation, or give --nnodes, --node_rank and --master_addr"),
        ([], slurm(1, "nohost-[1-2].invalid"), "[Error] the master address 'nohost-1.invalid' (first host of "
         "SLURM_JOB_NODELIST) does not resolve"),
        (["--nnodes=2", "--node_rank=1", "--master_addr=nohost.invalid"], {}, "[Error] the master address "
         "'nohost.invalid' (--master_addr) does not resolve"),
        ([], slurm(0, SLURM_STEP_NUM_TASKS="16"), "[Error] srun started 16 launchers for 2 nodes: one per node is "
         "needed (srun --ntasks-per-node=1)"),
    ],
)  # fmt: skip
def test_bad_node_setups_are_one_line(args, env, line, dirs, tmp_path: Path, monkeypatch, capsys) -> None:
    for var, value in launcher_env(tmp_path, **env).items():
        monkeypatch.setenv(var, value)
    assert launch.main(["cluster", *dirs, *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(line) and len(err.split("\n[Error]")) == 1
    assert not (tmp_path / "out").exists()  # nothing made before the line
