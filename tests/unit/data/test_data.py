import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from clip_train.data.dataset import Collator
from clip_train.train.loss import clip_loss
from clip_train.train.trainer import normalize_pixels


def samples(tokenizer, captions, size=64):
    rng = np.random.default_rng(0)
    return [
        {
            "input_ids": np.array(tokenizer(c)["input_ids"], np.int32),
            "pixel_values": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        }
        for c in captions
    ]


def test_collator_pads_to_longest_multiple_of_8_or_to_max(demo):
    _, model_dir = demo
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = samples(
        tok, ["a red circle", "a small purple triangle in the picture on a beige background today"]
    )
    longest = max(len(s["input_ids"]) for s in batch)
    out = Collator(tok.pad_token_id, 128)(batch)
    assert out["input_ids"].shape[1] == -(-longest // 8) * 8
    assert out["attention_mask"].sum(1).tolist() == [len(s["input_ids"]) for s in batch]
    assert out["pixel_values"].dtype == torch.uint8 and out["pixel_values"].shape == (2, 64, 64, 3)
    assert Collator(tok.pad_token_id, 128, pad_to_max_length=True)(batch)["input_ids"].shape[1] == 128
    assert (out["input_ids"][0, len(batch[0]["input_ids"]) :] == tok.pad_token_id).all()


def test_padding_does_not_change_the_loss(demo):
    _, model_dir = demo
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = samples(
        tok, ["a red circle", "a photo of a big blue square", "there is a triangle that is green"]
    )
    mean, std = (
        torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1),
        torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1),
    )
    losses = []
    for pad in (False, True):
        b = Collator(tok.pad_token_id, 128, pad_to_max_length=pad)(batch)
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        pixel_values=normalize_pixels(b["pixel_values"], mean, std))  # fmt: skip
        losses.append(clip_loss(out.image_embeds, out.text_embeds, model.logit_scale).item())
    assert abs(losses[0] - losses[1]) < 1e-5


def test_normalize_matches_the_reference_formula():
    img = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    mean, std = (
        torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1),
        torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1),
    )
    ref = (img.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    torch.testing.assert_close(normalize_pixels(img, mean, std), ref, atol=1e-5, rtol=1e-5)


# --- feeding: the loader settings run_clip.py picks when the command line gives none ---------------------------
def test_feeding_defaults_fill_only_what_the_user_left_unset(tmp_path):
    import json

    from transformers import TrainingArguments

    from clip_train.data.feeding import available_cpus, feeding_defaults, given_options

    argv = ["--dataloader_num_workers", "2", "--no_dataloader_pin_memory", "--output_dir=x"]
    assert given_options(argv) >= {"dataloader_num_workers", "dataloader_pin_memory", "output_dir"}
    (tmp_path / "args.json").write_text(json.dumps({"dataloader_pin_memory": True, "output_dir": "x"}))
    assert given_options([str(tmp_path / "args.json")]) == {"dataloader_pin_memory", "output_dir"}

    # CPU, image cache: batches are read in the training process; the user's worker count is kept when given.
    cpu = TrainingArguments(output_dir=str(tmp_path), dataloader_num_workers=3, use_cpu=True)
    assert feeding_defaults(cpu, set(), accelerator=False) == {"dataloader_num_workers": 0}
    assert cpu.dataloader_num_workers == 3  # chosen, not set: config/settle.py applies the choices
    assert feeding_defaults(cpu, {"dataloader_num_workers"}, accelerator=False) == {}
    assert not cpu.dataloader_pin_memory  # pinning on CPU is wasted work
    assert not cpu.dataloader_persistent_workers and cpu.dataloader_prefetch_factor is None
    # CPU, decoding on the fly: one worker per core (up to 8).
    fly = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert feeding_defaults(fly, set(), accelerator=False, image_cache=False) == {
        "dataloader_num_workers": min(8, available_cpus())
    }

    # Accelerator: a few workers, pinned memory with non-blocking copies, a deeper prefetch; persistent workers
    # stay as given (they would change the batches a resumed run sees).
    acc = TrainingArguments(output_dir=str(tmp_path), dataloader_persistent_workers=False)
    changed = feeding_defaults(acc, {"dataloader_persistent_workers"}, accelerator=True)
    assert changed["dataloader_num_workers"] == min(4, max(1, available_cpus() - 1))
    assert "dataloader_pin_memory" not in changed and acc.dataloader_pin_memory  # already on
    assert "dataloader_persistent_workers" not in changed and not acc.dataloader_persistent_workers
    assert changed["dataloader_prefetch_factor"] == 4 and changed["accelerator_config.non_blocking"] is True
    assert not acc.accelerator_config.non_blocking  # nothing set in place
