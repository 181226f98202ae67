"""The one way in for data: ``get_data`` reads each split a run needs and returns a ``DataInfo`` per split.

The kind of input is chosen here, from the flags, and nowhere else (as open_clip's ``get_data`` -> ``DataInfo``):

- the COCO 2017 folder (``--data_dir``) or csv / json-lines files (``--train_file``/``--validation_file``): caption
  rows -> a ClipDataset (tokenised once, images decoded once into the cache); the Trainer's own loader reads it;
- ``--train_shards``: a ShardStream, a *sized* IterableDataset (its length is the samples trained per epoch, which
  is all the Trainer needs to run by epochs and to count steps), with its own loader (split over ranks and loader
  workers by the stream itself) and its progress, saved with every checkpoint and read back at resume;
- ``--validation_shards``: read whole into a ClipDataset, as the COCO folder gives (eval loss and retrieval unchanged).

run_clip.py hands the records to ClipTrainer; neither asks which kind a split was.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader

from clip_train.data import rows as row_input
from clip_train.data import shard_reader
from clip_train.data.dataset import ClipDataset
from clip_train.data.shard_stream import ShardLoader, ShardStateCallback
from clip_train.errors import DataError, SetupError


@dataclass
class DataInfo:
    """One split as training and evaluation need it, whatever its source."""

    dataset: Any  # a ClipDataset, or a ShardStream (sized IterableDataset: len = samples trained per epoch)
    skipped: Counter  # rows left out while reading the split, by kind (the same on every rank)
    image_paths: list[str] = field(
        default_factory=list
    )  # unique image files (the run's fingerprint); none if read from shards
    # (collator, training_args) -> the train loader; None: the Trainer builds its own from ``dataset``.
    make_loader: Callable[[Any, Any], DataLoader] | None = None
    # A loader that resumes itself mid-epoch: a TrainerCallback that reads the progress back at resume, with
    # save(checkpoint_folder), which the trainer calls for every checkpoint it writes. None: the Trainer's own skip.
    progress: ShardStateCallback | None = None
    # Samples left out while training on this rank, by kind (streamed shards decode in the loader); None: none.
    skip_counts: Callable[[], dict[str, int]] | None = None

    @property
    def rows(self) -> int:
        """Caption rows (or, streamed, the samples trained per epoch over all ranks)."""
        return len(self.dataset)

    @property
    def images(self) -> int | None:
        """Unique images (None when streamed: not known before the epoch is read)."""
        return len(self.dataset.images) if isinstance(self.dataset, ClipDataset) else None

    def skip_metrics(self, prefix: str) -> dict[str, int]:
        """``{prefix}_skipped_KIND``: the rows left out while reading."""
        return {f"{prefix}_skipped_{k}": v for k, v in self.skipped.items()}


def check_data(data_args: Any, training_args: Any) -> None:
    """The cheap checks of the splits a run needs (annotations parse, zips open), run before the output folder is
    made or touched; shards are checked when opened. Raises DataError with one line."""
    wanted = {"train": (training_args.do_train, data_args.train_shards),
              "validation": (training_args.do_eval, data_args.validation_shards)}  # fmt: skip
    for split, (needed, shards) in wanted.items():
        if needed and not shards:
            row_input.check_readable(data_args, split)


def get_data(
    data_args: Any, training_args: Any, tokenizer: Any, image_size: int, cache_dir: str
) -> dict[str, DataInfo]:
    """``{"train": ..., "validation": ...}`` for the splits ``--do_train`` / ``--do_eval`` ask for (training_args is
    only read). Raises DataError / SetupError with one line when a split cannot be read or cannot make a batch."""
    found: dict[str, DataInfo] = {}
    if training_args.do_train:
        if data_args.train_shards:
            found["train"] = _stream(data_args, training_args, tokenizer, image_size)
        else:
            found["train"] = _rows("train", data_args, training_args, tokenizer, image_size, cache_dir)
    if training_args.do_eval:
        if data_args.validation_shards:
            ds, skipped = shard_reader.read_validation(data_args, tokenizer, image_size, cache_dir)
            found["validation"] = DataInfo(ds, skipped)
        else:
            found["validation"] = _rows(
                "validation", data_args, training_args, tokenizer, image_size, cache_dir
            )
    check_sizes(found, training_args)
    return found


def _rows(
    split: str, data_args: Any, training_args: Any, tokenizer: Any, image_size: int, cache_dir: str
) -> DataInfo:
    rows = row_input.load_rows(data_args, split)
    limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
    with training_args.main_process_first(
        desc=f"{split} caches"
    ):  # rank 0 builds the caches, the others read them
        ds, image_paths, skipped = row_input.make_split(
            rows, tokenizer, data_args, image_size=image_size, cache_dir=cache_dir, limit=limit, name=split
        )
    return DataInfo(ds, skipped, image_paths)


def _stream(data_args: Any, training_args: Any, tokenizer: Any, image_size: int) -> DataInfo:
    stream = shard_reader.make_stream(data_args, training_args, tokenizer, image_size)
    return DataInfo(
        stream, Counter(), make_loader=functools.partial(ShardLoader, stream), progress=ShardStateCallback(stream),
        skip_counts=stream.skip_counts,
    )  # fmt: skip


def check_sizes(splits: dict[str, DataInfo], training_args: Any) -> None:
    """Stop early, with the numbers, when a split cannot make a single batch."""
    for name, split in splits.items():
        n = split.rows
        if n == 0:
            raise DataError(f"the {name} split has no usable rows (skipped: {dict(split.skipped)})")
        per_device = (
            training_args.per_device_train_batch_size
            if name == "train"
            else training_args.per_device_eval_batch_size
        )
        batch = per_device * training_args.world_size
        if training_args.dataloader_drop_last and n < batch:
            raise SetupError(
                f"the {name} split has {n} rows, fewer than one batch ({per_device} x {training_args.world_size} "
                "ranks) with --dataloader_drop_last: lower the batch size or add data"
            )
