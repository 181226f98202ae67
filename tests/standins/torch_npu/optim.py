"""STAND-IN for torch_npu.optim (no NPU exists on this machine): NpuFusedAdamW computes as torch AdamW."""

import torch


class NpuFusedAdamW(torch.optim.AdamW):
    pass
