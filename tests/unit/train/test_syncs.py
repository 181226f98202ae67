"""No host-device synchronisation in a training step, from any module: between two logging steps nothing — our
code, transformers, accelerate or torch itself — reads a tensor's value on the host.

Two nets, both open only between logging steps (a logging step reads the loss and grad norm by design):
- Python reads: ``Tensor.item / tolist / cpu / numpy / __bool__ / __int__ / __float__ / __index__`` patched
  globally, each call attributed to the first frame outside torch (so a read inside torch's own Python, e.g. a
  GradScaler's ``found_inf.item()``, is named by whoever called torch).
- Dispatcher reads (eager runs): a TorchDispatchMode counts ``aten::_local_scalar_dense`` (what every scalar read
  becomes, from Python or C++) and the ops whose output size depends on the data (nonzero, masked_select, unique,
  ...), which wait for the device on an accelerator too.

On CPU nothing really waits, but the same calls on an accelerator block the host until the queued kernels have
run, so they are counted here where they are made. The one read allowed is the non-finite guard's flag read
(``_DeviceFlag.value``): on a GPU it reads pinned host memory after its CUDA event has passed, i.e. waits for
nothing; the guard runs its CUDA path here (``lazy_devices``). The Trainer's logging_nan_inf_filter reads every
step's loss: off here, as device/settings.py sets it on accelerators.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from clip_train.demo import recipe_args

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
# Ops that read a value or size their output by the data: each is a host-device sync on an accelerator.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
            "equal", "is_nonzero", "allclose", "repeat_interleave", "bincount", "histc"}  # fmt: skip
TORCH_DIR = os.path.dirname(torch.__file__)
HERE = os.path.abspath(__file__)


def caller(depth: int = 2) -> str:
    """file:line of the first frame outside torch (and this test) that led to the read."""
    frame = sys._getframe(depth)
    while frame is not None and (
        frame.f_code.co_filename.startswith(TORCH_DIR) or os.path.abspath(frame.f_code.co_filename) == HERE
    ):
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


class SyncOps(TorchDispatchMode):
    """Counts SYNC_OPS dispatched while ``window["open"]``, by caller."""

    def __init__(self, window: dict, reads: list[Counter]) -> None:
        super().__init__()
        self.window, self.reads = window, reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self.window["open"] and func.__name__.split(".")[0] in SYNC_OPS:
            self.reads[-1][f"aten::{func.__name__} at {caller(1)}"] += 1
        return func(*args, **(kwargs or {}))


def counting(name: str, window: dict, reads: list[Counter]):  # noqa: ANN201
    original = getattr(torch.Tensor, name)

    def read(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if window["open"]:
            reads[-1][f"{name} at {caller()}"] += 1
        return original(self, *a, **k)

    return read


def reads_between_logging_steps(
    demo, tmp_path, monkeypatch, *extra: str, dispatch: bool = True
) -> list[Counter]:  # noqa: ANN001
    """run_clip.main for 9 steps, logging every 3; the reads of the windows steps 4-6 and 7-9 (the last one closes
    at the run's end, so it is left out)."""
    import run_clip

    window = {"open": False, "logs": 0}
    reads: list[Counter] = []

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
             "--logging_nan_inf_filter", "False", "--max_logit_scale", "100", *extra]  # fmt: skip
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, window, reads))
    if dispatch:
        with SyncOps(window, reads):
            run_clip.main(args)
    else:
        run_clip.main(args)
    window["open"] = False
    assert window["logs"] >= 3
    assert len(reads[:-1]) == 2
    return reads[:-1]


def unexpected(between: list[Counter]) -> dict[str, int]:
    found: Counter = Counter()
    for c in between:
        found.update({site: n for site, n in c.items() if not host_flag_read(site.split(" at ")[1])})
    return dict(found)


def test_no_reads_between_logging_steps_eager(demo, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager, every module. Before the text mask was passed in 4-D form, transformers' masking_utils.py:354
    (``padding_mask.all()`` in _ignore_bidirectional_mask_sdpa) read once per step here."""
    between = reads_between_logging_steps(demo, tmp_path, monkeypatch)
    assert not unexpected(between), unexpected(between)
    allowed = sum(n for c in between for site, n in c.items() if host_flag_read(site.split(" at ")[1]))
    assert allowed > 0  # the nets work: the guard's (event-gated) flag reads are seen


def test_no_reads_between_logging_steps_compiled(demo, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (dynamo with the aot_eager backend: what runs outside the graph is the same as inductor's, and it
    compiles in seconds), in the CUDA-graph mode's static-width policy: no Python read from any module, no graph
    break that would read (a data-dependent branch would show up as a Python read in the window)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    between = reads_between_logging_steps(
        demo, tmp_path, monkeypatch, "--torch_compile", "True", "--torch_compile_backend", "aot_eager",
        "--torch_compile_mode", "reduce-overhead", "--pad_to_multiple_of", "64", dispatch=False,
    )  # fmt: skip
    assert not unexpected(between), unexpected(between)
    assert counters["stats"]["unique_graphs"] >= 1


def test_grad_scaler_step_with_fused_adamw_reads_nothing() -> None:
    """The fp16 path on CUDA (dynamic GradScaler, accelerate's optimizer wrapper, torch's fused AdamW, the guard's
    lazy step): scale, backward, unscale + clip (the Trainer's grad norm), step and update, with no read: the fused
    kernel takes the scaler's found_inf and skips on the device. (A non-fused optimizer would read it: GradScaler's
    ``_maybe_opt_step`` calls ``found_inf.item()``; the counting below sees that, checked last.)"""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    window, reads = {"open": True}, [Counter()]
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def run(fused: bool) -> Counter:
        raw = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        opt = AcceleratedOptimizer(raw, device_placement=False, scaler=scaler)
        reads[-1] = Counter()
        mp = pytest.MonkeyPatch()
        for name in READS:
            mp.setattr(torch.Tensor, name, counting(name, window, reads))
        try:
            with SyncOps(window, reads):
                for _ in range(3):
                    loss = model(torch.randn(4, 8)).square().mean()
                    scaler.scale(loss).backward()
                    scaler.unscale_(raw)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad()
        finally:
            mp.undo()
        return reads[-1]

    assert not run(fused=True), reads[-1]
    assert run(fused=False)  # the net catches torch's own read on the non-fused path
