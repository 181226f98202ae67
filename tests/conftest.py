"""Shared fixtures: one small demo COCO folder and tiny clip-roberta per test session, made by the real code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDINS = Path(__file__).resolve().parent / "standins"
S = 12800000.0  # the recipe's --loss_scale
LAUNCH_TIMEOUT = 600
RECIPE = {"fp16": True, "bf16": False, "fp16_opt_level": "O2", "loss_scale": "12800000"}


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches and the demo go to a temporary folder, never to ~/.cache or the repo; child processes inherit it."""
    root = tmp_path_factory.mktemp("session")
    os.environ["CLIP_CACHE"] = str(root / "cache")
    os.environ["CLIP_DEMO_ROOT"] = str(root / "demo")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def demo(_isolated_caches: None) -> tuple[str, str]:
    """(data_dir, model_dir): a 160-image COCO-format folder (zips) and a tiny clip-roberta."""
    from clip_train.demo import prepare

    return prepare(os.environ["CLIP_DEMO_ROOT"], n_train=160, n_val=40)


def run_py(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a Python entry point of the repo as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def launcher_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment a user's shell gives the launchers, minus any device settings of this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HCCL_", "ASCEND_", "CUDA_VISIBLE"))}
    env.update(PYTHON=sys.executable, OUTPUT_ROOT=str(tmp / "out"), CANN_ROOT=str(tmp / "no-cann"))
    env.update(extra)
    return env


def launch_sh(script: str, *args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    """bash test/train_clip_<script>.sh ARGS, as a user types it."""
    return subprocess.run(
        ["bash", os.path.join(REPO, "test", f"train_clip_{script}.sh"), *args],
        env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, **kw,
    )  # fmt: skip


@pytest.fixture
def standins(monkeypatch):
    """Stand-in torch_npu / apex (tests/standins; no NPU exists here), importable for this test only."""
    sys.path.insert(0, str(STANDINS.parent))
    import standins

    sys.path.remove(str(STANDINS.parent))
    standins.install(monkeypatch)
    yield
    standins.uninstall()


def spawn_ranks(argv: list[str], world: int = 2, env: dict | None = None, timeout: int = 240) -> list[str]:
    """Run ``python argv`` as ``world`` gloo ranks (torch.distributed's env:// variables, a free loopback port,
    no GPU, one thread each); asserts every rank exits 0 and returns their outputs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        rank_env = {
            **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", **(env or {}),
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv],
                env=rank_env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * world, "".join(o[-3000:] for o in outputs)
    return outputs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/runs/ is a whole run (processes, launchers, kills): ``-m "not runs"`` leaves it out."""
    runs = Path(__file__).resolve().parent / "runs"
    for item in items:
        if runs in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.runs)
