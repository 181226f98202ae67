"""Contrastive (CLIP) loss over the local batch or over the global batch across ranks, and the logit-scale clamp.

"global" gathers every rank's embeddings with autograd and scores this rank's rows against all columns
(memory linear in the global batch). Each rank's loss is the mean over its own rows, so after DDP averages the
gradients over ranks, training matches one process on the concatenated batch.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOSS_SCOPES = ("local", "global")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the summed gradient of its own rows.

    Our own instead of torch.distributed.nn.functional.all_gather: that one is deprecated in torch 2.13 and, off
    NCCL (gloo, hccl), emulates reduce-scatter with one scatter per rank; a single all_reduce works everywhere.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss touched our rows; sum those gradients. Summed in float32 whatever autocast made the
        # embeddings (bf16 / fp16): a half-precision sum over many ranks loses the small contributions.
        # (.float() copies a half gradient; clone the float32 one: all_reduce works in place.)
        dtype = grad.dtype
        grad = grad.contiguous().float() if dtype != torch.float32 else grad.contiguous().clone()
        dist.all_reduce(grad)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows].to(dtype)


def _distributed_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, scope: str = "local") -> Tensor:
    """CLIP's symmetric cross-entropy over image-text similarities.

    image_embeds, text_embeds: [B, D] L2-normalised embeddings of this rank's batch (the model's
    `out.image_embeds` / `out.text_embeds`); row i of each is a matching pair. logit_scale: the model's
    parameter, the log of the multiplier (the logits are scaled by logit_scale.exp()).

    scope "local": the in-batch loss the model itself returns with return_loss=True.
    scope "global": this rank's B texts and B images against the images and texts of every rank (W*B columns).
    Every rank must pass the same B. Without an initialised process group, or with one rank, it equals "local".
    """
    if scope not in LOSS_SCOPES:
        raise ValueError(
            f"loss scope must be one of {LOSS_SCOPES}, got {scope!r} (--loss_scope local|global)"
        )
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            "clip_loss expects image and text embeddings of the same shape [batch, dim], got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}; pass the model output's "
            "image_embeds and text_embeds"
        )
    scale = logit_scale.exp()
    rows = image_embeds.shape[0]
    if scope == "global" and _distributed_world_size() > 1:
        all_images = _GatherWithGrad.apply(image_embeds)
        all_texts = _GatherWithGrad.apply(text_embeds)
        labels = torch.arange(rows, device=image_embeds.device) + dist.get_rank() * rows
        logits_per_text = torch.matmul(text_embeds, all_images.t()) * scale
        logits_per_image = torch.matmul(image_embeds, all_texts.t()) * scale
    else:
        # Same operations, in the same order, as VisionTextDualEncoderModel.forward.
        labels = torch.arange(rows, device=image_embeds.device)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * scale
        logits_per_image = logits_per_text.t()
    return (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_image, labels)) / 2.0


def clamp_logit_scale_(model: nn.Module, max_scale: float) -> None:
    """Clamp the model's logit_scale parameter in place so that logit_scale.exp() <= max_scale.

    Done on the parameter after the optimizer step (as open_clip does) rather than inside the loss, where a clamp
    would zero the parameter's gradient for as long as it sits above the limit.
    """
    module = getattr(model, "module", model)  # accept a DDP-wrapped model too
    param = getattr(module, "logit_scale", None)
    if not isinstance(param, Tensor):
        raise ValueError(
            f"{type(module).__name__} has no logit_scale parameter to clamp; the logit-scale clamp needs a "
            "CLIP-style model such as VisionTextDualEncoderModel (or leave the clamp off)"
        )
    with torch.no_grad():
        param.clamp_(max=math.log(max_scale))


class LogitScaleClamp(TrainerCallback):
    """Keeps logit_scale.exp() <= max_scale (CLIP uses 100) after every optimizer step.

    max_scale is the multiplier itself, not its log: the parameter is clamped at ln(max_scale) (4.6052 for 100).
    on_optimizer_step fires right after optimizer.step() in the Trainer (transformers 5.x); the model it hands
    callbacks is the unwrapped one, whose parameter DDP shares, and every rank clamps the same values alike.
    """

    def __init__(self, max_scale: float = 100.0) -> None:
        if not max_scale > 1.0:
            raise ValueError(
                f"max logit scale must be > 1 (it is the multiplier exp(logit_scale); CLIP uses 100), got {max_scale}"
            )
        self.max_scale = max_scale

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A value given in log units (4.6 for 100) would silently squash the starting scale (1/0.07 = 14.3).
        start = getattr(getattr(model, "module", model), "logit_scale", None)
        if isinstance(start, Tensor) and start.exp().item() > self.max_scale:
            logger.warning(
                "max logit scale %.4g is below the model's current scale %.4g: it is clamped down now. The value "
                "is the multiplier exp(logit_scale) (CLIP uses 100), not its log.",
                self.max_scale,
                start.exp().item(),
            )

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        clamp_logit_scale_(model, self.max_scale)
