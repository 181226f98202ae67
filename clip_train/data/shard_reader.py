"""--train_shards / --validation_shards: the splits run_clip.py builds from WebDataset shards.

Training streams (shard_stream.py). Validation is read whole, once, into the same in-memory ClipDataset the COCO
path gives (validation sets are small: COCO val2017 is 5,000 images, 0.75 GB decoded at 224), so eval loss and
retrieval run unchanged. Validation images are grouped by identical image bytes: the captions of one image are the
samples whose image files are byte-identical (what the writer produces for COCO; for img2dataset data, the same
image downloaded twice counts as one image, which is what retrieval should do with it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from typing import Any

import numpy as np
from webdataset.shardlists import expand_urls

from clip_train.data.dataset import ClipDataset, tokenize_captions
from clip_train.data.images import BadImage, decode_image
from clip_train.data.rows import Split
from clip_train.data.shard_stream import ShardStream, read_samples
from clip_train.errors import DataError

logger = logging.getLogger(__name__)


def given(data_args: Any, split: str) -> bool:
    return bool(data_args.train_shards if split == "train" else data_args.validation_shards)


def expand_shards(spec: str) -> list[str]:
    """Brace patterns joined with ``::`` -> shard list; local shards must exist."""
    urls = [u for u in expand_urls(spec) if u]
    missing = [u for u in urls if "://" not in u and not os.path.isfile(u)]
    if not urls or missing:
        raise DataError(f"shards {spec!r}: {len(missing)} of {len(urls)} not found (e.g. {missing[:3]})")
    return urls


def shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from the sizes files next to them: ``sizes.json`` (open_clip's {shard file: n}) or
    img2dataset's per-shard ``NNNNN_stats.json`` ("successes"); None if a shard has neither (or is remote)."""
    sizes, by_dir = {}, {}
    for url in urls:
        if "://" in url:
            return None
        folder, name = os.path.split(url)
        if folder not in by_dir:
            path = os.path.join(folder, "sizes.json")
            by_dir[folder] = _read_json(path) if os.path.isfile(path) else {}
        if name in by_dir[folder]:
            sizes[url] = int(by_dir[folder][name])
            continue
        stats = os.path.join(folder, name.rsplit(".", 1)[0] + "_stats.json")
        if not os.path.isfile(stats):
            return None
        sizes[url] = int(_read_json(stats)["successes"])
    return sizes


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable json file ({e})") from e


def make_split(split: str, data_args: Any, training_args: Any, tokenizer: Any, image_size: int,
               cache_dir: str) -> Split:  # fmt: skip
    image_keys = [k.strip().lower() for k in data_args.image_key.split(";") if k.strip()]
    other = data_args.train_file if split == "train" else data_args.validation_file
    if other:
        raise DataError(f"give the {split} split either as shards or as {other!r}, not both")
    if split == "validation":
        return _validation(expand_shards(data_args.validation_shards), data_args, tokenizer, image_size,
                           image_keys, cache_dir)  # fmt: skip
    urls = expand_shards(data_args.train_shards)
    sizes = shard_sizes(urls)
    n = data_args.train_num_samples or (sum(sizes.values()) if sizes else None)
    if n and data_args.max_train_samples:
        n = min(n, data_args.max_train_samples)
    if not n:
        raise DataError(
            "--train_shards: how many samples an epoch has is unknown: give --train_num_samples N, or put a "
            "sizes.json ({shard file: samples}) or img2dataset's NNNNN_stats.json next to the shards"
        )
    stream = ShardStream(
        urls, tokenizer=tokenizer, max_len=data_args.max_seq_length, image_size=image_size,
        image_keys=image_keys, caption_key=data_args.caption_key,
        batch_size=training_args.per_device_train_batch_size, world=training_args.world_size,
        rank=training_args.process_index, workers=training_args.dataloader_num_workers, num_samples=n,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        shuffle_buffer=data_args.shuffle_buffer, sizes=sizes,
    )  # fmt: skip
    # The stream resumes itself mid-epoch (shard_stream.ShardStateCallback); the Trainer must not also skip batches.
    training_args.ignore_data_skip = True
    logger.info(
        "train: %d shards, %d samples an epoch -> %d batches of %d on each of %d rank(s), %d loader worker(s) each",
        len(urls), n, stream.batches_per_epoch, stream.batch_size, stream.world, stream.workers,
    )  # fmt: skip
    return Split(stream, [], np.zeros(0, np.int64), Counter())


def _validation(urls: list[str], data_args: Any, tokenizer: Any, image_size: int, image_keys: list[str],
                cache_dir: str) -> Split:  # fmt: skip
    skipped: Counter = Counter()
    captions: list[str] = []
    image_of: list[int] = []
    index: dict[bytes, int] = {}
    images: list[np.ndarray] = []
    bad: set[bytes] = set()

    def on_error(url: str, exn: Exception) -> None:
        logger.warning("shard %s: %s; the rest of it is skipped", url, str(exn).splitlines()[0][:300])
        skipped["corrupt_shards"] += 1

    for sample in read_samples(urls, on_error, shard_sizes(urls)):
        key = next((k for k in image_keys if k in sample), None)
        text = sample.get(data_args.caption_key)
        if key is None or text is None:
            skipped["missing_caption" if text is None else "missing_image"] += 1
            continue
        caption = text.decode("utf-8", "replace").strip()
        if not caption:
            skipped["empty_caption"] += 1
            continue
        digest = hashlib.sha1(sample[key]).digest()
        if digest in bad:
            skipped["rows_of_bad_images"] += 1
            continue
        if digest not in index:
            try:
                images.append(
                    decode_image(sample[key], image_size, f"{sample['__url__']}:{sample['__key__']}")
                )
            except BadImage as e:
                logger.warning("bad image skipped: %s", e)
                bad.add(digest)
                skipped["bad_image"] += 1
                skipped["rows_of_bad_images"] += 1
                continue
            index[digest] = len(index)
        captions.append(caption)
        image_of.append(index[digest])
    if not captions:
        raise DataError(f"the validation shards have no usable sample (skipped: {dict(skipped)})")
    flat, offsets = tokenize_captions(captions, tokenizer, data_args.max_seq_length, cache_dir, None,
                                      data_args.overwrite_cache)  # fmt: skip
    logger.info("validation: %d samples over %d images from %d shards", len(captions), len(images), len(urls))
    if skipped:
        logger.warning("validation: skipped %s", ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    ds = ClipDataset(flat, offsets, np.asarray(image_of, np.int64), np.stack(images))
    return Split(ds, [], np.arange(len(captions)), skipped)
