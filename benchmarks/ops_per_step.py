#!/usr/bin/env python3
"""Aten ops dispatched per optimizer step (the CPU proxy of kernel launches on an accelerator), eager and compiled,
and the memory the step holds, at full-size shapes — built from configs, nothing downloaded.

    python3 benchmarks/ops_per_step.py                          # full-size, batch 2, width 32: eager + compiled
    python3 benchmarks/ops_per_step.py --modes eager --memory 8,16   # + activation memory at batch 8 and 16
    python3 benchmarks/ops_per_step.py --tiny                   # tiny towers, seconds (CI-size check of the script)

A step is what ClipTrainer runs: uint8 images normalised, the dual encoder's forward with a 4-D boolean text mask
(train/text_mask.py), the contrastive loss, backward, the global grad-norm clip (foreach) and torch's fused AdamW.
Each phase runs under a ``record_function`` label; torch.profiler (CPU) counts the aten ops dispatched in it:
*all* (every aten event, nested ones included), *launch* (leaf ops less views, aliases, same-device casts and
allocations: the proxy of device kernel launches) and *leaf* (aten events with no aten op inside: what would reach
a device kernel or a view; a ``_foreach_*`` / ``_fused_*`` op counts once, as the one multi-tensor kernel it is on a
GPU, although CPU runs it as a loop of per-tensor ops). Compiled modes (inductor, CPU): ``forward`` = torch.compile(model) (ClipTrainer's
--torch_compile), ``forward+loss`` = one compiled function for the forward and the loss (backward compiled by
AOTAutograd in both); their inductor kernels are counted as well (``cpp.enable_kernel_profile``).
``--memory B1,B2``: the bytes autograd keeps for backward (saved tensors other than the parameters, per tower; the
loss's under "other"), measured at those batches with saved-tensor hooks (distinct storages counted once), fp32 or under CPU bf16 autocast
(``--memory_precision bf16``: what a GPU's bf16 autocast saves, op for op).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MULTI = ("aten::_foreach_", "aten::_fused_")
# Leaf ops that launch nothing on a device: views, aliases, same-device casts, allocations.
NO_KERNEL = {f"aten::{n}" for n in (
    "view", "t", "transpose", "permute", "expand", "reshape", "unsqueeze", "squeeze", "slice", "select",
    "as_strided", "detach", "alias", "to", "_unsafe_view", "split", "split_with_sizes", "chunk", "unbind",
    "lift_fresh", "empty", "empty_like", "empty_strided", "resize_", "_reshape_alias", "numpy_T", "contiguous",
    "result_type", "is_nonzero", "size", "stride", "set_", "narrow", "expand_as", "view_as", "flatten",
    "_has_compatible_shallow_copy_type", "new_empty", "new_empty_strided")}  # fmt: skip
PHASES = ("normalise", "forward", "loss", "backward", "clip", "optimizer")


def build(tiny: bool):  # noqa: ANN201
    import torch
    from transformers import (
        CLIPVisionConfig,
        RobertaConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    torch.manual_seed(0)
    if tiny:
        v = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
        t = RobertaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=130, vocab_size=1000)  # fmt: skip
        dim = 32
    else:  # ViT-B/32 at 224 + roberta-base: open_clip's roberta-ViT-B-32
        v = CLIPVisionConfig(image_size=224, patch_size=32)
        t = RobertaConfig(vocab_size=50265, max_position_embeddings=514)
        dim = 512
    config = VisionTextDualEncoderConfig.from_vision_text_configs(v, t, projection_dim=dim)
    for c in (config.vision_config, config.text_config):  # dropout off: the compiled and eager graphs alike
        for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
            if hasattr(c, k):
                setattr(c, k, 0.0)
    return VisionTextDualEncoderModel(config).train()


def batch(model, size: int, width: int):  # noqa: ANN001, ANN201
    import torch

    from clip_train.train.text_mask import text_attention_mask

    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(min(8, width), width + 1, (size,), generator=g)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, model.config.text_config.vocab_size, (size, width), generator=g).masked_fill(
        mask == 0, 1
    )
    images = torch.randint(0, 256, (size, 224, 224, 3), dtype=torch.uint8, generator=g)
    return ids, text_attention_mask(mask, model.text_model.config._attn_implementation), images


def make_step(model, mode: str):  # noqa: ANN001, ANN201
    import torch
    from torch.profiler import record_function

    from clip_train.train.loss import clip_loss
    from clip_train.train.trainer import normalize_pixels

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    mean, std = torch.full((1, 3, 1, 1), 0.45), torch.full((1, 3, 1, 1), 0.27)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_loss(ids, mask, pixels):  # noqa: ANN001, ANN202
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=False)
        return clip_loss(out["image_embeds"], out["text_embeds"], model.logit_scale)

    fwd = torch.compile(model) if mode == "forward" else model
    fused = torch.compile(forward_loss) if mode == "forward+loss" else None

    def step(ids, mask, images) -> None:  # noqa: ANN001
        with record_function("normalise"):
            pixels = normalize_pixels(images, mean, std)
        if fused is not None:
            with record_function("forward"):
                loss = fused(ids, mask, pixels)
        else:
            with record_function("forward"):
                out = fwd(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=False)
            with record_function("loss"):
                loss = clip_loss(out["image_embeds"], out["text_embeds"], model.logit_scale)
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def count_ops(step, args) -> dict:  # noqa: ANN001
    """Profile one step; aten ops per phase (all, leaf) and inductor kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(*args)
    events = prof.events()
    phase_of = {}
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name in PHASES]
    per = {p: Counter() for p in PHASES}
    total = Counter()
    for e in events:
        is_aten = e.name.startswith("aten::")
        is_kernel = ("cpp_fused" in e.name or e.name.startswith("graph_")) and not is_aten
        if not (is_aten or is_kernel):
            continue
        phase = next((n for s, t, n in spans if s <= e.time_range.start and e.time_range.end <= t), "other")
        phase_of[id(e)] = phase
        kinds = []
        if is_aten:
            kinds.append("all")
            # One multi-tensor kernel on a GPU: CPU runs _foreach_* / _fused_* ops as per-tensor loops of aten ops,
            # so the outer op counts as the leaf and what it runs inside it does not.
            inside_multi = False
            parent = e.cpu_parent
            while parent is not None:
                inside_multi = inside_multi or parent.name.startswith(MULTI)
                parent = parent.cpu_parent
            multi = e.name.startswith(MULTI)
            if not inside_multi and (multi or not any(c.name.startswith("aten::") for c in e.cpu_children)):
                kinds.append("leaf")
                if e.name not in NO_KERNEL:
                    kinds.append("launch")
        else:
            kinds.append("kernels")
        for k in kinds:
            total[k] += 1
            per.setdefault(phase, Counter())[k] += 1
    return {"total": dict(total), "phases": {p: dict(c) for p, c in per.items() if c}}


