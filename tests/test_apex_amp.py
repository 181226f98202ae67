"""apex_amp.BackendTrainerMixin driven by a REAL transformers Trainer loop on CPU, with stand-in apex / torch_npu
(tests/standins: no NPU exists here) recording what the loop calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import RECIPE, S
from torch import nn
from transformers import Trainer, TrainingArguments

from clip_train import backend
from clip_train.apex_amp import BackendTrainerMixin


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.norm, self.head = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        y = self.head(self.norm(torch.relu(self.proj(x)))).squeeze(-1)
        return {"loss": nn.functional.mse_loss(y.float(), labels)}


class BackendTrainer(BackendTrainerMixin, Trainer):
    """How the lead's ClipTrainer inherits the mixin."""


def make_trainer(out: Path, plan: backend.Plan, steps: int, cls: type = BackendTrainer) -> Trainer:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    rows = [{"x": x[i], "labels": (x[i] * torch.linspace(-1, 1, 8)).sum()} for i in range(64)]
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=0.01, weight_decay=0.1,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", dataloader_pin_memory=False, report_to="none", disable_tqdm=True,
    )  # fmt: skip
    return cls(model=Tiny(), args=backend.apply_plan(args, plan), train_dataset=rows, backend_plan=plan)


def apex_calls() -> list[str]:
    import apex

    return [call[0] for call in apex.amp.CALLS if call[0] != "initialize"]


def the_initialize() -> dict:
    import apex

    inits = [call[1] for call in apex.amp.CALLS if call[0] == "initialize"]
    assert len(inits) == 1, "amp.initialize must run exactly once"
    return inits[0]


def test_recipe_flags_run_apex_amp_in_the_trainer_loop(standins, tmp_path) -> None:
    import apex
    import torch_npu

    assert backend.ascend_apex_available()  # the stand-in has Ascend apex's shape
    plan = backend.make_plan(
        "npu", **RECIPE, optim="adamw_apex_fused_npu", use_combine_grad=True, apex_available=True
    )
    assert backend.set_npu_options(plan.family)
    assert torch_npu.npu.CALLS[0] == (
        "set_option", {"ACL_OP_SELECT_IMPL_MODE": "high_performance", "ACL_OPTYPELIST_FOR_IMPLMODE": "LayerNorm"}
    )  # fmt: skip
    trainer = make_trainer(tmp_path, plan, steps=4)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()

    init = the_initialize()
    assert (init["opt_level"], init["loss_scale"], init["combine_grad"]) == ("O2", S, True)
    assert init["model"] is trainer.model
    optimizer = init["optimizer"]
    assert isinstance(optimizer, apex.optimizers.NpuFusedAdamW) and trainer.optimizer.optimizer is optimizer
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["betas"] == (0.9, 0.999)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [(g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]
    assert groups == [
        (0.1, ["head.weight", "proj.weight"]),
        (0.0, ["head.bias", "norm.bias", "norm.weight", "proj.bias"]),
    ]
    # Every step: backward inside scale_loss, the fused clip on the combined grads, then apex's step.
    assert apex_calls() == ["scale_loss", "clip_optimizer_grad_norm_fused", "step"] * 4
    assert {
        call[1] for call in apex.amp.CALLS if call[0] in ("scale_loss", "clip_optimizer_grad_norm_fused")
    } == {
        S,
        1.0,
    }
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4 and all(
        torch.isfinite(torch.tensor([e["loss"], e["grad_norm"]])).all() for e in logged
    )


def test_apex_without_combine_grad_clips_the_master_params(standins, tmp_path) -> None:
    plan = backend.make_plan(
        "npu",
        **{**RECIPE, "loss_scale": None},
        optim="adamw_torch",
        use_combine_grad=False,
        apex_available=True,
    )
    trainer = make_trainer(tmp_path, plan, steps=2)
    trainer.train()
    init = the_initialize()
    assert (init["loss_scale"], init["combine_grad"]) == ("dynamic", False)
    assert type(init["optimizer"]) is torch.optim.AdamW  # the Trainer's own optimizer, amp-initialized
    assert apex_calls() == ["scale_loss", "master_params", "step"] * 2


NPU_NATIVE_COMBINED = {
    **RECIPE,
    "optim": "adamw_apex_fused_npu",
    "use_combine_grad": True,
    "apex_available": False,
}


def test_without_apex_torch_npu_fused_optimizer_clips_its_combined_grads(standins, tmp_path) -> None:
    import torch_npu

    plan = backend.make_plan("npu", **NPU_NATIVE_COMBINED)
    trainer = make_trainer(tmp_path, plan, steps=3)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch_npu.optim.NpuFusedAdamW)
    assert torch_npu.optim.CALLS == [("clip_grad_norm_fused_", 1.0), ("step",)] * 3
    assert "backward" not in vars(trainer.accelerator)  # no apex: the Trainer's own backward


@pytest.mark.parametrize(
    "flags",
    [
        {**RECIPE, "optim": "adamw_apex_fused_npu", "use_combine_grad": True, "apex_available": True},
        NPU_NATIVE_COMBINED,
    ],
    ids=["apex", "torch_npu-fused"],
)
def test_torch2_zero_grad_would_detach_the_combined_grads(standins, tmp_path, flags) -> None:
    """Without the mixin's training_step hook the loop's model.zero_grad() sets grads to None between steps."""

    class WithoutHook(BackendTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            return Trainer.training_step(self, model, inputs, num_items_in_batch)

    trainer = make_trainer(tmp_path, backend.make_plan("npu", **flags), steps=2, cls=WithoutHook)
    with pytest.raises(RuntimeError, match="no longer its combined-buffer tensor"):
        trainer.train()


def test_native_npu_fp16_gets_a_static_grad_scaler(standins, tmp_path) -> None:
    import torch_npu

    plan = backend.make_plan("npu", **RECIPE, optim="adamw_apex_fused_npu", apex_available=False)
    trainer = make_trainer(tmp_path, plan, steps=1)
    assert trainer.args.fp16 and trainer.args.optim == "adamw_torch_npu_fused"
    # accelerate makes its dynamic scaler only on a real NPU; stand in for it so the swap can be seen.
    trainer.accelerator.scaler = "accelerate's dynamic default"
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch_npu.optim.NpuFusedAdamW)  # via transformers' adamw_torch_npu_fused
    assert (trainer.accelerator.scaler.init_scale, trainer.accelerator.scaler.dynamic) == (S, False)


def test_off_the_apex_path_the_trainer_runs_unchanged(tmp_path) -> None:
    plan = backend.make_plan("cpu", fp16=False, bf16=False, optim="adamw_torch")
    trainer = make_trainer(tmp_path, plan, steps=2)
    trainer.train()
    assert "backward" not in vars(trainer.accelerator) and "zero_grad" not in vars(trainer.model)
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW and trainer.accelerator.scaler is None
    assert trainer.state.global_step == 2
