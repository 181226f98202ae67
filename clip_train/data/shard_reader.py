"""--train_shards / --validation_shards: the splits read from WebDataset shards (data/inputs.py picks them).

Training streams (shard_stream.py). Validation is read whole, once, into the same in-memory ClipDataset the COCO
path gives (validation sets are small: COCO val2017 is 5,000 images, 0.75 GB decoded at 224), so eval loss and
retrieval run unchanged. Validation images are grouped by identical image bytes: the captions of one image are the
samples whose image files are byte-identical (what the writer produces for COCO; for img2dataset data, the same
image downloaded twice counts as one image, which is what retrieval should do with it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from typing import Any

import numpy as np
from webdataset.shardlists import expand_urls

from clip_train.data.dataset import ClipDataset, tokenize_captions
from clip_train.data.images import BadImage, decode_image
from clip_train.data.shard_stream import SampleFormat, ShardStream, StreamConfig, read_samples
from clip_train.errors import DataError

logger = logging.getLogger(__name__)


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


def sample_format(data_args: Any, tokenizer: Any, image_size: int) -> SampleFormat:
    image_keys = tuple(k.strip().lower() for k in data_args.image_key.split(";") if k.strip())
    return SampleFormat(image_keys, data_args.caption_key.strip().lower(), tokenizer, data_args.max_seq_length,
                        image_size)  # fmt: skip


KEY_CHECK_SAMPLES = 50


def check_keys(urls: list[str], fmt: SampleFormat, what: str) -> None:
    """Stop with one line, before any training, when none of the first samples holds the caption or image key
    (a wrong --caption_key/--image_key would otherwise skip every sample). Reads only those samples' bytes."""
    found: Counter = Counter()
    n = 0
    for sample in itertools.islice(read_samples(urls, lambda url, e: None), KEY_CHECK_SAMPLES):
        n += 1
        found.update(k for k in sample if not k.startswith("__"))
    if not n:
        raise DataError(f"{what}: no readable sample in {urls[:3]}{'...' if len(urls) > 3 else ''}")
    wrong = [] if found[fmt.caption_key] else [f"--caption_key {fmt.caption_key}"]
    if not any(found[k] for k in fmt.image_keys):
        wrong.append(f"--image_key {';'.join(fmt.image_keys)}")
    if wrong:
        keys = ", ".join(f"{k} ({c})" for k, c in sorted(found.items()))
        raise DataError(f"{what}: none of the first {n} samples has a file for {' or '.join(wrong)}; their keys "
                        f"(samples): {keys}. Set the flag to one of them")  # fmt: skip


def make_stream(data_args: Any, training_args: Any, tokenizer: Any, image_size: int) -> ShardStream:
    """--train_shards as this rank's stream (training_args is only read)."""
    urls = expand_shards(data_args.train_shards)
    fmt = sample_format(data_args, tokenizer, image_size)
    check_keys(urls, fmt, "--train_shards")
    sizes = shard_sizes(urls)
    n = data_args.train_num_samples or (sum(sizes.values()) if sizes else None)
    if n and data_args.max_train_samples:
        n = min(n, data_args.max_train_samples)
    if not n:
        raise DataError(
            "--train_shards: how many samples an epoch has is unknown: give --train_num_samples N, or put a "
            "sizes.json ({shard file: samples}) or img2dataset's NNNNN_stats.json next to the shards"
        )
    config = StreamConfig(
        num_samples=n, batch_size=training_args.per_device_train_batch_size, world=training_args.world_size,
        rank=training_args.process_index, workers=training_args.dataloader_num_workers,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        shuffle_buffer=data_args.shuffle_buffer,
    )  # fmt: skip
    stream = ShardStream(urls, fmt, config, sizes)
    logger.info(
        "train: %d shards, %d samples an epoch -> %d batches of %d on each of %d rank(s), %d loader worker(s) each",
        len(urls), n, stream.batches_per_epoch, stream.batch_size, stream.world, stream.workers,
    )  # fmt: skip
    return stream


def read_validation(
    data_args: Any, tokenizer: Any, image_size: int, cache_dir: str
) -> tuple[ClipDataset, Counter]:
    """--validation_shards read whole into a ClipDataset (its first --max_eval_samples rows, as the COCO path),
    and the rows left out, by kind."""
    urls = expand_shards(data_args.validation_shards)
    fmt = sample_format(data_args, tokenizer, image_size)
    check_keys(urls, fmt, "--validation_shards")
    limit = data_args.max_eval_samples
    skipped: Counter = Counter()
    captions: list[str] = []
    image_of: list[int] = []
    index: dict[bytes, int] = {}
    images: list[np.ndarray] = []
    bad: set[bytes] = set()
    rows = 0  # rows with an image and a caption, as the COCO path counts them for --max_eval_samples

    def on_error(url: str, exn: Exception) -> None:
        logger.warning("shard %s: %s; the rest of it is skipped", url, str(exn).splitlines()[0][:300])
        skipped["corrupt_shards"] += 1

    for sample in read_samples(urls, on_error, shard_sizes(urls)):
        if limit is not None and rows >= limit:
            break
        picked = fmt.pick(sample, skipped)
        if picked is None:
            continue
        rows += 1
        image, caption = picked
        digest = hashlib.sha1(image).digest()
        if digest in bad:
            skipped["rows_of_bad_images"] += 1
            continue
        if digest not in index:
            try:
                images.append(decode_image(image, image_size, f"{sample['__url__']}:{sample['__key__']}"))
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
    return ClipDataset(flat, offsets, np.asarray(image_of, np.int64), np.stack(images)), skipped
