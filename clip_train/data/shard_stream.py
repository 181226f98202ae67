"""Training batches streamed from WebDataset shards: split over ranks and loader workers, resumable mid-epoch.

Reading uses the ``webdataset`` package's tar expander and key grouping (``tar_file_expander``, ``group_by_keys``)
and its seeded shuffle buffer; the split, the epoch length and the resume are ours, because they must agree with the
Trainer's step count on every rank.

- **Streams.** Each epoch the shard list is shuffled (seed + epoch) and dealt to ``world x workers`` streams:
  stream ``s = rank * workers + j`` reads shards ``s, s + world*workers, ...``. Fewer shards than streams is an
  error (a stream with no shard would idle). Every stream runs its shards through a shuffle buffer seeded by
  (seed, epoch, stream), then decodes (the image cache's resize/crop) and tokenises in the loader worker.
- **Equal steps.** An epoch is ``num_samples // (batch x world)`` batches on *every* rank (the tail smaller than one
  global batch is dropped, as ``--dataloader_drop_last``). Batch ``k`` of a rank comes from its worker ``k % workers``
  (the DataLoader's round robin), so each stream has a fixed quota of batches. A stream whose shards run out first
  (uneven shard sizes, skipped samples) reads its shards again, reshuffled: those samples are seen twice that epoch,
  and no rank waits on another. A whole pass over a stream's shards without one usable sample (wrong keys, every
  image undecodable) is a DataError, not an endless loop.
- **Resume.** Every batch carries (its stream, how many raw samples that stream has drawn from its buffer, skips).
  Every checkpoint the Trainer saves gets each rank's progress in ``checkpoint-N/shard_stream-rank{r}.json``
  (ClipTrainer writes it when it writes the checkpoint, whoever decided the save). On resume the Trainer counts the
  resumed epoch's batches as usual but does not fast-forward the loader (ClipTrainer hands it back unchanged); each
  stream replays its raw sample order up to where it was (tar bytes are read, nothing is decoded) and goes on:
  the resumed run sees exactly the batches an uninterrupted run would have, in the same order (the same world size,
  batch size and worker count are required; a checkpoint without the file resumes as if no sample had been skipped).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import TrainerCallback
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_expander

from clip_train.data.images import BadImage, decode_image
from clip_train.errors import DataError

logger = logging.getLogger(__name__)

SKIP_KINDS = ("missing_image", "missing_caption", "empty_caption", "undecodable_image", "corrupt_shards")
STATE_FILE = "shard_stream-rank{rank}.json"


def open_shard(url: str) -> Any:
    """A local path, or a URL through fsspec (s3://, gs://, https://, ... where that protocol is installed)."""
    if "://" not in url or url.startswith("file://"):
        return open(url.removeprefix("file://"), "rb")
    return fsspec.open(url, "rb").open()


def read_samples(urls: list[str], on_error: Any, sizes: dict[str, int] | None = None) -> Iterator[dict]:
    """Raw samples ({"__key__", ext: bytes, ...}) of the shards in order. A shard that cannot be opened, or is
    corrupt or truncated, is reported to ``on_error(url, exception)`` once and the rest of it is skipped.

    ``sizes`` (samples per shard, from the sizes files): a shard that ends with fewer samples is reported too, at
    the end of the pass. Python's tarfile takes a tar cut inside a member's header for a complete shorter one, so
    without sizes such a cut goes unnoticed."""
    current: dict[str, str] = {}
    failed: set[str] = set()

    def opened() -> Iterator[dict]:
        for url in urls:
            try:
                stream = open_shard(url)
            except (OSError, ValueError, ImportError) as e:
                on_error(url, e)
                continue
            current["url"] = url
            yield {"url": url, "stream": stream}
            stream.close()

    def handler(exn: Exception) -> bool:
        url = current.get("url", "?")
        if url not in failed:
            failed.add(url)
            on_error(url, exn)
        return True  # go on with the next shard

    counts: Counter = Counter()
    for sample in group_by_keys(tar_file_expander(opened(), handler=handler), handler=handler):
        counts[sample["__url__"]] += 1
        yield sample
    for url in urls:
        listed = (sizes or {}).get(url)
        if listed is not None and counts[url] < listed and url not in failed:
            on_error(url, ValueError(f"{counts[url]} samples where its sizes file lists {listed}: cut short"))


@dataclass(frozen=True)
class SampleFormat:
    """Which files of a shard sample hold the image and the caption, and what a sample becomes (image size,
    caption tokens). Shared by the training stream and the validation reader."""

    image_keys: tuple[str, ...]  # lower case, as webdataset groups them
    caption_key: str
    tokenizer: Any
    max_len: int
    image_size: int

    def pick(self, sample: dict, skipped: Counter) -> tuple[bytes, str] | None:
        """(image bytes, caption) of a raw sample, or None (counted in ``skipped`` by kind) if it has none."""
        image_key = next((k for k in self.image_keys if k in sample), None)
        text = sample.get(self.caption_key)
        if image_key is None or text is None:
            skipped["missing_caption" if text is None else "missing_image"] += 1
            return None
        caption = text.decode("utf-8", "replace").strip()
        if not caption:
            skipped["empty_caption"] += 1
            return None
        return sample[image_key], caption


@dataclass(frozen=True)
class StreamConfig:
    """How one rank streams an epoch: the samples an epoch has (all ranks), the batch, the ranks and loader workers
    the shards are dealt to, the seed of the shard order and of the shuffle buffers."""

    num_samples: int
    batch_size: int
    world: int
    rank: int
    workers: int
    seed: int
    shuffle_buffer: int


class ShardStream(IterableDataset):
    """Per-sample dicts ({"input_ids", "pixel_values", "_meta"}) for one rank; see the module docstring. A sized
    IterableDataset: its length is the samples trained per epoch (all ranks), which is what the Trainer needs to
    run by epochs."""

    def __init__(self, urls: list[str], fmt: SampleFormat, config: StreamConfig,
                 sizes: dict[str, int] | None = None) -> None:  # fmt: skip
        self.urls, self.fmt, self.sizes = urls, fmt, sizes
        self.batch_size, self.world, self.rank = config.batch_size, config.world, config.rank
        self.workers = max(1, config.workers)
        self.seed, self.shuffle_buffer = config.seed, config.shuffle_buffer
        self.num_samples = config.num_samples
        self.batches_per_epoch = config.num_samples // (self.batch_size * self.world)
        streams = self.world * self.workers
        if len(urls) < streams:
            raise DataError(
                f"{len(urls)} train shards for {self.world} rank(s) x {self.workers} loader worker(s) = {streams} "
                "streams: every stream needs at least one shard. Use more shards (write smaller ones) or "
                "fewer --dataloader_num_workers"
            )
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{config.num_samples} samples are fewer than one global batch ({self.batch_size} x {self.world} "
                "ranks): check --train_num_samples or the sizes file"
            )
        self.epoch = 0
        self.resume: dict | None = None  # saved progress of the epoch to continue (set by ShardStateCallback)
        self.progress = self._fresh(0)  # main process: what the batches handed to the Trainer have consumed
        self.skipped: Counter = Counter()  # main process: skips in those batches, over the whole run

    def __len__(self) -> int:  # samples trained per epoch, all ranks
        return self.batches_per_epoch * self.batch_size * self.world

    def layout(self) -> dict:
        return {"world": self.world, "workers": self.workers, "batch": self.batch_size,
                "batches_per_epoch": self.batches_per_epoch, "shards": len(self.urls), "seed": self.seed}  # fmt: skip

    def _fresh(self, epoch: int) -> dict:
        return {"epoch": epoch, "batches": 0, "emitted": [0] * self.workers}

    def begin_epoch(self) -> None:
        """Main process, before the loader starts its workers: where this epoch starts."""
        if self.resume is not None and self.resume["epoch"] == self.epoch:
            self.progress = {k: self.resume[k] for k in ("epoch", "batches", "emitted")}
            self.progress["emitted"] = list(self.progress["emitted"])
        else:
            self.progress = self._fresh(self.epoch)
        self.resume = None

    def record(self, meta: dict) -> None:
        """Main process: a batch was handed to the Trainer."""
        self.progress["batches"] += 1
        self.progress["emitted"][meta["stream"]] = meta["emitted"]
        self.skipped.update(meta["skipped"])

    def skip_counts(self) -> dict[str, int]:
        return {k: self.skipped.get(k, 0) for k in SKIP_KINDS}

    # --- in the loader worker -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        done = self.progress["batches"]
        j = (worker + done) % self.workers  # the DataLoader restarts its round robin at worker 0
        quota = len(range(j, self.batches_per_epoch, self.workers)) - len(range(j, done, self.workers))
        return self._samples(self.epoch, j, self.progress["emitted"][j], quota * self.batch_size)

    def _raw(self, epoch: int, stream: int, pending: Counter) -> Iterator[dict | None]:
        """Raw samples of stream ``stream`` (of this rank), shuffled, then None at the end of each pass over its
        shards; passes again until the consumer stops. The buffer drains at the end of each pass (it must not pull
        the next pass's samples forward)."""
        mine = self._shards_of(epoch, stream)

        def on_error(url: str, exn: Exception) -> None:
            logger.warning("shard %s: %s; the rest of it is skipped", url, str(exn).splitlines()[0][:300])
            pending["corrupt_shards"] += 1

        for rerun in itertools.count():
            if rerun:  # the stream's quota is not met yet: its shards again, in another order
                random.Random(f"{self.seed}/{epoch}/{self.rank}/{stream}/{rerun}").shuffle(mine)
            samples = read_samples(mine, on_error, self.sizes)
            if self.shuffle_buffer > 1:
                rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{stream}/{rerun}/buffer")
                samples = wds_shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            yield from samples
            yield None

    def _samples(self, epoch: int, stream: int, skip: int, wanted: int) -> Iterator[dict]:
        pending: Counter = Counter()
        emitted = given = 0
        if wanted <= 0:
            return
        this_pass: Counter = Counter()  # what the current pass over the stream's shards gave
        for sample in self._raw(epoch, stream, pending):
            if sample is None:  # a whole pass without one usable sample would loop forever: stop instead
                if not this_pass["usable"] and not this_pass["resumed"]:
                    mine = self._shards_of(epoch, stream)
                    raise DataError(
                        f"a whole pass over the train shards {mine[:3]}{'...' if len(mine) > 3 else ''} gave no "
                        "usable sample (skipped: "
                        f"{dict(this_pass) or 'no sample read'}): check the "
                        "shards, --caption_key and --image_key"
                    )
                this_pass.clear()
                continue
            emitted += 1
            if (
                emitted <= skip
            ):  # resuming: drawn before the checkpoint (not decoded; its skips already counted)
                this_pass["resumed"] += 1
                pending.clear()
                continue
            before = Counter(pending)
            item = self._decode(sample, pending)
            this_pass.update(pending - before)
            if item is None:
                continue
            this_pass["usable"] += 1
            item["_meta"] = {
                "stream": stream, "emitted": emitted, "skipped": dict(pending), "key": sample["__key__"]
            }  # fmt: skip
            pending.clear()
            given += 1
            yield item
            if given == wanted:
                return

    def _shards_of(self, epoch: int, stream: int) -> list[str]:
        """The shards of stream ``stream`` of this rank in ``epoch`` (the epoch's shard order, dealt out)."""
        order = list(self.urls)
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order[self.rank * self.workers + stream :: self.world * self.workers]

    def _decode(self, sample: dict, pending: Counter) -> dict | None:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        kinds = Counter(pending)
        picked = self.fmt.pick(sample, pending)
        if picked is None:
            kind = next(iter(pending - kinds))
            logger.warning("sample %s skipped: %s", where, kind.replace("_", " "))
            return None
        image, caption = picked
        try:
            pixels = decode_image(image, self.fmt.image_size, where)
        except BadImage as e:
            pending["undecodable_image"] += 1
            logger.warning("sample skipped: %s", e)
            return None
        ids = self.fmt.tokenizer(caption, max_length=self.fmt.max_len, truncation=True)["input_ids"]
        return {"input_ids": np.asarray(ids, dtype=np.int32), "pixel_values": pixels}


class _StreamCollator:
    """The run's collator, plus the stream progress of the batch (popped again by ShardLoader)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, samples: list[dict]) -> dict:
        metas = [s.pop("_meta") for s in samples]
        skipped: Counter = Counter()
        for m in metas:
            skipped.update(m["skipped"])
        batch = self.collator(samples)
        batch["_stream"] = {**metas[-1], "skipped": dict(skipped), "keys": [m["key"] for m in metas]}
        return batch


class ShardLoader(DataLoader):
    """A DataLoader the Trainer uses as is (not wrapped by accelerate, which would make every rank read every
    shard): its length is the epoch's batches, set_epoch reaches the stream, and it records progress."""

    def __init__(self, stream: ShardStream, collator: Any, args: Any) -> None:
        if args.dataloader_persistent_workers:
            logger.warning("--dataloader_persistent_workers is not used with --train_shards (each epoch's "
                           "workers need that epoch's shard order)")  # fmt: skip
        workers = args.dataloader_num_workers
        super().__init__(
            stream, batch_size=stream.batch_size, drop_last=True, collate_fn=_StreamCollator(collator),
            num_workers=workers, pin_memory=args.dataloader_pin_memory,
            prefetch_factor=args.dataloader_prefetch_factor if workers else None,
        )  # fmt: skip

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        self.dataset.begin_epoch()
        # Debugging aid (and the tests' witness): the sample keys of every batch handed to the Trainer, a line each.
        log = os.environ.get("CLIP_SHARD_KEY_LOG")
        log = log and open(f"{log}.rank{self.dataset.rank}", "a")
        try:
            yield from self._batches(log)
        except DataError as e:  # raised in a loader worker: torch wraps it with the worker's traceback
            raise DataError(str(e).rstrip().rsplit("DataError: ", 1)[-1]) from None

    def _batches(self, log: Any) -> Iterator[dict]:
        for batch in super().__iter__():
            meta = batch.pop("_stream")
            self.dataset.record(meta)
            if log:
                log.write(f"{self.dataset.epoch} {' '.join(meta['keys'])}\n")
                log.flush()
            yield batch


class ShardStateCallback(TrainerCallback):
    """Each rank's stream progress: ``save`` writes it into every checkpoint the Trainer saves (ClipTrainer calls
    it from its checkpoint save, whoever decided the save: the step count, the clock, a pre-emption, a best
    metric); ``on_train_begin`` reads it back at resume."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def _path(self, args: Any, step: int) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{step}", STATE_FILE.format(rank=self.stream.rank))

    def save(self, checkpoint: str) -> None:
        """Write this rank's progress (the batches handed to the Trainer so far) into ``checkpoint``."""
        path = os.path.join(checkpoint, STATE_FILE.format(rank=self.stream.rank))
        os.makedirs(checkpoint, exist_ok=True)
        body = {**self.stream.progress, "skipped": dict(self.stream.skipped), "layout": self.stream.layout()}
        with open(path + ".tmp", "w") as f:
            json.dump(body, f)
        os.replace(path + ".tmp", path)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0:
            return
        s = self.stream
        per_epoch = -(-s.batches_per_epoch // args.gradient_accumulation_steps)  # the Trainer's update steps
        epoch = state.global_step // per_epoch
        batches = min(
            s.batches_per_epoch, (state.global_step - epoch * per_epoch) * args.gradient_accumulation_steps
        )
        path = self._path(args, state.global_step)
        saved = None
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved["layout"] != s.layout():
                raise DataError(
                    f"{path}: saved with {saved['layout']}, this run has {s.layout()}: resume --train_shards with "
                    "the same world size, batch size, loader workers, shards and seed (or --overwrite_output_dir)"
                )
            s.skipped = Counter(saved["skipped"])
        if args.ignore_data_skip:  # as the Trainer does with a dataset: the resumed epoch starts over
            logger.info("--ignore_data_skip: the shard stream starts epoch %d over", epoch)
            return
        if (
            saved is None
        ):  # e.g. --resume_from_checkpoint from elsewhere: exact only if no sample was skipped before
            logger.warning("%s not found: resuming the shard stream as if no sample had been skipped", path)
            saved = {"epoch": epoch, "batches": batches, "emitted": [len(range(j, batches, s.workers)) * s.batch_size
                                                                    for j in range(s.workers)]}  # fmt: skip
        s.resume = {k: saved[k] for k in ("epoch", "batches", "emitted")}
        epoch, batches = saved["epoch"], saved["batches"]
        logger.info(
            "shard stream resumes epoch %d after %d of its %d batches", epoch, batches, s.batches_per_epoch
        )
