"""Zero-shot classification on an ImageFolder (one subfolder per class, as ImageNet's val set is usually laid out).

Protocol (CLIP's, open_clip's ``zero_shot``): each class name is put into every template; the class embedding is
the L2-normalised mean of its templates' L2-normalised text embeddings, built once per evaluation. An image is
classified by cosine similarity to every class embedding; top-K counts a hit when the image's own class is among
the K best. Ties count against the model (rank = 1 + the number of wrong classes scoring at least as high), as in
retrieval.py, so a collapsed model does not score. Accuracies are percentages.

Images go through training's decode, resize and center crop (data/images.py; the image cache when asked), then the
trainer's ``pixels`` normalisation. Several ranks share the work: each embeds a contiguous slice of the images and
every world-th prompt of the length order (batches of one fixed shape, as evaluation.py's retrieval), the
embeddings are gathered, and every rank scores the same matrices in float32 with autocast off: identical figures
on 1 or N ranks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clip_train.data.dataset import ImagesOnTheFly, pad_captions
from clip_train.data.images import build_cache
from clip_train.errors import DataError
from clip_train.eval.evaluation import _caption_batches, _fill
from clip_train.eval.retrieval import embed_for_retrieval, full_precision, gather_rows, shard_indices
from clip_train.eval.templates import BUILT_IN

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
LAYOUT = "an ImageFolder: one subfolder per class, the class's images inside (e.g. val/n01440764/*.JPEG)"


class ZeroShotSkipped(RuntimeError):
    """Zero-shot accuracy cannot be computed for this evaluation (a diverged model); training may go on."""


@dataclass
class ZeroShotSet:
    """What an evaluation needs, prepared once: the classes' prompts as token ids and the images with labels."""

    classnames: list[str]
    templates: list[str]
    prompts: list[np.ndarray]  # token ids, class-major: template t of class c at c * len(templates) + t
    images: Any  # images[i] -> uint8 [S, S, 3], or None where an on-the-fly decode failed
    labels: np.ndarray  # int64 class index per image
    skipped: dict[str, int] = field(default_factory=dict)  # images / classes left out before any evaluation


# --- the folder, the class names, the templates ------------------------------------------------------------------
def read_folder(root: str) -> tuple[list[str], list[list[str]]]:
    """(class folder names, sorted; each folder's image files, sorted). DataError for a missing or empty folder."""
    if not os.path.isdir(root):
        what = "is a file" if os.path.exists(root) else "does not exist"
        raise DataError(f"--zeroshot_dir {root} {what}: expected {LAYOUT}")
    folders = sorted(
        d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
    )
    if not folders:
        raise DataError(f"--zeroshot_dir {root} has no class subfolders: expected {LAYOUT}")
    files = [
        sorted(
            os.path.join(root, d, f)
            for f in os.listdir(os.path.join(root, d))
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, d, f))
        )
        for d in folders
    ]
    if not any(files):
        raise DataError(
            f"--zeroshot_dir {root} has {len(folders)} class folders but no image file in them "
            f"({' '.join(IMAGE_EXTENSIONS)}): expected {LAYOUT}"
        )
    return folders, files


def class_names(folders: Sequence[str], names_file: str | None = None) -> list[str]:
    """The folder names with ``_`` as spaces, or ``names_file``'s lines (one per class, in sorted-folder order)."""
    if not names_file:
        return [f.replace("_", " ") for f in folders]
    try:
        with open(names_file, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--zeroshot_classnames {names_file}: cannot be read ({e})") from e
    if len(names) != len(folders):
        raise DataError(
            f"--zeroshot_classnames {names_file} has {len(names)} names for {len(folders)} class folders: give one "
            "name a line, in the order of the sorted folder names"
        )
    return names


def load_templates(spec: str) -> list[str]:
    """``openai`` (the 80 ImageNet templates), ``simple`` ("a photo of a {}.") or a file, one template a line."""
    if spec in BUILT_IN:
        return list(BUILT_IN[spec])
    try:
        with open(spec, encoding="utf-8") as f:
            templates = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"--zeroshot_templates {spec}: neither openai, simple nor a readable file ({e})"
        ) from e
    if not templates:
        raise DataError(
            f"--zeroshot_templates {spec}: the file holds no template; write one a line, with {{}}"
        )
    for i, t in enumerate(templates, 1):
        if t.count("{}") != 1 or "{" in t.replace("{}", "") or "}" in t.replace("{}", ""):
            raise DataError(
                f"--zeroshot_templates {spec}, line {i} {t!r}: a template needs exactly one {{}} where the class "
                "name goes (and no other braces), e.g. a photo of a {}."
            )
    return templates


