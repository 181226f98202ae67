"""STAND-IN for torch_npu.optim (Ascend/pytorch torch_npu 2.x: torch_npu/optim/npu_fused_optim_base.py and
npu_fused_adamw.py; no NPU exists here): NpuFusedAdamW computes as torch AdamW and keeps the contract of
NpuFusedOptimizerBase: grads are combined at the first step and must stay the params'
`.grad` tensors afterwards, `zero_grad(set_to_none=True)` raises, `clip_grad_norm_fused_` clips the combined grads."""

import torch
from standin_clip import clip_grads_

CALLS: list[tuple] = []


class NpuFusedAdamW(torch.optim.AdamW):
    is_fused_optimizer = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self.combined = None  # [(param, grad)] once combined

    def _combined_grads(self) -> list:
        if self.combined is None:
            self.combined = [
                (p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None
            ]
        for param, grad in self.combined:
            if param.grad is not grad:
                raise RuntimeError(
                    "stand-in torch_npu: a param's .grad is no longer its combined-buffer tensor (set to None or "
                    "replaced); the fused optimizer would step on stale combined grads"
                )
        return [grad for _, grad in self.combined]

    @torch.no_grad()
    def step(self, closure=None):
        self._combined_grads()
        CALLS.append(("step",))
        return super().step(closure)

    def zero_grad(self, set_to_none=False):
        if set_to_none:
            raise ValueError("set_to_none is not supported in fused optimizers")
        super().zero_grad(set_to_none=False)

    @torch.no_grad()
    def clip_grad_norm_fused_(self, max_norm, norm_type=2):
        total = clip_grads_(self._combined_grads(), max_norm, norm_type)
        CALLS.append(("clip_grad_norm_fused_", float(max_norm)))
        return total
