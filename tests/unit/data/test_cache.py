"""The decoded-image cache under interruption and concurrency, with real processes.

A named pipe (FIFO) stands in for one image: a builder that reaches it blocks until the test writes the image's
bytes, which holds a build in progress for exactly as long as a test needs, without timing guesses.
"""

import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import REPO, run_py
from PIL import Image

from clip_train.data import images
from clip_train.data.images import build_cache, load_image, remove_stale_partials

SIZE = 32
BUILDER = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from clip_train.data.images import build_cache
paths, cache, workers = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
arr, meta = build_cache(paths, 32, cache, workers=workers)
print("finished", len(arr), flush=True)
"""


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """(paths, fifo index, the FIFO image's bytes): 40 JPEGs, image 20 a FIFO."""
    d = tmp_path / "imgs"
    d.mkdir()
    paths = []
    for i in range(40):
        p = d / f"{i:03d}.jpg"
        if i == 20:
            os.mkfifo(p)
        else:
            p.write_bytes(jpeg(i))
        paths.append(str(p))
    return paths, 20, jpeg(20)


def feed(fifo: str, data: bytes) -> threading.Thread:
    """Write ``data`` into the FIFO once, as soon as a reader opens it (in a thread: opening blocks till then)."""

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


@pytest.fixture
def start_builder(tmp_path):
    """Starts builder subprocesses; any still running at the end (a failed test: blocked on the FIFO) is killed."""
    started = []

    def start(paths, cache, workers, name="paths.json") -> subprocess.Popen:
        (tmp_path / name).write_text(json.dumps(paths))
        cmd = [sys.executable, "-c", BUILDER, str(tmp_path / name), cache, str(workers)]
        started.append(
            subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def listing(cache: str) -> list[str]:
    return sorted(os.listdir(cache)) if os.path.isdir(cache) else []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def check_images(arr, paths, fifo_index, fifo_bytes, tmp_path):
    copy = tmp_path / "fifo-copy.jpg"
    copy.write_bytes(fifo_bytes)
    for i, p in enumerate(paths):
        want = load_image(str(copy) if i == fifo_index else p, SIZE)
        np.testing.assert_array_equal(arr[i], want, err_msg=f"image {i}")


def test_killed_build_is_never_served_and_the_next_run_rebuilds(folder, tmp_path, caplog, start_builder):
    paths, k, fifo_bytes = folder
    cache = str(tmp_path / "cache")
    builder = start_builder(paths, cache, workers=2)
    wait_for(lambda: any(f.endswith(".partial") for f in listing(cache)))
    wait_for(lambda: len(psutil.Process(builder.pid).children()) == 2)
    workers = [c.pid for c in psutil.Process(builder.pid).children()]
    time.sleep(0.5)  # the workers decode everything up to the FIFO
    os.kill(builder.pid, signal.SIGKILL)  # no cleanup code runs
    builder.wait()
    # Nothing under a final name, only the dead build's partial file; its pool workers notice and exit.
    files = [f for f in listing(cache) if not f.endswith(".lock")]
    assert len(files) == 1 and files[0].endswith(f".{images._HOST}.{builder.pid}.partial"), files
    try:
        wait_for(lambda: all(gone(w) for w in workers), timeout=10)
    finally:  # if they did not exit, do not leave them blocked on the FIFO for ever
        for w in workers:
            if not gone(w):
                os.kill(w, signal.SIGKILL)

    # The next run: removes the leftover, builds again from scratch, and serves complete, correct images.
    caplog.set_level(logging.INFO, logger="clip_train.data.images")
    feeder = feed(paths[k], fifo_bytes)
    arr, meta = build_cache(paths, SIZE, cache, workers=1)
    feeder.join(5)
    assert "Removed 1 leftover file(s)" in caplog.text and "Building the image cache" in caplog.text
    assert not [f for f in listing(cache) if f.endswith(".partial")]
    assert arr.shape == (40, SIZE, SIZE, 3) and meta["bad"] == {}
    check_images(arr, paths, k, fifo_bytes, tmp_path)

    # And after that, a hit: the FIFO is not read again (nobody feeds it, so a rebuild would hang).
    caplog.clear()
    again, _ = build_cache(paths, SIZE, cache, workers=2)
    assert "Image cache hit" in caplog.text
    np.testing.assert_array_equal(np.asarray(again), np.asarray(arr))


def test_concurrent_builders_build_once(folder, tmp_path, start_builder):
    paths, k, fifo_bytes = folder
    cache = str(tmp_path / "cache")
    first = start_builder(paths, cache, workers=1, name="a.json")
    wait_for(lambda: any(f.endswith(".partial") for f in listing(cache)))  # first holds the lock, at the FIFO
    second = start_builder(paths, cache, workers=1, name="b.json")
    time.sleep(1.5)
    assert second.poll() is None, second.communicate()[0]  # waiting for the lock, not building
    assert [f for f in listing(cache) if f.endswith(".partial")] == [
        f for f in listing(cache) if f.endswith(f".{first.pid}.partial")
    ]
    feed(paths[k], fifo_bytes)  # exactly one image's worth: a second build would block on the FIFO forever
    out_first, _ = first.communicate(timeout=60)
    out_second, _ = second.communicate(timeout=60)
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    assert "Building the image cache" in out_first and "finished 40" in out_first
    assert "Building the image cache" not in out_second, out_second
    assert "Image cache hit" in out_second and "finished 40" in out_second
    arr, _ = build_cache(paths, SIZE, cache)
    check_images(arr, paths, k, fifo_bytes, tmp_path)


def test_stale_partials_of_dead_builders_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    base = "images-0123456789abcdef0123-224.u8"
    names = {
        "dead here": f"{base}.{images._HOST}.{dead.pid}.partial",
        "dead meta": f"{base}.json.{images._HOST}.{dead.pid}.partial",
        "alive here": f"{base}.{images._HOST}.{os.getppid()}.partial",
        "other host, fresh": f"{base}.some.other.host.{dead.pid}.partial",
        "other host, old": f"{base}.old.host.7.partial",
        "not ours": "notes.partial",
    }
    for n in names.values():
        (tmp_path / n).write_bytes(b"x")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / names["other host, old"], (two_days_ago, two_days_ago))
    removed = {os.path.basename(p) for p in remove_stale_partials(str(tmp_path))}
    assert removed == {names["dead here"], names["dead meta"], names["other host, old"]}
    assert sorted(os.listdir(tmp_path)) == sorted(
        names[k] for k in ("alive here", "other host, fresh", "not ours")
    )


def test_overwrite_rebuilds_old_caches_once_per_run(tmp_path, caplog):
    paths = []
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
        paths.append(str(tmp_path / f"{i}.jpg"))
    cache = str(tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="clip_train.data.images")
    build_cache(paths, SIZE, cache)
    meta = next(os.path.join(cache, f) for f in listing(cache) if f.endswith(".json"))
    caplog.clear()
    build_cache(paths, SIZE, cache, overwrite=True)  # built during this run (by another rank, say): reused
    assert "Image cache hit" in caplog.text and "Building" not in caplog.text
    old = images._STARTED - 3600
    os.utime(meta, (old, old))  # as if from an earlier run
    caplog.clear()
    arr, _ = build_cache(paths, SIZE, cache, overwrite=True)
    assert "Building the image cache" in caplog.text
    np.testing.assert_array_equal(arr[3], load_image(paths[3], SIZE))


def test_cache_names_change_with_size_and_content_and_reader_survives_pickling(tmp_path):
    paths = []
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
        paths.append(str(tmp_path / f"{i}.jpg"))
    fp = images.cache_fingerprint(paths, SIZE)
    assert images.cache_fingerprint(paths, SIZE + 8) != fp
    assert images.cache_fingerprint(paths[:2], SIZE) != fp
    (tmp_path / "3.jpg").write_bytes(jpeg(3))  # the folder changed
    os.utime(tmp_path, (time.time() + 5, time.time() + 5))
    assert images.cache_fingerprint(paths, SIZE) != fp
    arr, _ = build_cache(paths, SIZE, str(tmp_path / "cache"))
    clone = pickle.loads(pickle.dumps(arr))  # what a spawn-started loader worker receives
    np.testing.assert_array_equal(clone[2], arr[2])
    with pytest.raises(IndexError):
        arr[3]


def test_two_ranks_under_torchrun_build_the_cache_once(demo, tmp_path):
    data_dir, model_dir = demo
    cache = str(tmp_path / "cache")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "run_clip.py",
            "--model_name_or_path", model_dir, "--data_dir", data_dir, "--output_dir", str(tmp_path / "out"),
            "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none",
            "--save_strategy", "no", "--image_cache_dir", cache, "--dataloader_num_workers", "0",
            "--log_level", "info", "--log_level_replica", "info", "--use_cpu"]  # fmt: skip
    # (--use_cpu: without it, transformers 5 leaves CPU-only ranks undistributed: two independent runs.)
    r = run_py(args, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert log.count("world_size=2") == 2  # both ranks log at INFO, so a second build could not hide
    assert log.count("Building the image cache") == 1, log[-4000:]
    assert log.count("Image cache hit") == 1
    assert len([f for f in os.listdir(cache) if f.endswith(".u8")]) == 1
