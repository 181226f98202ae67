#!/usr/bin/env python3
"""Contrastive accumulation's cost: samples/s and peak memory of a training step, per accumulation setting.

    python benchmarks/bench_accum.py --quick                     # tiny model, a few steps (a minute on a CPU)
    python benchmarks/bench_accum.py                             # tiny, then full-size (2 timed steps on a CPU)
    python benchmarks/bench_accum.py --device cuda --precision bf16 --models full-size --steps 10

For each model (bench_input.py's tiny and full-size clip-roberta shapes, random init, 224 images, captions of
``--width`` tokens) it times one optimizer step of
  B = 64 x K = 1 (the recipe's batch), B = 16 x K = 4 contrastive (clip_train.train.accumulation.grad_cache_step: the
  same 64-sample loss and gradients), B = 16 x K = 4 mean (the Trainer's accumulation: four 16-sample losses),
  B = 16 x K = 1,
each in a fresh process (so that CPU peak RSS is its own), as run_clip.py trains: uint8 images normalised on the
device, the contrastive loss, AdamW, optional bf16/fp16 autocast (fp16 with a GradScaler). Peak memory: the
process's peak RSS on a CPU (and its growth over the RSS with the model loaded), peak allocated device memory on
an accelerator (reset after the warm-up steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = [(64, 1, "contrastive"), (16, 4, "contrastive"), (16, 4, "mean"), (16, 1, "contrastive")]


# bench_input.py's TINY and FULL shapes (repeated here: importing bench_input needs `datasets`, which the GPU
# machine this may run on lacks). Full: ViT-B/32 + roberta-base.
SHAPES = {
    "tiny": {"vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
             "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "max_position_embeddings": 130, "vocab_size": 1000},
             "projection_dim": 32},
    "full-size": {"vision": {}, "text": {"vocab_size": 50265, "max_position_embeddings": 514}, "projection_dim": 512},
}  # fmt: skip


def build_model(shape: str, dropout: float | None = None, image_size: int = 224):
    """A random-init clip-roberta of the given shape (dropout: override both towers' dropout)."""
    from transformers import (
        CLIPVisionConfig,
        RobertaConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    spec = SHAPES[shape]
    vision, text = dict(spec["vision"]), dict(spec["text"])
    if dropout is not None:
        vision["attention_dropout"] = dropout
        text["hidden_dropout_prob"] = text["attention_probs_dropout_prob"] = dropout
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(image_size=image_size, patch_size=32, **vision),
        RobertaConfig(
            type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2, **text
        ),
        projection_dim=spec["projection_dim"],
    )
    return VisionTextDualEncoderModel(config)


def normalize(images, mean, std, out):
    """clip_train.train.trainer.normalize_pixels' arithmetic (that module imports `datasets`)."""
    out.copy_(images.permute(0, 3, 1, 2))
    return out.mul_(1.0 / (std * 255.0)).add_(-mean / std)


def describe_machine(device: str) -> str:
    import platform

    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    what = f"{cpu}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    if device == "cuda":
        what += f", {torch.cuda.get_device_name()}"
    return f"{what}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_gb(device: str) -> float:
    import resource

    import torch

    if device != "cpu":
        return getattr(torch, device).max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(shape: str, batch: int, steps_k: int, mode: str, a: argparse.Namespace) -> dict:
    """One configuration in this process: seconds per optimizer step and peak memory."""
    import torch

    from clip_train.device.backend import synchronize
    from clip_train.train.accumulation import grad_cache_step
    from clip_train.train.loss import clip_loss

    device = a.device
    torch.manual_seed(0)
    model = build_model(shape).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loaded = rss_gb()
    size, vocab = model.config.vision_config.image_size, model.config.text_config.vocab_size
    micro = []
    for _ in range(steps_k):
        ids = torch.randint(3, vocab, (batch, a.width))
        micro.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                      "images": torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).to(device)})  # fmt: skip
    mean, std = torch.full((1, 3, 1, 1), 0.45, device=device), torch.full((1, 3, 1, 1), 0.27, device=device)
    pixels = torch.empty(batch, 3, size, size, device=device)  # reused, as ClipTrainer.pixels does
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.precision)
    scaler = torch.amp.GradScaler(device) if a.precision == "fp16" else None

    def backward(loss: torch.Tensor) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()

    def embed(model, b: dict):
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         pixel_values=normalize(b["images"], mean, std, pixels), return_loss=False)  # fmt: skip

    def step() -> None:
        if mode == "contrastive" and steps_k > 1:
            grad_cache_step(model, micro, embed, model.logit_scale, backward=backward)
        else:  # K = 1, or the Trainer's mean of K in-batch losses
            for b in micro:
                out = embed(model, b)
                backward(clip_loss(out["image_embeds"], out["text_embeds"], model.logit_scale) / steps_k)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    synchronize(device)
    if device != "cpu":
        getattr(torch, device).reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / a.steps
    return {"seconds": seconds, "peak": peak_gb(device), "loaded": loaded}


