"""STAND-IN for Ascend apex.optimizers (no NPU exists on this machine): NpuFusedAdamW computes as torch AdamW."""

import torch

CREATED: list = []


class NpuFusedAdamW(torch.optim.AdamW):
    is_npu_fused_optimizer = True  # what Ascend apex's fused optimizers carry; amp then combines grads

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        CREATED.append(self)