def prepare_zeroshot(
    root: str,
    tokenizer: Any,
    *,
    image_size: int,
    classnames_file: str | None = None,
    templates: str = "openai",
    max_len: int = 77,
    use_cache: bool = True,
    cache_dir: str | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> ZeroShotSet:
    """Read, check and prepare a class folder once: prompts tokenised, images decoded into the cache."""
    folders, files = read_folder(root)
    names = class_names(folders, classnames_file)
    chosen = load_templates(templates)
    texts = [t.format(name) for name in names for t in chosen]
    prompts = [
        np.asarray(ids, np.int32)
        for ids in tokenizer(texts, max_length=max_len, truncation=True)["input_ids"]
    ]
    paths = [p for group in files for p in group]
    labels = np.repeat(np.arange(len(folders)), [len(group) for group in files])
    skipped = {"images": 0, "classes": 0}
    if use_cache and cache_dir:
        images, meta = build_cache(paths, image_size, cache_dir, workers=workers, overwrite=overwrite)
        bad = sorted(meta["bad"])
        for i in bad:
            logger.warning("zero-shot: image skipped: %s", meta["bad"][i])
        keep = np.setdiff1d(np.arange(len(paths)), np.asarray(bad, np.int64))
        skipped["images"] = len(bad)
        images, labels = _Subset(images, keep), labels[keep]
    else:  # decoded at every evaluation; a failure is counted there
        images = ImagesOnTheFly(paths, image_size)
    empty = [folders[c] for c in range(len(folders)) if not (labels == c).any()]
    skipped["classes"] = len(empty)
    if empty:
        logger.warning("zero-shot: %d class folder(s) have no readable image (still candidates): %s",
                       len(empty), ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""))  # fmt: skip
    if not len(labels):
        raise DataError(
            f"--zeroshot_dir {root}: none of its {len(paths)} images could be decoded (see the warnings)"
        )
    logger.info("zero-shot: %d images in %d classes, %d templates (%s) from %s",
                len(labels), len(names), len(chosen), templates, root)  # fmt: skip
    return ZeroShotSet(names, chosen, prompts, images, labels.astype(np.int64), skipped)


class _Subset:
    """The readable images of a cache, in order."""

    def __init__(self, images: Any, keep: np.ndarray) -> None:
        self.images, self.keep = images, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[int(self.keep[i])]


