"""apex_amp.BackendTrainerMixin and the non-finite check driven by a REAL transformers Trainer loop on CPU, with
stand-in apex / torch_npu (tests/standins, modelled on the real sources: no NPU exists here)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import RECIPE, S
from torch import nn
from transformers import Trainer, TrainingArguments

from clip_train.device import backend
from clip_train.device.apex_amp import BackendTrainerMixin


class Tiny(nn.Module):
    """A small regression net; `poison` = training forwards (1-based) whose loss is multiplied by inf."""

    def __init__(self, poison: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.norm, self.head = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 1)
        self.poison, self.calls = set(poison), 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        y = self.head(self.norm(torch.relu(self.proj(x)))).squeeze(-1)
        loss = nn.functional.mse_loss(y.float(), labels.float())  # apex O2 casts every float input to fp16
        if self.training:
            self.calls += 1
            if self.calls in self.poison:
                loss = loss * float("inf")
        return {"loss": loss}


class BackendTrainer(BackendTrainerMixin, Trainer):
    """How ClipTrainer inherits the mixin."""


def make_trainer(
    out: Path, plan: backend.BackendPlan, steps: int, cls: type = BackendTrainer, poison=(), **kw
) -> Trainer:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    rows = [{"x": x[i], "labels": (x[i] * torch.linspace(-1, 1, 8)).sum()} for i in range(64)]
    settings = {
        "output_dir": str(out), "max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 0.01,
        "weight_decay": 0.1, "max_grad_norm": 1.0, "logging_steps": 1, "save_strategy": "no",
        "dataloader_pin_memory": False, "report_to": "none", "disable_tqdm": True,
    }  # fmt: skip
    args = TrainingArguments(**{**settings, **kw})
    return cls(model=Tiny(poison), args=backend.apply_plan(args, plan), train_dataset=rows, backend_plan=plan)


def apex_calls() -> list[str]:
    import apex

    return [call[0] for call in apex.amp.CALLS if call[0] != "initialize"]


def the_initialize() -> dict:
    import apex

    inits = [call[1] for call in apex.amp.CALLS if call[0] == "initialize"]
    assert len(inits) == 1, "amp.initialize must run exactly once"
    return inits[0]


def scheduler_steps(trainer: Trainer) -> int:
    return getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler).last_epoch


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --- the recipe's flags on the stand-ins --------------------------------------------------------------------------
def test_recipe_static_scale_overflows_are_skipped_and_the_scale_lowered(standins, tmp_path, caplog) -> None:
    """apex O2 with the recipe's static 12800000: fp16 grads overflow to inf (as on a 910B) and apex never skips.
    The check skips those steps, halves the scale until the grads fit, and the run then trains."""
    import apex

    assert backend.ascend_apex_available()
    plan = backend.make_backend_plan(
        "npu", **RECIPE, optim="adamw_apex_fused_npu", use_combine_grad=True, apex_available=True
    )
    trainer = make_trainer(tmp_path, plan, steps=16)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with caplog.at_level(logging.WARNING, logger="clip_train"):
        trainer.train()

    init = the_initialize()
    assert (init["opt_level"], init["loss_scale"], init["combine_grad"]) == ("O2", S, True)
    optimizer = init["optimizer"]
    assert isinstance(optimizer, apex.optimizers.NpuFusedAdamW) and trainer.optimizer.optimizer is optimizer
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float16}  # O2: fp16 model weights ...
    assert {p.dtype for p in apex.amp.master_params(optimizer)} == {torch.float32}  # ... fp32 masters
    skipped = trainer.nonfinite_metrics()["train_skipped_nonfinite_steps"]
    assert 0 < skipped < 16, skipped
    assert "apex static loss scale lowered from 12800000 to 6400000" in caplog.text
    assert apex.amp._amp_state.loss_scalers[0].loss_scale() == S / 2**skipped
    assert apex_calls().count("step") == 16 - skipped  # skipped steps never reach the optimizer
    assert scheduler_steps(trainer) == 16 - skipped  # nor the LR schedule
    assert all_finite(trainer.model) and all_finite(nn.ParameterList(apex.amp.master_params(optimizer)))
    assert any(not torch.equal(a, b.float()) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert "step 1: non-finite gradients" in caplog.text


def test_without_the_guard_a_static_scale_makes_the_weights_nan(standins, tmp_path) -> None:
    """What the stand-in models: apex's static scaler does not skip, so the overflowed step is applied."""

    class Unguarded(BackendTrainer):
        def _guarded_step(self, optimizer, original, *args, **kwargs):
            return original(*args, **kwargs)

    plan = backend.make_backend_plan(
        "npu", **RECIPE, optim="adamw_apex_fused_npu", use_combine_grad=True, apex_available=True
    )
    trainer = make_trainer(tmp_path, plan, steps=2, cls=Unguarded)
    trainer.train()
    assert not all_finite(trainer.model)


