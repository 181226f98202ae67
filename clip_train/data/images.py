"""Image decoding and the decoded-image cache.

Every image is decoded, resized (shorter side to the model's image size, bicubic, as the recipe) and
center-cropped once, into a uint8 array of shape [n_images, size, size, 3] on disk. Training then only reads those
bytes; conversion to float and normalisation happen on the device (see ``trainer.normalize_pixels``).

The cache is built under a private ``*.partial`` name and renamed into place only when complete (its meta file
last), under a per-cache file lock: a killed build is never served, a concurrent builder waits and then reuses the
result, and the next run removes the dead build's leftovers and builds again.

Paths may point inside a zip: ``/data/coco/train2017.zip/train2017/000000000009.jpg`` reads member
``train2017/000000000009.jpg`` of ``/data/coco/train2017.zip`` without extracting anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from io import BytesIO

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TRANSFORM_VERSION = "pil-bicubic-shorter-side+center-crop-v1"

# One open ZipFile per (process, archive): zip handles must not cross a fork, so they are keyed by pid.
_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}
# --overwrite_cache rebuilds a cache only if it is older than this process: other ranks of the same run, which
# wait for the first one to build, then reuse its fresh cache instead of rebuilding it once each.
_STARTED = time.time()
_HOST = socket.gethostname()
# <cache file>.<host>.<pid>.partial: a build in progress (or the leftovers of a killed one).
_PARTIAL = re.compile(r"^(?P<base>images-[0-9a-f]+-\d+\.u8(?:\.json)?)\.(?P<host>.+)\.(?P<pid>\d+)\.partial$")
# A partial file of another host that nobody has written for this long is a leftover too.
STALE_AFTER_S = 24 * 3600


def default_cache_dir(cache_dir: str | None) -> str:
    """Where the decoded-image caches live unless --image_cache_dir says: under --cache_dir, $CLIP_CACHE or ~/.cache."""
    base = cache_dir or os.environ.get("CLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clip_for_pytorch")


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
    return decode_image(read_bytes(path), size, path)


def decode_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """``load_image`` on bytes already read (a tar member): the same decode, resize and crop; BadImage if unusable."""
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
        raise BadImage(f"cannot decode {name}: {e}") from e


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


class CachedImages:
    """The read side of a cache file: image ``i`` as a uint8 [size, size, 3] array.

    Reads with ``os.pread`` rather than a memory map: the bytes sit once in the shared page cache either way, but
    mapped pages count in every loader worker's RSS (8 workers on COCO would each show up to 17.8 GB).
    """

    def __init__(self, path: str, n: int, size: int) -> None:
        self.path, self.n, self.size = path, n, size
        self.shape = (n, size, size, 3)
        self._nbytes = size * size * 3
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"image {i} of a cache of {self.n}")
        if self._pid != os.getpid():  # first use in this process (a fork shares the fd, a spawn has none)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, self._nbytes, i * self._nbytes)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.size, self.size, 3)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        arr = np.fromfile(self.path, dtype=np.uint8, count=self.n * self._nbytes).reshape(self.shape)
        return arr if dtype is None else arr.astype(dtype)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


def _exit_with_parent(parent: int) -> None:
    """Pool-worker initializer: a worker whose builder was killed (kill -9 runs no cleanup) exits too, instead of
    decoding on, or waiting forever on a queue nobody will close."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _decode_chunk(args: tuple[str, list[str], int, int]) -> list[tuple[int, str]]:
    """Worker: decode ``paths`` into images ``start..`` of the partial file; returns (index, reason) of bad images."""
    partial, paths, start, size = args
    nbytes = size * size * 3
    bad = []
    fd = os.open(partial, os.O_WRONLY)
    try:
        for i, p in enumerate(paths, start):
            try:
                os.pwrite(fd, load_image(p, size).tobytes(), i * nbytes)
            except BadImage as e:
                bad.append((i, str(e)))  # its bytes stay zero (the file is created sparse)
    finally:
        os.close(fd)
    return bad


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(cache_dir: str) -> list[str]:
    """Delete what killed builds left: partial files of dead processes on this host, or untouched for a day."""
    removed = []
    for name in os.listdir(cache_dir):
        m = _PARTIAL.match(name)
        if not m:
            continue
        path = os.path.join(cache_dir, name)
        try:
            if m["host"] == _HOST:
                stale = int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
            else:
                stale = time.time() - os.path.getmtime(path) > STALE_AFTER_S
            if stale:
                os.remove(path)
                removed.append(path)
        except OSError:  # another process removed it first
            continue
    if removed:
        logger.info("Removed %d leftover file(s) of interrupted cache builds in %s", len(removed), cache_dir)
    return removed


