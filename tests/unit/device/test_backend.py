"""backend.py: the plan for each device family x recipe flags, and what it does to a real Trainer on CPU."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import RECIPE, S, spawn_ranks
from torch import nn

from clip_train.device import backend
from clip_train.device.backend import APEX_OPTIMIZER, BackendPlan, make_backend_plan

# (family, flags, expected plan fields). Flags not given take make_backend_plan's defaults.
PLAN_TABLE = [
    # Ascend with apex: the recipe path.
    (
        "npu",
        {**RECIPE, "optim": "adamw_apex_fused_npu", "use_combine_grad": True, "apex_available": True},
        {"precision": "fp16", "amp": "apex", "opt_level": "O2", "loss_scale": S, "optimizer": APEX_OPTIMIZER,
         "combine_grad": True, "device": "npu:0", "dist_backend": None},
    ),
    (
        "npu",
        {**RECIPE, "fp16_opt_level": "O1", "loss_scale": "dynamic", "optim": "adamw_apex_fused_npu",
         "apex_available": True},
        {"amp": "apex", "opt_level": "O1", "loss_scale": "dynamic", "optimizer": APEX_OPTIMIZER,
         "combine_grad": False},
    ),
    (
        "npu",
        {**RECIPE, "optim": "adamw_torch", "use_combine_grad": True, "apex_available": True},
        {"amp": "apex", "optimizer": "adamw_torch", "combine_grad": True},
    ),
    (
        "npu",
        {"fp16": False, "bf16": True, "optim": "adamw_apex_fused_npu", "apex_available": True},
        {"precision": "bf16", "amp": "native", "opt_level": None, "loss_scale": None,
         "optimizer": "adamw_torch_npu_fused"},
    ),
    # Ascend without apex: native autocast + torch_npu GradScaler, static when the scale is a number.
    (
        "npu",
        {**RECIPE, "optim": "adamw_apex_fused_npu", "use_combine_grad": True, "apex_available": False},
        {"precision": "fp16", "amp": "native", "opt_level": None, "loss_scale": S, "init_scale": None,
         "optimizer": "adamw_torch_npu_fused", "combine_grad": True},
    ),
    (
        "npu",
        {**RECIPE, "fp16_opt_level": "O1", "loss_scale": None, "optim": "adamw_torch"},
        {"amp": "native", "loss_scale": "dynamic", "optimizer": "adamw_torch"},
    ),
    (
        "npu",
        {**RECIPE, "optim": "adamw_torch", "use_combine_grad": True},
        {"amp": "native", "optimizer": "adamw_torch_npu_fused", "combine_grad": True},
    ),
    # CUDA: autocast fp16 with a dynamic GradScaler starting at the given scale, or bf16 without one.
    (
        "cuda",
        {**RECIPE, "optim": "adamw_apex_fused_npu", "use_combine_grad": True, "apex_available": True},
        {"precision": "fp16", "amp": "native", "loss_scale": "dynamic", "init_scale": S,
         "optimizer": "adamw_torch_fused", "combine_grad": False, "device": "cuda:0"},
    ),
    (
        "cuda",
        {**RECIPE, "fp16_opt_level": "O1", "loss_scale": "dynamic", "optim": "adamw_torch"},
        {"amp": "native", "loss_scale": "dynamic", "init_scale": None, "optimizer": "adamw_torch"},
    ),
    (
        "cuda",
        {"fp16": False, "bf16": True, "loss_scale": "128", "optim": "adamw_torch_npu_fused"},
        {"precision": "bf16", "amp": "native", "loss_scale": None, "optimizer": "adamw_torch_fused"},
    ),
    (
        "cuda",
        {**RECIPE, "fp16_opt_level": "O0"},
        {"precision": "fp32", "amp": "none", "loss_scale": None},
    ),
    # CPU: fp16 runs fp32 (said in a note), bf16 is autocast.
    (
        "cpu",
        {**RECIPE, "optim": "adamw_apex_fused_npu", "use_combine_grad": True, "apex_available": True},
        {"precision": "fp32", "amp": "none", "loss_scale": None, "optimizer": "adamw_torch_fused",
         "combine_grad": False, "device": "cpu", "dist_backend": None},
    ),
    (
        "cpu",
        {"fp16": False, "bf16": True, "optim": "adamw_torch"},
        {"precision": "bf16", "amp": "native", "loss_scale": None, "optimizer": "adamw_torch"},
    ),
    (
        "cpu",
        {"fp16": False, "bf16": False, "loss_scale": "dynamic"},
        {"precision": "fp32", "amp": "none", "optimizer": "adamw_torch_fused", "notes": []},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("family", "flags", "expected"), PLAN_TABLE)
def test_plan_table(family: str, flags: dict, expected: dict) -> None:
    plan = make_backend_plan(family, **flags)
    got = {key: getattr(plan, key) for key in expected}
    assert got == expected, plan.notes
    assert all(isinstance(n, str) and "\n" not in n for n in plan.notes)


@pytest.mark.parametrize(
    ("family", "flags", "says"),
    [
        ("cpu", RECIPE, "runs fp32|running fp32"),
        ("cpu", {**RECIPE, "optim": "adamw_apex_fused_npu"}, "adamw_torch_fused"),
        ("npu", {**RECIPE, "apex_available": False}, "GradScaler(dynamic=False)"),
        ("npu", {**RECIPE, "apex_available": False}, "fp32 weights"),
        ("npu", {**RECIPE, "apex_available": False}, "Python 3.7-3.10"),
        ("npu", {**RECIPE, "apex_available": True}, "fp32 master weights"),
        ("npu", {**RECIPE, "apex_available": True, "use_combine_grad": True}, "combined buffers"),
        ("cuda", RECIPE, "first scale of a dynamic GradScaler"),
        ("cuda", {"fp16": False, "bf16": True, "loss_scale": "128"}, "--loss_scale 128 ignored"),
        ("cuda", {**RECIPE, "use_combine_grad": True}, "no combined grad buffers"),
        (
            "npu",
            {**RECIPE, "use_combine_grad": True, "optim": "adamw_apex_fused_npu"},
            "clip_grad_norm_fused_",
        ),
    ],
)
def test_plan_notes_say_what_changed(family: str, flags: dict, says: str) -> None:
    notes = " ".join(make_backend_plan(family, **flags).notes)
    assert any(part in notes for part in says.split("|")), notes


@pytest.mark.parametrize(
    ("family", "world_size", "local_rank", "device", "dist"),
    [
        ("npu", 8, 5, "npu:5", "hccl"),
        ("cuda", 2, 1, "cuda:1", "nccl"),
        ("cpu", 2, 1, "cpu", "gloo"),
        ("npu", 1, 0, "npu:0", "hccl"),  # torchrun --nproc_per_node 1 is still a process group
        ("npu", 1, -1, "npu:0", None),
    ],
)
def test_device_and_backend_under_torchrun(family, world_size, local_rank, device, dist) -> None:
    plan = make_backend_plan(family, fp16=False, bf16=False, world_size=world_size, local_rank=local_rank)
    assert (plan.device, plan.dist_backend, plan.world_size) == (device, dist, world_size)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_backend_plan("tpu", fp16=False, bf16=False), "unknown device family"),
        (lambda: make_backend_plan("cpu", fp16=True, bf16=True), "only one"),
        (lambda: make_backend_plan("npu", fp16=True, bf16=False, fp16_opt_level="O4"), "O0, O1, O2, O3"),
        (
            lambda: make_backend_plan("npu", fp16=True, bf16=False, loss_scale="big"),
            "positive number or 'dynamic'",
        ),
        (
            lambda: make_backend_plan("npu", fp16=True, bf16=False, loss_scale=0),
            "positive number or 'dynamic'",
        ),
        (
            lambda: make_backend_plan(
                "npu", **{**RECIPE, "fp16_opt_level": "O3"}, optim="adamw_apex_fused_npu"
            ),
            "NPU fused optimizer only with O1 or O2",
        ),
        (
            lambda: make_backend_plan("cuda", **{**RECIPE, "fp16_opt_level": "O0"}, use_combine_grad=True),
            "combines gradients only with O1 or O2",
        ),
    ],
)
def test_bad_input_gets_a_clear_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_describe_is_one_line_with_everything() -> None:
    plan = make_backend_plan(
        "npu", **RECIPE, optim="adamw_apex_fused_npu", use_combine_grad=True, apex_available=True, world_size=8,
        local_rank=3,
    )  # fmt: skip
    line = backend.describe(plan)
    assert line == (
        "backend: npu | device npu:3 | world size 8 | dist hccl | precision fp16 (apex amp O2) | "
        "loss scale static 12800000 | optimizer apex NpuFusedAdamW + combined grads"
    )
    cuda = backend.describe(make_backend_plan("cuda", **RECIPE))
    assert (
        "precision fp16 (torch.autocast, fp32 weights) INSTEAD OF apex O2: apex amp runs only on Ascend | "
        "loss scale dynamic from 12800000 | optimizer adamw_torch_fused"
    ) in cuda
    npu = backend.describe(
        make_backend_plan("npu", **RECIPE, optim="adamw_apex_fused_npu", apex_available=False)
    )
    assert (
        "precision fp16 (torch.autocast, fp32 weights) INSTEAD OF apex O2: Ascend apex not installed" in npu
    )
    assert "INSTEAD OF" not in backend.describe(
        make_backend_plan("cuda", **{**RECIPE, "fp16_opt_level": "O1"})
    )
    assert "loss scale none" in backend.describe(make_backend_plan("cpu", fp16=False, bf16=True))


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (make_backend_plan("npu", **RECIPE, optim="adamw_apex_fused_npu", apex_available=True),
         {"fp16": False, "bf16": False, "use_cpu": False, "optim": "adamw_torch"}),
        (make_backend_plan("npu", **RECIPE, optim="adamw_apex_fused_npu", world_size=8, local_rank=0),
         {"fp16": True, "bf16": False, "use_cpu": False, "optim": "adamw_torch_npu_fused", "ddp_backend": "hccl"}),
        (make_backend_plan("cuda", fp16=False, bf16=True, world_size=2, local_rank=1),
         {"fp16": False, "bf16": True, "use_cpu": False, "optim": "adamw_torch_fused", "ddp_backend": "nccl"}),
        (make_backend_plan("cpu", **RECIPE),
         {"fp16": False, "bf16": False, "use_cpu": True, "optim": "adamw_torch_fused"}),
    ],
)  # fmt: skip
def test_training_args_overrides(plan: BackendPlan, expected: dict) -> None:
    assert backend.training_args_overrides(plan) == expected


def test_detect_family_sees_an_npu_through_torch_npu(standins) -> None:
    import torch_npu

    assert backend.detect_family() == "cpu"  # torch_npu imports, but no device: this CPU machine
    torch_npu.npu.DEVICE_COUNT = 1
    assert backend.detect_family() == "npu"


def test_detect_family_without_torch_npu() -> None:
    assert backend.detect_family() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_set_npu_options_and_synchronize(standins) -> None:
    import torch_npu

    assert backend.set_npu_options("cpu") is False and torch_npu.npu.CALLS == []
    assert backend.set_npu_options("npu") is True
    assert torch_npu.npu.CALLS == [
        (
            "set_option",
            {"ACL_OP_SELECT_IMPL_MODE": "high_performance", "ACL_OPTYPELIST_FOR_IMPLMODE": "LayerNorm"},
        ),
        ("set_compile_mode", False),
        ("set_option", {"ALLOW_INTERNAL_FORMAT": "disable"}),  # through torch_npu's setter-only config
    ]
    with pytest.raises(AttributeError):
        torch_npu.npu.config.allow_internal_format  # noqa: B018 - nothing to read, as in torch_npu
    backend.synchronize("cpu")
    backend.synchronize("npu:2")
    assert torch_npu.npu.CALLS[-1] == ("synchronize", "npu:2")


def test_make_grad_scaler(standins) -> None:
    import torch_npu

    static = backend.make_grad_scaler(make_backend_plan("npu", **RECIPE))
    assert (static.get_scale(), static.dynamic) == (S, False)
    assert backend.make_grad_scaler(make_backend_plan("npu", **{**RECIPE, "loss_scale": "dynamic"})) is None
    assert (
        backend.make_grad_scaler(make_backend_plan("npu", **RECIPE, apex_available=True)) is None
    )  # apex scales
    assert backend.make_grad_scaler(make_backend_plan("cpu", fp16=False, bf16=True)) is None
    assert [c for c in torch_npu.npu.CALLS if c[0] == "GradScaler"] == [
        ("GradScaler", {"init_scale": S, "dynamic": False})
    ]
    with pytest.warns(UserWarning):  # no CUDA here: torch disables the scaler, but it is the right one
        cuda = backend.make_grad_scaler(make_backend_plan("cuda", **RECIPE))
    assert isinstance(cuda, torch.amp.GradScaler) and cuda._device == "cuda"


# --- a real Trainer on CPU ----------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """y = head(norm(relu(proj(x)))); records the dtype its forward computes in and what it was fed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.norm, self.head = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 1)
        self.dtypes: list[torch.dtype] = []
        self.fed: list[float] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        y = self.head(self.norm(torch.relu(self.proj(x)))).squeeze(-1)
        self.dtypes.append(y.dtype)
        self.fed.append(float(x.sum()))
        return {"loss": nn.functional.mse_loss(y.float(), labels)}