# --- apex O2 resume -----------------------------------------------------------------------------------------------
class Snapshot(BackendTrainer):
    """Records the optimizer's per-param state right after a resume loaded it."""

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        opt = self.optimizer.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        self.loaded = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


class Unfixed(Snapshot):
    def _load_optimizer_and_scheduler(self, checkpoint):
        Trainer._load_optimizer_and_scheduler(self, checkpoint)  # before apex has its masters (the old order)
        opt = self.optimizer.optimizer
        opt._amp_lazy_init()
        self.loaded = [
            {k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]
        ]


@pytest.mark.parametrize("cls", [Snapshot, Unfixed], ids=["fixed", "old-order"])
def test_apex_o2_resume_keeps_adam_moments_in_fp32(standins, tmp_path, cls) -> None:
    plan = backend.make_backend_plan("npu", **{**RECIPE, "loss_scale": "dynamic"}, optim="adamw_apex_fused_npu",
                             apex_available=True)  # fmt: skip
    first = make_trainer(tmp_path, plan, steps=3, save_strategy="steps", save_steps=3, learning_rate=1e-4)
    first.train()
    saved = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)["state"]
    moments = [saved[i]["exp_avg_sq"] for i in sorted(saved)]
    assert {m.dtype for m in moments} == {torch.float32}
    tiny = torch.cat([m.flatten() for m in moments])
    assert bool(((tiny > 0) & (tiny < 6e-8)).any()), "precondition: some second moments below fp16's smallest"

    import standins

    standins.uninstall()  # a fresh apex for the second process-like run
    import apex  # noqa: F401

    second = make_trainer(tmp_path, plan, steps=4, cls=cls, learning_rate=1e-4)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    exact = all(
        torch.equal(second.loaded[i][k], saved[i][k]) and second.loaded[i][k].dtype == saved[i][k].dtype
        for i in sorted(saved) for k in ("exp_avg", "exp_avg_sq")
    )  # fmt: skip
    assert exact == (cls is Snapshot)


# --- restrictions and contracts of the real libraries -------------------------------------------------------------
def test_apex_refuses_o3_with_its_fused_optimizer_and_combine_grad(standins) -> None:
    """The stand-in refuses what Ascend apex refuses; run_clip.py refuses it first (test_backend)."""
    import apex

    for opt_level, combine in (("O3", False), ("O0", False), ("O3", True)):
        model = Tiny()
        optimizer = (
            apex.optimizers.NpuFusedAdamW(model.parameters())
            if not combine
            else torch.optim.AdamW(model.parameters())
        )
        with pytest.raises(RuntimeError, match="opt_level='O1' or opt_level='O2'"):
            apex.amp.initialize(model, optimizer, opt_level=opt_level, combine_grad=combine or None)


def test_apex_patches_module_zero_grad_globally_and_uninstall_restores_it(standins) -> None:
    import apex

    original = torch.nn.Module.zero_grad
    model = Tiny()
    apex.amp.initialize(model, torch.optim.AdamW(model.parameters()), opt_level="O1", combine_grad=True)
    assert torch.nn.Module.zero_grad is not original
    model(torch.ones(2, 8), torch.ones(2))["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    nn.Linear(1, 1).zero_grad()  # any module
    model.zero_grad()
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads, strict=True))
    with pytest.raises(AssertionError, match="set_to_none"):
        model.zero_grad(set_to_none=True)
    import standins

    standins.uninstall()
    assert torch.nn.Module.zero_grad is original


