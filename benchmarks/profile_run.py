#!/usr/bin/env python3
"""run_clip.py with a torch.profiler window over a few optimizer steps; writes the op tables to a text file.

    python benchmarks/profile_run.py OUT.txt START COUNT -- <run_clip.py arguments>

Profiles steps START+1 .. START+COUNT (CPU, and CUDA when training there): the top 25 ops by device time (CPU time
on CPU) and the top 15 by self CPU time (launch overhead shows there). benchmarks/gpu_check.py runs it on its
fastest configuration.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def profile_child(out_file: str, start: int, count: int, argv: list[str]) -> int:
    """run_clip.py with a callback that profiles optimizer steps [start, start + count) and writes the tables."""
    import torch
    from transformers import TrainerCallback

    import run_clip
    from clip_train.device.backend import synchronize

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if state.global_step == start and self.prof is None:
                kinds = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available() and args.device.type == "cuda":
                    kinds.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=kinds)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if self.prof is not None and state.global_step == start + count:
                synchronize(args.device)
                self.prof.__exit__(None, None, None)
                write_profile(self.prof, out_file, f"steps {start + 1}-{start + count} of: {' '.join(argv)}")
                self.prof = None

    class Profiled(run_clip.ClipTrainer):
        def __init__(self, *a, **k) -> None:  # noqa: ANN002, ANN003
            super().__init__(*a, **k)
            self.add_callback(Profile())

    run_clip.ClipTrainer = Profiled
    return run_clip.cli(argv)


def write_profile(prof: object, out_file: str, title: str) -> None:
    events = prof.key_averages()
    device = any(getattr(e, "device_time_total", 0) for e in events)
    with open(out_file, "w") as f:
        f.write(f"torch.profiler, {title}\n\n")
        for sort in (["device_time_total", "cuda_time_total"] if device else []) + ["cpu_time_total"]:
            try:
                f.write(
                    f"top 25 by {sort}:\n{events.table(sort_by=sort, row_limit=25, max_name_column_width=60)}\n"
                )
                break
            except (KeyError, AttributeError, RuntimeError):
                continue
        f.write(
            f"top 15 by self_cpu_time_total:\n{events.table(sort_by='self_cpu_time_total', row_limit=15)}\n"
        )


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[4] != "--":
        sys.exit("usage: profile_run.py OUT.txt START COUNT -- <run_clip.py arguments>")
    sys.exit(profile_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5:]))
