"""The non-finite guard and the per-family settings on a real CUDA GPU (the device check for a session with one).

For the recipe's fp16 flags (a dynamic GradScaler from 12800000, fused AdamW), bf16 and fp32: a small Trainer run
with inf injected into the loss at two steps; prints, per path, the skipped steps, LR-scheduler steps vs applied
steps, the final scale, finiteness, TF32 and the start-up line. Then the guard's cost: steps/s of a larger MLP in
bf16 with the guard (sync-free on CUDA), its eager host-sync variant, and without it. Prints one JSON object.

    python3 benchmarks/check_guard_cuda.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from clip_train.device import backend
from clip_train.device import settings as device_settings  # noqa: E402
from clip_train.device.apex_amp import BackendTrainerMixin  # noqa: E402

RECIPE = {
    "fp16": True,
    "bf16": False,
    "fp16_opt_level": "O2",
    "loss_scale": "12800000",
    "optim": "adamw_torch_fused",
}


class Net(nn.Module):
    def __init__(self, width: int, depth: int, poison: tuple[int, ...] = ()) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(64, width)]
        for _ in range(depth):
            layers += [nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width)]
        self.body, self.head = nn.Sequential(*layers), nn.Linear(width, 1)
        self.poison, self.calls = set(poison), 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        loss = nn.functional.mse_loss(self.head(self.body(x)).squeeze(-1).float(), labels.float())
        if self.training:
            self.calls += 1
            if self.calls in self.poison:
                loss = loss * float("inf")
        return {"loss": loss}


class Guarded(BackendTrainerMixin, Trainer):
    pass


class Eager(Guarded):
    lazy_devices = ()  # the guard's host-sync path


class Unguarded(Guarded):
    def _guarded_step(self, optimizer, original, *args, **kwargs):
        return original(*args, **kwargs)


def rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 64, generator=g)
    y = x[:, :8].sum(-1)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def run(
    flags: dict, steps: int, width: int, depth: int, batch: int, poison=(), cls=Guarded, log_every=1
) -> dict:
    plan = backend.make_backend_plan("cuda", **flags)
    args = TrainingArguments(
        output_dir="/tmp/guard_check", max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
        logging_steps=log_every, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False,
    )  # fmt: skip
    args = dataclasses.replace(
        backend.apply_plan(args, plan), **device_settings.choose(args, plan, given=set())
    )
    trainer = cls(
        model=Net(width, depth, poison), args=args, train_dataset=rows(batch * 8), backend_plan=plan
    )
    start = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - start
    trainer.nonfinite_metrics()  # reads the flags of the last steps (sync-free path)
    sched = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
    scaler = trainer.accelerator.scaler
    return {
        "describe": backend.describe(plan),
        "skipped_steps": trainer._skipped_steps,
        "sync_free": trainer._lazy,
        "global_step": trainer.state.global_step,
        "scheduler_steps": sched.last_epoch,
        "final_scale": scaler.get_scale() if scaler is not None else None,
        "weights_finite": all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()),
        "fp32_precision": str(getattr(torch.backends, "fp32_precision", "n/a")),
        "train_steps_per_second": round(steps / seconds, 2),
        "train_loss": out.training_loss,
    }


def main() -> None:
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    for name, flags in (("fp16 recipe", RECIPE), ("bf16", {"fp16": False, "bf16": True}),
                        ("fp32", {"fp16": False, "bf16": False})):  # fmt: skip
        report[name] = run(flags, steps=30, width=256, depth=2, batch=32, poison=(20, 25))
    # the guard's cost: one host sync per optimizer step (logging every 50 steps, so the Trainer adds none)
    big = {"steps": 100, "width": 8192, "depth": 8, "batch": 2048, "log_every": 50}
    for label, cls in (
        ("bf16 guarded", Guarded),
        ("bf16 eager guard", Eager),
        ("bf16 unguarded", Unguarded),
    ) * 3:
        report.setdefault(label, []).append(
            run({"fp16": False, "bf16": True}, cls=cls, **big)["train_steps_per_second"]
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
