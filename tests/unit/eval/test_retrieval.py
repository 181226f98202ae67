"""Retrieval metrics: hand-built score matrices with known ranks, chunking, two gloo ranks, a tiny dual encoder."""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import (
    CLIPVisionConfig,
    RobertaConfig,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)

from clip_train.eval.retrieval import (
    embed_for_retrieval,
    gather_rows,
    retrieval_metrics,
    retrieval_ranks,
    shard_indices,
)


def embeds_from_scores(scores: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors whose image @ text.T is exactly ``scores`` [N_img, N_txt] (column norms must be <= 1).

    Images are one-hot; caption j holds column j plus a private dimension that tops its norm up to 1,
    so every dot product is a single exact product.
    """
    s = torch.tensor(scores, dtype=torch.float32)
    n_img, n_txt = s.shape
    images = torch.zeros(n_img, n_img + n_txt)
    images[:, :n_img] = torch.eye(n_img)
    texts = torch.zeros(n_txt, n_img + n_txt)
    texts[:, :n_img] = s.T
    texts[torch.arange(n_txt), n_img + torch.arange(n_txt)] = (1 - (s**2).sum(0)).clamp_min(0).sqrt()
    assert torch.equal(images @ texts.T, s)
    return images, texts


# 3 images; captions 0,1 -> image 0; 2,3,4 -> image 1; 5 -> image 2.
HAND_SCORES = [
    [0.1, 0.5, 0.6, 0.2, 0.3, 0.0],
    [0.7, 0.1, 0.2, 0.4, 0.3, 0.4],
    [0.0, 0.1, 0.1, 0.1, 0.1, 0.3],
]
HAND_T2I = torch.tensor([0, 0, 1, 1, 1, 2])
# image 0: best own caption 0.5, beaten by caption 2 (0.6) -> 2
# image 1: best own caption 0.4, beaten by caption 0 (0.7), tied by caption 5 (0.4, ties count against) -> 3
# image 2: own caption 0.3 is the top -> 1
HAND_I2T = [2, 3, 1]
# caption 4: own image 1 scores 0.3, image 0 ties it -> 2; caption 5: image 1 (0.4) beats image 2 (0.3) -> 2
HAND_T2I_RANKS = [2, 1, 2, 1, 2, 2]


def brute_force_ranks(s: torch.Tensor, t2i: torch.Tensor) -> tuple[list[int], list[int]]:
    """The protocol written as plainly as possible, on the whole matrix."""
    n_img, n_txt = s.shape
    i2t = []
    for i in range(n_img):
        own = [t for t in range(n_txt) if t2i[t] == i]
        best = max(float(s[i, t]) for t in own)
        i2t.append(1 + sum(1 for t in range(n_txt) if t not in own and float(s[i, t]) >= best))
    t2i_ranks = []
    for t in range(n_txt):
        own = int(t2i[t])
        t2i_ranks.append(1 + sum(1 for i in range(n_img) if i != own and float(s[i, t]) >= float(s[own, t])))
    return i2t, t2i_ranks


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4096])
def test_hand_built_ranks_and_metrics(chunk_size: int) -> None:
    images, texts = embeds_from_scores(HAND_SCORES)
    i2t, t2i = retrieval_ranks(images, texts, HAND_T2I, chunk_size=chunk_size)
    assert i2t.tolist() == HAND_I2T
    assert t2i.tolist() == HAND_T2I_RANKS
    m = retrieval_metrics(images, texts, HAND_T2I, ks=(1, 2, 5), chunk_size=chunk_size)
    assert m == pytest.approx(
        {
            "image_to_text_R@1": 100 / 3,
            "image_to_text_R@2": 200 / 3,
            "image_to_text_R@5": 100.0,
            "image_to_text_mean_rank": 2.0,
            "image_to_text_median_rank": 2.0,
            "text_to_image_R@1": 100 / 3,
            "text_to_image_R@2": 100.0,
            "text_to_image_R@5": 100.0,  # K beyond the 3 candidate images
            "text_to_image_mean_rank": 10 / 6,
            "text_to_image_median_rank": 2.0,  # median of 1,1,2,2,2,2
        }
    )


def test_default_keys_are_exact() -> None:
    images, texts = embeds_from_scores(HAND_SCORES)
    keys = set(retrieval_metrics(images, texts, HAND_T2I))
    assert keys == {
        f"{d}_{m}"
        for d in ("image_to_text", "text_to_image")
        for m in ("R@1", "R@5", "R@10", "mean_rank", "median_rank")
    }


def test_even_count_median_is_mean_of_middle_ranks() -> None:
    # Two images, one caption each; caption 1 prefers image 0 -> text->image ranks [1, 2], median 1.5.
    images, texts = embeds_from_scores([[0.9, 0.5], [0.1, 0.4]])
    m = retrieval_metrics(images, texts, torch.tensor([0, 1]))
    assert m["text_to_image_median_rank"] == 1.5
    assert m["image_to_text_median_rank"] == 1.0  # each image scores its own caption highest


def test_collapsed_model_gets_the_worst_rank_and_big_k_gives_100() -> None:
    # Every embedding equal: all scores tie, so every right answer is ranked behind every wrong one.
    n_img, t2i = 4, torch.tensor([0, 0, 1, 2, 3, 3, 3])
    images = torch.nn.functional.normalize(torch.ones(n_img, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.ones(len(t2i), 8), dim=-1)
    i2t, t2i_ranks = retrieval_ranks(images, texts, t2i)
    assert i2t.tolist() == [6, 7, 7, 5]  # 1 + number of other images' captions
    assert t2i_ranks.tolist() == [4] * 7
    m = retrieval_metrics(images, texts, t2i, ks=(1, 3, 4, 50))
    assert m["image_to_text_R@1"] == 0.0 and m["text_to_image_R@1"] == 0.0
    assert m["text_to_image_R@3"] == 0.0 and m["text_to_image_R@4"] == 100.0
    assert m["image_to_text_R@50"] == 100.0 and m["text_to_image_R@50"] == 100.0


def test_many_ties_match_brute_force_at_every_chunk_size() -> None:
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 7, 20
    scores = (torch.randint(0, 4, (n_img, n_txt), generator=g) / 10).tolist()  # values 0..0.3, many ties
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    t2i = t2i[torch.randperm(n_txt, generator=g)]
    images, texts = embeds_from_scores(scores)
    want = brute_force_ranks(images @ texts.T, t2i)
    for chunk_size in (1, 3, 5, 10_000):
        i2t, t2i_ranks = retrieval_ranks(images, texts, t2i, chunk_size=chunk_size)
        assert (i2t.tolist(), t2i_ranks.tolist()) == want, chunk_size


def test_chunking_does_not_change_random_embeddings() -> None:
    g = torch.Generator().manual_seed(1)
    n_img, n_txt = 40, 190
    images = torch.nn.functional.normalize(torch.randn(n_img, 16, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(n_txt, 16, generator=g), dim=-1)
    t2i = torch.arange(n_txt) % n_img
    want = brute_force_ranks(images @ texts.T, t2i)
    for chunk_size in (1, 3, 64, 4096):
        i2t, t2i_ranks = retrieval_ranks(images, texts, t2i, chunk_size=chunk_size)
        assert (i2t.tolist(), t2i_ranks.tolist()) == want, chunk_size
    results = [retrieval_metrics(images, texts, t2i, chunk_size=c) for c in (1, 3, 4096)]
    assert results[0] == results[1] == results[2]
    assert 0 < results[0]["text_to_image_R@10"] < 100  # random embeddings: neither trivial nor perfect


def test_accepts_float64_embeddings_and_int32_index() -> None:
    images, texts = embeds_from_scores(HAND_SCORES)
    i2t, t2i = retrieval_ranks(images.double(), texts.double(), HAND_T2I.int())
    assert i2t.tolist() == HAND_I2T and t2i.tolist() == HAND_T2I_RANKS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda i, t, m: (i * 2, t, m), "not L2-normalised"),
        (lambda i, t, m: (i, t.clone().fill_(float("nan")), m), "NaN"),
        (lambda i, t, m: (i, t, torch.tensor([0, 0, 1, 1, 1, 1])), "no caption"),
        (lambda i, t, m: (i, t, torch.tensor([0, 0, 1, 1, 3, 2])), r"\[0, 3\)"),
        (lambda i, t, m: (i, t, m[:-1]), "one image index per caption"),
        (lambda i, t, m: (i, t, m.float()), "integer"),
        (lambda i, t, m: (i[:, :-1], t, m), "same D"),
        (lambda i, t, m: (i[:0], t, m), "at least one image"),
    ],
)
def test_bad_input_names_the_problem(change, message: str) -> None:
    images, texts = embeds_from_scores(HAND_SCORES)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(*change(images, texts, HAND_T2I))


def test_bad_ks_and_chunk_size() -> None:
    images, texts = embeds_from_scores(HAND_SCORES)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(images, texts, HAND_T2I, ks=(0, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(images, texts, HAND_T2I, chunk_size=0)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 25_014])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_indices_cover_once_and_balance(n: int, world: int) -> None:
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    assert all(s.step == 1 for s in shards)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_indices_rejects_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, 2, 2)


def test_gather_rows_single_process_is_identity() -> None:
    x = torch.randn(5, 3)
    assert gather_rows(x, 5) is x
    with pytest.raises(ValueError, match="expected all 6 rows"):
        gather_rows(x, 6)


# ---- a tiny clip-roberta, built from configs ----


def tiny_dual_encoder() -> VisionTextDualEncoderModel:
    vision = CLIPVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    text = RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40,
    )  # fmt: skip
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    torch.manual_seed(0)
    return VisionTextDualEncoderModel(config)


def tiny_data(n_img: int, n_txt: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n_txt,), generator=g)
    ids = torch.randint(3, 100, (n_txt, 12), generator=g)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 1)  # RoBERTa's pad id
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    return {"pixels": torch.randn(n_img, 3, 32, 32, generator=g), "ids": ids, "mask": mask, "t2i": t2i}


def batches(data: dict[str, torch.Tensor], img_rows: range, txt_rows: range, bs_img: int, bs_txt: int):
    """Image batches, and caption batches padded to their own longest caption (as a collator does)."""
    pixels = data["pixels"][img_rows.start : img_rows.stop]
    image_batches = [pixels[i : i + bs_img] for i in range(0, len(pixels), bs_img)]
    text_batches = []
    for i in range(txt_rows.start, txt_rows.stop, bs_txt):
        sl = slice(i, min(i + bs_txt, txt_rows.stop))
        width = int(data["mask"][sl].sum(1).max())
        text_batches.append(
            {"input_ids": data["ids"][sl, :width], "attention_mask": data["mask"][sl, :width]}
        )
    return image_batches, text_batches


def test_embed_for_retrieval_matches_the_models_own_embeddings() -> None:
    model = tiny_dual_encoder()
    model.train()
    data = tiny_data(5, 9)
    image_batches, text_batches = batches(data, range(5), range(9), bs_img=2, bs_txt=4)
    images, texts = embed_for_retrieval(model, image_batches, text_batches, "cpu")
    assert model.training  # mode restored
    assert images.shape == (5, 16) and texts.shape == (9, 16)
    assert images.dtype == texts.dtype == torch.float32 and images.device.type == "cpu"
    assert torch.allclose(images.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.allclose(texts.norm(dim=1), torch.ones(9), atol=1e-6)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=data["ids"], attention_mask=data["mask"], pixel_values=data["pixels"])
    assert torch.allclose(images, out.image_embeds, atol=1e-5)
    assert torch.allclose(texts, out.text_embeds, atol=1e-5)
    # With return_dict off the 5.x feature methods return tuples; the embedding is still found.
    model.config.return_dict = False
    images2, texts2 = embed_for_retrieval(model, image_batches, text_batches, "cpu")
    assert torch.equal(images, images2) and torch.equal(texts, texts2)
    # No batches (a rank whose shard is empty): [0, projection_dim].
    empty_images, empty_texts = embed_for_retrieval(model, [], [], "cpu")
    assert empty_images.shape == empty_texts.shape == (0, 16)


class TensorReturningModel(torch.nn.Module):
    """A real module shaped like a transformers 4.x dual encoder, whose feature methods return tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.image_proj = torch.nn.Linear(3, 4, bias=False)
        self.text_emb = torch.nn.Embedding(10, 4)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.image_proj(pixel_values.mean(dim=(2, 3)))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.text_emb(input_ids).mean(1)


def test_embed_for_retrieval_accepts_tensor_returning_models() -> None:
    model = TensorReturningModel()
    pixels, ids = torch.randn(3, 3, 2, 2), torch.tensor([[1, 2], [3, 4]])
    images, texts = embed_for_retrieval(model, [pixels], [{"input_ids": ids}], torch.device("cpu"))
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.get_image_features(pixels), dim=-1)
    assert torch.allclose(images, want) and texts.shape == (2, 4)
    with pytest.raises(KeyError, match="input_ids"):
        embed_for_retrieval(model, [], [{"ids": ids}], "cpu")


