"""Contrastive accumulation (gradient caching): K micro-batches train as one batch of K x B, alone, under real
gloo DDP with --loss_scope global, in a real ClipTrainer run, and through a kill and resume."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import RECIPE
from runner import finish, kill_all, losses, start
from test_loss import free_port, grads
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPVisionConfig,
    RobertaConfig,
    TrainerCallback,
    TrainingArguments,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

from clip_train.checkpoint.layout import complete_checkpoints
from clip_train.data.dataset import ClipDataset, Collator, tokenize_captions
from clip_train.device import backend
from clip_train.model import checkpoint_towers, freeze_towers
from clip_train.train import accumulation
from clip_train.train.accumulation import grad_cache_step
from clip_train.train.loss import clip_loss
from clip_train.train.trainer import ClipTrainer

SEQ = 12
TOL = {"atol": 1e-5, "rtol": 0}


def tiny_model(dropout: float, seed: int = 0) -> VisionTextDualEncoderModel:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, attention_dropout=dropout)  # fmt: skip
    text = RobertaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=SEQ + 4, hidden_dropout_prob=dropout,
                         attention_probs_dropout_prob=dropout)  # fmt: skip
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    torch.manual_seed(seed)
    return VisionTextDualEncoderModel(config).float().train()


def tiny_batch(rows: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Captions of 3..SEQ tokens padded to SEQ (so each micro-batch can also be cut to its own width)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, SEQ + 1, (rows,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, 100, (rows, SEQ), generator=gen).masked_fill(mask == 0, 1)
    ids[:, 0] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(rows, 3, 32, 32, generator=gen),
    }


def split(batch: dict, parts: int, own_width: bool = False) -> list[dict]:
    """``parts`` micro-batches in order; own_width: each cut to its longest caption (per-batch padding)."""
    chunks = [
        dict(zip(batch, vals, strict=True))
        for vals in zip(*(v.chunk(parts) for v in batch.values()), strict=True)
    ]
    if own_width:
        for c in chunks:
            width = int(c["attention_mask"].sum(1).max())
            c["input_ids"], c["attention_mask"] = c["input_ids"][:, :width], c["attention_mask"][:, :width]
    return chunks


def embed(model: torch.nn.Module, batch: dict):
    return model(**batch, return_loss=False)


def cached(model, chunks: list[dict], seed: int = 5, **kwargs) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = grad_cache_step(model, chunks, embed, getattr(model, "module", model).logit_scale, **kwargs)
    return loss, grads(getattr(model, "module", model))


def full_graph(model, chunks: list[dict], seed: int = 5) -> tuple[torch.Tensor, dict]:
    """The reference: every micro-batch forward with its graph kept (the same draws from the generator in the same
    order as gradient caching's first pass), one loss over all of them, one backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    outs = [embed(model, c) for c in chunks]
    loss = clip_loss(torch.cat([o.image_embeds for o in outs]), torch.cat([o.text_embeds for o in outs]),
                     model.logit_scale)  # fmt: skip
    loss.backward()
    return loss.detach(), grads(model)


def assert_same(got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert got[1].keys() == want[1].keys()
    for name, g in want[1].items():
        if g is None:
            assert got[1][name] is None, name
        else:
            torch.testing.assert_close(got[1][name], g, **TOL, msg=name)


def worst(a: dict, b: dict) -> float:
    return max((a[n] - g).abs().max().item() for n, g in b.items() if g is not None)


# --- one process ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["plain", "gradient_checkpointing", "frozen_vision"])
def test_four_micro_batches_equal_one_batch_of_64_with_dropout_on(variant):
    model = tiny_model(dropout=0.1)
    if variant == "gradient_checkpointing":
        # (the dual encoder itself does not support it: --gradient_checkpointing raises in the Trainer; its towers do)
        model.vision_model.gradient_checkpointing_enable()
        model.text_model.gradient_checkpointing_enable()
    if variant == "frozen_vision":
        freeze_towers(model, vision=True, text=False)
    chunks = split(tiny_batch(64), 4)
    got, want = cached(model, chunks), full_graph(model, chunks)
    assert_same(got, want)
    assert all(
        g is not None for n, g in got[1].items() if not (variant == "frozen_vision" and "vision_model" in n)
    )
    # Teeth: without the RNG replay the second forward draws other dropout masks, and the gradients go wrong.
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(accumulation, "replaying", lambda state, device: contextlib.nullcontext())
        assert worst(cached(model, chunks)[1], want[1]) > 1e-4
    # ... and the Trainer's own accumulation (mean of 4 in-batch losses) is another objective.
    torch.manual_seed(5)
    mean = (
        sum(
            clip_loss(o.image_embeds, o.text_embeds, model.logit_scale)
            for o in (embed(model, c) for c in chunks)
        )
        / 4
    )
    assert abs(mean.item() - want[0].item()) > 1e-2


def test_without_dropout_equals_the_model_on_the_whole_batch():
    model = tiny_model(dropout=0.0)
    batch = tiny_batch(64)
    model.zero_grad()
    whole = model(**batch, return_loss=True).loss
    whole.backward()
    assert_same(cached(model, split(batch, 4)), (whole.detach(), grads(model)))


def test_micro_batches_padded_to_their_own_widths_equal_one_width():
    model = tiny_model(dropout=0.0)
    batch = tiny_batch(64)
    # Micro-batch k's captions are at most 5 + 2k tokens long: each has a width of its own.
    cap = 5 + 2 * (torch.arange(64) // 16)
    batch["attention_mask"] = (torch.arange(SEQ)[None, :] < cap[:, None]).long() * batch["attention_mask"]
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 1)
    own = split(batch, 4, own_width=True)
    assert len({c["input_ids"].shape[1] for c in own}) > 1  # the widths really differ
    assert_same(cached(model, own), cached(model, split(batch, 4)))


def test_loss_scaler_scales_the_gradients_not_the_loss():
    """A GradScaler (what --fp16 brings on a GPU) scales what each replay back-propagates, as it scales a loss."""
    model = tiny_model(dropout=0.1)
    chunks = split(tiny_batch(32), 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss, scaled = cached(model, chunks, backward=lambda x: scaler.scale(x).backward())
    ref_loss, ref = cached(model, chunks)
    assert_same((loss, {n: g / 1024.0 for n, g in scaled.items()}), (ref_loss, ref))


def counting_mean(
    calls, bucket
):  # unannotated: DDP checks the annotations, which __future__ turns to strings
    """DDP's own gradient averaging, counting the bucket reductions."""
    calls.append(1)
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda f: f.value()[0] / dist.get_world_size())


# --- two gloo processes, --loss_scope global --------------------------------------------------------------------
def _ddp_worker(rank: int, port: int, state_path: str, batch: dict, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = {k: v[rank * 32 : (rank + 1) * 32] for k, v in batch.items()}
        found = {}
        for find_unused in (False, True):  # DDP's default; what the Trainer passes for a PreTrainedModel
            model = tiny_model(dropout=0.0)
            model.load_state_dict(torch.load(state_path))
            ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
            reductions: list[int] = []
            ddp.register_comm_hook(reductions, counting_mean)
            loss, g = cached(ddp, split(mine, 2), scope="global", no_sync=ddp.no_sync)
            found[find_unused] = {"loss": loss, "grads": g, "reductions": len(reductions)}
        # One plain DDP step of one micro-batch: how many bucket reductions a synchronised backward takes.
        model = tiny_model(dropout=0.0)
        ddp = DistributedDataParallel(model)
        plain: list[int] = []
        ddp.register_comm_hook(plain, counting_mean)
        out = ddp(**mine, return_loss=False)
        clip_loss(out.image_embeds, out.text_embeds, model.logit_scale, "global").backward()
        found["plain_reductions"] = len(plain)
        torch.save(found, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_global_scope_two_micro_batches_each_equal_one_batch_of_64(tmp_path):
    model = tiny_model(dropout=0.0)
    state_path = str(tmp_path / "state.pt")
    torch.save(model.state_dict(), state_path)
    batch = tiny_batch(64)
    whole = model(**batch, return_loss=True).loss
    whole.backward()
    want = (whole.detach(), grads(model))

    mp.spawn(_ddp_worker, args=(free_port(), state_path, batch, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for find_unused in (False, True):
        mean_loss = sum(r[find_unused]["loss"] for r in ranks) / 2  # the Trainer logs the mean over ranks
        for r in ranks:
            assert_same((mean_loss, r[find_unused]["grads"]), want)
            # DDP reduced once per step (no_sync held the first micro-batch's gradients), not once per micro-batch.
            assert r[find_unused]["reductions"] == r["plain_reductions"]


# --- the real ClipTrainer ---------------------------------------------------------------------------------------
class Probe(TrainerCallback):
    """The gradients before the first optimizer step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.first = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs) -> None:
        if self.first is None:
            self.first = grads(self.model)


def demo_dataset(model_dir: str, rows: int = 128) -> tuple:
    tok = AutoTokenizer.from_pretrained(model_dir)
    words = "a red blue big small photo of the circle square triangle on green picture there is white".split()
    rng = random.Random(0)
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 20))) for _ in range(rows)]
    flat, offsets = tokenize_captions(captions, tok, 128, None, None, False)
    pixels = np.random.default_rng(0).integers(0, 255, (rows, 64, 64, 3), dtype=np.uint8)
    return tok, ClipDataset(flat, offsets, np.arange(rows), pixels)


def train(model_dir: str, out: str, batch: int, steps: int, mode: str = "contrastive", dropout: bool = False,
          plan: backend.BackendPlan | None = None, checkpointing: bool = False):  # fmt: skip
    """Two optimizer steps of a real ClipTrainer: (logged losses, first step's gradients, final weights)."""
    tok, ds = demo_dataset(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    if not dropout:  # a B = 64 batch draws other masks than four of 16: compare without dropout
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=steps, learning_rate=1e-3, weight_decay=0.1,
                             report_to="none", save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                             logging_steps=1, max_grad_norm=0.0, seed=3, disable_tqdm=True)  # fmt: skip
    if checkpointing:  # as run_clip.py does for --gradient_checkpointing (the Trainer's own flag stays off)
        checkpoint_towers(model)
    if plan is not None:
        args = backend.apply_plan(args, plan)
    probe = Probe(model)
    trainer = ClipTrainer(model=model, args=args, train_dataset=ds, data_collator=Collator(tok.pad_token_id, 128),
                          image_mean=[0.5] * 3, image_std=[0.25] * 3, callbacks=[probe], accumulation_mode=mode,
                          retrieval=False, backend_plan=plan)  # fmt: skip
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return logged, probe.first, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def test_trainer_k4_b16_takes_the_steps_of_b64(demo, tmp_path):
    _, model_dir = demo
    big_loss, big_grads, big_weights, _ = train(model_dir, str(tmp_path / "b64"), 64, 1)
    loss, first, weights, trainer = train(model_dir, str(tmp_path / "k4"), 16, 4)
    assert loss == pytest.approx(big_loss, abs=1e-5) and len(loss) == 2
    assert_same((torch.tensor(0.0), first), (torch.tensor(0.0), big_grads))
    for name, w in big_weights.items():
        torch.testing.assert_close(weights[name], w, **TOL, msg=name)
    assert trainer.global_batch() == 64  # FPS counts samples, K x B per optimizer step

    # --accumulation_mode mean is the Trainer's own: the mean of the four micro-batches' in-batch gradients.
    mean_loss, mean_grads, _, _ = train(model_dir, str(tmp_path / "mean"), 16, 4, mode="mean")
    model = AutoModel.from_pretrained(model_dir)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tok, ds = demo_dataset(model_dir)
    trainer = ClipTrainer(model=model, args=TrainingArguments(str(tmp_path / "x"), use_cpu=True, seed=3,
                          per_device_train_batch_size=16, report_to="none", dataloader_num_workers=0),
                          train_dataset=ds, data_collator=Collator(tok.pad_token_id, 128), image_mean=[0.5] * 3,
                          image_std=[0.25] * 3)  # fmt: skip
    loader = iter(trainer.get_train_dataloader())  # the same sampler and seed: the first step's micro-batches
    model.train()
    total = 0.0
    for _ in range(4):
        loss = trainer.compute_loss(model, next(loader)) / 4
        loss.backward()
        total += loss.item()
    assert mean_loss[0] == pytest.approx(total, abs=1e-5)
    assert_same((torch.tensor(0.0), mean_grads), (torch.tensor(0.0), grads(model)))
    assert worst(mean_grads, big_grads) > 1e-4  # and it is not the contrastive one


def test_apex_o2_stand_in_backpropagates_each_micro_batch_through_scale_loss(demo, standins, tmp_path):
    """The Ascend recipe's path (stand-in apex, tests/standins: no NPU here): each micro-batch's replay goes
    through amp.scale_loss, and the first step's loss equals one batch of 16 (the stand-in now accumulates what each
    scale_loss unscales into the fp32 master grads, as apex O2 does; the exact gradients are checked in fp32 above)."""
    import apex

    _, model_dir = demo
    # A static scale fp16 gradients survive (the recipe's 12800000 overflows them: tests/unit/device/test_apex_amp.py).
    recipe = {**RECIPE, "loss_scale": "128"}
    plan = backend.make_backend_plan("npu", **recipe, optim="adamw_apex_fused_npu", use_combine_grad=True,
                             apex_available=True)  # fmt: skip
    want, _, _, _ = train(model_dir, str(tmp_path / "b16"), 16, 1, plan=plan)
    apex.amp.CALLS.clear()
    got, _, _, _ = train(model_dir, str(tmp_path / "k2"), 8, 2, plan=plan)
    calls = [c[0] for c in apex.amp.CALLS if c[0] != "initialize"]
    norm = "clip_optimizer_grad_norm_fused"  # clipping off, but the norm is the fp32 masters' (issue 25.12)
    assert calls == ["scale_loss", "scale_loss", norm, "step"] * 2
    assert got[0] == pytest.approx(want[0], abs=1e-4) and np.isfinite(got).all()


def test_gradient_checkpointing_runs_on_the_towers_and_changes_nothing(demo, tmp_path):
    """--gradient_checkpointing with K = 2 and dropout on: the same losses and weights (the Trainer alone raises:
    the dual encoder declares no checkpointing support; checkpoint_towers checkpoints its towers)."""
    _, model_dir = demo
    want, _, weights, _ = train(model_dir, str(tmp_path / "plain"), 8, 2, dropout=True)
    got, _, ckpt_weights, trainer = train(
        model_dir, str(tmp_path / "ckpt"), 8, 2, dropout=True, checkpointing=True
    )
    assert (
        trainer.model.text_model.is_gradient_checkpointing
        and trainer.model.vision_model.is_gradient_checkpointing
    )
    assert got == pytest.approx(want, abs=1e-5)
    for name, w in weights.items():
        torch.testing.assert_close(ckpt_weights[name], w, **TOL, msg=name)


# --- kill and resume --------------------------------------------------------------------------------------------
def test_killed_and_resumed_k4_run_ends_at_the_uninterrupted_losses(demo, tmp_path):
    data_dir, model_dir = demo
    import sys

    def cmd(out: str) -> list[str]:
        return [sys.executable, "run_clip.py", "--output_dir", out, "--model_name_or_path", model_dir,
                "--data_dir", data_dir, "--do_train", "--max_train_samples", "96",
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4",
                "--dataloader_drop_last", "--dataloader_num_workers", "1", "--max_steps", "12",
                "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3", "--seed", "7",
                "--report_to", "none", "--use_cpu"]  # fmt: skip

    ref_out, out = str(tmp_path / "reference"), str(tmp_path / "killed")
    ref = start(cmd(ref_out), ref_out + ".log")
    killed = start(cmd(out), out + ".log")
    try:
        deadline = time.monotonic() + 300
        while not any(int(c.rsplit("-", 1)[1]) >= 6 for c in complete_checkpoints(out)):
            assert killed.poll() is None, open(out + ".log").read()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        kill_all(killed)
        assert killed.returncode == -signal.SIGKILL
        resumed_from = complete_checkpoints(out)[-1]
        killed = start(cmd(out), out + ".rerun.log")
        log = finish(killed, out + ".rerun.log")
        ref_log = finish(ref, ref_out + ".log")
    finally:
        for p in (ref, killed):
            if p.poll() is None:
                kill_all(p)
    assert "contrastive over 4 micro-batches of 4: each step scores 16 samples" in ref_log
    assert f"Resuming from {resumed_from}" in log
    got, want = losses(out), losses(ref_out)
    assert sorted(got) == list(range(1, 13)) == sorted(want)
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), (s, resumed_from)
    assert os.path.exists(os.path.join(out, "all_results.json"))


def test_bad_mode_is_refused_by_the_trainer_too():
    # The command line's one-line error for --accumulation_mode is a row of tests/unit/config/test_bad_args.py.
    with pytest.raises(ValueError, match="contrastive"):
        ClipTrainer(model=tiny_model(0.0), image_mean=[0.5] * 3, image_std=[0.5] * 3, accumulation_mode="sum")