def check(device: str) -> int:
    """On the device: gradient caching with dropout on == every micro-batch kept in one graph (the device's RNG is
    replayed), in fp32; and the difference without the replay. Prints the largest gradient differences."""
    import torch

    from clip_train.train import accumulation
    from clip_train.train.loss import clip_loss

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = build_model("tiny", dropout=0.1, image_size=64).to(device).train()
    gen = torch.Generator().manual_seed(1)
    micro = [{"input_ids": torch.randint(3, 1000, (16, 24), generator=gen).to(device),
              "pixel_values": torch.randn(16, 3, 64, 64, generator=gen).to(device)} for _ in range(4)]  # fmt: skip

    def embed(model, b):
        return model(**b, return_loss=False)

    def grads() -> dict:
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return got

    torch.manual_seed(5)
    outs = [embed(model, b) for b in micro]
    want = clip_loss(torch.cat([o.image_embeds for o in outs]), torch.cat([o.text_embeds for o in outs]),
                     model.logit_scale)  # fmt: skip
    want.backward()
    ref = grads()
    torch.manual_seed(5)
    loss = accumulation.grad_cache_step(model, micro, embed, model.logit_scale)
    got = grads()
    accumulation.replaying = lambda state, device: contextlib.nullcontext()  # the check's teeth: no replay
    torch.manual_seed(5)
    accumulation.grad_cache_step(model, micro, embed, model.logit_scale)
    unreplayed = grads()
    diff = max((got[n] - g).abs().max().item() for n, g in ref.items())
    wrong = max((unreplayed[n] - g).abs().max().item() for n, g in ref.items())
    ok = abs(loss.item() - want.item()) < 1e-5 and diff < 1e-5 and wrong > 1e-4
    print(f"check on {device}: loss {loss.item():.6f} vs {want.item():.6f}; largest gradient difference {diff:.2e} "
          f"(without the RNG replay: {wrong:.2e}): {'OK' if ok else 'FAILED'}")  # fmt: skip
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="tiny,full-size (default both; --quick: tiny)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "npu"], default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    p.add_argument("--width", type=int, default=32, help="caption tokens (COCO batches pad to 24-32)")
    p.add_argument(
        "--steps", type=int, default=None, help="timed optimizer steps (default: tiny 10, full-size 2)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny model, 3 timed steps")
    p.add_argument("--check", action="store_true", help="only check the dropout replay on the device (exact)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child run: shape,batch,K,mode
    a = p.parse_args(argv)
    if a.device == "auto":
        from clip_train.device.backend import detect_family

        a.device = detect_family()
    if a.device == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu)
    if a.precision == "fp16" and a.device == "cpu":
        p.error("--precision fp16 needs an accelerator; on CPU use bf16")
    if a.check:
        return check(a.device)
    if a.one:
        shape, batch, k, mode = a.one.split(",")
        print(json.dumps(measure(shape, int(batch), int(k), mode, a)))
        return 0

    models = (a.models or ("tiny" if a.quick else "tiny,full-size")).split(",")
    print(
        f"machine: {describe_machine(a.device)}; device {a.device}, {a.precision}, captions of {a.width} tokens"
    )
    print("\n| model | B x K, mode | samples/s | time per sample vs B64 | peak memory (GB) | "
          "peak above the loaded model (GB) | load 1-min |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|")
    for shape in models:
        steps = a.steps or (3 if a.quick else 10 if shape == "tiny" else 2)
        base = None
        for batch, k, mode in CONFIGS:
            before = load()
            cmd = [sys.executable, os.path.abspath(__file__), "--device", a.device, "--precision", a.precision,
                   "--width", str(a.width), "--steps", str(steps), "--warmup", str(a.warmup),
                   "--one", f"{shape},{batch},{k},{mode}"]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"bench_accum.py: {shape} B={batch} K={k} {mode} failed:\n{run.stderr[-3000:]}")
            r = json.loads(run.stdout.strip().splitlines()[-1])
            per_sample = r["seconds"] / (batch * k)
            base = base or per_sample
            growth = f"{r['peak'] - r['loaded']:.2f}" if a.device == "cpu" else "-"
            label = f"{batch} x {k}" + (f", {mode}" if k > 1 else "")
            print(f"| {shape} | {label} | {1 / per_sample:.3g} | {per_sample / base:.2f}x | {r['peak']:.2f} | "
                  f"{growth} | {before} -> {load()} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
