"""The text mask without a device check: the collator's widths and mask (none when nothing is padded), and the 4-D
form giving the same embeddings and losses as the 2-D mask transformers would have turned into it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from clip_train.data.dataset import Collator
from clip_train.train.loss import clip_loss
from clip_train.train.text_mask import full_mask, text_attention_mask


def sample(n_tokens: int) -> dict:
    return {
        "input_ids": np.arange(n_tokens, dtype=np.int32) + 5,
        "pixel_values": np.zeros((4, 4, 3), np.uint8),
    }


def test_collator_rounds_widths_to_the_multiple_capped_at_max_len() -> None:
    for multiple, lengths, width in ((8, (3, 9), 16), (16, (3, 9), 16), (16, (17,), 32), (1, (3, 9), 9),
                                     (32, (40, 90), 96), (32, (40, 120), 128), (64, (100,), 128)):  # fmt: skip
        out = Collator(1, 128, pad_to_multiple_of=multiple)([sample(n) for n in lengths])
        assert out["input_ids"].shape[1] == width, (multiple, lengths)
        assert out["attention_mask"].sum(1).tolist() == list(lengths)
    # pad_to_max_length wins; a caption longer than max_len (never from the tokenizer) keeps its length
    assert (
        Collator(1, 128, pad_to_max_length=True, pad_to_multiple_of=16)([sample(3)])["input_ids"].shape[1]
        == 128
    )


def test_collator_leaves_the_mask_out_when_nothing_is_padded() -> None:
    out = Collator(1, 128, pad_to_multiple_of=8)([sample(16), sample(16)])
    assert "attention_mask" not in out and out["input_ids"].shape == (2, 16)
    assert "attention_mask" in Collator(1, 128, pad_to_multiple_of=8)([sample(16), sample(15)])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_4d_mask_gives_the_losses_of_the_2d_mask_with_per_batch_and_max_padding(demo, impl: str) -> None:
    _, model_dir = demo
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation=impl).eval()
    assert model.text_model.config._attn_implementation == impl
    captions = ["a red circle", "a photo of a big blue square", "there is a triangle that is green", "a dot"]
    rng = np.random.default_rng(0)
    batch = [{"input_ids": np.array(tok(c)["input_ids"], np.int32),
              "pixel_values": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)} for c in captions]  # fmt: skip
    pixels = torch.from_numpy(np.stack([s["pixel_values"] for s in batch])).permute(0, 3, 1, 2).float() / 255
    losses, texts = [], []
    for pad, form in ((True, "2d"), (False, "2d"), (True, "4d"), (False, "4d")):
        b = Collator(tok.pad_token_id, 128, pad_to_max_length=pad)(batch)
        mask = b["attention_mask"] if form == "2d" else text_attention_mask(b["attention_mask"], impl)
        assert mask.dim() == (2 if form == "2d" else 4)
        with torch.no_grad():
            out = model(input_ids=b["input_ids"], attention_mask=mask, pixel_values=pixels)
        losses.append(clip_loss(out.image_embeds, out.text_embeds, model.logit_scale).item())
        texts.append(out.text_embeds)
    assert max(losses) - min(losses) < 1e-5, losses
    for t in texts[1:]:
        torch.testing.assert_close(t, texts[0], atol=1e-5, rtol=1e-5)


def test_no_mask_and_the_full_mask_equal_an_all_ones_2d_mask(demo) -> None:
    _, model_dir = demo
    model = AutoModel.from_pretrained(model_dir).eval()
    ids = torch.randint(5, 100, (3, 16))
    with torch.no_grad():
        ref = model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
        for mask in (None, full_mask(3, 16, "sdpa", ids.device)):
            got = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert text_attention_mask(torch.ones(2, 4), "flash_attention_2").dim() == 2  # others: as given


def test_the_eager_mask_follows_half_precision_weights(demo) -> None:
    """apex O2 runs the towers in fp16 weights without autocast: the additive mask must be fp16 too (an fp32 one
    makes the eager attention's next matmul fail), and it masks what the 2-D mask masks."""
    _, model_dir = demo
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval().to(torch.bfloat16)
    b = Collator(tok.pad_token_id, 128)([sample(3), sample(7)])
    mask = text_attention_mask(b["attention_mask"], "eager", torch.bfloat16)
    assert mask.dtype == torch.bfloat16
    with torch.no_grad():
        four_d = model.get_text_features(input_ids=b["input_ids"], attention_mask=mask).pooler_output
        two_d = model.get_text_features(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"]
        ).pooler_output
    torch.testing.assert_close(four_d, two_d)
