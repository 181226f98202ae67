"""Image<->text retrieval metrics (R@K, mean/median rank), many captions per image, as on COCO.

Protocol: every unique image is embedded once and every caption once; ``text_to_image[t]`` is the index
of caption ``t``'s image. Scores are dot products of L2-normalised embeddings (cosine similarity).

- image -> text: an image's rank is the best (smallest) 1-based rank among its own captions; a hit at K
  when that rank is <= K, i.e. any of its captions is in its top K.
- text -> image: a caption's rank is the 1-based rank of its own image among all images.
- Ties count against the model (pessimistic): rank = 1 + number of *wrong* candidates scoring >= the
  right one. A collapsed model whose embeddings are all equal therefore gets the worst rank, not R@1 100%.
- Recalls are percentages (0-100), as the CLIP papers report them. K beyond the number of candidates
  gives 100%, since every rank is <= the number of candidates.

The score matrix is built ``chunk_size`` rows at a time, so extra memory is about
``chunk_size * max(N_img, N_txt) * 4`` bytes (the float32 scores) plus a few MB, never ``N_img * N_txt``
at once.

For several ranks: each embeds its contiguous shard (``shard_indices``), then ``gather_rows`` hands every
rank the full matrix; the metrics are then computed the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "embed_for_retrieval",
    "full_precision",
    "gather_rows",
    "retrieval_metrics",
    "retrieval_ranks",
    "shard_indices",
]


def full_precision(device: torch.device | str) -> AbstractContextManager:
    """Autocast off on ``device``: scores, ties and ranks must not depend on the training precision.

    The Trainer evaluates under its autocast (bf16 / fp16); inside it a float32 matmul would come out in the low
    precision again, and ties and ranks would change with ``--bf16`` (or fail: scatter wants one dtype).
    """
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.autocast(kind, enabled=False)


def _check_inputs(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"expected image_embeds [N_img, D] and text_embeds [N_txt, D] with the same D, got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    n_img, n_txt = image_embeds.shape[0], text_embeds.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {n_img} and {n_txt}")
    if text_to_image.ndim != 1 or text_to_image.shape[0] != n_txt:
        raise ValueError(
            f"text_to_image must be 1-D with one image index per caption ({n_txt}), "
            f"got shape {tuple(text_to_image.shape)}"
        )
    if text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got dtype {text_to_image.dtype}")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(f"text_to_image values must lie in [0, {n_img}), got [{lo}, {hi}]")
    captionless = (torch.bincount(text_to_image.cpu(), minlength=n_img) == 0).nonzero().flatten()
    if captionless.numel():
        raise ValueError(
            f"{captionless.numel()} image(s) have no caption (first: index {int(captionless[0])}); "
            "pass only the images that captions point to"
        )
    for name, emb in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not torch.isfinite(emb).all():
            raise ValueError(f"{name} contain NaN or inf: the model has diverged (check loss and loss scale)")
        norms = emb.float().norm(dim=1)
        if (norms - 1).abs().max() > 1e-3:
            raise ValueError(
                f"{name} are not L2-normalised (norms in [{float(norms.min()):.4g}, {float(norms.max()):.4g}]); "
                "pass torch.nn.functional.normalize(x, dim=-1) or use embed_for_retrieval"
            )


def _count_at_or_above(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per row, how many scores are >= that row's threshold [c, 1].

    In blocks of ~2M elements: summing a boolean tensor converts it to int64 first, which would
    otherwise cost 9 bytes per score on top of the scores themselves.
    """
    rows = max(1, (1 << 21) // max(1, scores.shape[1]))
    return torch.cat(
        [(scores[r : r + rows] >= threshold[r : r + rows]).sum(1) for r in range(0, len(scores), rows)]
    )


def retrieval_ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks (image->text [N_img], text->image [N_txt]) under the protocol in the module docstring.

    Embeddings must be L2-normalised; computed on their device in float32 (autocast off, whatever the caller's
    context), returned as int64 on the CPU.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_inputs(image_embeds, text_embeds, text_to_image)
    with full_precision(image_embeds.device):
        return _ranks(image_embeds.float(), text_embeds.float(), text_to_image, chunk_size)


def _ranks(
    img: torch.Tensor, txt: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device = img.device
    t2i = text_to_image.to(device=device, dtype=torch.long)
    n_img, n_txt = img.shape[0], txt.shape[0]

    i2t = torch.empty(n_img, dtype=torch.long, device=device)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        scores = img[start:stop] @ txt.T  # [c, N_txt]
        # This chunk's positive pairs: (row of the caption's image in the chunk, caption index).
        caps = ((t2i >= start) & (t2i < stop)).nonzero().flatten()
        rows = t2i[caps] - start
        pos = scores[rows, caps]  # read from the same matrix as the competitors, so ties are exact
        best = torch.full((stop - start,), float("-inf"), device=device)
        best = best.scatter_reduce(0, rows, pos, reduce="amax")
        at_or_above = _count_at_or_above(scores, best[:, None])
        # Positives scoring >= the best positive are exactly those equal to it; they are not competitors.
        pos_at_best = torch.zeros(stop - start, dtype=torch.long, device=device)
        pos_at_best = pos_at_best.scatter_add(0, rows, (pos >= best[rows]).long())
        i2t[start:stop] = 1 + at_or_above - pos_at_best

    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=device)
    for start in range(0, n_txt, chunk_size):
        stop = min(start + chunk_size, n_txt)
        scores = txt[start:stop] @ img.T  # [c, N_img]
        own = scores.gather(1, t2i[start:stop, None])
        # Counts the own image itself (score >= itself) plus every wrong image tying or beating it.
        t2i_rank[start:stop] = _count_at_or_above(scores, own)

    return i2t.cpu(), t2i_rank.cpu()


def _summarise(ranks: torch.Tensor, prefix: str, ks: Sequence[int]) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": 100.0 * float((ranks <= k).double().mean()) for k in ks}
    out[f"{prefix}_mean_rank"] = float(ranks.double().mean())
    # numpy's median: the mean of the two middle ranks for an even count.
    out[f"{prefix}_median_rank"] = float(torch.quantile(ranks.double(), 0.5))
    return out


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """R@K (percent) and mean/median rank both ways, e.g. ``image_to_text_R@1``, ``text_to_image_median_rank``.

    ``image_embeds`` [N_img, D] and ``text_embeds`` [N_txt, D] must be L2-normalised (``embed_for_retrieval``
    returns them so); ``text_to_image`` [N_txt] gives each caption's image index. See the module docstring
    for the protocol and the tie rule.
    """
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    i2t, t2i = retrieval_ranks(image_embeds, text_embeds, text_to_image, chunk_size)
    return {**_summarise(i2t, "image_to_text", ks), **_summarise(t2i, "text_to_image", ks)}


def shard_indices(n: int, rank: int, world: int) -> range:
    """This rank's contiguous slice of ``range(n)``; sizes differ by at most one, the first ranks larger."""
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"need n >= 0 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_rows(local: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate every rank's contiguous shard of rows, in rank order; the full [n_total, ...] on every rank.

    Shards may differ in length (even be empty; an empty shard's trailing shape is ignored). Without an
    initialised process group, or with one rank, returns ``local``. Use device tensors with nccl/hccl
    and CPU tensors with gloo. The result stays on ``local``'s device; floating-point rows come back float32.
    """
    if local.ndim < 1:
        raise ValueError("gather_rows needs a tensor with a row dimension, got a scalar")
    if local.is_floating_point():
        local = local.float()  # every rank gathers one dtype, and the metrics are computed in float32
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        if local.shape[0] != n_total:
            raise ValueError(f"expected all {n_total} rows in a single process, got {local.shape[0]}")
        return local
    backend = str(dist.get_backend())
    if backend == "undefined":  # a group made from a device map, e.g. "cpu:gloo,cuda:nccl"
        backend = str(dist.get_backend_config())
    if local.device.type == "cpu" and "gloo" not in backend:
        raise ValueError(
            f"the {backend} process group cannot gather CPU tensors: call gather_rows(t.to(device), n).cpu()"
        )
    world = dist.get_world_size()
    # Rows and trailing shape of every shard (up to 6 trailing dims), so padding and trimming agree everywhere.
    if local.ndim > 7:
        raise ValueError(f"gather_rows supports up to 7 dims, got {local.ndim}")
    meta = torch.full((8,), -1, dtype=torch.long, device=local.device)
    meta[0] = local.shape[0]
    meta[1 : local.ndim] = torch.tensor(local.shape[1:], dtype=torch.long)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    metas_cpu = [m.cpu().tolist() for m in metas]
    counts = [m[0] for m in metas_cpu]
    shapes = {tuple(d for d in m[1:] if d >= 0) for m in metas_cpu if m[0] > 0}
    if sum(counts) != n_total:
        raise ValueError(f"shards hold {sum(counts)} rows in all (per rank {counts}), expected {n_total}")
    if len(shapes) > 1:
        raise ValueError(f"shards disagree on the row shape: {sorted(shapes)}")
    row_shape = shapes.pop() if shapes else tuple(local.shape[1:])
    width = max(counts)
    padded = local.new_zeros((width, *row_shape))
    if local.shape[0]:
        padded[: local.shape[0]] = local
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded.contiguous())
    return torch.cat([buf[:count] for buf, count in zip(bufs, counts, strict=True)])


def _pooled(out: object) -> torch.Tensor:
    # transformers 4.x returned the projected tensor; 5.x returns BaseModelOutputWithPooling with it in
    # pooler_output (or its to_tuple() when return_dict is off: (last_hidden_state, pooler_output, ...)).
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(out, tuple | list) and len(out) > 1 and isinstance(out[1], torch.Tensor):
        return out[1]
    raise TypeError(f"cannot find the projected embedding in a {type(out).__name__} returned by the model")


def _collect(out: object, device: torch.device | str) -> torch.Tensor:
    # The one cast: the model may run under autocast (bf16 / fp16) or in half weights (apex O2); the embeddings
    # leave here float32 and L2-normalised in float32, so everything downstream is precision-independent.
    with full_precision(device):
        return F.normalize(_pooled(out).float(), dim=-1).cpu()


def embed_for_retrieval(
    model: torch.nn.Module,
    image_batches: Iterable[torch.Tensor],
    text_batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed images and captions; returns L2-normalised float32 CPU tensors [N_img, P] and [N_txt, P].

    ``image_batches`` yield normalised float NCHW pixel values; ``text_batches`` yield dicts with
    ``input_ids`` (and usually ``attention_mask``). ``model`` is the bare model (unwrap DDP first); it is
    put in eval mode and restored afterwards. Empty iterables give [0, P] tensors.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    width = int(getattr(getattr(model, "config", None), "projection_dim", 0) or 0)
    images: list[torch.Tensor] = []
    texts: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for pixel_values in image_batches:
                out = model.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype))
                images.append(_collect(out, device))
            for batch in text_batches:
                if "input_ids" not in batch:
                    raise KeyError(f"text batches need 'input_ids' (got keys {sorted(batch)})")
                mask = batch.get("attention_mask")
                out = model.get_text_features(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=None if mask is None else mask.to(device),
                )
                texts.append(_collect(out, device))
    finally:
        model.train(was_training)
    empty = torch.empty(0, width)
    return (torch.cat(images) if images else empty), (torch.cat(texts) if texts else empty)
