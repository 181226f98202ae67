import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from clip_train.data import Collator
from clip_train.loss import clip_loss
from clip_train.trainer import normalize_pixels


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