@contextlib.contextmanager
def _build_lock(path: str) -> Iterator[None]:
    """An exclusive flock on ``path``: concurrent builders of one cache wait for each other. The kernel drops it
    when its holder dies, however it dies. Where the file system has no locks, builders go unserialised (safe:
    each writes its own partial file and the renames are atomic; only the work is duplicated)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:
            logger.warning("no lock on %s (%s): a concurrent build may duplicate work", path, e)
        yield


def _read_meta(array_path: str, fingerprint: str, n: int, size: int, newer_than: float) -> dict | None:
    """The meta of a complete cache matching this request, else None."""
    meta_path = array_path + ".json"
    try:
        if os.path.getmtime(meta_path) < newer_than:
            return None
        with open(meta_path) as f:
            meta = json.load(f)
        complete = os.path.getsize(array_path) == n * size * size * 3
    except (OSError, ValueError):
        return None
    want = {"fingerprint": fingerprint, "n": n, "size": size, "transform": TRANSFORM_VERSION}
    if not complete or any(meta.get(k) != v for k, v in want.items()):
        return None
    meta["bad"] = {int(k): v for k, v in meta["bad"].items()}
    return meta


def build_cache(
    paths: Sequence[str], size: int, cache_dir: str, workers: int = 1, overwrite: bool = False
) -> tuple[CachedImages, dict]:
    """The decoded-image cache for ``paths``: built once, then reused by every epoch, run and rank.

    Returns (images, meta): ``images[i]`` is image i as uint8 [size, size, 3]; ``meta["bad"]`` maps the index of
    each image that could not be decoded (left black) to the reason. ``overwrite`` rebuilds a cache made before
    this process started.
    """
    os.makedirs(cache_dir, exist_ok=True)
    n = len(paths)
    fp = cache_fingerprint(paths, size)
    array_path = os.path.join(cache_dir, f"images-{fp}-{size}.u8")
    newer_than = _STARTED if overwrite else 0.0
    meta = _read_meta(array_path, fp, n, size, newer_than)
    if meta is None:
        with _build_lock(os.path.join(cache_dir, f"images-{fp}-{size}.lock")):
            remove_stale_partials(cache_dir)
            meta = _read_meta(array_path, fp, n, size, newer_than)  # built while we waited for the lock?
            if meta is None:
                meta = _build(paths, size, array_path, fp, workers)
                return CachedImages(array_path, n, size), meta
    logger.info("Image cache hit: %s (%d images)", array_path, n)
    return CachedImages(array_path, n, size), meta


def _build(paths: Sequence[str], size: int, array_path: str, fp: str, workers: int) -> dict:
    n = len(paths)
    partial = f"{array_path}.{_HOST}.{os.getpid()}.partial"
    meta_partial = f"{array_path}.json.{_HOST}.{os.getpid()}.partial"
    logger.info("Building the image cache: %d images at %dx%d into %s (%d processes)",
                n, size, size, array_path, workers)  # fmt: skip
    # Chunks small enough to balance the workers and move the progress bar, big enough to amortise a task.
    chunk = max(8, min(256, -(-n // (8 * max(1, workers)))))
    jobs = [(partial, list(paths[s : s + chunk]), s, size) for s in range(0, n, chunk)]
    bad: dict[int, str] = {}
    try:
        with open(partial, "wb") as f:
            f.truncate(n * size * size * 3)  # sparse: bad images read back as zeros
        with tqdm(total=n, desc="decoding images", unit="img", disable=n == 0) as bar:
            if workers > 1 and len(jobs) > 1:
                pool = ProcessPoolExecutor(workers, initializer=_exit_with_parent, initargs=(os.getpid(),))
                try:
                    futures = {pool.submit(_decode_chunk, job): len(job[1]) for job in jobs}
                    for fut in as_completed(futures):
                        bad.update(fut.result())
                        bar.update(futures[fut])
                finally:  # on an error or Ctrl-C, do not decode the rest first
                    pool.shutdown(wait=True, cancel_futures=True)
            else:
                for job in jobs:
                    bad.update(_decode_chunk(job))
                    bar.update(len(job[1]))
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before its name says "complete"
        meta = {"fingerprint": fp, "n": n, "size": size, "transform": TRANSFORM_VERSION,
                "bad": dict(sorted(bad.items()))}  # fmt: skip
        with open(meta_partial, "w") as f:
            json.dump(meta, f)
        os.replace(partial, array_path)
        os.replace(meta_partial, array_path + ".json")  # last: its presence marks the cache complete
    finally:
        for leftover in (partial, meta_partial):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    if bad:
        logger.warning("%d of %d images could not be decoded and are left out", len(bad), n)
    return meta