def saved_bytes(model, size: int, width: int, precision: str = "fp32") -> dict:  # noqa: ANN001
    """Bytes autograd saves for backward during the forward (by tower) and the logits, at batch ``size``."""
    import torch

    from clip_train.train.loss import clip_loss
    from clip_train.train.trainer import normalize_pixels

    ids, mask, images = batch(model, size, width)
    pixels = normalize_pixels(images, torch.full((1, 3, 1, 1), 0.45), torch.full((1, 3, 1, 1), 0.27))
    where = {"now": "other"}
    seen: dict[str, set] = {"vision": set(), "text": set(), "other": set()}
    sizes: dict[int, int] = {}

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # noqa: ANN001, ANN202
        key = t.untyped_storage().data_ptr()
        if key in weights:
            return t  # a parameter saved for its matmul's backward: model state, not an activation
        sizes[key] = t.untyped_storage().nbytes()
        seen[where["now"]].add(key)
        return t

    def tag(name: str):  # noqa: ANN202
        def hook(*_):  # noqa: ANN002, ANN202
            where["now"] = name

        return hook

    handles = [model.vision_model.register_forward_pre_hook(tag("vision")),
               model.vision_model.register_forward_hook(tag("other")),
               model.text_model.register_forward_pre_hook(tag("text")),
               model.text_model.register_forward_hook(tag("other"))]  # fmt: skip
    dtype = torch.bfloat16 if precision == "bf16" else None
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype, dtype is not None),
    ):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=False)
        loss = clip_loss(out["image_embeds"], out["text_embeds"], model.logit_scale)
    for h in handles:
        h.remove()
    del loss, out
    counted: set = set()
    result = {}
    for name in ("vision", "text", "other"):
        keys = seen[name] - counted
        counted |= keys
        result[name] = sum(sizes[k] for k in keys)
    return result