# --- embedding and scoring ---------------------------------------------------------------------------------------
def class_embeddings(
    model: Any, zs: ZeroShotSet, *, pad_id: int, batch_size: int, device: Any, rank: int, world: int
) -> torch.Tensor:
    """[C, D] float32 on the CPU: per class, the normalised mean of its templates' normalised text embeddings."""
    lengths = np.fromiter((len(p) for p in zs.prompts), np.int64, len(zs.prompts))
    order = np.argsort(lengths, kind="stable")
    dealt = [order[r::world] for r in range(world)]  # every rank gets short and long prompts alike
    real: list[int] = []

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for rows, n, width in _caption_batches([zs.prompts[i] for i in dealt[rank]], batch_size):
            real.append(n)
            ids, mask = pad_captions(rows, pad_id, width)
            yield {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    _, texts = embed_for_retrieval(model, iter(()), batches(), device)
    if texts.shape[0]:
        texts = torch.cat([b[:n] for b, n in zip(texts.split(batch_size), real, strict=True)])
    if world > 1:
        texts = gather_rows(texts.to(device), len(zs.prompts)).cpu()
    by_prompt = torch.empty_like(texts)
    by_prompt[torch.from_numpy(np.concatenate(dealt))] = texts
    with full_precision("cpu"):
        mean = by_prompt.view(len(zs.classnames), len(zs.templates), -1).mean(1)
        return torch.nn.functional.normalize(mean, dim=-1)


def image_embeddings(
    model: Any,
    zs: ZeroShotSet,
    *,
    batch_size: int,
    device: Any,
    rank: int,
    world: int,
    pixels: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, D] float32 embeddings of every image, [N] bool: decoded), the same on every rank."""
    mine = shard_indices(len(zs.labels), rank, world)
    ok = np.ones(len(mine), dtype=bool)

    def batches() -> Iterator[torch.Tensor]:
        rows: list[np.ndarray] = []
        for j, i in enumerate(mine):
            array = zs.images[i]
            if array is None:  # an on-the-fly decode failed (logged by the reader)
                ok[j] = False
                continue
            rows.append(array)
            if len(rows) == batch_size:
                yield pixels(torch.from_numpy(np.stack(rows)).to(device))
                rows = []
        if rows:  # one fixed batch shape: the last batch repeats its first row
            yield pixels(torch.from_numpy(np.stack(_fill(rows, batch_size))).to(device))

    embedded, _ = embed_for_retrieval(model, batches(), iter(()), device)
    local = torch.zeros(len(mine), embedded.shape[1])
    local[torch.from_numpy(ok)] = embedded[: int(ok.sum())]
    valid = torch.from_numpy(ok).long()
    if world > 1:
        local = gather_rows(local.to(device), len(zs.labels)).cpu()
        valid = gather_rows(valid.to(device), len(zs.labels)).cpu()
    return local, valid.bool()


def topk_accuracy(
    image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """``zeroshot_top{k}`` in percent; ties against the model. Embeddings L2-normalised; scores in float32."""
    ranks = torch.empty(len(labels), dtype=torch.long)
    with full_precision(image_embeds.device):
        for start in range(0, len(labels), 4096):
            scores = image_embeds[start : start + 4096].float() @ class_embeds.float().T
            own = scores.gather(1, labels[start : start + 4096, None])
            ranks[start : start + 4096] = (scores >= own).sum(1)  # the own class counts itself once
    return {f"zeroshot_top{k}": 100.0 * float((ranks <= k).double().mean()) for k in ks}


def zeroshot_eval(
    model: Any,
    zs: ZeroShotSet,
    *,
    pad_id: int,
    batch_size: int,
    device: Any,
    rank: int,
    world: int,
    pixels: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) on ``zs``; every rank calls it and gets the same figures.

    Adds ``zeroshot_images`` (images scored), ``zeroshot_classes`` and ``zeroshot_skipped_images`` (unreadable).
    Raises ZeroShotSkipped when the embeddings are not finite (a diverged model).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes = class_embeddings(
        model, zs, pad_id=pad_id, batch_size=batch_size, device=device, rank=rank, world=world
    )
    images, ok = image_embeddings(
        model, zs, batch_size=batch_size, device=device, rank=rank, world=world, pixels=pixels
    )
    labels = torch.from_numpy(zs.labels)
    failed = int((~ok).sum())
    if failed:
        logger.warning("zero-shot: %d of %d images could not be decoded; left out", failed, len(ok))
        images, labels = images[ok], labels[ok]
    if not len(labels):
        raise ZeroShotSkipped("no zero-shot image could be decoded")
    for name, emb in (("class", classes), ("image", images)):
        bad = ~torch.isfinite(emb).all(1) | (emb.norm(dim=1) < 0.5)
        if bad.any():
            raise ZeroShotSkipped(
                f"{int(bad.sum())} of {len(emb)} {name} embeddings are NaN, inf or zero: the model has diverged"
            )
    metrics = topk_accuracy(images, classes, labels)
    metrics.update(
        zeroshot_images=len(labels), zeroshot_classes=len(zs.classnames),
        zeroshot_skipped_images=zs.skipped.get("images", 0) + failed,
    )  # fmt: skip
    return metrics


def predictions(
    model: Any, zs: ZeroShotSet, *, pad_id: int, batch_size: int, device: Any, pixels: Callable
) -> np.ndarray:
    """Each image's best class (one process): what the figures above count, image by image."""
    classes = class_embeddings(
        model, zs, pad_id=pad_id, batch_size=batch_size, device=device, rank=0, world=1
    )
    images, _ = image_embeddings(
        model, zs, batch_size=batch_size, device=device, rank=0, world=1, pixels=pixels
    )
    with full_precision("cpu"):
        return (images @ classes.T).argmax(1).numpy()


def from_args(
    data_args: Any, tokenizer: Any, *, image_size: int, cache_dir: str, training_args: Any
) -> ZeroShotSet | None:
    """run_clip.py's class folder (--zeroshot_dir, --zeroshot_classnames, --zeroshot_templates), or None."""
    if not getattr(data_args, "zeroshot_dir", None):
        return None
    with training_args.main_process_first(desc="zero-shot caches"):  # one rank decodes, the others reuse
        return prepare_zeroshot(
            data_args.zeroshot_dir, tokenizer, image_size=image_size, classnames_file=data_args.zeroshot_classnames,
            templates=data_args.zeroshot_templates, max_len=data_args.max_seq_length or 77,
            use_cache=data_args.image_cache, cache_dir=cache_dir,
            workers=data_args.preprocessing_num_workers or 1, overwrite=data_args.overwrite_cache,
        )  # fmt: skip
