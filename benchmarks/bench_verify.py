#!/usr/bin/env python3
"""What checking a checkpoint costs: hash throughput per GB (xxh3 / xxh64 / sha256), and for one full-size
checkpoint (clip-roberta + AdamW state, ~2 GB) the write it follows, the hash at marker time (pages still cached)
and the verification at resume (pages evicted, read from disk). Wall and CPU seconds both: on a shared machine
the CPU time is what the hash itself costs, the wall time what the disk and the neighbours add.

    python3 benchmarks/bench_verify.py [--gb 2.0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

import numpy as np
import xxhash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip_train.checkpoint.integrity import file_hash  # noqa: E402

ALGOS = {
    "xxh3_64": xxhash.xxh3_64,
    "xxh3_128": xxhash.xxh3_128,
    "xxh64": xxhash.xxh64,
    "sha256": hashlib.sha256,
}
BLOCK = 64 << 20


def timed(fn, *args) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0


def _digest(make, buf: bytes) -> None:
    make(buf).digest()


def in_memory(buf: bytes, repeats: int = 3) -> dict[str, tuple[float, float]]:
    """(wall, CPU) GB/s of each hash over a buffer already in memory, best of ``repeats``."""
    rates = {}
    for name, make in ALGOS.items():
        runs = [timed(_digest, make, buf) for _ in range(repeats)]
        rates[name] = (
            len(buf) / min(w for w, _ in runs) / 1e9,
            len(buf) / max(min(c for _, c in runs), 1e-9) / 1e9,
        )
    return rates


def evict(path: str) -> None:
    """Drop the file's pages from the page cache (clean pages; no root needed), as after a restart."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the stand-in checkpoint file (GB)")
    ap.add_argument("--dir", default=None, help="folder for the file (default: the temp folder)")
    args = ap.parse_args()

    block = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()
    print("in memory, one thread (256 MiB, best of 3):")
    for name, (wall, cpu) in in_memory(block * 4).items():
        print(f"  {name:9s} {cpu:6.2f} GB/s of CPU = {1 / cpu:5.2f} CPU s per GB   (wall {wall:.2f} GB/s)")

    n_blocks = max(1, round(args.gb * 1e9 / BLOCK))
    size = n_blocks * BLOCK
    fd, path = tempfile.mkstemp(prefix="bench_verify_", dir=args.dir)
    try:

        def write() -> None:
            with os.fdopen(fd, "wb") as f:
                for i in range(n_blocks):  # distinct blocks, so nothing below us can deduplicate them
                    f.write(i.to_bytes(8, "little") + block[8:])

        wrote = timed(write)
        synced = timed(os.sync)
        warm = timed(file_hash, path)
        evict(path)
        cold = timed(file_hash, path)
        evict(path)
        cold_sha = timed(sha256_file, path)
    finally:
        os.remove(path)
    gb = size / 1e9
    print(f"a {gb:.2f} GB checkpoint file (wall / CPU seconds):")
    print(
        f"  write, as torch.save does (page cache)  {wrote[0]:6.2f} / {wrote[1]:5.2f}; sync to disk +{synced[0]:.2f}"
    )
    print(f"  xxh3_128 at marker time (pages cached)  {warm[0]:6.2f} / {warm[1]:5.2f}")
    print(f"  xxh3_128 at resume (read from disk)     {cold[0]:6.2f} / {cold[1]:5.2f}")
    print(f"  sha256 at resume (read from disk)       {cold_sha[0]:6.2f} / {cold_sha[1]:5.2f}")


if __name__ == "__main__":
    main()
