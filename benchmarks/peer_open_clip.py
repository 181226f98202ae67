#!/usr/bin/env python3
"""open_clip's own training app on the same data, model shapes, batch and precision: the peer of gpu_check.py.

    python3 benchmarks/peer_open_clip.py CONFIG.json -- <open_clip_train.main arguments>

open_clip's ``roberta-ViT-B-32`` is our model (ViT-B/32 + roberta-base through transformers). Offline its text
tower comes from a local folder: ``prepare`` writes a copy of that model config whose ``hf_model_name`` /
``hf_tokenizer_name`` name a local roberta folder (our model's text config and tokenizer, random init; tiny shapes
for --tiny), the images of the COCO folder as files and a csv of (file, caption) rows; this wrapper registers the
config with ``open_clip.add_model_config`` and runs ``open_clip_train.main.main`` (its own loader, loss, AMP and
optimizer), then prints the peak device memory. Install: benchmarks/requirements-bench.txt (never requirements.txt).

Differences that stay (open_clip's choices): every caption padded to its context length (77; ours per batch), the
mean pooler over tokens (ours: roberta's pooler on <s>), images decoded per sample by its loader workers (ours from
the decoded-image cache), quick_gelu in the vision tower.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys

from bench_runs import run_one, tail

SPEED = re.compile(r"Batch \(t\): ([0-9.]+), ([0-9.eE+-]+)/s, ([0-9.eE+-]+)/s/gpu")
PEAK = "peer_peak_device_memory_gb="


def available() -> bool:
    try:
        import open_clip  # noqa: F401
        import open_clip_train  # noqa: F401
    except ImportError:
        return False
    return True


def prepare(paths: dict, base: str) -> dict[str, str]:
    """csv + image files + local roberta folder + model config JSON under ``base`` (once)."""
    import open_clip
    from transformers import AutoConfig, AutoTokenizer, VisionTextDualEncoderModel

    from clip_train.data.coco import load_coco_split
    from clip_train.data.images import read_bytes

    out = {"csv": os.path.join(base, "train.csv"), "config": os.path.join(base, "peer-roberta-ViT-B-32.json"),
           "text": os.path.join(base, "roberta")}  # fmt: skip
    if os.path.isfile(os.path.join(base, "READY")):
        return out
    os.makedirs(os.path.join(base, "images"), exist_ok=True)
    cols = load_coco_split(paths["coco"], "train").columns
    files: dict[str, str] = {}
    with open(out["csv"], "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        for image, caption in zip(cols["image_path"], cols["caption"], strict=True):
            if image not in files:
                files[image] = os.path.join(base, "images", f"{len(files):07d}.jpg")
                with open(files[image], "wb") as g:
                    g.write(read_bytes(image))
            w.writerow([files[image], " ".join(caption.split())])
    ours = AutoConfig.from_pretrained(paths["model"])
    # Our (random-init) text tower's weights: open_clip loads its text tower with AutoModel.from_pretrained.
    VisionTextDualEncoderModel.from_pretrained(paths["model"]).text_model.save_pretrained(out["text"])
    AutoTokenizer.from_pretrained(paths["model"]).save_pretrained(out["text"])
    with open(
        os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "roberta-ViT-B-32.json")
    ) as f:
        cfg = json.load(f)
    cfg["text_cfg"].update(hf_model_name=out["text"], hf_tokenizer_name=out["text"])
    v = ours.vision_config
    cfg["vision_cfg"].update(image_size=v.image_size, layers=v.num_hidden_layers, width=v.hidden_size,
                             patch_size=v.patch_size, head_width=v.hidden_size // v.num_attention_heads,
                             mlp_ratio=v.intermediate_size / v.hidden_size)  # fmt: skip
    cfg["embed_dim"] = ours.projection_dim
    with open(out["config"], "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(base, "READY"), "w") as f:
        f.write("ok\n")
    return out


def peer_args(peer: dict, logs: str, cell: dict, workers: int) -> list[str]:
    """open_clip_train.main's command line for one cell: same batch, precision, lr, wd, AdamW, steps."""
    steps = cell["skip"] + cell["steps"]
    with open(peer["csv"]) as f:
        rows = sum(1 for _ in f) - 1
    epochs = -(
        -steps * cell["batch"] // max(1, rows)
    )  # its csv epoch is the whole file: enough epochs for the steps
    precision = {"bf16": "amp_bf16", "fp16": "amp"}[cell["precision"]]
    args = ["--train-data", peer["csv"], "--dataset-type", "csv", "--csv-separator", "\t",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", "peer-roberta-ViT-B-32", "--batch-size", str(cell["batch"]),
            "--precision", precision, "--workers", str(workers), "--epochs", str(epochs), "--lr", "5e-5", "--wd", "0.1",
            "--warmup", "0", "--logs", logs, "--name", cell["name"], "--log-every-n-steps", "1",
            "--save-frequency", "0", "--report-to", "", "--seed", "0"]  # fmt: skip
    return args + (["--torchcompile"] if cell["compiled"] else [])


def speed(log_text: str, skip: int, batch: int, steps: int | None = None) -> dict:
    """samples/s and step ms over the logged steps after ``skip`` (each line: one step's time with
    --log-every-n-steps 1), at most ``steps`` of them."""
    times = [float(m.group(1)) for m in SPEED.finditer(log_text)]
    timed = times[skip + 1 :] if len(times) > skip + 1 else []
    timed = timed[:steps] if steps else timed
    out: dict = {"peer_logged_steps": len(times), "peer_timed_steps": len(timed)}
    if timed:
        step = sum(timed) / len(timed)
        out.update(train_samples_per_second=batch / step, step_ms=1000 * step)
    peak = [line for line in log_text.splitlines() if line.startswith(PEAK)]
    if peak:
        out["train_peak_device_memory_gb"] = float(peak[-1][len(PEAK) :])
    return out


def peer_cell(peer: dict, cell: dict, root: str, timeout: float, env: dict, workers: int) -> dict:
    """One gpu_check cell trained by open_clip's own app (this file as a subprocess, under ``timeout``)."""
    logs = os.path.join(root, "peer-logs")
    shutil.rmtree(os.path.join(logs, cell["name"]), ignore_errors=True)
    log_path = os.path.join(root, "logs", cell["name"] + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), peer["config"], "--",
           *peer_args(peer, logs, cell, workers)]  # fmt: skip
    status, seconds = run_one(cmd, log_path, timeout, env)
    with open(log_path, errors="replace") as f:
        results = speed(f.read(), cell["skip"], cell["batch"], cell["steps"])
    row = {**cell, "status": status, "wall_s": round(seconds, 1), "log": log_path, "results": results}
    if status == "ok" and not results.get("peer_timed_steps"):
        row["status"] = "failed (no timed steps)"
    if row["status"] != "ok":
        row["tail"] = tail(log_path)
    shutil.rmtree(os.path.join(logs, cell["name"]), ignore_errors=True)
    return row


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        sys.exit("usage: peer_open_clip.py CONFIG.json -- <open_clip_train.main arguments>")
    import open_clip
    import torch
    from open_clip_train import main as oc_main

    open_clip.add_model_config(argv[0])
    oc_main.main(argv[2:])
    if torch.cuda.is_available():
        print(f"{PEAK}{torch.cuda.max_memory_allocated() / 2**30:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
