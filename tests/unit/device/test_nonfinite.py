"""The non-finite step check (clip_train/device/nonfinite.py) on every precision path, driven by a REAL transformers
Trainer loop on CPU; apex / torch_npu paths through the stand-ins (tests/standins: no NPU exists here). Shared parts: test_apex_amp."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import RECIPE
from test_apex_amp import BackendTrainer, all_finite, apex_calls, make_trainer, scheduler_steps

from clip_train.device import backend
from clip_train.errors import TrainingDiverged

# --- injected non-finite gradients on every path ------------------------------------------------------------------
NATIVE_FP16_CPU = "native fp16 + torch.amp.GradScaler('cpu') + fused AdamW"
PATHS = {
    "fp32": lambda: backend.make_backend_plan("cpu", fp16=False, bf16=False),
    "bf16": lambda: backend.make_backend_plan("cpu", fp16=False, bf16=True),
    NATIVE_FP16_CPU: lambda: backend.make_backend_plan("npu", **{**RECIPE, "loss_scale": "dynamic"}, optim="adamw_torch_fused"),
    "torch_npu static GradScaler": lambda: backend.make_backend_plan(
        "npu", **{**RECIPE, "loss_scale": "1024"}, optim="adamw_apex_fused_npu", use_combine_grad=True
    ),
    "apex O2 dynamic": lambda: backend.make_backend_plan(
        "npu", **{**RECIPE, "loss_scale": "dynamic"}, optim="adamw_apex_fused_npu", apex_available=True
    ),
    "apex O2 static": lambda: backend.make_backend_plan(
        "npu", **{**RECIPE, "loss_scale": "1024"}, optim="adamw_apex_fused_npu", use_combine_grad=True,
        apex_available=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("path", list(PATHS))
def test_injected_nonfinite_steps_are_skipped_counted_and_hold_the_schedule(
    standins, tmp_path, caplog, path
) -> None:
    poison = (3, 4, 7)
    trainer = make_trainer(tmp_path, PATHS[path](), steps=10, poison=poison)
    if path == NATIVE_FP16_CPU:
        # accelerate makes no GradScaler on a CPU device (fp16 autocast does run there); torch's works on CPU.
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        trainer.accelerator.native_amp = True
    if path == "torch_npu static GradScaler":
        trainer.accelerator.scaler = (
            "accelerate's dynamic default"  # made only on a real NPU; the mixin swaps it
        )
    with caplog.at_level(logging.WARNING, logger="clip_train"):
        trainer.train()
    skipped = trainer.nonfinite_metrics()["train_skipped_nonfinite_steps"]
    # apex's dynamic scale starts at 2**16, which this model's fp16 grads overflow at first: skipped as well
    assert skipped == 3 if path != "apex O2 dynamic" else set(poison) < set(trainer._skipped_steps)
    assert trainer.state.global_step == 10 and scheduler_steps(trainer) == 10 - skipped  # applied steps only
    assert all_finite(trainer.model)
    for step in poison:
        assert f"step {step}: non-finite gradients" in caplog.text
    if path == NATIVE_FP16_CPU:
        assert (
            isinstance(trainer.optimizer.optimizer, torch.optim.AdamW)
            and trainer.optimizer.optimizer.defaults["fused"]
        )
        assert trainer.accelerator.scaler.get_scale() == 2.0**10 / 2**3  # backed off once per skipped step
        assert int(next(iter(trainer.optimizer.optimizer.state.values()))["step"]) == 7
    if path == "torch_npu static GradScaler":
        assert trainer.accelerator.scaler.get_scale() == 1024 / 2**3  # static: lowered by the check (said)
        assert "static loss scale lowered from 1024 to 512" in caplog.text
    if path.startswith("apex"):
        assert apex_calls().count("step") == 10 - skipped
        assert ("skip_step" in apex_calls()) == path.endswith(
            "dynamic"
        )  # apex's own skip, counted by the check


def test_a_diverging_run_stops_with_a_clear_error_and_saves_no_nan(tmp_path) -> None:
    class QuickToGiveUp(BackendTrainer):
        max_consecutive_skips = 3

    plan = backend.make_backend_plan("cpu", fp16=False, bf16=False, optim="adamw_torch")
    trainer = make_trainer(
        tmp_path, plan, steps=40, cls=QuickToGiveUp, learning_rate=1e36, save_strategy="steps", save_steps=1,
        save_total_limit=0,
    )  # fmt: skip
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row .* non-finite gradients"):
        trainer.train()
    assert all_finite(trainer.model)
    saved = sorted(tmp_path.glob("checkpoint-*/model.safetensors"))
    assert saved
    from safetensors.torch import load_file

    for path in saved:
        assert all(bool(torch.isfinite(t).all()) for t in load_file(path).values()), path


def test_nonfinite_weights_are_never_saved(tmp_path) -> None:
    trainer = make_trainer(tmp_path, backend.make_backend_plan("cpu", fp16=False, bf16=False), steps=1)
    with torch.no_grad():
        trainer.model.head.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="parameter head.bias is not finite"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_without_the_trainers_filter_logged_losses_stay_finite(tmp_path) -> None:
    """On accelerators device/settings.py turns the Trainer's syncing loss filter off; the check filters on the
    device."""
    plan = backend.make_backend_plan("cpu", fp16=False, bf16=False)
    trainer = make_trainer(
        tmp_path, plan, steps=6, poison=(2, 5), logging_steps=3, logging_nan_inf_filter=False
    )
    out = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert (
        len(losses) == 2
        and all(torch.isfinite(torch.tensor(losses)))
        and out.training_loss == out.training_loss
    )
    assert trainer.nonfinite_metrics() == {"train_skipped_nonfinite_steps": 2}


class LazyOnCpu(BackendTrainer):
    """The check's sync-free CUDA path (fused AdamW's found_inf, the flag read a step later), driven on CPU."""

    lazy_devices = ("cuda", "cpu")


@pytest.mark.parametrize("path", ["fp32", NATIVE_FP16_CPU])
def test_the_sync_free_path_skips_on_the_device_and_rewinds_the_schedule(
    standins, tmp_path, caplog, path
) -> None:
    poison = (3, 4, 7)
    trainer = make_trainer(
        tmp_path, PATHS[path](), steps=10, poison=poison, cls=LazyOnCpu, optim="adamw_torch_fused"
    )
    if path == NATIVE_FP16_CPU:
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        trainer.accelerator.native_amp = True
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with caplog.at_level(logging.WARNING, logger="clip_train"):
        trainer.train()
    assert trainer._lazy is True
    assert trainer.nonfinite_metrics() == {"train_skipped_nonfinite_steps": 3}
    assert scheduler_steps(trainer) == 7 and all_finite(trainer.model)
    assert int(next(iter(trainer.optimizer.optimizer.state.values()))["step"]) == 7  # the kernel skipped 3
    assert "step 4: non-finite gradients (inf/NaN, skipped on the device)" in caplog.text
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    # The same run with the eager check ends at the same weights and learning rate.
    eager = make_trainer(
        tmp_path / "eager", PATHS[path](), steps=10, poison=poison, optim="adamw_torch_fused"
    )
    if path == NATIVE_FP16_CPU:
        eager.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        eager.accelerator.native_amp = True
    eager.train()
    assert eager._lazy is False
    for a, b in zip(eager.model.parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert eager.lr_scheduler.get_last_lr() == trainer.lr_scheduler.get_last_lr()
