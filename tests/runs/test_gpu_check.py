"""benchmarks/gpu_check.py: the prepared accelerator check keeps running end to end on CPU with tiny shapes."""

from __future__ import annotations

import json
import os
import sys

from conftest import REPO, run_py

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import flops  # noqa: E402
import gpu_check  # noqa: E402


def test_flops_per_sample_of_vit_b32_and_roberta_base() -> None:
    """ViT-B/32 at 224 is ~4.4 GMACs (8.8 GFLOPs) forward; roberta-base ~85 M matmul params -> ~0.17 GFLOPs/token."""
    from transformers import CLIPVisionConfig, RobertaConfig, VisionTextDualEncoderConfig

    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(image_size=224, patch_size=32), RobertaConfig(), projection_dim=512
    )
    per_token_text = (flops.flops_per_sample(config, 33) - flops.flops_per_sample(config, 32)) / 3
    vision_fwd = flops.flops_per_sample(config, 0) / 3
    assert 8.5e9 < vision_fwd < 9.0e9
    assert 0.16e9 < per_token_text < 0.18e9
    assert 35e9 < flops.flops_per_sample(config, 24) < 42e9  # the issue's ~9-11k samples/s at 40% of 990 TF


def test_set_flag_replaces_adds_and_removes() -> None:
    args = ["--a", "1", "--b=2", "--c", "3"]
    assert gpu_check.set_flag(args, "b", "5") == ["--a", "1", "--c", "3", "--b", "5"]
    assert gpu_check.set_flag(args, "a", None) == ["--b=2", "--c", "3"]
    assert gpu_check.set_flag(args, "d", "x")[-2:] == ["--d", "x"]


def test_a_failing_or_hanging_configuration_is_recorded(tmp_path) -> None:
    log = str(tmp_path / "x.log")
    status, _ = gpu_check.run_one(
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log, 30, dict(os.environ)
    )
    assert status == "failed (rc 3)" and gpu_check.tail(log) == ["boom"]
    status, seconds = gpu_check.run_one(
        [sys.executable, "-c", "import time; time.sleep(60)"], log, 2, dict(os.environ)
    )
    assert status.startswith("timeout") and seconds < 30


def test_grid_orders_the_target_first_and_pairs_each_cell_with_its_peer() -> None:
    cells = gpu_check.parse_cells("fp16:64,bf16:256,bf16:1024")
    rows = gpu_check.grid(cells, ["eager", "compiled"], 200, {"eager": 10, "compiled": 30}, peer=True)
    names = [r["name"] for r in rows]
    assert names[:4] == ["bf16-b1024-eager", "open_clip-bf16-b1024-eager", "bf16-b1024-compiled",
                         "open_clip-bf16-b1024-compiled"]  # fmt: skip
    assert len(rows) == 12 and all(r["peer"] == r["name"].startswith("open_clip-") for r in rows)
    steps = {r["batch"]: r["steps"] for r in rows}
    assert steps[64] == 200 and steps[1024] < 200  # about the same samples per cell, at least 30 steps
    assert {r["name"] for r in rows if r["eval"]} == {"fp16-b64-eager", "bf16-b256-eager"}


def test_peer_speed_parses_open_clip_log_lines() -> None:
    import peer_open_clip

    line = ("2026-12-07,18:00:00 | INFO | Train Epoch: 0 [ 64/640 (10%)] Data (t): 0.010 Batch (t): {t}, "
            "123.4/s, 123.4/s/gpu LR: 0.000050 Logit Scale: 14.286 Contrastive_loss: 4.1 (4.1) Loss: 4.1 (4.1)")  # fmt: skip
    log = (
        "\n".join(line.format(t=t) for t in ("9.000", "0.600", "0.500", "0.500"))
        + "\npeer_peak_device_memory_gb=3.5\n"
    )
    out = peer_open_clip.speed(log, skip=1, batch=64)
    assert out["peer_timed_steps"] == 2 and abs(out["train_samples_per_second"] - 128.0) < 1e-6
    assert out["train_peak_device_memory_gb"] == 3.5


def test_tiny_check_on_cpu_end_to_end(tmp_path) -> None:
    """Data + model build, both precision cells (train -> eval with retrieval -> exit 0), the profile, one table;
    open_clip's own app side by side on the same data when open_clip is installed (benchmarks/
    requirements-bench.txt; requirements-dev.txt leaves it out, see benchmarks/README.md), its rows asserted then."""
    import peer_open_clip

    out = tmp_path / "out"
    # About a minute on a quiet 2-core machine; the budget is generous for a CI host shared with other jobs.
    run = run_py(["benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(out),
                  "--root", str(tmp_path / "root"), "--budget_s", "1200"], timeout=1300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.md", "profile.txt"]
    rows = {r["name"]: r for r in json.loads((out / "gpu_check.json").read_text())["rows"]}
    peers = {name: rows.pop(name) for name in list(rows) if name.startswith("open_clip-")}
    assert set(rows) == {"bf16-b16-eager", "fp16-b16-eager"}
    if peer_open_clip.available():
        assert set(peers) == {"open_clip-bf16-b16-eager", "open_clip-fp16-b16-eager"}
        for name, row in peers.items():
            assert row["status"] == "ok", (name, row.get("tail"))
            assert row["results"]["train_samples_per_second"] > 0 and row["results"]["peer_timed_steps"] >= 3
        assert "x |" in (out / "gpu_check.md").read_text()  # the ours / open_clip ratio
    else:
        assert not peers
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("tail"))
        assert row["results"]["train_samples_per_second"] > 0 and row["results"]["train_timed_steps"] == 6
        assert "eval_image_to_text_R@1" in row["results"]  # the precision cells evaluate, retrieval included
        assert "train_peak_device_memory_gb" not in row["results"]  # CPU: no device memory to report
    table = (out / "gpu_check.md").read_text()
    assert "| bf16-b16-eager | bf16 | 16 | eager | ok |" in table and table in run.stdout
    assert "top 25 by cpu_time_total" in (out / "profile.txt").read_text()
