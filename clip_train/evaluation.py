"""Retrieval evaluation on the validation split: every unique image and every caption embedded once, sharded
over ranks and gathered, then R@K both ways (see retrieval.py for the protocol)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from .data import ClipDataset, pad_captions
from .retrieval import embed_for_retrieval, gather_rows, retrieval_metrics, shard_indices

logger = logging.getLogger(__name__)


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
    """Image<->text recall on ``ds``; every rank calls it and gets the same metrics."""
    used, text_to_image = np.unique(ds.image_index, return_inverse=True)  # only images that have captions
    img_rows = shard_indices(len(used), rank, world)
    txt_rows = shard_indices(len(ds), rank, world)
    missing = 0

    def image_batches() -> Iterator[torch.Tensor]:
        nonlocal missing
        for s in range(img_rows.start, img_rows.stop, batch_size):
            arrays = [ds.images[i] for i in used[s : min(s + batch_size, img_rows.stop)]]
            missing += sum(a is None for a in arrays)
            ref = next(a for a in arrays if a is not None) if missing < len(arrays) else None
            arrays = (
                [a if a is not None else np.zeros_like(ref) for a in arrays] if ref is not None else arrays
            )
            yield pixels(torch.from_numpy(np.stack(arrays)).to(device))

    def text_batches() -> Iterator[dict[str, torch.Tensor]]:
        for s in range(txt_rows.start, txt_rows.stop, batch_size):
            ids = [
                ds.flat_ids[ds.offsets[i] : ds.offsets[i + 1]]
                for i in range(s, min(s + batch_size, txt_rows.stop))
            ]
            input_ids, mask = pad_captions(ids, pad_id, None)
            yield {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

    images, texts = embed_for_retrieval(model, image_batches(), text_batches(), device)
    if missing:
        logger.warning("retrieval: %d validation images could not be decoded and count as blank", missing)
    images = gather_rows(images.to(device), len(used)).cpu()
    texts = gather_rows(texts.to(device), len(ds)).cpu()
    return retrieval_metrics(images, texts, torch.from_numpy(text_to_image.astype(np.int64)))
