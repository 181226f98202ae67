"""CLIP_for_PyTorch: clip-roberta training on COCO 2017 (see README.md)."""
