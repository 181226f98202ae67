"""Peak accelerator memory of this process, for the train metrics (CPU runs report none)."""

from __future__ import annotations

import torch


def peak_device_memory_metrics(device: str | torch.device, prefix: str = "train") -> dict[str, float]:
    """``{prefix}_peak_device_memory_gb``: the most memory torch's allocator held on the device (GiB); {} on CPU."""
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated(device)
    elif kind == "npu" and hasattr(torch, "npu"):  # torch_npu registers torch.npu
        peak = torch.npu.max_memory_allocated(device)
    else:
        return {}
    return {f"{prefix}_peak_device_memory_gb": round(peak / 2**30, 3)}
