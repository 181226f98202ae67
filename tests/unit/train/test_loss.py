"""clip_loss: local == the model's own loss; global over 2 gloo ranks under real DDP == one big batch; the clamp."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    CLIPVisionConfig,
    RobertaConfig,
    Trainer,
    TrainingArguments,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

from clip_train.train.loss import LogitScaleClamp, clamp_logit_scale_, clip_loss

WORLD = 2
GLOBAL_BATCH = 8
SEQ = 10


def tiny_model(seed: int = 0) -> VisionTextDualEncoderModel:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    # Dropout off: the distributed and single-process runs must see the same function.
    text = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=SEQ + 4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    torch.manual_seed(seed)
    return VisionTextDualEncoderModel(config).float()


def tiny_batch(rows: int, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 100, (rows, SEQ), generator=gen)
    input_ids[:, 0] = 0  # <s>
    lengths = torch.randint(4, SEQ + 1, (rows,), generator=gen)
    attention_mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)  # <pad>
    pixel_values = torch.randn(rows, 3, 32, 32, generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def _ddp_worker(rank: int, port: int, state_path: str, batch: dict, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        rows = GLOBAL_BATCH // WORLD
        half = {k: v[rank * rows : (rank + 1) * rows] for k, v in batch.items()}
        results = {}
        # find_unused_parameters=True is what the Trainer passes for a PreTrainedModel; False is DDP's default.
        for name, scope, find_unused in [
            ("global", "global", False),
            ("global_find_unused", "global", True),
            ("local", "local", False),
        ]:
            model = tiny_model()
            model.load_state_dict(torch.load(state_path))
            ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
            out = ddp(**half, return_loss=False)
            # logit_scale taken from the unwrapped module, as the Trainer subclass will do.
            loss = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale, scope=scope)
            loss.backward()
            results[name] = {"loss": loss.detach(), "grads": grads(model)}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_global_scope_under_ddp_equals_one_big_batch(tmp_path):
    model = tiny_model()
    state_path = str(tmp_path / "state.pt")
    torch.save(model.state_dict(), state_path)
    batch = tiny_batch(GLOBAL_BATCH)

    # Reference: one process, the whole batch, the model's own loss.
    ref = model(**batch, return_loss=True).loss
    ref.backward()
    ref_grads = grads(model)

    mp.spawn(_ddp_worker, args=(free_port(), state_path, batch, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for name in ("global", "global_find_unused"):
        mean_loss = sum(r[name]["loss"] for r in ranks) / WORLD
        torch.testing.assert_close(mean_loss, ref.detach(), atol=1e-5, rtol=0)
        for rank in ranks:
            assert rank[name]["grads"].keys() == ref_grads.keys()
            for pname, ref_grad in ref_grads.items():
                assert ref_grad is not None, f"{pname} got no gradient in the reference run"
                torch.testing.assert_close(rank[name]["grads"][pname], ref_grad, atol=1e-5, rtol=0, msg=pname)

    # The comparison has teeth: per-rank (local) losses train on a different objective.
    local_mean = sum(r["local"]["loss"] for r in ranks) / WORLD
    assert abs(local_mean - ref.detach()) > 1e-3
    worst = max((ranks[0]["local"]["grads"][n] - g).abs().max().item() for n, g in ref_grads.items())
    assert worst > 1e-4


def test_local_scope_equals_model_loss_and_gradients():
    model = tiny_model()
    batch = tiny_batch(6)
    own = model(**batch, return_loss=True).loss
    own.backward()
    own_grads = grads(model)
    model.zero_grad()

    out = model(**batch, return_loss=False)
    ours = clip_loss(out.image_embeds, out.text_embeds, model.logit_scale)
    ours.backward()
    torch.testing.assert_close(ours, own, atol=0, rtol=0)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, own_grads[name], atol=1e-7, rtol=0, msg=name)


def test_global_scope_without_process_group_is_local():
    assert not dist.is_initialized()
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(5, 16, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(5, 16, generator=gen), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07))
    assert torch.equal(clip_loss(images, texts, scale, "global"), clip_loss(images, texts, scale, "local"))


def test_bad_input_is_named():
    emb = torch.zeros(4, 16)
    with pytest.raises(ValueError, match="--loss_scope"):
        clip_loss(emb, emb, torch.tensor(0.0), scope="world")
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(emb, torch.zeros(3, 16), torch.tensor(0.0))
    with pytest.raises(ValueError, match="CLIP uses 100"):
        LogitScaleClamp(1.0)
    with pytest.raises(ValueError, match="no logit_scale"):
        clamp_logit_scale_(torch.nn.Linear(2, 2), 100.0)


def test_clamp_warns_when_given_in_log_units(caplog):
    LogitScaleClamp(math.log(100)).on_train_begin(None, None, None, model=tiny_model())
    assert "not its log" in caplog.text


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, rows: int):
        self.batch = tiny_batch(rows)

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def _collate(rows: list[dict]) -> dict:
    return {**{k: torch.stack([r[k] for r in rows]) for k in rows[0]}, "return_loss": True}


def _one_trainer_step(tmp_path, callbacks: list) -> float:
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))  # above CLIP's limit of 100
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,  # a step moves the parameter by ~lr: clamping before the step would show
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=_Pairs(4), data_collator=_collate, callbacks=callbacks
    )
    trainer.train()
    return model.logit_scale.item()


def test_clamp_callback_brings_scale_back_after_the_step_and_is_off_by_default(tmp_path):
    clamped = _one_trainer_step(tmp_path / "clamped", [LogitScaleClamp(100.0)])
    assert clamped == pytest.approx(math.log(100.0), abs=1e-6)

    unclamped = _one_trainer_step(tmp_path / "default", [])
    assert unclamped > math.log(100.0) + 0.5  # ln 200 - one small step
