"""From caption rows to training batches: tokenise once, point captions at decoded images, pad per batch.

A sample is (token ids, uint8 image). The collator pads each batch only to its longest caption (rounded up to a
multiple of ``pad_to_multiple_of``, 8 by default) unless ``pad_to_max_length``; images stay uint8 until they reach
the device. A batch without any padding gets no attention mask: the host knows it, so the model need not check it
on the device (transformers' ``padding_mask.all()``, a host-device sync in every RoBERTa forward). ``feeding_defaults``
picks the DataLoader settings a run did not set.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch

from clip_train.data.feeding import available_cpus
from clip_train.data.images import BadImage, build_cache, load_image

logger = logging.getLogger(__name__)


def tokenize_captions(
    captions: Sequence[str],
    tokenizer: Any,
    max_len: int,
    cache_dir: str | None,
    num_proc: int | None,
    overwrite: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every caption as one flat int32 array plus offsets (cached with datasets.map)."""
    ds = datasets.Dataset.from_dict({"caption": list(captions)})
    key = hashlib.sha256()
    key.update(f"{type(tokenizer).__name__}|{len(tokenizer)}|{max_len}|{tokenizer.name_or_path}|".encode())
    key.update(str(sorted(tokenizer.get_vocab().items())[:50]).encode())
    for c in captions:
        key.update(c.encode("utf-8", "replace"))
        key.update(b"\x00")
    cache_file = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"tokens-{key.hexdigest()[:20]}.arrow")

    def encode(batch: dict) -> dict:
        return {"input_ids": tokenizer(batch["caption"], max_length=max_len, truncation=True)["input_ids"]}

    ds = ds.map(
        encode,
        batched=True,
        num_proc=num_proc if num_proc and num_proc > 1 and len(ds) > 10_000 else None,
        remove_columns=["caption"],
        cache_file_name=cache_file,
        load_from_cache_file=not overwrite,
        desc="tokenizing captions",
    )
    ids = ds.with_format("numpy")["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(ids).astype(np.int32) if len(ids) else np.zeros(0, np.int32)
    return flat, offsets


def image_table(paths: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique image paths in first-seen order, and each row's index into them."""
    index: dict[str, int] = {}
    rows = np.empty(len(paths), dtype=np.int64)
    for i, p in enumerate(paths):
        rows[i] = index.setdefault(p, len(index))
    return list(index), rows


class ImagesOnTheFly:
    """The reference path: decode every sample's image when it is read (no cache)."""

    def __init__(self, paths: Sequence[str], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray | None:
        try:
            return load_image(self.paths[i], self.size)
        except BadImage as e:
            logger.warning("skipping a sample: %s", e)
            return None


class ClipDataset(torch.utils.data.Dataset):
    """Caption rows -> {"input_ids": int32 array, "pixel_values": uint8 [S, S, 3]}."""

    def __init__(
        self, flat_ids: np.ndarray, offsets: np.ndarray, image_index: np.ndarray, images: Any
    ) -> None:
        self.flat_ids, self.offsets, self.image_index, self.images = flat_ids, offsets, image_index, images

    def __len__(self) -> int:
        return len(self.image_index)

    def __getitem__(self, i: int) -> dict:
        ids = self.flat_ids[self.offsets[i] : self.offsets[i + 1]]
        return {"input_ids": ids, "pixel_values": self.images[self.image_index[i]]}


def build_dataset(
    captions: Sequence[str],
    image_paths: Sequence[str],
    tokenizer: Any,
    *,
    image_size: int,
    max_len: int,
    use_cache: bool,
    cache_dir: str,
    num_proc: int | None,
    overwrite_cache: bool,
    skipped: Counter,
) -> tuple[ClipDataset, list[str], np.ndarray]:
    """The dataset of one split. Returns (dataset, unique image paths, kept rows' indices into the input)."""
    flat, offsets = tokenize_captions(captions, tokenizer, max_len, cache_dir, num_proc, overwrite_cache)
    unique, image_index = image_table(image_paths)
    keep = np.arange(len(captions))
    if use_cache:
        workers = num_proc or min(32, available_cpus())  # the other ranks wait meanwhile: use the machine
        images, meta = build_cache(unique, image_size, cache_dir, workers=workers, overwrite=overwrite_cache)
        if meta["bad"]:
            for reason in meta["bad"].values():
                logger.warning("bad image skipped: %s", reason)
            bad = np.zeros(len(unique), dtype=bool)
            bad[list(meta["bad"])] = True
            dropped = bad[image_index]
            skipped["bad_image"] += len(meta["bad"])
            skipped["rows_of_bad_images"] += int(dropped.sum())
            keep = np.flatnonzero(~dropped)
    else:
        images = ImagesOnTheFly(unique, image_size)
    if len(keep) < len(captions):
        starts, ends = offsets[keep], offsets[keep + 1]
        flat = (
            np.concatenate([flat[s:e] for s, e in zip(starts, ends, strict=True)]) if len(keep) else flat[:0]
        )
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
    return ClipDataset(flat, offsets, image_index[keep], images), unique, keep


def pad_captions(ids: list[np.ndarray], pad_id: int, width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded to ``width``, or to the longest caption rounded up to a multiple of 8."""
    if width is None:
        width = -(-max((len(x) for x in ids), default=1) // 8) * 8
    out = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, x in enumerate(ids):
        out[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return torch.from_numpy(out), torch.from_numpy(mask)


class Collator:
    """Pads a batch's captions to its longest rounded up to a multiple of ``pad_to_multiple_of`` (capped at
    ``max_len``), or to ``max_len``; stacks uint8 images. No "attention_mask" when no caption is padded."""

    def __init__(
        self, pad_id: int, max_len: int, pad_to_max_length: bool = False, pad_to_multiple_of: int = 8
    ) -> None:
        self.pad_id, self.max_len, self.pad_to_max_length = pad_id, max_len, pad_to_max_length
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        given = len(samples)
        samples = [s for s in samples if s["pixel_values"] is not None]  # undecodable on the fly (logged)
        ids = [s["input_ids"] for s in samples]
        longest = max((len(x) for x in ids), default=1)
        rounded = -(-longest // self.multiple) * self.multiple
        width = max(longest, self.max_len if self.pad_to_max_length else min(self.max_len, rounded))
        input_ids, mask = pad_captions(ids, self.pad_id, width)
        images = (
            np.stack([s["pixel_values"] for s in samples]) if samples else np.zeros((0, 1, 1, 3), np.uint8)
        )
        batch = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": torch.from_numpy(images)}
        if ids and all(len(x) == width for x in ids):
            # Nothing padded: what transformers would otherwise test on the device, answered here.
            del batch["attention_mask"]
        if len(samples) < given:  # counted by the trainer (ClipTrainer.undecodable)
            batch["undecodable"] = torch.tensor(given - len(samples))
        return batch