def widths_by_multiple(
    batches: list[int], multiples: list[int], draws: int = 2000, seed: int = 0
) -> list[dict]:
    """Caption widths a run sees per --pad_to_multiple_of: distinct widths (= static graphs / CUDA graphs) and the
    mean padded width (text FLOPs), over ``draws`` batches of caption lengths drawn as bench_input.py makes them
    (COCO-like with roberta's tokenizer: N(12.5, 3) tokens, at least 8, 2% with 5-20 more; the appended phrases
    overshoot the target by 0-3 tokens)."""
    import random

    rng = random.Random(seed)
    rows = []
    for b in batches:
        longest = []
        for _ in range(draws):
            n = 0
            for _ in range(b):
                t = max(8, round(rng.gauss(12.5, 3.0))) + (rng.randint(5, 20) if rng.random() < 0.02 else 0)
                n = max(n, t + rng.randint(0, 3))
            longest.append(min(n, 128))
        for m in multiples:
            widths = [min(128, -(-w // m) * m) for w in longest]
            rows.append({"batch": b, "multiple": m, "distinct": len(set(widths)), "mean": sum(widths) / len(widths),
                         "widths": sorted(set(widths))})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--width", type=int, default=32, help="caption width (tokens) of the batch")
    p.add_argument("--modes", default="eager,forward,forward+loss", help="eager, forward, forward+loss")
    p.add_argument("--memory", default="", help="batches at which to measure saved activations, e.g. 8,16")
    p.add_argument(
        "--memory_precision", choices=["fp32", "bf16"], default="fp32", help="autocast for --memory"
    )
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--widths", action="store_true", help="only the caption widths per --pad_to_multiple_of")
    a = p.parse_args(argv)
    if a.widths:
        print(
            "| batch | pad_to_multiple_of | distinct widths (graphs) | mean width | widths |\n|---:|---:|---:|---:|---|"
        )
        for r in widths_by_multiple([64, 256, 1024], [1, 8, 16, 32]):
            print(f"| {r['batch']} | {r['multiple']} | {r['distinct']} | {r['mean']:.1f} | {r['widths']} |")
        return 0
    import torch
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True
    results: dict = {"ops": {}, "memory": {}}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; "
          f"{'tiny' if a.tiny else 'full-size'} clip-roberta, batch {a.batch}, caption width {a.width}", flush=True)  # fmt: skip
    for mode in [m for m in a.modes.split(",") if m]:
        torch._dynamo.reset()
        model = build(a.tiny)
        step = make_step(model, "eager" if mode == "eager" else mode)
        args = batch(model, a.batch, a.width)
        t = time.perf_counter()
        step(*args)  # warm-up (compiles)
        first = time.perf_counter() - t
        step(*args)
        found = count_ops(step, args)
        found["first_step_s"] = round(first, 1)
        results["ops"][mode] = found
        print(f"{mode}: {json.dumps(found)}", flush=True)
        del model, step
    for size in [int(x) for x in a.memory.split(",") if x]:
        model = build(a.tiny)
        found = saved_bytes(model, size, a.width, a.memory_precision)
        results["memory"][size] = found
        print(f"saved for backward at batch {size}, width {a.width}, {a.memory_precision}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in found.items()),
              flush=True)  # fmt: skip
        del model
    print("\n| mode | aten ops / step (all) | leaf aten ops | launch-like (leaf - views) | inductor kernels | "
          + " | ".join(f"{ph} (launch + kernels)" for ph in PHASES) + " | first step s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|" + "---:|" * len(PHASES) + "---:|")
    for mode, r in results["ops"].items():
        cells = [
            str(r["phases"].get(ph, {}).get("launch", 0) + r["phases"].get(ph, {}).get("kernels", 0))
            for ph in PHASES
        ]
        tot = r["total"]
        print(f"| {mode} | {tot.get('all', 0)} | {tot.get('leaf', 0)} | {tot.get('launch', 0)} | {tot.get('kernels', 0)} | "
              + " | ".join(cells) + f" | {r['first_step_s']} |")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
