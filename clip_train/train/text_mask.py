"""The text tower's attention mask in a form transformers uses as it is, so no step reads a tensor on the host.

transformers 5.24 turns a 2-D padding mask into the attention mask inside every RoBERTa forward
(``masking_utils.create_bidirectional_mask``), and for SDPA first asks ``padding_mask.all()`` to drop the mask when
nothing is padded: a host-device sync in every training step, which keeps the host from queueing step n+1 while
the device runs step n. A 4-D mask is returned as it is, unchecked. So:

- the collator, which sees the batch on the host, leaves the mask out when no caption is padded (data/dataset.py);
- ``text_attention_mask`` turns the 2-D mask into the 4-D form transformers would have built, on the device,
  without reading it: boolean ``[B, 1, 1, W]`` (True = attend; SDPA broadcasts it over the queries) for SDPA, and
  additive, in the tower's weight dtype (0 / dtype min, as transformers builds it), for the eager attention. Other implementations (flash, flex) get the 2-D mask.
"""

from __future__ import annotations

import torch

FOUR_D = ("sdpa", "eager")


def text_attention_mask(
    mask: torch.Tensor | None, attn_implementation: str | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """The 4-D mask for ``attn_implementation`` ("sdpa" or "eager") from a 2-D 0/1 mask; anything else as given.
    ``dtype``: the text tower's weights' (an fp32 mask beside fp16 weights, apex O2, breaks the eager attention)."""
    if mask is None or mask.dim() != 2 or attn_implementation not in FOUR_D:
        return mask
    keep = mask[:, None, None, :].to(torch.bool)
    if attn_implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~keep, torch.finfo(dtype).min
    )


def full_mask(
    batch: int,
    width: int,
    attn_implementation: str | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A 4-D mask that masks nothing (compiled runs keep one graph per width whether or not a batch is padded)."""
    ones = torch.ones((batch, width), dtype=torch.int64, device=device)
    return text_attention_mask(ones, attn_implementation, dtype)
