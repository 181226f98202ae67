"""Retrieval evaluation on the validation split: every unique image and every distinct caption embedded once,
sharded over ranks and gathered, then R@K both ways (see retrieval.py for the protocol and the tie rule).

Every batch the model sees here has a fixed shape: ``batch_size`` rows (a short last batch repeats its first
row) and, for captions, a width set by the caption's own length (captions are sorted by length and batched
within one width). A row's embedding then does not depend on which rows share its batch wherever kernels
depend only on shapes (so on CPU; checked by the tests): 1 or N ranks give bit-identical embeddings and the
same metrics. Identical captions (same token ids) are embedded once, so they tie exactly and the tie counts
against the model. Ranks take every world-th caption of the length order, so each gets short and long ones.

Images that fail to decode (the on-the-fly path returns None) are left out together with their captions, as
the image cache leaves out the rows of bad images; the metrics say how many images and captions they cover.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from clip_train.data.dataset import ClipDataset, pad_captions
from clip_train.eval.retrieval import embed_for_retrieval, gather_rows, retrieval_metrics, shard_indices

logger = logging.getLogger(__name__)


class RetrievalSkipped(RuntimeError):
    """Retrieval metrics cannot be computed for this evaluation; the message says why. Training may go on."""


def unique_captions(ds: ClipDataset) -> tuple[list[np.ndarray], np.ndarray]:
    """Distinct token sequences in first-seen order, and each caption row's index into them."""
    index: dict[bytes, int] = {}
    uniq: list[np.ndarray] = []
    inverse = np.empty(len(ds), dtype=np.int64)
    for i in range(len(ds)):
        ids = ds.flat_ids[ds.offsets[i] : ds.offsets[i + 1]]
        j = index.setdefault(ids.tobytes(), len(uniq))
        if j == len(uniq):
            uniq.append(ids)
        inverse[i] = j
    return uniq, inverse


def _fill(rows: list, batch_size: int) -> list:
    return rows + [rows[0]] * (batch_size - len(rows))


def _caption_batches(
    captions: list[np.ndarray], batch_size: int
) -> Iterator[tuple[list[np.ndarray], int, int]]:
    """(rows filled to batch_size, real rows, width); captions must come sorted by length."""
    group: list[np.ndarray] = []
    width = 0
    for ids in captions:
        w = -(-max(len(ids), 1) // 8) * 8
        if group and (w != width or len(group) == batch_size):
            yield _fill(group, batch_size), len(group), width
            group = []
        group.append(ids)
        width = w
    if group:
        yield _fill(group, batch_size), len(group), width


def retrieval_eval(
    model: Any,
    ds: ClipDataset,
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    rank: int,
    world: int,
    pixels: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """Image<->text recall on ``ds``; every rank calls it and gets the same metrics.

    Adds ``retrieval_images`` and ``retrieval_captions``: how many the metrics cover. Raises
    RetrievalSkipped when no image decodes or the embeddings are not finite (a diverged model).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    used, text_to_image = np.unique(ds.image_index, return_inverse=True)  # only images that have captions
    img_rows = shard_indices(len(used), rank, world)
    valid = np.ones(len(img_rows), dtype=bool)

    def image_batches() -> Iterator[torch.Tensor]:
        rows: list[np.ndarray] = []
        for j, i in enumerate(used[img_rows.start : img_rows.stop]):
            array = ds.images[i]
            if array is None:  # decode failed (logged by the reader)
                valid[j] = False
                continue
            rows.append(array)
            if len(rows) == batch_size:
                yield pixels(torch.from_numpy(np.stack(rows)).to(device))
                rows = []
        if rows:
            yield pixels(torch.from_numpy(np.stack(_fill(rows, batch_size))).to(device))

    uniq, caption_to_uniq = unique_captions(ds)
    order = np.argsort(np.fromiter((len(x) for x in uniq), np.int64, len(uniq)), kind="stable")
    # Every world-th caption of the length order: each rank gets short and long ones alike.
    dealt = [order[r::world] for r in range(world)]
    real: list[int] = []

    def text_batches() -> Iterator[dict[str, torch.Tensor]]:
        for rows, n, width in _caption_batches([uniq[u] for u in dealt[rank]], batch_size):
            real.append(n)
            input_ids, mask = pad_captions(rows, pad_id, width)
            yield {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

    # float32 from here on, whatever the autocast or the model's dtype; retrieval_metrics turns autocast off.
    images, texts = embed_for_retrieval(model, image_batches(), text_batches(), device)
    local = torch.zeros(len(img_rows), images.shape[1])
    local[torch.from_numpy(valid)] = images[: int(valid.sum())]
    if texts.shape[0]:
        texts = torch.cat([b[:n] for b, n in zip(texts.split(batch_size), real, strict=True)])
    ok = torch.from_numpy(valid).long()
    if world > 1:
        local = gather_rows(local.to(device), len(used)).cpu()
        ok = gather_rows(ok.to(device), len(used)).cpu()
        texts = gather_rows(texts.to(device), len(uniq)).cpu()
    by_uniq = torch.empty_like(texts)
    by_uniq[torch.from_numpy(np.concatenate(dealt) if world > 1 else order)] = texts
    images, texts = local, by_uniq[torch.from_numpy(caption_to_uniq)]
    t2i = torch.from_numpy(text_to_image.astype(np.int64))

    ok = ok.bool()
    if not ok.all():
        keep = ok[t2i]
        logger.warning(
            "retrieval: %d of %d validation images could not be decoded; left out with their %d captions",
            int((~ok).sum()),
            len(ok),
            int((~keep).sum()),
        )
        new_index = torch.cumsum(ok.long(), 0) - 1
        images, texts, t2i = images[ok], texts[keep], new_index[t2i[keep]]
    if images.shape[0] == 0:
        raise RetrievalSkipped("no validation image could be decoded")
    for name, emb in (("image", images), ("caption", texts)):
        bad = ~torch.isfinite(emb).all(1) | (emb.norm(dim=1) < 0.5)
        if bad.any():
            raise RetrievalSkipped(
                f"{int(bad.sum())} of {len(emb)} {name} embeddings are NaN, inf or zero: the model has "
                "diverged (check the training loss, the learning rate and the loss scale)"
            )
    metrics = retrieval_metrics(images, texts, t2i)
    metrics.update(retrieval_images=images.shape[0], retrieval_captions=texts.shape[0])
    return metrics
