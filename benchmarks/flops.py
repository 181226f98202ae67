"""Training FLOPs of one image-caption pair: what MFU divides by (2 per multiply-add, forward x3).

Checked against open_clip's model profile for ViT-B/32 (tests/runs/test_gpu_check.py)."""

from __future__ import annotations


def _encoder_flops(tokens: float, layers: int, hidden: int, ffn: int) -> float:
    """Forward FLOPs of a pre/post-LN transformer encoder on one sequence: QKV/out + MLP matmuls + attention."""
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * tokens * hidden
    return tokens * layers * per_token


def flops_per_sample(config: object, width: float) -> float:
    """Training FLOPs (forward x3) of one image-caption pair for a VisionTextDualEncoder config."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    vision = _encoder_flops(patches + 1, v.num_hidden_layers, v.hidden_size, v.intermediate_size)
    vision += 2 * patches * 3 * v.patch_size**2 * v.hidden_size + 2 * v.hidden_size * config.projection_dim
    text = _encoder_flops(width, t.num_hidden_layers, t.hidden_size, t.intermediate_size)
    text += (
        2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * config.projection_dim
    )  # pooler + projection
    return 3 * (vision + text)
