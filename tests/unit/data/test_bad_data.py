"""Bad data never crashes a run: odd images are kept (as RGB), broken ones and broken annotations are skipped and
counted in the log and in all_results.json. Every case goes through the real run_clip.py on a real COCO folder."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from clip_train.demo import write_coco

N_TRAIN, N_VAL = 16, 8  # good demo images, 5 captions each
NON_ASCII = ["ein rotes Quadrat – 赤い四角", "un cercle vert à côté d'un carré ✓", "Кружок 🟢"]


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def bomb_png(width: int = 10_000, height: int = 9_000) -> bytes:
    """A valid 1-bit PNG of 90 M pixels (past PIL's 89.5 M decompression-bomb limit) that is only ~11 kB."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" + bytes((width + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def odd_images() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(images to keep, images to skip), by file name."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8))
    jpeg = encoded(rgb, "JPEG")
    keep = {
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "gray.jpg": encoded(rgb.convert("L"), "JPEG"),
        "palette.png": encoded(rgb.convert("P"), "PNG"),
        "rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
        "png_named.jpg": encoded(rgb, "PNG"),
    }
    skip = {
        "corrupt.jpg": bytes(np.random.default_rng(1).integers(0, 255, 3000, dtype=np.uint8)),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "bomb.png": bomb_png(),
    }
    return keep, skip


def extract(zpath: str, into: str) -> None:
    with zipfile.ZipFile(zpath) as z:
        z.extractall(into)
    os.remove(zpath)


def add_images(ann: dict, names: list[str], captions: list) -> None:
    """Image entries for ``names`` and one annotation each (caption from ``captions``, cycled)."""
    next_image = max(i["id"] for i in ann["images"]) + 1
    next_caption = max(a["id"] for a in ann["annotations"]) + 1
    for k, name in enumerate(names):
        ann["images"].append({"id": next_image + k, "file_name": name, "height": 72, "width": 96})
        caption = captions[k % len(captions)]
        ann["annotations"].append({"image_id": next_image + k, "id": next_caption + k, "caption": caption})


def build_bad_coco(root: str) -> str:
    """A demo COCO folder with every kind of defect. train: zip images, val: extracted folder; both with
    extracted annotations (the two forms the loader reads)."""
    data = os.path.join(root, "coco")
    write_coco(data, N_TRAIN, N_VAL)
    extract(os.path.join(data, "annotations_trainval2017.zip"), data)
    extract(os.path.join(data, "val2017.zip"), data)
    keep, skip = odd_images()

    path = os.path.join(data, "annotations", "captions_train2017.json")
    ann = json.load(open(path, encoding="utf-8"))
    with zipfile.ZipFile(os.path.join(data, "train2017.zip"), "a") as z:
        for name, blob in {**keep, **skip}.items():
            z.writestr(f"train2017/{name}", blob)
        # Members that would land outside any folder if extracted: never extracted, never used.
        z.writestr("train2017/../evil.jpg", keep["gray.jpg"])
        z.writestr("/abs_evil.jpg", keep["gray.jpg"])
    add_images(ann, list(keep), NON_ASCII)
    add_images(ann, list(skip), ["a broken picture"])
    add_images(ann, ["missing.jpg", "../evil.jpg", "/abs_evil.jpg"], ["not there"])
    first = ann["annotations"][0]["image_id"]
    bad_captions = ["", None, "  \t\n "]
    for k, cap in enumerate(bad_captions):
        ann["annotations"].append({"image_id": first, "id": 90_000 + k, "caption": cap})
    ann["annotations"].append({"image_id": 999_999, "id": 90_010, "caption": "an orphan caption"})
    ann["images"].append({"id": 777_777, "height": 72, "width": 96})  # no file_name: unusable
    ann["annotations"].append({"image_id": 777_777, "id": 90_011, "caption": "a caption of a nameless image"})
    json.dump(ann, open(path, "w", encoding="utf-8"), ensure_ascii=False)

    path = os.path.join(data, "annotations", "captions_val2017.json")
    ann = json.load(open(path, encoding="utf-8"))
    os.remove(os.path.join(data, "val2017", ann["images"][0]["file_name"]))  # its 5 captions: missing_image
    open(os.path.join(data, "val2017", "corrupt.jpg"), "wb").write(skip["corrupt.jpg"])
    add_images(ann, ["corrupt.jpg"], ["a broken picture"])
    json.dump(ann, open(path, "w", encoding="utf-8"), ensure_ascii=False)
    return data


def build_unusable_coco(root: str, how: str) -> str:
    """A COCO folder in which nothing is usable: every train image corrupt, or every train caption empty."""
    data = os.path.join(root, how)
    write_coco(data, 4, 4)
    extract(os.path.join(data, "annotations_trainval2017.zip"), data)
    path = os.path.join(data, "annotations", "captions_train2017.json")
    ann = json.load(open(path))
    if how == "corrupt":
        extract(os.path.join(data, "train2017.zip"), data)
        for img in ann["images"]:
            open(os.path.join(data, "train2017", img["file_name"]), "wb").write(b"not a jpeg at all")
    else:
        for a in ann["annotations"]:
            a["caption"] = " "
    json.dump(ann, open(path, "w"), ensure_ascii=False)
    return data


def cmd(data_dir: str, model_dir: str, out: str) -> list[str]:
    return [
        sys.executable, "run_clip.py", "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir,
        "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8", "--dataloader_drop_last", "--report_to", "none",
        "--image_cache_dir", os.path.join(out, "cache"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory) -> dict:
    """The defective folder through run_clip.py, as a process that trains and evaluates."""
    root = tmp_path_factory.mktemp("bad_data")
    _, model_dir = demo
    data = build_bad_coco(str(root))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd(data, model_dir, str(root / "out")), cwd=REPO, env=env, text=True, capture_output=True,
                       timeout=300)  # fmt: skip
    return {
        "bad": {"rc": r.returncode, "log": r.stdout + r.stderr, "out": str(root / "out")},
        "root": str(root),
    }


def results(runs: dict) -> dict:
    run = runs["bad"]
    assert run["rc"] == 0, run["log"][-4000:]
    return json.load(open(os.path.join(run["out"], "all_results.json")))


def test_odd_images_are_kept_as_rgb(runs):
    # 16 good images x 5 captions + one caption for each of CMYK, grayscale, palette, RGBA and a PNG named .jpg
    assert results(runs)["train_samples"] == N_TRAIN * 5 + 5
    for name in ("cmyk.jpg", "gray.jpg", "palette.png", "rgba.png", "png_named.jpg"):
        assert name not in runs["bad"]["log"], name  # never reported as bad


def test_broken_images_are_skipped_and_counted(runs):
    r = results(runs)
    assert r["train_skipped_bad_image"] == 3 and r["train_skipped_rows_of_bad_images"] == 3
    log = runs["bad"]["log"]
    for name in ("corrupt.jpg", "truncated.jpg", "bomb.png"):
        assert any(
            "bad image skipped: cannot decode" in line and name in line for line in log.splitlines()
        ), name
    assert "decompression bomb" in log
    assert "train: 85 of 96 rows kept; skipped: bad_image=3, empty_caption=3, missing_image=3, " in log


def test_undecodable_images_on_the_fly_are_left_out_and_counted(runs, demo):
    # Without the cache nothing is known about an image before it is drawn: its sample is left out of its batch,
    # logged, and counted. One epoch of 88 rows (85 good + the 3 bad images' rows) in batches of 8 draws each once.
    _, model_dir = demo
    out = os.path.join(runs["root"], "fly")
    args = cmd(os.path.join(runs["root"], "coco"), model_dir, out)
    args.remove("--dataloader_drop_last")
    args[args.index("--max_steps") : args.index("--max_steps") + 2] = ["--num_train_epochs", "1"]
    r = subprocess.run([*args, "--image_cache", "False"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       text=True, capture_output=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.load(open(os.path.join(out, "all_results.json")))
    cached = results(runs)
    assert got["train_samples"] == 88 and got["train_skipped_undecodable_samples"] == 3
    assert got["eval_skipped_undecodable_samples"] == cached["eval_skipped_rows_of_bad_images"]
    assert got["eval_samples"] == cached["eval_samples"] + cached["eval_skipped_rows_of_bad_images"]
    assert (r.stdout + r.stderr).count("skipping a sample: cannot decode") >= 3
    assert "train_skipped_undecodable_samples" not in cached  # the cache left them out before batching


def test_undecodable_counts_are_summed_over_ranks(runs, demo):
    # Two gloo ranks split the 88 rows; each bad row is drawn by one of them, and the total reaches all_results.json.
    _, model_dir = demo
    out = os.path.join(runs["root"], "fly2")
    args = cmd(os.path.join(runs["root"], "coco"), model_dir, out)[1:]  # without the interpreter
    args.remove("--dataloader_drop_last")
    args[args.index("--max_steps") : args.index("--max_steps") + 2] = ["--num_train_epochs", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*torchrun, *args, "--image_cache", "False", "--do_eval", "False"], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, capture_output=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    got = json.load(open(os.path.join(out, "all_results.json")))
    assert "world_size=2" in r.stderr and got["train_skipped_undecodable_samples"] == 3


def test_missing_images_are_skipped_and_counted(runs):
    r = results(runs)
    assert r["train_skipped_missing_image"] == 3  # missing.jpg and the two path-escaping names (zip)
    assert r["eval_skipped_missing_image"] == 5  # one deleted image's five captions (folder)


def test_empty_captions_and_unknown_image_ids_are_skipped_and_counted(runs):
    r = results(runs)
    assert r["train_skipped_empty_caption"] == 3  # "", None and whitespace
    assert (
        r["train_skipped_unknown_image_id"] == 2
    )  # an id no image has, and an image entry without file_name


def test_eval_skips_reach_all_results(runs):
    r = results(runs)
    assert r["eval_skipped_bad_image"] == 1 and r["eval_samples"] == N_VAL * 5 - 5
    assert (
        json.load(open(os.path.join(runs["bad"]["out"], "eval_results.json")))["eval_skipped_missing_image"]
        == 5
    )


def test_non_ascii_captions_are_kept_as_they_are(runs):
    from clip_train.data.coco import load_coco_split

    rows = load_coco_split(os.path.join(runs["root"], "coco"), "train")
    kept = set(rows.columns["caption"])
    assert all(c in kept for c in NON_ASCII)
    assert results(runs)["train_samples"] == N_TRAIN * 5 + 5  # and trained on: see test_odd_images_are_kept


def test_zip_members_escaping_the_folder_are_never_used_or_written(runs):
    results(runs)
    written = [os.path.join(d, f) for d, _, files in os.walk(runs["root"]) for f in files]
    assert not [p for p in written if "evil" in os.path.basename(p)], written
    assert not os.path.exists("/abs_evil.jpg") and not os.path.exists(os.path.join(REPO, "evil.jpg"))


@pytest.mark.parametrize("how", ["corrupt", "empty"])
def test_nothing_usable_left_stops_with_a_clear_error(demo, tmp_path, capfd, how):
    """In this process through run_clip.cli (it fails before training; start-up would be most of its cost)."""
    import run_clip

    data = build_unusable_coco(str(tmp_path), how)
    rc = run_clip.cli(cmd(data, demo[1], str(tmp_path / "out"))[2:])
    err = capfd.readouterr().err
    assert rc == 2, err[-4000:]
    assert "run_clip.py: error: the train split has no usable rows" in err
    assert "Traceback" not in err