def regression_rows(n: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = x @ torch.linspace(-1, 1, 8)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def training_args(out: str, argv: list[str], family: str):
    """TrainingArguments parsed the way run_clip.py parses them, with backend.parser_defaults."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    parser.set_defaults(**backend.parser_defaults(family))
    common = ["--output_dir", out, "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]
    (args,) = parser.parse_args_into_dataclasses(args=common + argv)
    return args


def test_cpu_bf16_parses_only_with_parser_defaults(tmp_path) -> None:
    from transformers import HfArgumentParser, TrainingArguments

    with pytest.raises(ValueError, match="use_cpu"):
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            args=["--output_dir", str(tmp_path), "--bf16"]
        )
    assert training_args(str(tmp_path), ["--bf16"], "cpu").bf16


def test_cpu_fp16_runs_fp32_and_says_so(tmp_path) -> None:
    args = training_args(str(tmp_path), ["--fp16"], "cpu")
    assert args.mixed_precision == "fp16"  # what transformers would claim while computing in fp32
    plan = make_backend_plan("cpu", fp16=args.fp16, bf16=args.bf16)
    args = backend.apply_plan(args, plan)
    assert (args.fp16, args.mixed_precision, plan.precision) == (False, "no", "fp32")


def test_cpu_bf16_trainer_trains(tmp_path) -> None:
    from transformers import Trainer

    args = training_args(str(tmp_path), ["--bf16", "--max_steps", "24", "--learning_rate", "0.02",
                                         "--per_device_train_batch_size", "16", "--logging_steps", "1"], "cpu")  # fmt: skip
    plan = make_backend_plan("cpu", fp16=args.fp16, bf16=args.bf16, optim=args.optim.value)
    args = backend.apply_plan(args, plan)
    model = Tiny()
    trainer = Trainer(model=model, args=args, train_dataset=regression_rows())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    assert set(model.dtypes) == {torch.bfloat16}  # autocast was on in every forward
    assert trainer.accelerator.mixed_precision == "bf16"


# --- two real processes on gloo ---------------------------------------------------------------------------------
def _dist_worker(out: str) -> None:
    """One rank of the gloo test: parse, plan, apply, train 3 steps, report what the Trainer ran with."""
    import torch.distributed as dist
    from transformers import Trainer

    family = backend.detect_family()
    args = training_args(out, ["--bf16", "--max_steps", "3", "--per_device_train_batch_size", "4"], family)
    plan = make_backend_plan(
        family, fp16=args.fp16, bf16=args.bf16, world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
    )  # fmt: skip
    args = backend.apply_plan(args, plan)
    model = Tiny()
    trainer = Trainer(model=model, args=args, train_dataset=regression_rows())
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    report = {
        "describe": backend.describe(plan),
        "backend": dist.get_backend(),
        "world_size": args.world_size,
        "weights": weights.tolist(),
        "fed": model.fed,
    }
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()  # neither rank tears gloo down while the other still uses it (a rank hung in destroy under load)
    dist.destroy_process_group()  # as run_clip.py does: left to interpreter exit, gloo's threads can abort


def test_two_ranks_on_gloo_train_one_model(tmp_path) -> None:
    repo = str(Path(__file__).resolve().parents[3])
    spawn_ranks(
        [__file__, str(tmp_path)],
        env={
            "PYTHONPATH": os.pathsep.join(
                [repo, str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
            )
        },
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["backend"] == "gloo" and report["world_size"] == 2
        assert "backend: cpu | device cpu | world size 2 | dist gloo | precision bf16" in report["describe"]
    # Each rank was fed different batches; identical weights after 3 steps mean DDP averaged the gradients.
    assert reports[0]["fed"] != reports[1]["fed"]
    assert reports[0]["weights"] == reports[1]["weights"]


if __name__ == "__main__":  # a rank of test_two_ranks_on_gloo_train_one_model
    _dist_worker(sys.argv[1])