# ---- two real ranks on gloo ----

N_IMG, N_TXT = 7, 33  # uneven shards: 4/3 images, 17/16 captions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, tmp: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        data = torch.load(Path(tmp, "data.pt"))
        model = VisionTextDualEncoderModel.from_pretrained(Path(tmp, "model"))
        image_batches, text_batches = batches(
            data, shard_indices(N_IMG, rank, world), shard_indices(N_TXT, rank, world), bs_img=2, bs_txt=5
        )
        images, texts = embed_for_retrieval(model, image_batches, text_batches, "cpu")
        images, texts = gather_rows(images, N_IMG), gather_rows(texts, N_TXT)
        out = {"images": images, "texts": texts, "metrics": retrieval_metrics(images, texts, data["t2i"])}
        # One row over two ranks: rank 1's shard is empty, and of a shape that says nothing of the rows.
        one = torch.arange(3.0)[None] if rank == 0 else torch.empty(0, 0)
        out["one_row"] = gather_rows(one, 1)
        # Not from shard_indices: the shorter shard first, so padding must be trimmed per rank.
        out["short_first"] = gather_rows(torch.full((1 + 2 * rank, 2), float(rank)), 4)
        try:
            gather_rows(torch.zeros(len(shard_indices(10, rank, world)), 2), 11)
        except ValueError as e:
            out["wrong_total"] = str(e)
        torch.save(out, Path(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_metrics(tmp_path: Path) -> None:
    model = tiny_dual_encoder()
    model.save_pretrained(tmp_path / "model")
    data = tiny_data(N_IMG, N_TXT, seed=3)
    torch.save(data, tmp_path / "data.pt")
    # One process, other batch sizes: the ranks' batches differ, the metrics must not.
    image_batches, text_batches = batches(data, range(N_IMG), range(N_TXT), bs_img=3, bs_txt=8)
    images, texts = embed_for_retrieval(model, image_batches, text_batches, "cpu")
    want = retrieval_metrics(images, texts, data["t2i"])

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["metrics"] == want, rank
        assert torch.allclose(got["images"], images, atol=1e-6)
        assert torch.allclose(got["texts"], texts, atol=1e-6)
        assert torch.equal(got["one_row"], torch.arange(3.0)[None])
        assert got["short_first"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
        assert "hold 10 rows" in got["wrong_total"] and "expected 11" in got["wrong_total"]
    assert not all(math.isclose(v, 100.0) for k, v in want.items() if "R@1" in k)
