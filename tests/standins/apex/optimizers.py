"""STAND-IN for Ascend apex.optimizers (gitee ascend/apex master 49a7994, src/apex/optimizers/npu_fused_adamw.py):
NpuFusedAdamW computes as torch AdamW and carries `is_npu_fused_optimizer`, which makes amp combine the grads and
limits it to O1/O2."""

import torch

CREATED: list = []


class NpuFusedAdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        self.is_npu_fused_optimizer = True
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, foreach=False
        )
        CREATED.append(self)
