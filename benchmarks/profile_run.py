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
import time

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
                synchronize(args.device)
                self.t0 = time.perf_counter()
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            if self.prof is not None and state.global_step == start + count:
                synchronize(args.device)
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                write_profile(
                    self.prof, out_file, f"steps {start + 1}-{start + count} of: {' '.join(argv)}", wall
                )
                self.prof = None

    class Profiled(run_clip.ClipTrainer):
        def __init__(self, *a, **k) -> None:  # noqa: ANN002, ANN003
            super().__init__(*a, **k)
            self.add_callback(Profile())

    run_clip.ClipTrainer = Profiled
    return run_clip.cli(argv)


def busy_fraction(prof: object, wall_s: float) -> float | None:
    """The share of ``wall_s`` in which at least one GPU kernel ran (union of kernel intervals); None on CPU."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if str(getattr(e, "device_type", "")).endswith("CUDA") and e.time_range.end > e.time_range.start
    )
    if not spans or wall_s <= 0:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > hi:
            busy, lo, hi = busy + hi - lo, s, e
        else:
            hi = max(hi, e)
    return (busy + hi - lo) / 1e6 / wall_s  # profiler times are in microseconds


def write_profile(prof: object, out_file: str, title: str, wall_s: float = 0.0) -> None:
    events = prof.key_averages()
    device = any(getattr(e, "device_time_total", 0) for e in events)
    busy = busy_fraction(prof, wall_s)
    with open(out_file, "w") as f:
        f.write(f"torch.profiler, {title}\n\n")
        f.write(f"gpu busy: {'-' if busy is None else f'{100 * busy:.1f}%'} of {1000 * wall_s:.1f} ms\n\n")
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
