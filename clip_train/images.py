"""Image decoding and the decoded-image cache.

Every image is decoded, resized (shorter side to the model's image size, bicubic, as the recipe) and
center-cropped once, into a uint8 array of shape [n_images, size, size, 3]. Training then only reads those bytes;
conversion to float and normalisation happen on the device (see ``trainer.normalize_pixels``).

Paths may point inside a zip: ``/data/coco/train2017.zip/train2017/000000000009.jpg`` reads member
``train2017/000000000009.jpg`` of ``/data/coco/train2017.zip`` without extracting anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from io import BytesIO

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TRANSFORM_VERSION = "pil-bicubic-shorter-side+center-crop-v1"

# One open ZipFile per (process, archive): zip handles must not cross a fork, so they are keyed by pid.
_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


class BadImage(Exception):
    """An image that cannot be used: missing, corrupt, truncated or too large."""


def split_zip_path(path: str) -> tuple[str, str] | None:
    """``a/b.zip/c/d.jpg`` -> (``a/b.zip``, ``c/d.jpg``); None for a plain file path."""
    marker = ".zip" + os.sep
    cut = path.find(marker)
    if cut < 0 or os.path.isfile(path):
        return None
    return path[: cut + 4], path[cut + 5 :]


def _zip(archive: str) -> zipfile.ZipFile:
    key = (os.getpid(), archive)
    if key not in _ZIPS:
        _ZIPS[key] = zipfile.ZipFile(archive)
    return _ZIPS[key]


def read_bytes(path: str) -> bytes:
    """The raw bytes of an image file, from disk or from inside a zip."""
    inside = split_zip_path(path)
    try:
        if inside is None:
            with open(path, "rb") as f:
                return f.read()
        return _zip(inside[0]).read(inside[1])
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise BadImage(f"cannot read {path}: {e}") from e


def load_image(path: str, size: int) -> np.ndarray:
    """Decode one image to RGB, resize its shorter side to ``size`` (bicubic) and center-crop: uint8 [size, size, 3]."""
    data = read_bytes(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(BytesIO(data))
            # JPEG draft decoding at a reduced DCT scale that still covers size x size: several times faster.
            img.draft("RGB", (size, size))
            img = img.convert("RGB")
        return resize_center_crop(img, size)
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise BadImage(f"cannot decode {path}: {e}") from e


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic, like torchvision's Resize([size])), then a center crop."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _stamp(path: str) -> list:
    """What identifies a data file's content cheaply: its size and modification time."""
    inside = split_zip_path(path)
    target = inside[0] if inside else os.path.dirname(path) or "."
    st = os.stat(target)
    return [os.path.abspath(target), st.st_size, int(st.st_mtime)]


def cache_fingerprint(paths: Sequence[str], size: int) -> str:
    """Names the cache: the image list, the containers' sizes and times, the image size and the transform."""
    h = hashlib.sha256()
    h.update(f"{TRANSFORM_VERSION}|{size}|{len(paths)}\n".encode())
    containers = {}
    for p in paths:
        h.update(p.encode())
        h.update(b"\n")
        inside = split_zip_path(p)
        key = inside[0] if inside else os.path.dirname(p)
        if key not in containers:
            containers[key] = _stamp(p)
    h.update(json.dumps(sorted(containers.values())).encode())
    return h.hexdigest()[:20]


def _decode_chunk(args: tuple[str, list[str], int, int, int]) -> list[tuple[int, str]]:
    """Worker: decode paths[start:] into the memory-mapped array; returns (index, reason) for bad images."""
    array_path, paths, start, n_total, size = args
    out = np.memmap(array_path, dtype=np.uint8, mode="r+", shape=(n_total, size, size, 3))
    bad = []
    for i, p in enumerate(paths, start):
        try:
            out[i] = load_image(p, size)
        except BadImage as e:
            out[i] = 0
            bad.append((i, str(e)))
    out.flush()
    del out
    return bad


def build_cache(paths: Sequence[str], size: int, cache_dir: str, workers: int = 1) -> tuple[np.ndarray, dict]:
    """The decoded-image cache for ``paths``: built once, then reused by every epoch, run and rank.

    Returns (read-only memmap [n, size, size, 3], meta). ``meta["bad"]`` maps image index -> reason.
    The array is written under a private name and renamed into place only when complete, with its meta file
    written last, so a killed build is never served: the next run simply builds again.
    """
    os.makedirs(cache_dir, exist_ok=True)
    fp = cache_fingerprint(paths, size)
    array_path = os.path.join(cache_dir, f"images-{fp}-{size}.u8")
    meta_path = array_path + ".json"
    n = len(paths)
    if os.path.exists(meta_path) and os.path.exists(array_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("n") == n and os.path.getsize(array_path) == n * size * size * 3:
            logger.info("Image cache hit: %s (%d images)", array_path, n)
            meta["bad"] = {int(k): v for k, v in meta["bad"].items()}
            return _open(array_path, n, size), meta

    partial = f"{array_path}.{socket.gethostname()}.{os.getpid()}.partial"
    np.memmap(partial, dtype=np.uint8, mode="w+", shape=(max(n, 1), size, size, 3)).flush()
    logger.info(
        "Building the image cache for %d images at %dx%d in %s (%d workers)",
        n,
        size,
        size,
        cache_dir,
        workers,
    )
    chunk = 256
    jobs = [(partial, list(paths[s : s + chunk]), s, max(n, 1), size) for s in range(0, n, chunk)]
    bad: dict[int, str] = {}
    try:
        with tqdm(total=n, desc="decoding images", unit="img", disable=n == 0) as bar:
            if workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(workers) as pool:
                    for job, result in zip(jobs, pool.map(_decode_chunk, jobs), strict=True):
                        bad.update(result)
                        bar.update(len(job[1]))
            else:
                for job in jobs:
                    bad.update(_decode_chunk(job))
                    bar.update(len(job[1]))
        os.replace(partial, array_path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    meta = {"n": n, "size": size, "transform": TRANSFORM_VERSION, "bad": bad}
    tmp_meta = f"{meta_path}.{os.getpid()}.tmp"
    with open(tmp_meta, "w") as f:
        json.dump(meta, f)
    os.replace(tmp_meta, meta_path)
    return _open(array_path, n, size), meta


def _open(array_path: str, n: int, size: int) -> np.ndarray:
    if n == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.memmap(array_path, dtype=np.uint8, mode="r", shape=(n, size, size, 3))
