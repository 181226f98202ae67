"""--torch_compile True with ClipTrainer: same losses as eager, and a bounded number of compilations however many
per-batch caption widths the run sees (the width is marked dynamic, clip_train/train/compiling.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import zipfile

import pytest

from clip_train.demo import COLOURS, SHAPES, recipe_args
from clip_train.train import compiling


def test_bucket_width() -> None:
    assert [compiling.bucket_width(w, 128) for w in (8, 16, 24, 40, 72, 104, 128)] == [
        16,
        16,
        32,
        48,
        96,
        128,
        128,
    ]
    assert compiling.bucket_width(40, 40) == 40 and compiling.bucket_width(136, 128) == 136


def varied_captions(data_dir: str, model_dir: str, out: str, seed: int = 0) -> str:
    """A copy of the demo's COCO folder whose captions run 4 to 60 tokens: batches of 8 pad to many widths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    shutil.copytree(data_dir, out)
    path = os.path.join(out, "annotations_trainval2017.zip")
    with zipfile.ZipFile(path) as z:
        files = {n: json.loads(z.read(n)) for n in z.namelist()}
    for ann in files.values():
        for a in ann["annotations"]:
            target, caption = 4 + int(56 * rng.random() ** 4), a["caption"]  # mostly short, a long tail
            while len(tok(caption)["input_ids"]) < target:
                caption += f" and a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)}"
            a["caption"] = caption
    with zipfile.ZipFile(path, "w") as z:
        for name, ann in files.items():
            z.writestr(name, json.dumps(ann))
    return out


def no_dropout(model_dir: str, out: str) -> str:
    """The demo model with dropout off: inductor draws its own random masks, so only then are losses comparable."""
    shutil.copytree(model_dir, out)
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    for side in ("text_config", "vision_config"):
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
            if key in config[side]:
                config[side][key] = 0.0
    json.dump(config, open(path, "w"))
    return out


def train(monkeypatch: pytest.MonkeyPatch, data_dir: str, model_dir: str, out: str, *extra: str) -> dict:
    """run_clip.main in this process (dynamo's counters are per process), 20 steps of batch 8, fp32, losses logged
    every step; returns the per-step losses, the compilations counted after each step and the caption widths."""
    import torch
    from transformers import TrainerCallback

    import run_clip
    from clip_train.train.trainer import ClipTrainer

    seen: dict = {"loss": [], "compiled": [], "widths": []}

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            seen["compiled"].append(compiling.compilations())

    class Recording(ClipTrainer):  # not run_clip's: an earlier call patched that
        def __init__(self, *a, **k) -> None:  # noqa: ANN002, ANN003
            super().__init__(*a, **k)
            self.add_callback(Count())

        def compute_loss(self, model, inputs, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN201
            if model.training:
                seen["widths"].append(inputs["input_ids"].shape[1])
            return super().compute_loss(model, inputs, *a, **k)

    monkeypatch.setattr(run_clip, "ClipTrainer", Recording)
    torch._dynamo.reset()
    args = recipe_args(data_dir, model_dir, out)
    args.remove("--fp16")
    args += ["--per_device_train_batch_size=8", "--per_device_eval_batch_size=8", "--max_steps", "20",
             "--logging_steps", "1", "--skip_steps", "2", "--dataloader_num_workers", "0", "--report_to", "none",
             "--save_strategy", "no", "--max_eval_samples", "40", "--seed", "3", *extra]  # fmt: skip
    results = run_clip.main(args)
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    seen["loss"] = [h["loss"] for h in state["log_history"] if "loss" in h]
    seen["results"] = results
    seen["compiled_after_eval"] = compiling.compilations()
    return seen


def test_compiled_training_matches_eager_with_bounded_compilations(
    demo, tmp_path, monkeypatch, caplog
) -> None:
    data_dir = varied_captions(demo[0], demo[1], str(tmp_path / "coco"))
    model_dir = no_dropout(demo[1], str(tmp_path / "model"))
    eager = train(monkeypatch, data_dir, model_dir, str(tmp_path / "eager"))
    with caplog.at_level("INFO", logger="run_clip"):
        compiled = train(
            monkeypatch, data_dir, model_dir, str(tmp_path / "compiled"), "--torch_compile", "True"
        )
    assert (
        "compile: model forward (train and eval loss)" in caplog.text
    )  # the start-up line says what is compiled

    assert compiled["widths"] == eager["widths"] and len(set(eager["widths"])) >= 5, eager["widths"]
    assert len(compiled["loss"]) == 20
    for step, (a, b) in enumerate(zip(eager["loss"], compiled["loss"], strict=True)):
        assert abs(a - b) <= 1e-4, (step, a, b)
    assert abs(eager["results"]["eval_loss"] - compiled["results"]["eval_loss"]) <= 1e-4
    # Every width after the first reuses the first compilation: nothing is compiled after step 1.
    counts = compiled["compiled"]
    assert counts[0] >= 1 and counts[-1] == counts[0], counts
    assert counts[-1] <= 3, counts  # the model's forward (graph breaks would add pieces)
    # Evaluation (eval mode, a smaller last batch) adds at most a couple of graphs, not one per width.
    assert compiled["compiled_after_eval"] - counts[-1] <= 3, compiled["compiled_after_eval"]
    assert eager["compiled"][-1] == 0


def test_cuda_graph_modes_compile_one_static_graph_per_width_bucket(demo, tmp_path, monkeypatch) -> None:
    """reduce-overhead (CUDA graphs need static shapes): each --pad_to_multiple_of bucket gets one static graph, so
    the graph count over a run of many caption widths is bounded by the buckets it meets, and the losses equal
    per-batch padding's (multiple of 8, eager). Backend aot_eager: the graphs dynamo makes are the same as
    inductor's, in seconds (on CPU inductor skips the CUDA graphs anyway)."""
    data_dir = varied_captions(demo[0], demo[1], str(tmp_path / "coco"))
    model_dir = no_dropout(demo[1], str(tmp_path / "model"))
    eager = train(monkeypatch, data_dir, model_dir, str(tmp_path / "eager"))
    bucketed = train(monkeypatch, data_dir, model_dir, str(tmp_path / "bucketed"), "--torch_compile", "True",
                     "--torch_compile_backend", "aot_eager", "--torch_compile_mode", "reduce-overhead",
                     "--pad_to_multiple_of", "16")  # fmt: skip
    assert len(set(eager["widths"])) >= 5, eager["widths"]  # many per-batch widths...
    buckets = set(bucketed["widths"])
    assert all(w % 16 == 0 for w in buckets) and 2 <= len(buckets) < len(set(eager["widths"])), buckets
    # ...one static graph per bucket met (a bucket seen again reuses its graph), never one per width
    counts = bucketed["compiled"]
    first_seen = [len(set(bucketed["widths"][: i + 1])) for i in range(len(counts))]
    assert counts == [c0 + n for c0, n in zip([counts[0] - 1] * len(counts), first_seen, strict=True)], (
        counts,
        bucketed["widths"],
    )
    assert counts[-1] - counts[0] + 1 == len(buckets)
    for step, (a, b) in enumerate(zip(eager["loss"], bucketed["loss"], strict=True)):
        assert abs(a - b) <= 1e-4, (step, a, b)
    assert abs(eager["results"]["eval_loss"] - bucketed["results"]["eval_loss"]) <= 1e-4
