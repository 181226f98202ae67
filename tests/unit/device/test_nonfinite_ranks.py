"""Two real gloo ranks on the check's sync-free path (CUDA's, driven on CPU as test_syncs does): a skipped step is
taken back at the same step on every rank whatever each rank's device pace, so the replicas stay bit-identical."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from conftest import spawn_ranks

POISON_STEP, STEPS = 3, 8


def _rank(out: str) -> None:
    """One rank: the Tiny regression net under DDP, fused AdamW, non-finite gradients at POISON_STEP."""
    import torch.distributed as dist
    from test_apex_amp import BackendTrainer, make_trainer

    from clip_train.device import backend, nonfinite

    class LazyOnCpu(BackendTrainer):
        lazy_devices = ("cuda", "cpu")  # the sync-free path, as it runs on a GPU

    rank = int(os.environ["RANK"])
    if rank == 1:
        # TEST SEAM (delay injection): this rank's device runs a step behind, so each step's flag event reports
        # "not ready" the first time it is asked. The check must not let that decide the step it acts on.
        def late(flag: object) -> bool:
            flag.asked = getattr(flag, "asked", 0) + 1
            return flag.asked > 1

        nonfinite._DeviceFlag.ready = late
    plan = backend.make_backend_plan("cpu", fp16=False, bf16=False)
    trainer = make_trainer(
        Path(out) / "run", plan, steps=STEPS, cls=LazyOnCpu, poison=(POISON_STEP,), optim="adamw_torch_fused",
        use_cpu=True,
    )  # fmt: skip
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    report = {
        "lazy": trainer._lazy, "world": dist.get_world_size(), "skipped": trainer._skipped_steps,
        "weights": weights.tolist(), "lr": trainer.lr_scheduler.get_last_lr(),
    }  # fmt: skip
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_ranks_with_a_late_flag_on_one_stay_bit_identical(tmp_path) -> None:
    here = Path(__file__).resolve()
    path = os.pathsep.join(
        [str(here.parents[3]), str(here.parents[2]), str(here.parent)]
    )  # repo, tests/, here
    spawn_ranks([__file__, str(tmp_path)], env={"PYTHONPATH": path})
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["lazy"] is True and report["world"] == 2 and report["skipped"] == [POISON_STEP]
    assert reports[0]["lr"] == reports[1]["lr"]
    assert reports[0]["weights"] == reports[1]["weights"]


if __name__ == "__main__":  # a rank of test_ranks_with_a_late_flag_on_one_stay_bit_identical
    _rank(sys.argv[1])