def test_apex_without_combine_grad_clips_the_master_params(standins, tmp_path) -> None:
    plan = backend.make_backend_plan(
        "npu", **{**RECIPE, "loss_scale": None}, optim="adamw_torch", apex_available=True
    )
    trainer = make_trainer(tmp_path, plan, steps=4)
    trainer.train()
    init = the_initialize()
    assert (init["loss_scale"], init["combine_grad"]) == ("dynamic", False)
    assert type(init["optimizer"]) is torch.optim.AdamW  # the Trainer's own optimizer, amp-initialized
    # apex's dynamic scale starts at 2**16: this model's first fp16 backward passes overflow and apex skips them
    calls = apex_calls()
    assert calls[::2] == ["scale_loss"] * 4 and set(calls[1::2]) == {"step", "skip_step"}
    skipped = calls.count("skip_step")
    assert trainer.nonfinite_metrics() == {"train_skipped_nonfinite_steps": skipped}
    assert scheduler_steps(trainer) == 4 - skipped


NPU_NATIVE_COMBINED = {
    **RECIPE,
    "optim": "adamw_apex_fused_npu",
    "use_combine_grad": True,
    "apex_available": False,
}


def test_without_apex_torch_npu_fused_optimizer_clips_its_combined_grads(standins, tmp_path) -> None:
    import torch_npu

    plan = backend.make_backend_plan("npu", **NPU_NATIVE_COMBINED)
    trainer = make_trainer(tmp_path, plan, steps=3)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch_npu.optim.NpuFusedAdamW)
    assert torch_npu.optim.CALLS == [("clip_grad_norm_fused_", 1.0), ("step",)] * 3
    assert "backward" not in vars(trainer.accelerator)  # no apex: the Trainer's own backward


def test_torch2_zero_grad_would_detach_torch_npu_combined_grads(standins, tmp_path) -> None:
    """Without the mixin's training_step hook the loop's model.zero_grad() sets grads to None between steps (under
    apex its global zero_grad patch keeps them; torch_npu's fused optimizers have no such patch)."""

    class WithoutHook(BackendTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return Trainer.training_step(self, model, inputs, num_items_in_batch)

    trainer = make_trainer(
        tmp_path, backend.make_backend_plan("npu", **NPU_NATIVE_COMBINED), steps=2, cls=WithoutHook
    )
    with pytest.raises(RuntimeError, match="no longer its combined-buffer tensor"):
        trainer.train()


def test_native_npu_fp16_gets_a_static_grad_scaler(standins, tmp_path) -> None:
    import torch_npu

    plan = backend.make_backend_plan("npu", **RECIPE, optim="adamw_apex_fused_npu", apex_available=False)
    trainer = make_trainer(tmp_path, plan, steps=1)
    assert trainer.args.fp16 and trainer.args.optim == "adamw_torch_npu_fused"
    trainer.accelerator.scaler = "accelerate's dynamic default"  # made only on a real NPU; stand in for it
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch_npu.optim.NpuFusedAdamW)  # via transformers' adamw_torch_npu_fused
    assert (trainer.accelerator.scaler.get_scale(), trainer.accelerator.scaler.dynamic) == (S, False)


def test_off_the_apex_path_the_trainer_runs_unchanged(tmp_path) -> None:
    plan = backend.make_backend_plan("cpu", fp16=False, bf16=False, optim="adamw_torch")
    trainer = make_trainer(tmp_path, plan, steps=2)
    trainer.train()
    assert "backward" not in vars(trainer.accelerator) and "zero_grad" not in vars(trainer.model)
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW and trainer.accelerator.scaler is None
    assert trainer.state.global_step == 2 and scheduler_steps(trainer) == 2
    assert trainer.backend_metrics() == {"train_skipped_nonfinite_steps": 0, "train_precision": "fp32"}
