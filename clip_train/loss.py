"""Contrastive loss (placeholder: local scope only; the global-batch version lands with issue 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, scope: str = "local"
) -> torch.Tensor:
    logits = text_embeds @ image_embeds.t() * logit_scale.exp()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
