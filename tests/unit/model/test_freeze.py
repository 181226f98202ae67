"""Frozen towers: a real ClipTrainer step leaves the frozen tower untouched and does no gradient work for it."""

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, TrainerCallback, TrainingArguments

from clip_train.data.dataset import ClipDataset, Collator, tokenize_captions
from clip_train.model import freeze_towers
from clip_train.train.trainer import ClipTrainer

CAPTIONS = ["a red circle", "a photo of a big blue square", "there is a triangle that is green",
            "a small white square in the picture", "a yellow circle on a gray background",
            "a black triangle", "a photo of a purple circle", "there is a square that is orange"]  # fmt: skip


class GradProbe(TrainerCallback):
    """Before the optimizer step, which parameters hold a gradient."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.with_grad = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.with_grad = {n for n, p in self.model.named_parameters() if p.grad is not None}


def train_one_step(model_dir: str, tmp_path, freeze_vision: bool, freeze_text: bool):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    freeze_towers(model, freeze_vision, freeze_text)
    size = model.config.vision_config.image_size
    flat, offsets = tokenize_captions(CAPTIONS, tok, 128, None, None, False)
    pixels = np.random.default_rng(0).integers(0, 255, (len(CAPTIONS), size, size, 3), dtype=np.uint8)
    ds = ClipDataset(flat, offsets, np.arange(len(CAPTIONS)), pixels)

    graph = {}  # whether each tower's output carries an autograd graph (i.e. backward will run through it)
    for name in ("vision_model", "text_model"):
        getattr(model, name).register_forward_hook(
            lambda m, i, out, name=name: graph.__setitem__(name, out.pooler_output.requires_grad)
        )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                             learning_rate=1e-2, weight_decay=0.1, report_to="none", save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0)  # fmt: skip
    probe = GradProbe(model)
    trainer = ClipTrainer(model=model, args=args, train_dataset=ds, data_collator=Collator(tok.pad_token_id, 128),
                          image_mean=[0.5] * 3, image_std=[0.25] * 3, callbacks=[probe])  # fmt: skip
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return model, changed, probe.with_grad, graph


@pytest.mark.parametrize("frozen,trained", [("vision_model", "text_model"), ("text_model", "vision_model")])
def test_frozen_tower_is_untouched_and_gets_no_gradient_work(demo, tmp_path, frozen, trained):
    _, model_dir = demo
    model, changed, with_grad, graph = train_one_step(
        model_dir, tmp_path, freeze_vision=frozen == "vision_model", freeze_text=frozen == "text_model"
    )
    frozen_names = {f"{frozen}.{n}" for n, _ in getattr(model, frozen).named_parameters()}
    trained_names = {f"{trained}.{n}" for n, _ in getattr(model, trained).named_parameters()}
    assert frozen_names and not frozen_names & changed  # unchanged, weight decay included
    assert not frozen_names & with_grad  # no gradient was ever computed for it
    assert all(p.grad is None for p in getattr(model, frozen).parameters())
    assert graph == {frozen: False, trained: True}  # no autograd graph through the frozen tower at all
    # The other tower, the projections and the logit scale train.
    assert len(trained_names & changed) > len(trained_names) // 2
    assert {"visual_projection.weight", "text_projection.weight", "logit_scale"} <= changed
    assert trained_names & with_grad
