"""The loss scale the non-finite check manages, through a REAL Trainer loop on CPU with the stand-in apex (tests/standins:
no NPU exists here): the norm it checks under apex with clipping off, a lowered static scale growing back, and the
scale and skip count carried through a checkpoint into the resumed run."""

from __future__ import annotations

import json
import logging

from conftest import RECIPE
from test_apex_amp import BackendTrainer, apex_calls, make_trainer

from clip_train.device import backend
from clip_train.device.nonfinite import STATE_FILE


def apex_o2(scale: str):
    return backend.make_backend_plan(
        "npu", **{**RECIPE, "loss_scale": scale}, optim="adamw_apex_fused_npu", use_combine_grad=True,
        apex_available=True,
    )  # fmt: skip


def apex_scale() -> float:
    import apex

    return apex.amp._amp_state.loss_scalers[0].loss_scale()


def apex_scale_calls() -> list:
    import apex

    return apex.amp.CALLS


def fresh_apex() -> None:
    """A new process's apex (the stand-in keeps its scaler in a module global, as apex does)."""
    import standins

    standins.uninstall()
    import apex  # noqa: F401


def test_apex_o2_without_clipping_skips_no_sound_step(standins, tmp_path) -> None:
    """--max_grad_norm 0 under apex O2: the norm the check reads is the fp32 master grads', not the scaled fp16
    model grads' (inf in fp16 once scale x |g| > 65504 although every gradient is finite)."""
    # 8192 x |g| passes 65504 while every fp16 gradient stays finite: no step of this run overflows.
    trainer = make_trainer(tmp_path / "a", apex_o2("8192"), steps=20, max_grad_norm=0.0)
    trainer.train()
    assert trainer.nonfinite_metrics()["train_skipped_nonfinite_steps"] == 0 and apex_scale() == 8192
    # The recipe's 12800000 really overflows at first: clipping off skips the same steps as clipping on.
    skipped = {}
    for norm in (0.0, 1.0):
        fresh_apex()
        trainer = make_trainer(
            tmp_path / str(norm), apex_o2(RECIPE["loss_scale"]), steps=20, max_grad_norm=norm
        )
        trainer.train()
        skipped[norm] = (trainer._skipped_steps, apex_scale())
    assert skipped[0.0] == skipped[1.0] and skipped[0.0][0]


class GrowsSoon(BackendTrainer):
    static_growth_interval = 3  # 2000 in a real run (STATIC_GROWTH_INTERVAL)


def test_a_lowered_static_scale_grows_back_after_clean_steps(standins, tmp_path, caplog) -> None:
    trainer = make_trainer(tmp_path, apex_o2("1024"), steps=15, poison=(2, 3), cls=GrowsSoon)
    with caplog.at_level(logging.INFO, logger="clip_train"):
        trainer.train()
    scales = [call[1] for call in apex_scale_calls() if call[0] == "scale_loss"]
    # Halved at steps 2 and 3; doubled after each 3 clean steps (4-6, 7-9), never above the 1024 asked for.
    assert scales == [1024, 1024, 512] + [256] * 3 + [512] * 3 + [1024] * 6
    assert "static loss scale raised from 256 to 512 after 3 steps without an overflow" in caplog.text
    assert trainer.nonfinite_metrics()["train_skipped_nonfinite_steps"] == 2 and apex_scale() == 1024


def test_a_resumed_apex_run_keeps_its_lowered_scale_and_skip_count(standins, tmp_path) -> None:
    first = make_trainer(
        tmp_path, apex_o2("1024"), steps=4, poison=(2, 3), save_strategy="steps", save_steps=4
    )
    first.train()
    assert apex_scale() == 256 and first._skipped_steps == [2, 3]

    fresh_apex()
    second = make_trainer(tmp_path, apex_o2("1024"), steps=6, poison=(1,))
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    scales = [call[1] for call in apex_scale_calls() if call[0] == "scale_loss"]
    assert scales == [
        256,
        128,
    ]  # not the 1024 asked for: where the first run left it (then halved at its step 5)
    assert second.nonfinite_metrics() == {"train_skipped_nonfinite_steps": 3}
    assert second._skipped_steps == [2, 3, 5] and apex_calls().count("step") == 1
    saved = json.loads((tmp_path / "checkpoint-4" / STATE_FILE).read_text())  # beside the Trainer's files
    assert saved["loss_scaler"]["loss_scale"] == 256 and saved["skipped_steps"] == [2, 3]
