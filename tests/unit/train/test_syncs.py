"""No host-device synchronisation per training step in our code: between two logging steps nothing under
clip_train/ or run_clip.py reads a tensor's value (.item(), .tolist(), .cpu(), .numpy(), bool/int/float()).

On CPU nothing really waits, but the same calls on an accelerator block the host until the queued kernels have
run, so they are counted here where they are made. Calls made by transformers/accelerate are recorded and listed
(the Trainer's logging_nan_inf_filter reads every step's loss: off here, as backend.py sets it on accelerators).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from conftest import REPO
from transformers import TrainerCallback

from clip_train.demo import recipe_args

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
TORCH_DIR = os.path.dirname(torch.__file__)


def caller() -> str:
    """file:line of the first frame outside torch that led to the read."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def host_flag_read(site: str) -> bool:
    """The non-finite check reading a skipped-step flag it copied to pinned host memory behind a CUDA event (after
    the event has passed): on a GPU that read waits for nothing. On CPU the same line reads a CPU tensor."""
    import inspect

    from clip_train.device import nonfinite as guard

    lines, first = inspect.getsourcelines(guard._DeviceFlag.value)
    path, line = site.rsplit(":", 1)
    return os.path.abspath(path) == os.path.abspath(guard.__file__) and first <= int(line) < first + len(
        lines
    )


def ours(site: str) -> bool:
    path = os.path.abspath(site.rsplit(":", 1)[0])
    mine = path.startswith(os.path.join(REPO, "clip_train")) or path == os.path.join(REPO, "run_clip.py")
    return mine and not host_flag_read(site)


def test_no_reads_between_logging_steps(demo, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import run_clip

    window = {"open": False, "logs": 0}
    reads: list[Counter] = []

    def counting(name: str):  # noqa: ANN202
        original = getattr(torch.Tensor, name)

        def read(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            if window["open"]:
                reads[-1][f"{name} at {caller()}"] += 1
            return original(self, *a, **k)

        return read

    class CloseAtLoggingSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step % args.logging_steps == 0:
                window["open"] = False  # a logging step: reading the loss and grad norm is expected

    class Counting(run_clip.ClipTrainer):
        lazy_devices = ("cuda", "cpu")  # the check's sync-free path, as it runs on a GPU

        def __init__(self, *a, **k) -> None:  # noqa: ANN002, ANN003
            super().__init__(*a, **k)
            self.add_callback(CloseAtLoggingSteps())

        def log(self, logs, start_time=None):  # noqa: ANN001, ANN201
            super().log(logs, start_time)
            if "loss" in logs:
                window["logs"] += 1
                reads.append(Counter())
                window["open"] = True

    monkeypatch.setattr(run_clip, "ClipTrainer", Counting)
    data_dir, model_dir = demo
    args = recipe_args(data_dir, model_dir, str(tmp_path / "out"))
    args.remove("--do_eval")
    args += ["--per_device_train_batch_size=8", "--max_steps", "9", "--logging_steps", "3", "--skip_steps", "1",
             "--dataloader_num_workers", "0", "--report_to", "none", "--save_strategy", "no",
             "--logging_nan_inf_filter", "False", "--max_logit_scale", "100"]  # fmt: skip
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    run_clip.main(args)
    window["open"] = False

    assert window["logs"] >= 3  # windows: steps 4-6 and 7-9 (the last one closes at the run's end)
    between = reads[:-1]
    assert len(between) == 2
    ours_read = [site for c in between for site in c if ours(site.split(" at ")[1])]
    assert not ours_read, ours_read
    theirs = Counter()
    for c in between:
        theirs.update(c)
    # The Trainer's own loop reads nothing per step once its nan/inf filter is off (grad norms stay tensors until
    # logging); what the model code still reads is listed in the README ("Host syncs").
    assert not [
        s
        for s in theirs
        if s.split(" at ")[1].rsplit(":", 1)[0].endswith(os.path.join("transformers", "trainer.py"))
    ], theirs
    print("\nreads by libraries over 6 steps:", dict(theirs))
