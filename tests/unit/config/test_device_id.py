"""--device_id N, "the card of a 1-card run": a direct run makes that card the only visible one before torch looks
at the devices (transformers trains one process on <family>:0); under torchrun / the launcher, where LOCAL_RANK
and ASCEND_DEVICE_ID pick the cards, it is refused with one line; a card this host does not have is refused."""

from __future__ import annotations

import os

import pytest

import run_clip
from clip_train.config.args import device_id_given
from clip_train.device.families import pin_card, pinned_card_problem
from clip_train.errors import ArgumentError

NPU, CUDA = "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"


def test_the_card_is_read_before_parsing(tmp_path) -> None:
    assert device_id_given(["--output_dir", "o"]) == 0
    assert device_id_given(["--device_id", "3"]) == 3 and device_id_given(["--device_id=5"]) == 5
    assert (
        device_id_given(["--device_id", "x"]) == device_id_given(["--device_id", "-2"]) == 0
    )  # the parser says
    (tmp_path / "a.json").write_text('{"device_id": 2, "output_dir": "o"}')
    assert device_id_given([str(tmp_path / "a.json")]) == 2


def test_a_direct_run_sees_only_its_card() -> None:
    env: dict[str, str] = {}
    assert pin_card(0, env) == {} and env == {}  # card 0 is <family>:0 already
    assert pin_card(3, env) == {NPU: "3", CUDA: "3"} and env == {NPU: "3", CUDA: "3"}
    assert pinned_card_problem(3, env, "npu") is None and pinned_card_problem(3, env, "cuda") is None
    # Cards already narrowed by the user: N indexes that list, as the launcher's ASCEND_DEVICE_ID does.
    env = {NPU: "4,5,6"}
    assert pin_card(2, env) == {NPU: "6", CUDA: "2"} and env[NPU] == "6"
    env = {NPU: "4,5"}
    pinned = pin_card(2, env)
    assert pinned[NPU] is None and env[NPU] == "4,5"  # left alone: it may not be this host's family
    assert pinned_card_problem(2, pinned, "cuda") is None
    assert "ASCEND_RT_VISIBLE_DEVICES lists fewer than 3 cards" in pinned_card_problem(2, pinned, "npu")
    # No device left to see (a card the host lacks, or a CPU host): no silent CPU run.
    assert "no NPU or GPU card 7 is visible" in pinned_card_problem(7, pin_card(7, {}), "cpu")


@pytest.mark.parametrize("var", ["WORLD_SIZE", "LOCAL_RANK"])
def test_under_torchrun_it_is_refused(var) -> None:
    env = {var: "0"}
    with pytest.raises(ArgumentError, match=r"--device_id 1: under torchrun .* LOCAL_RANK.*ASCEND_DEVICE_ID"):
        pin_card(1, env)
    assert pin_card(0, env) == {} and set(env) == {var}


def test_on_the_npu_stand_in_the_pinned_card_is_the_one_the_process_sees(standins, monkeypatch) -> None:
    """pin_card -> detect_family -> the check, as run_clip.py runs them: card 1 of 2 is this process's npu:0;
    card 5 of 2 leaves no NPU visible, and is refused rather than trained on the CPU."""
    import torch_npu

    from clip_train.device import backend

    torch_npu.npu.DEVICE_COUNT = 2
    for var in (NPU, CUDA, "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    pinned = pin_card(1, os.environ)
    assert os.environ[NPU] == "1" and torch_npu.npu.device_count() == 1
    family = backend.detect_family()
    assert family == "npu" and pinned_card_problem(1, pinned, family) is None
    pinned = pin_card(5, os.environ)  # an index into the list above (one card): refused, the list left alone
    assert os.environ[NPU] == "1" and "lists fewer than 6 cards" in pinned_card_problem(5, pinned, "npu")
    monkeypatch.delenv(NPU)
    monkeypatch.delenv(CUDA)
    pinned = pin_card(5, os.environ)
    family = backend.detect_family()
    assert family == "cpu" and "no NPU or GPU card 5 is visible" in pinned_card_problem(5, pinned, family)


def run(capfd, argv: list[str]) -> tuple[int, list[str], str]:
    rc = run_clip.cli(argv)
    err = capfd.readouterr().err
    return rc, [ln for ln in err.splitlines() if ln.startswith("run_clip.py: error:")], err


def test_run_clip_refuses_a_card_it_cannot_honour(demo, tmp_path, capfd, monkeypatch) -> None:
    for var in (NPU, CUDA, "WORLD_SIZE", "LOCAL_RANK"):  # restored after the test, whatever run_clip sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    data_dir, model_dir = demo
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_train",
            "--max_steps", "1", "--report_to", "none", "--device_id", "3"]  # fmt: skip
    rc, lines, err = run(capfd, argv)  # this CPU host has no card 3
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "--device_id 3: no NPU or GPU card 3 is visible to this process" in lines[0]
    monkeypatch.delenv(NPU)
    monkeypatch.delenv(CUDA)
    monkeypatch.setenv("LOCAL_RANK", "0")  # under torchrun
    rc, lines, err = run(capfd, argv)
    assert rc == 2 and len(lines) == 1 and "--device_id 3: under torchrun" in lines[0], err[-3000:]
    assert not out.exists()
