"""Subprocess helpers of the benchmarks: run a command under a timeout (its whole process group killed), read a
log's last lines."""

from __future__ import annotations

import os
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(cmd: list[str], log_path: str, timeout: float, env: dict[str, str]) -> tuple[str, float]:
    """Run ``cmd`` (its whole process group killed at ``timeout``); returns (status, seconds)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the loader workers too
            proc.wait()
            return f"timeout ({timeout:.0f} s)", time.perf_counter() - t
    return ("ok" if rc == 0 else f"failed (rc {rc})"), time.perf_counter() - t


def tail(path: str, lines: int = 12) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            text = f.read().replace("\r", "\n")
    except OSError:
        return []
    return [x for x in text.splitlines() if x.strip()][-lines:]
