"""What torchrun starts for every worker: ``python clip_train/launch/worker.py run_clip.py ARGS``.

Two things torchrun cannot do itself, then the process becomes run_clip.py (``execv``: the same process, so signals,
exit codes and torchrun's restarts are run_clip.py's):

- **A run that cannot succeed is not rerun.** torchrun restarts the workers after any non-zero exit, up to
  --max_restarts times. run_clip.py exits 2 for a diverged run or a bad argument or data, which a rerun only repeats;
  it records that in the stop file (``note_stop``), and every later start of a worker, on any node, ends at once
  with the same status and reason instead of training again.
- **Which launcher holds global rank 0.** Under the c10d rendezvous torchrun numbers the nodes in its own order, so
  the worker that is global rank 0 names its launcher in the rank-0 file; that launcher writes the summary.
- **Is the run folder shared?** Each node's first worker writes a file named for its node into the run folder
  (after the rendezvous, so after every node's launcher has set its folder up); each launcher then looks for the
  others' (run.py).

The launcher sets both paths (in the run folder, which every node shares) in the workers' environment. Torch-free
and free of training code: the launcher imports its names.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

STOP_FILE_ENV = "CLIP_STOP_FILE"  # "<status>\n<reason>": the run stopped for a reason a restart does not fix
RANK0_FILE_ENV = (
    "CLIP_RANK0_FILE"  # the launcher of the node whose worker holds global rank 0 writes its id here
)
LAUNCHER_ENV = "CLIP_LAUNCHER_ID"  # this node's launcher: its node, host, pid and summary file
NODE_FILE_ENV = (
    "CLIP_NODE_FILE"  # each node's first worker writes this launch's token there: is the folder shared?
)
NODE_TOKEN_ENV = "CLIP_NODE_TOKEN"  # the same on every node of one launch (the rendezvous id)


def note_stop(status: int, reason: str) -> None:
    """Record that this run must not be restarted (called by run_clip.py as it exits ``status``); no-op outside
    the launcher. The first rank to stop writes it; the others find it there."""
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(f"{status}\n{reason}\n")
    except OSError:  # written already by another rank, or the folder is gone: nothing to add
        pass


def read_stop(path: str | os.PathLike) -> tuple[int, str] | None:
    """(status, reason) of a recorded stop, None if the run may go on."""
    try:
        status, _, reason = Path(path).read_text(encoding="utf-8").partition("\n")
        return int(status), reason.strip()
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    stop = read_stop(os.environ[STOP_FILE_ENV]) if os.environ.get(STOP_FILE_ENV) else None
    if stop:
        print("run_clip.py: not restarted: this run stopped for good (its error is above)", file=sys.stderr)
        return stop[0]
    if os.environ.get("RANK") == "0" and os.environ.get(RANK0_FILE_ENV):
        Path(os.environ[RANK0_FILE_ENV]).write_text(os.environ.get(LAUNCHER_ENV, "") + "\n", encoding="utf-8")
    if os.environ.get("LOCAL_RANK") == "0" and os.environ.get(NODE_FILE_ENV):
        node_file = Path(os.environ[NODE_FILE_ENV])
        node_file.parent.mkdir(parents=True, exist_ok=True)
        node_file.write_text(os.environ.get(NODE_TOKEN_ENV, "") + "\n", encoding="utf-8")
    os.execv(sys.executable, [sys.executable, *argv])
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
