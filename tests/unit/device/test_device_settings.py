"""device/settings.py (DDP / TF32 / logging per family, one GPU per process without torchrun) and the fp32 model load,
with real TrainingArguments, a real Trainer, real DDP on 2 gloo processes and a real run_clip.py run."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import RECIPE, run_py, spawn_ranks
from runner import recipe_cmd
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments

from clip_train.device import backend
from clip_train.device import settings as device_settings

FLAGS = ("ddp_find_unused_parameters", "ddp_broadcast_buffers", "ddp_bucket_cap_mb", "logging_nan_inf_filter")


def apply(args: TrainingArguments, chosen: dict) -> TrainingArguments:
    """What config/settle.py does with the choices: a copy, re-validated by TrainingArguments.__post_init__."""
    import dataclasses

    return dataclasses.replace(args, **chosen)


def parsed(tmp_path, argv: list[str] = ()) -> TrainingArguments:
    parser = HfArgumentParser(TrainingArguments)
    parser.set_defaults(use_cpu=True)
    (args,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), *argv])
    return args


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("npu", (False, False, 150, False)),
        ("cuda", (False, False, 25, False)),
        (
            "cpu",
            (False, False, None, True),
        ),  # CPU: no bucket choice, the Trainer's loss filter stays (no device)
    ],
)
def test_per_family_ddp_settings_are_stated(tmp_path, family, expected) -> None:
    args = parsed(tmp_path)
    plan = backend.make_backend_plan(family, fp16=False, bf16=True, world_size=8, local_rank=0)
    args = apply(args, device_settings.choose(args, plan, given=set()))
    assert tuple(getattr(args, f) for f in FLAGS) == expected
    plan.settings = device_settings.describe(args, plan)
    line = backend.describe(plan)
    assert (
        f"| ddp find_unused_parameters=False broadcast_buffers=False bucket_cap_mb={expected[2] or 25}"
        in line
    )
    assert ("nan/inf loss filter on device" in line) == (family != "cpu")


def test_given_flags_are_kept(tmp_path) -> None:
    argv = [
        "--ddp_find_unused_parameters",
        "True",
        "--ddp_bucket_cap_mb",
        "150",
        "--logging_nan_inf_filter",
        "True",
    ]
    args = parsed(tmp_path, argv)
    plan = backend.make_backend_plan("cuda", fp16=False, bf16=True, world_size=2, local_rank=0)
    chosen = device_settings.choose(args, plan, given={"ddp_find_unused_parameters", "ddp_bucket_cap_mb",
                                                       "logging_nan_inf_filter"})  # fmt: skip
    assert chosen == {"ddp_broadcast_buffers": False}
    args = apply(args, chosen)
    plan.settings = device_settings.describe(args, plan)
    assert (args.ddp_find_unused_parameters, args.ddp_bucket_cap_mb, args.logging_nan_inf_filter) == (
        True,
        150,
        True,
    )
    assert "find_unused_parameters=True broadcast_buffers=False bucket_cap_mb=150" in backend.describe(plan)


def test_tf32_only_for_fp32_on_cuda(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(device_settings, "_tf32_available", lambda: True)  # no Ampere GPU here
    for precision, given, want in (("fp32", set(), True), ("bf16", set(), None), ("fp32", {"tf32"}, None)):
        args = parsed(tmp_path)
        plan = backend.make_backend_plan("cuda", fp16=False, bf16=precision == "bf16")
        assert device_settings.choose(args, plan, given).get("tf32") is want
        args.tf32 = want  # what applying it gives (TrainingArguments refuses tf32=True without an Ampere GPU)
        assert device_settings.describe(args, plan)["tf32"] == ("on" if want else "off")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, labels):
        return {"loss": nn.functional.mse_loss(self.lin(x).squeeze(-1), labels)}


def test_a_direct_multi_gpu_launch_trains_on_one_gpu_not_dataparallel(tmp_path) -> None:
    """A faked 2-GPU count: the Trainer would wrap the model in nn.DataParallel; after choose() it does not, and the
    global batch (FPS) counts one device."""
    args = parsed(tmp_path, ["--per_device_train_batch_size", "4"])
    args._n_gpu = 2  # what TrainingArguments finds on a host with 2 visible GPUs and no torchrun
    assert isinstance(Trainer(model=Tiny(), args=args)._wrap_model(Tiny()), nn.DataParallel)
    plan = backend.make_backend_plan("cuda", fp16=False, bf16=False)
    note = device_settings.one_device_per_process(args, plan)
    assert note and "2 GPUs visible but one process (no torchrun): training on cuda:0 only" in note
    args._n_gpu = 1  # what config/settle.py then does
    assert args.n_gpu == 1 and args.train_batch_size == 4
    model = Tiny()
    assert Trainer(model=model, args=args)._wrap_model(model) is model
    under_torchrun = backend.make_backend_plan("cuda", fp16=False, bf16=False, world_size=2, local_rank=0)
    assert device_settings.one_device_per_process(args, under_torchrun) is None


# --- DDP without find_unused_parameters on the real clip-roberta, vision tower frozen: 2 gloo ranks -----------
def _ddp_rank(model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModel

    from clip_train.model import freeze_towers
    from clip_train.train.loss import clip_loss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    args = parsed(out)
    plan = backend.make_backend_plan("cpu", fp16=False, bf16=False, world_size=2, local_rank=rank)
    args = apply(args, device_settings.choose(args, plan, given=set()))
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    freeze_towers(model, vision=True, text=False)
    ddp = nn.parallel.DistributedDataParallel(
        model,
        find_unused_parameters=args.ddp_find_unused_parameters,
        broadcast_buffers=args.ddp_broadcast_buffers,
    )
    g = torch.Generator().manual_seed(rank)
    size = model.config.vision_config.image_size
    no_grad = []
    for _ in range(2):  # an unused parameter makes DDP fail at the second iteration
        ddp.zero_grad()
        ids = torch.randint(5, 50, (4, 12), generator=g)
        out_ = ddp(input_ids=ids, attention_mask=torch.ones_like(ids),
                   pixel_values=torch.randn(4, 3, size, size, generator=g), return_loss=False)  # fmt: skip
        clip_loss(out_.image_embeds, out_.text_embeds, model.logit_scale).backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "no_grad": no_grad,
                "frozen": len(frozen),
                "grad_sum": float(grads.double().sum()),
                "find_unused": args.ddp_find_unused_parameters,
            }
        )  # fmt: skip
    )
    dist.barrier()  # neither rank tears gloo down while the other still uses it (one hung in destroy under load)
    dist.destroy_process_group()


def test_every_trainable_parameter_gets_a_gradient_without_find_unused(demo, tmp_path) -> None:
    _, model_dir = demo
    repo = str(Path(__file__).resolve().parents[3])
    spawn_ranks(
        [__file__, model_dir, str(tmp_path)],
        env={"PYTHONPATH": repo + os.pathsep + str(Path(__file__).parents[2])},  # tests/: conftest
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["find_unused"] is False and report["no_grad"] == [] and report["frozen"] > 0
    assert reports[0]["grad_sum"] == reports[1]["grad_sum"]  # all-reduced: the same averaged gradients


# --- run_clip.py: a model saved in bf16 trains in fp32 ---------------------------------------------------------
def test_a_bf16_saved_model_trains_in_fp32_and_results_say_what_ran(demo, tmp_path) -> None:

    from safetensors import safe_open
    from transformers import AutoModel

    data_dir, model_dir = demo
    bf16_dir = tmp_path / "bf16-model"
    shutil.copytree(model_dir, bf16_dir)
    AutoModel.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(bf16_dir)
    with safe_open(bf16_dir / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    out = tmp_path / "out"
    r = run_py(recipe_cmd(data_dir, str(bf16_dir), str(out), "--max_steps", "3", "--do_eval", "False"))
    assert r.returncode == 0, r.stderr[-3000:]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_skipped_nonfinite_steps"] == 0
    assert results["train_precision"] == "fp32 INSTEAD OF fp16 O2: no fp16 training on CPU"
    assert "precision fp32 INSTEAD OF fp16 O2" in r.stderr  # the start-up line


def test_o3_with_the_apex_fused_optimizer_is_one_clear_error(capsys, tmp_path) -> None:
    import run_clip

    for extra in (["--optim", "adamw_apex_fused_npu"], ["--use_combine_grad"]):
        argv = [
            "--model_name_or_path",
            "x",
            "--output_dir",
            str(tmp_path),
            "--fp16",
            "--fp16_opt_level",
            "O3",
            *extra,
        ]
        assert run_clip.cli(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("run_clip.py: error: --fp16_opt_level O3 with"), err
        assert "only with O1 or O2" in err[0]
    with pytest.raises(ValueError, match="only with O1 or O2"):
        backend.make_backend_plan("npu", **{**RECIPE, "fp16_opt_level": "O0"}, optim="adamw_apex_fused_npu")


if __name__ == "__main__":  # a rank of test_every_trainable_parameter_gets_a_gradient_without_find_unused
    _ddp_rank(sys.argv[1], sys.argv[2])
