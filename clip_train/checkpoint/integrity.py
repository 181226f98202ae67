"""What a checkpoint must prove before a run resumes from it: its files as they were saved, and the run's shape.

The completion marker lists every file of the checkpoint with its size and an xxh3-128 hash of its bytes (the
``xxhash`` package: several GB/s a core, ~10x sha256; benchmarks/bench_verify.py). A cut copy, a zeroed block or a
missing file then shows up before the Trainer's loaders meet it. The marker also keeps the run's identity (world
size, per-device batch, accumulation, loss scope, the training rows, the model folder): resuming it with another
shape would silently change what every later step means.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np
import xxhash

from clip_train.checkpoint.layout import MARKER

HASH = "xxh3_128"
_CHUNK = 16 << 20


def file_hash(path: str) -> str:
    """xxh3-128 of a file's bytes, read in 16 MiB blocks into one reused buffer."""
    h, buf = xxhash.xxh3_128(), bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def manifest(folder: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", HASH}} of every file under ``folder`` but the marker and its temporary files."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            if name == MARKER or name.startswith(f".{MARKER}."):
                continue
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = {"size": os.path.getsize(path), HASH: file_hash(path)}
    return dict(sorted(files.items()))


class Check(NamedTuple):
    problem: str | None  # None: the checkpoint holds what its marker recorded
    hashed: bool  # False: an older marker without a file list; only trainer_state.json was looked for


def read_marker(folder: str) -> dict:
    with open(os.path.join(folder, MARKER)) as f:
        marker = json.load(f)
    if not isinstance(marker, dict):
        raise ValueError("not a JSON object")
    return marker


def verify(folder: str) -> Check:
    """Every recorded file present at its recorded size (all checked first: cheap), then at its recorded hash."""
    try:
        marker = read_marker(folder)
    except FileNotFoundError:
        return Check(f"{MARKER}: missing", True)
    except (OSError, ValueError) as e:
        return Check(f"{MARKER}: unreadable ({e})", True)
    files = marker.get("files")
    if files is None:  # written before markers listed their files
        ok = os.path.isfile(os.path.join(folder, "trainer_state.json"))
        return Check(None if ok else "trainer_state.json: missing", False)
    if not isinstance(files, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get(HASH), str)
        for r in files.values()
    ):
        return Check(f"{MARKER}: its file list is not one this version wrote (sizes and {HASH} hashes)", True)
    for rel, rec in files.items():
        try:
            size = os.path.getsize(os.path.join(folder, rel))
        except OSError:
            return Check(f"{rel}: missing", True)
        if size != rec["size"]:
            return Check(f"{rel}: {size} bytes, {rec['size']} when saved (cut short or overwritten)", True)
    for rel, rec in files.items():
        try:
            digest = file_hash(os.path.join(folder, rel))
        except OSError as e:
            return Check(f"{rel}: unreadable ({e.strerror})", True)
        if digest != rec[HASH]:
            return Check(f"{rel}: its bytes changed since it was saved ({HASH} differs)", True)
    return Check(None, True)


def rows_fingerprint(dataset: Any, image_paths: list[str]) -> str:
    """The training rows as the model sees them: token ids per caption, and which image (by file name) each has.

    File names, not full paths, so the same data in a moved or re-mounted folder is the same run.
    """
    h = xxhash.xxh3_64()
    if not hasattr(dataset, "flat_ids"):  # streamed shards: their names (not paths) and the epoch length
        names = "\n".join(os.path.basename(u) for u in getattr(dataset, "urls", []))
        h.update(f"{names}\n{getattr(dataset, 'num_samples', len(dataset))}".encode())
        return h.hexdigest()
    for arr in (dataset.flat_ids, dataset.offsets, dataset.image_index):
        a = np.ascontiguousarray(arr)
        h.update(str(a.dtype).encode() + b":")
        h.update(a.tobytes())
    h.update("\n".join(os.path.basename(p) for p in image_paths).encode())
    return h.hexdigest()


def run_identity(
    training_args: Any, loss_scope: str, model_path: str, train_split: Any, *, accumulation_mode: str
) -> dict[str, Any]:
    """What defines a run: a checkpoint is resumed only by a run where all of these are equal (a marker written
    before a key was recorded lacks it, and is not compared on it)."""
    model = os.path.realpath(model_path) if os.path.isdir(model_path) else model_path
    steps = training_args.gradient_accumulation_steps
    return {
        "world_size": training_args.world_size,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": steps,
        # Contrastive accumulation scores K micro-batches as one batch, mean averages K in-batch losses: another
        # objective. With K = 1 both are the same: None, so changing the flag alone changes nothing.
        "accumulation_mode": accumulation_mode if steps > 1 else None,
        "loss_scope": loss_scope,
        "train_rows": len(train_split.dataset),
        "train_rows_fingerprint": rows_fingerprint(train_split.dataset, train_split.image_paths),
        "model": model,
    }


_NAMES = {
    "world_size": "processes (world size)",
    "per_device_train_batch_size": "--per_device_train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "accumulation_mode": "--accumulation_mode",
    "loss_scope": "--loss_scope",
    "train_rows": "training rows",
    "train_rows_fingerprint": "training rows' fingerprint",
    "model": "--model_name_or_path",
}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'NAME SAVED then, NOW now' for every recorded part of the identity that changed."""
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    if "train_rows" in changed:  # other rows: their fingerprint differs too, and says nothing more
        changed.remove("train_rows_fingerprint")
    return [f"{_NAMES.get(k, k)} {saved[k]} then, {now[k]} now" for k in changed]
