"""Write image-text pairs as WebDataset shards in img2dataset's layout, from a COCO folder or a csv/json-lines file.

    python -m clip_train.shards --data_dir /data/coco --split train --out /data/coco-shards/train
    python -m clip_train.shards --file pairs.csv --image_column path --caption_column text --out DIR

Train rows are shuffled (``--seed``; ``--keep_order`` to keep them), validation rows keep their order.
One sample per caption row: ``KEY.jpg`` (the image file's bytes as stored, never re-encoded; ``.png``/``.webp``
keep their extension), ``KEY.txt`` (the caption, UTF-8) and ``KEY.json`` (key, caption, and the row's other
columns such as image_id and caption_id), in shards ``00000.tar``, ``00001.tar``, ... of ``--samples_per_shard``
samples, KEY = shard number (5 digits) + index in the shard, as img2dataset names them. Next to the shards, as
img2dataset and open_clip expect: ``NNNNN_stats.json`` per shard (count, successes, failed_to_download) and one
``sizes.json`` ({shard file: samples}), which the reader uses for the epoch length. An image shared by several
captions is stored once per caption (byte-identical copies: the reader groups validation images by their bytes).
Rows whose image cannot be read are left out and counted. Each shard is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections import Counter
from types import SimpleNamespace

import webdataset as wds

from clip_train.data.images import BadImage, read_bytes
from clip_train.data.rows import load_rows  # the same row readers as run_clip.py
from clip_train.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}


def image_extension(path: str) -> str:
    return IMAGE_EXTENSIONS.get(path.rsplit(".", 1)[-1].lower(), "jpg")


def write_shards(
    columns: dict[str, list], out: str, samples_per_shard: int = 1000, seed: int | None = None
) -> dict:
    """Write the rows of ``columns`` (needs "caption" and "image_path"; other columns go to KEY.json), in their
    order, or shuffled with ``seed``.

    Returns {"shards": [file names], "samples": n, "skipped": Counter}.
    """
    if samples_per_shard < 1:
        raise DataError(f"--samples_per_shard {samples_per_shard}: give at least 1")
    if seed is not None:
        order = list(range(len(columns["caption"])))
        random.Random(seed).shuffle(order)
        columns = {k: [v[i] for i in order] for k, v in columns.items()}
    os.makedirs(out, exist_ok=True)
    digits = max(4, len(str(samples_per_shard - 1)))  # img2dataset: 5 + 4 digits
    extra = [c for c in columns if c not in ("caption", "image_path")]
    sizes: dict[str, int] = {}
    skipped: Counter = Counter()
    writer, name, count, missing = None, "", 0, 0

    def close() -> None:
        writer.close()
        os.replace(os.path.join(out, name + ".partial"), os.path.join(out, name))
        stats = {"count": count + missing, "successes": count, "failed_to_download": missing}
        with open(os.path.join(out, name[:-4] + "_stats.json"), "w") as f:
            json.dump(stats, f)
        sizes[name] = count

    for i, (caption, path) in enumerate(zip(columns["caption"], columns["image_path"], strict=True)):
        try:
            data = read_bytes(path)
        except BadImage as e:
            logger.warning("left out: %s", e)
            skipped["unreadable_image"] += 1
            missing += 1
            continue
        if writer is None:
            name, count, missing = f"{len(sizes):05d}.tar", 0, missing
            writer = wds.TarWriter(os.path.join(out, name + ".partial"))
        key = f"{len(sizes):05d}{count:0{digits}d}"
        meta = {"key": key, "caption": caption, **{c: columns[c][i] for c in extra}}
        writer.write({"__key__": key, image_extension(path): data, "txt": caption, "json": meta})
        count += 1
        if count == samples_per_shard:
            close()
            writer, missing = None, 0
    if writer is not None:
        close()
    with open(os.path.join(out, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=1)
    return {"shards": list(sizes), "samples": sum(sizes.values()), "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clip_train.shards", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="COCO 2017 folder (zips or extracted)")
    source.add_argument("--file", help="csv or json-lines file of image paths and captions")
    parser.add_argument("--split", default="train", choices=["train", "validation"], help="COCO split")
    parser.add_argument("--image_column", default="image_path")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--max_samples", type=int, default=None, help="write only the first N rows")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the rows (train)")
    parser.add_argument(
        "--keep_order", action="store_true",
        help="write the rows in their order (always so for --split validation). By default train rows are "
        "shuffled: where the source lists an image's captions together (the demo does, csv files often do), "
        "unshuffled shards hold few images each, a loader worker reads only some shards, and its batches get "
        "several captions of one image as each other's negatives",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s - %(message)s", level=logging.INFO)

    data_args = SimpleNamespace(
        train_file=args.file if args.split == "train" else None,
        validation_file=args.file if args.split == "validation" else None,
        dataset_name=None, dataset_config_name="2017", data_dir=args.data_dir,
        image_column=args.image_column, caption_column=args.caption_column,
    )  # fmt: skip
    try:
        rows = load_rows(data_args, args.split)
        columns = dict(rows.columns)
        if args.max_samples is not None:
            columns = {k: v[: args.max_samples] for k, v in columns.items()}
        keep = args.keep_order or args.split == "validation"
        done = write_shards(columns, args.out, args.samples_per_shard, None if keep else args.seed)
    except DataError as e:
        print(f"python -m clip_train.shards: error: {e}", file=sys.stderr)
        return 2
    skipped = rows.skipped + done["skipped"]
    print(f"wrote {done['samples']} samples in {len(done['shards'])} shards to {args.out}"
          + (f"; left out: {dict(skipped)}" if skipped else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
