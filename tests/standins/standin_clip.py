"""STAND-IN helper shared by the apex and torch_npu stand-ins: clip a list of grads to a total norm, in place."""

import torch


@torch.no_grad()
def clip_grads_(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2) -> torch.Tensor:
    """Scale ``grads`` so their joint ``norm_type`` norm is at most ``max_norm``; returns the norm before."""
    total = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float(), norm_type) for g in grads]), norm_type
    )
    coef = float(max_norm) / (float(total) + 1e-6)
    if coef < 1:
        for grad in grads:
            grad.mul_(coef)
    return total
