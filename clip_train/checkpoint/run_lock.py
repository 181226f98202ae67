"""One run per output folder: an exclusive lock, held from before the folder is touched until the process ends.

Two runs in one folder (a scheduler re-queue while the first is alive, a double launch) would resume from each
other's checkpoints, delete each other's unfinished ones and rotate each other's saves. The lock is an ``flock`` on
``run.lock`` in the folder (the image cache uses the same kind): the kernel drops it when its holder dies, however it
dies, so a lock file left by a dead run (a kill -9, a torchrun restart of this same run) is simply taken over. The
file names the holder (pid, host, start time) for the one-line refusal a second run gets.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from typing import IO

logger = logging.getLogger(__name__)

LOCK = "run.lock"
# Forked children (DataLoader workers) share the holder's lock and outlive a kill -9 of it by a few seconds (they
# poll for their parent's death every 5 s): a lock whose recorded holder is dead is waited for this long.
ORPHAN_WAIT_S = 30.0
_held: dict[str, IO] = {}  # folder -> the open lock file, kept open (locked) for the life of the process


def lock_name(per_node: bool) -> str:
    """``run.lock``; with --save_on_each_node each node's first rank locks its own (run.<host>.lock), since the
    folder may be one shared by every node."""
    return f"run.{socket.gethostname()}.lock" if per_node else LOCK


def _orphaned(record: str) -> bool:
    """Whether the recorded holder ran on this host and is gone (its lock then lives on in its children only)."""
    try:
        held = json.loads(record)
        if held["host"] != socket.gethostname():
            return False
        os.kill(int(held["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return False


def _describe(record: str) -> str:
    try:
        held = json.loads(record)
        return f"pid {held['pid']} on {held['host']}, since {held['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no record"


def take(folder: str, name: str = LOCK) -> str | None:
    """Lock ``folder`` for this process's life. None when locked (or already held here); otherwise who holds it."""
    path = os.path.join(folder, name)
    if os.path.realpath(path) in _held:
        return None
    f = open(path, "a+")  # noqa: SIM115 - stays open: closing it would drop the lock
    deadline = time.monotonic() + ORPHAN_WAIT_S
    try:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                record = f.read()
                if not _orphaned(record) or time.monotonic() > deadline:
                    f.close()
                    return _describe(record) + (" (ended; its child processes still hold the lock)"
                                                if _orphaned(record) else "")  # fmt: skip
                time.sleep(0.5)
    except OSError as e:  # a file system without locks: run unguarded rather than not at all
        f.close()
        logger.warning("no lock on %s (%s): nothing stops a second run from using this folder", path, e)
        return None
    f.seek(0)
    left = f.read().strip()
    if left:
        logger.info("Took over the lock %s left by a run that has ended (%s)", path, _describe(left))
    f.seek(0)
    f.truncate()
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n")
    f.flush()
    _held[os.path.realpath(path)] = f
    return None
