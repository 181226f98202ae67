"""Every precision path runs a real short run to the end: train -> evaluate (loss + retrieval) -> save -> reload.

Each cell is run_clip.py on the demo COCO folder (3 steps), then the saved folder is loaded with AutoModel. The
stand-in cells run in this process, since the stand-ins (tests/standins: no NPU or Ascend apex exists here) are
importable for one test only; the 2-rank cells run under torchrun on gloo. What CPU cannot run, and what each
such cell checks instead:

- ``--fp16`` on CPU: accelerate has no CPU fp16 path; the run is fp32 and says so (checked).
- apex O1 / O2: the stand-in apex records amp.initialize and scales the loss but skips the fp16 casts; the cell
  checks the recipe's flags reach amp.initialize and that evaluation copes with apex's plain-dict outputs.
- torch_npu native fp16, static scale: no NPU, so accelerate runs fp32 on CPU and leaves no scaler to replace;
  the cell checks the plan (static 12800000, torch_npu GradScaler(dynamic=False)) and the run's end.
- a dynamic GradScaler: accelerate only scales on a device, so the cell gives its Accelerator CPU fp16 autocast
  and a real torch.amp.GradScaler("cpu") (`_cpu_fp16_accelerator`): fp16 embeddings then reach evaluation.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from conftest import RECIPE, run_py
from transformers import AutoModel

import run_clip
from clip_train.device import backend
from clip_train.eval.retrieval import retrieval_metrics

EVAL_KEYS = {"eval_loss"} | {
    f"eval_{way}_{m}"
    for way in ("image_to_text", "text_to_image")
    for m in ("R@1", "R@5", "R@10", "mean_rank", "median_rank")
}


def tiny_run(data_dir: str, model_dir: str, out: str, *extra: str) -> list[str]:
    return [
        "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_train", "--do_eval",
        "--max_steps", "3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--max_train_samples", "48", "--max_eval_samples", "40", "--dataloader_num_workers", "0",
        "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", *extra,
    ]  # fmt: skip


def recipe_flags(opt_level: str = "O2") -> list[str]:
    return [
        "--fp16", "--fp16_opt_level", opt_level, "--loss_scale", RECIPE["loss_scale"], "--optim",
        "adamw_apex_fused_npu", "--use_combine_grad",
    ]  # fmt: skip


def check_finished(out: str) -> dict:
    """all_results.json holds every eval key, finite; the saved folder reloads and embeds."""
    results = json.load(open(os.path.join(out, "all_results.json")))
    assert EVAL_KEYS <= results.keys(), sorted(EVAL_KEYS - results.keys())
    assert all(results[k] == results[k] and abs(results[k]) < float("inf") for k in EVAL_KEYS), results
    assert results["eval_retrieval_images"] == 8 and results["eval_retrieval_captions"] == 40
    model = AutoModel.from_pretrained(out)
    size = model.config.vision_config.image_size
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=torch.zeros(1, 3, size, size)).pooler_output
    assert torch.isfinite(emb).all()
    return results


def run_in_process(capfd, caplog, args: list[str]) -> str:
    """run_clip.cli in this process; its stderr and log records (pytest's handlers hold those) as one text."""
    caplog.set_level("INFO")
    rc = run_clip.cli(args)
    err = capfd.readouterr().err + caplog.text
    assert rc == 0, err[-3000:]
    return err


# --- plain cells --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ([], "precision fp32 |"),
        (["--bf16"], "precision bf16 (torch.autocast, fp32 weights)"),
        (["--fp16"], "--fp16 on CPU: running fp32"),
    ],
    ids=["fp32", "bf16", "fp16-is-fp32-on-cpu"],
)
def test_precision_cell(demo, tmp_path, capfd, caplog, flags, says) -> None:
    out = str(tmp_path / "out")
    err = run_in_process(capfd, caplog, tiny_run(*demo, out, *flags))
    assert says in err
    check_finished(out)


