"""Caption rows (COCO folder, csv or json-lines) and the ready datasets made from them."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import datasets

from clip_train.data.coco import SplitRows, check_split, load_coco_split
from clip_train.data.dataset import ClipDataset, build_dataset
from clip_train.errors import DataError

logger = logging.getLogger(__name__)

# dataset_name values that mean "the COCO folder in --data_dir" (the recipe's hub script, read locally).
COCO_NAMES = {None, "", "coco", "ydshieh/coco_dataset_script"}


def _read_table(path: str) -> datasets.Dataset:
    ext = path.rsplit(".", 1)[-1].lower()
    kind = {"csv": "csv", "json": "json", "jsonl": "json"}.get(ext)
    if kind is None:
        raise DataError(f"{path}: only csv and json-lines files are read (got .{ext})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:  # the file was checked line by line at parse time (validate.table_file); this catches the rest
        return datasets.load_dataset(kind, data_files={"x": path}, split="x")
    except Exception as e:  # datasets wraps its parsers' errors in several types
        cause = " ".join(str(e.__cause__ or e).split())[:300]
        raise DataError(f"{path}: could not be read as {ext} ({cause}); check the file") from e


def load_rows(data_args: Any, split: str) -> SplitRows:
    """Rows of a split from the COCO folder, or from --train_file / --validation_file."""
    table_file = data_args.train_file if split == "train" else data_args.validation_file
    if table_file:
        table = _read_table(table_file)
        missing = [
            c for c in (data_args.image_column, data_args.caption_column) if c not in table.column_names
        ]
        if missing:
            raise DataError(f"{table_file}: no column {missing} (columns: {table.column_names}); "
                            "set --image_column / --caption_column")  # fmt: skip
        rows = SplitRows()
        rows.columns = {"caption": [], "image_path": []}
        base = os.path.dirname(os.path.abspath(table_file))
        for cap, img in zip(table[data_args.caption_column], table[data_args.image_column], strict=True):
            if not isinstance(cap, str) or not cap.strip():
                rows.skipped["empty_caption"] += 1
            elif not img:
                rows.skipped["missing_image"] += 1
            else:
                rows.columns["caption"].append(cap)
                rows.columns["image_path"].append(img if os.path.isabs(img) else os.path.join(base, img))
        return rows
    if data_args.dataset_name not in COCO_NAMES:
        raise DataError(
            f"--dataset_name {data_args.dataset_name!r}: hub datasets are not loaded here. Use --data_dir with the "
            "COCO folder (dataset_name ydshieh/coco_dataset_script or none), or --train_file/--validation_file."
        )
    if not data_args.data_dir:
        raise DataError("no data: give --data_dir (the COCO 2017 folder) or --train_file/--validation_file")
    rows = load_coco_split(data_args.data_dir, split, data_args.dataset_config_name or "2017")
    for col in (data_args.image_column, data_args.caption_column):
        if col not in rows.columns:
            raise DataError(
                f"--image_column/--caption_column {col!r} is not a COCO column ({list(rows.columns)})"
            )
    if data_args.image_column != "image_path" or data_args.caption_column != "caption":
        rows.columns = {"caption": rows.columns[data_args.caption_column],
                        "image_path": rows.columns[data_args.image_column]}  # fmt: skip
    return rows


def check_readable(data_args: Any, split: str) -> None:
    """Before the output folder is made: a split read from the COCO folder has annotations that parse and images
    whose zip opens (table files were checked line by line with the arguments). Raises DataError."""
    table_file = data_args.train_file if split == "train" else data_args.validation_file
    if not (table_file or data_args.data_dir):  # found here, not after the other split's caches are built
        flags = (
            "--train_file or --train_shards"
            if split == "train"
            else "--validation_file or --validation_shards"
        )
        raise DataError(f"no {split} data: give --data_dir (the COCO 2017 folder), {flags}")
    if table_file or data_args.dataset_name not in COCO_NAMES:
        return  # load_rows says what is wrong with these
    check_split(data_args.data_dir, split, data_args.dataset_config_name or "2017")


def make_split(rows: SplitRows, tokenizer: Any, data_args: Any, *, image_size: int, cache_dir: str,
               limit: int | None, name: str = "data") -> tuple[ClipDataset, list[str], Counter]:  # fmt: skip
    """The ready dataset of a split's first ``limit`` rows, its unique image paths, and the rows left out."""
    captions, paths = rows.columns["caption"], rows.columns["image_path"]
    if limit is not None:
        captions, paths = captions[:limit], paths[:limit]
    skipped = Counter(rows.skipped)
    if not captions:  # stop here, with the reasons, rather than deep inside tokenisation
        raise DataError(f"the {name} split has no usable rows (skipped: {dict(skipped)})")
    ds, unique, _ = build_dataset(
        captions,
        paths,
        tokenizer,
        image_size=image_size,
        max_len=data_args.max_seq_length,
        use_cache=data_args.image_cache,
        cache_dir=cache_dir,
        num_proc=data_args.preprocessing_num_workers,
        overwrite_cache=data_args.overwrite_cache,
        skipped=skipped,
    )
    if skipped:
        logger.warning("%s: %d of %d rows kept; skipped: %s", name, len(ds), len(captions) + sum(rows.skipped.values()),
                       ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))  # fmt: skip
    return ds, unique, skipped
