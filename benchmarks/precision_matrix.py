"""The precision matrix on whatever device this host has: each cell a real short run_clip.py run (train a few steps
-> evaluate with retrieval -> save), then the saved folder reloaded with AutoModel and embedded on the device.

On a GPU (or NPU) host this is the check tests/runs/test_precision_matrix.py cannot make on CPU: --bf16 and the
recipe's fp16 flags under real autocast and a real GradScaler, end to end. Prints one line per cell and exits 1 if
any cell failed.

    python benchmarks/precision_matrix.py [--root DIR] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EVAL_KEYS = ["eval_loss"] + [
    f"eval_{way}_{m}"
    for way in ("image_to_text", "text_to_image")
    for m in ("R@1", "R@5", "R@10", "mean_rank", "median_rank")
]
RECIPE_FP16 = ["--fp16", "--loss_scale", "12800000", "--optim", "adamw_apex_fused_npu", "--use_combine_grad"]
CELLS = {
    "fp32": [],
    "bf16": ["--bf16"],
    "fp16 recipe O1": [*RECIPE_FP16, "--fp16_opt_level", "O1"],
    "fp16 recipe O2": [*RECIPE_FP16, "--fp16_opt_level", "O2"],
    "fp16 dynamic": ["--fp16", "--loss_scale", "dynamic"],
}


def run_cell(name: str, flags: list[str], data_dir: str, model_dir: str, root: str, steps: int) -> dict:
    out = os.path.join(root, "out-" + name.replace(" ", "-"))
    cmd = [
        sys.executable, os.path.join(REPO, "run_clip.py"), "--output_dir", out, "--overwrite_output_dir",
        "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_train", "--do_eval",
        "--max_steps", str(steps), "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "32",
        "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True", *flags,
    ]  # fmt: skip
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    cell = {"cell": name, "rc": r.returncode, "seconds": round(time.perf_counter() - start, 1)}
    backend_line = next((line for line in r.stderr.splitlines() if "backend:" in line), "")
    cell["backend"] = backend_line.split("backend:", 1)[-1].strip()
    if r.returncode != 0:
        cell["error"] = r.stderr[-1500:]
        return cell
    results = json.load(open(os.path.join(out, "all_results.json")))
    missing = [k for k in EVAL_KEYS if k not in results]
    cell.update(
        {k: results.get(k) for k in ("eval_loss", "eval_image_to_text_R@1", "eval_text_to_image_R@1")}
    )
    if missing:
        cell["error"] = f"missing eval keys: {missing}"
        return cell
    cell["reload"] = reload_and_embed(out)
    return cell


def reload_and_embed(out: str) -> str:
    import torch
    from transformers import AutoModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModel.from_pretrained(out).to(device)
    size = model.config.vision_config.image_size
    with torch.no_grad():
        emb = model.get_image_features(
            pixel_values=torch.zeros(2, 3, size, size, device=device)
        ).pooler_output
    return f"ok on {device} ({emb.dtype}, finite={bool(torch.isfinite(emb).all())})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.path.join(REPO, ".cache", "precision"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--cells", nargs="*", default=list(CELLS), help=f"some of: {', '.join(CELLS)}")
    a = p.parse_args(argv)
    from clip_train.demo import prepare

    data_dir, model_dir = prepare(os.path.join(a.root, "demo"), n_train=160, n_val=40)
    failed = 0
    for name in a.cells:
        cell = run_cell(name, CELLS[name], data_dir, model_dir, a.root, a.steps)
        failed += "error" in cell or cell["rc"] != 0
        print(json.dumps(cell), flush=True)
    print(f"{len(a.cells) - failed} of {len(a.cells)} cells passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