# --- through the stand-ins ----------------------------------------------------------------------------------------
def as_family(monkeypatch, family: str, apex: bool) -> None:
    """This host as `family` for run_clip (the Trainer still computes on the CPU), Ascend apex present or not."""
    monkeypatch.setattr(backend, "detect_family", lambda: family)
    monkeypatch.setattr(backend, "ascend_apex_available", lambda: apex)


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_apex_cell(demo, tmp_path, capfd, caplog, standins, monkeypatch, opt_level) -> None:
    import apex

    as_family(monkeypatch, "npu", apex=True)
    out = str(tmp_path / "out")
    err = run_in_process(capfd, caplog, tiny_run(*demo, out, *recipe_flags(opt_level)))
    assert f"precision fp16 (apex amp {opt_level}) | loss scale static 12800000" in err
    inits = [call[1] for call in apex.amp.CALLS if call[0] == "initialize"]
    assert [(i["opt_level"], i["loss_scale"], i["combine_grad"]) for i in inits] == [
        (opt_level, float(RECIPE["loss_scale"]), True)
    ]
    check_finished(out)


def test_torch_npu_static_scaler_cell(demo, tmp_path, capfd, caplog, standins, monkeypatch) -> None:
    as_family(monkeypatch, "npu", apex=False)
    out = str(tmp_path / "out")
    err = run_in_process(capfd, caplog, tiny_run(*demo, out, *recipe_flags("O1")))
    assert "loss scale static 12800000" in err and "torch_npu GradScaler(dynamic=False)" in err
    check_finished(out)


@pytest.fixture
def _cpu_fp16_accelerator(monkeypatch):
    """accelerate runs fp16 only on a device: give it CPU fp16 autocast and a real CPU GradScaler (test-only)."""
    import accelerate

    made: list = []
    init = accelerate.Accelerator.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu":
            self.native_amp, self.scaler = True, torch.amp.GradScaler("cpu")
            made.append(self.scaler)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", patched)
    return made


def test_dynamic_grad_scaler_cell(demo, tmp_path, capfd, caplog, monkeypatch, _cpu_fp16_accelerator) -> None:
    as_family(monkeypatch, "cuda", apex=False)
    out = str(tmp_path / "out")
    err = run_in_process(capfd, caplog, tiny_run(*demo, out, "--fp16", "--loss_scale", "dynamic"))
    assert (
        "precision fp16 (torch.autocast, fp32 weights) INSTEAD OF apex O2" in err
        and "| loss scale dynamic" in err
    )
    (scaler,) = _cpu_fp16_accelerator
    assert scaler.is_enabled() and scaler._scale is not None  # it scaled the loss of every step
    check_finished(out)


# --- the global loss on 2 gloo ranks ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags", [[], ["--bf16"]], ids=["fp32", "bf16"])
def test_global_loss_on_two_ranks_cell(demo, tmp_path, flags) -> None:
    out = str(tmp_path / "out")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    r = run_py(
        [*torchrun, "run_clip.py", *tiny_run(*demo, out, "--loss_scope", "global", *flags)],
        timeout=300,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world_size=2" in r.stderr and "Traceback" not in r.stderr
    check_finished(out)


# --- the unit under the crash the matrix found --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_retrieval_metrics_ignore_the_callers_autocast(dtype) -> None:
    """The Trainer evaluates under its autocast: the scores must stay float32 (ranks, ties), not crash or round."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
    # Near-duplicate captions: their order flips if the scores were rounded to bf16 / fp16.
    texts = torch.nn.functional.normalize(
        images.repeat(5, 1) + 1e-3 * torch.randn(60, 16, generator=g), dim=-1
    )
    t2i = torch.arange(60) % 12
    expected = retrieval_metrics(images, texts, t2i)
    with torch.autocast("cpu", dtype=dtype):
        assert retrieval_metrics(images, texts, t2i) == expected
