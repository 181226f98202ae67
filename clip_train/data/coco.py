"""COCO 2017 captions straight from the seed's folder: one row per caption annotation.

Replaces the hub loading script ``ydshieh/coco_dataset_script`` (datasets >= 4 cannot run scripts) with the same
rows and columns: image_id, caption_id, caption, height, width, file_name, coco_url, image_path. The folder may
hold the zips (``train2017.zip``, ``val2017.zip``, ``annotations_trainval2017.zip``) or their extracted content
(``train2017/``, ``val2017/``, ``annotations/captions_*2017.json``); zips are read in place, never extracted.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field

from clip_train.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "validation": "val", "test": "test"}
COLUMNS = ["image_id", "caption_id", "caption", "height", "width", "file_name", "coco_url", "image_path"]


@dataclass
class SplitRows:
    """Columns of one split, plus what was skipped and why."""

    columns: dict[str, list] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.columns["caption"])


def _parse_annotations(blob: bytes, where: str) -> dict:
    try:
        ann = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{where} is not valid JSON ({e}); download or extract it again.") from e
    if not isinstance(ann, dict):
        raise DataError(
            f"{where} is not a COCO captions file (expected an object with images and annotations)"
        )
    return ann


def _annotation_json(data_dir: str, name: str) -> dict:
    """Read ``annotations/<name>`` from the extracted folder or from ``annotations_trainval2017.zip``."""
    plain = os.path.join(data_dir, "annotations", name)
    if os.path.isfile(plain):
        with open(plain, "rb") as f:
            return _parse_annotations(f.read(), plain)
    for zname in ("annotations_trainval2017.zip", "annotations_trainval.zip"):
        zpath = os.path.join(data_dir, zname)
        if os.path.isfile(zpath):
            try:
                with zipfile.ZipFile(zpath) as z:
                    blob = z.read(f"annotations/{name}")
            except KeyError:
                continue
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DataError(f"{zpath} is not a valid zip ({e}); download it again.") from e
            return _parse_annotations(blob, f"{zpath}/annotations/{name}")
    raise DataError(
        f"No caption annotations in {data_dir!r}: looked for annotations/{name} and for "
        f"annotations_trainval2017.zip containing it. Point --data_dir (launchers: --data_path) at the COCO "
        f"2017 folder holding train2017.zip, val2017.zip and annotations_trainval2017.zip (or their extracted folders)."
    )


def _image_container(data_dir: str, folder: str) -> tuple[str, set[str]]:
    """Where a split's images live (a folder or a zip) and which file names it has."""
    plain = os.path.join(data_dir, folder)
    if os.path.isdir(plain):
        return plain, set(os.listdir(plain))
    zpath = os.path.join(data_dir, f"{folder}.zip")
    if os.path.isfile(zpath):
        try:
            with zipfile.ZipFile(zpath) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{zpath} is not a valid zip ({e}); download it again.") from e
        prefix = f"{folder}/"
        files = {n[len(prefix) :] for n in names if n.startswith(prefix) and not n.endswith("/")}
        # Zip members with '..' or absolute paths are never used: images are read by their COCO file name only.
        files = {n for n in files if "/" not in n and n not in ("", "..")}
        return os.path.join(zpath, folder), files
    raise DataError(f"No images for {folder} in {data_dir!r}: looked for {plain}/ and {zpath}.")


def check_split(data_dir: str, split: str, year: str = "2017") -> None:
    """The cheap half of load_coco_split, run before the output folder is made: the split's annotations are there
    and parse, its images' folder or zip opens. Raises the DataError load_coco_split would raise later."""
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir!r} is not a folder. Give the COCO {year} folder (see README).")
    folder = f"{SPLIT_DIRS[split]}{year}"
    _annotation_json(data_dir, f"captions_{folder}.json")
    _image_container(data_dir, folder)


def load_coco_split(data_dir: str, split: str, year: str = "2017") -> SplitRows:
    """All caption rows of one split, in annotation-file order, with the hub script's columns."""
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir!r} is not a folder. Give the COCO {year} folder (see README).")
    folder = f"{SPLIT_DIRS[split]}{year}"
    ann = _annotation_json(data_dir, f"captions_{folder}.json")
    image_root, present = _image_container(data_dir, folder)
    # Entries without an id or a file name are unusable; captions pointing at them count as unknown_image_id.
    images = {img["id"]: img for img in ann.get("images", []) if isinstance(img, dict) and "id" in img
              and isinstance(img.get("file_name"), str)}  # fmt: skip
    rows = SplitRows()
    cols = rows.columns
    for a in ann.get("annotations", []):
        a = a if isinstance(a, dict) else {}
        caption = a.get("caption")
        info = images.get(a.get("image_id"))
        if not isinstance(caption, str) or not caption.strip():
            rows.skipped["empty_caption"] += 1
        elif info is None:
            rows.skipped["unknown_image_id"] += 1
        elif info["file_name"] not in present:
            rows.skipped["missing_image"] += 1
        else:
            cols["image_id"].append(info["id"])
            cols["caption_id"].append(a.get("id"))
            cols["caption"].append(caption)
            cols["height"].append(info.get("height"))
            cols["width"].append(info.get("width"))
            cols["file_name"].append(info["file_name"])
            cols["coco_url"].append(info.get("coco_url", ""))
            cols["image_path"].append(os.path.join(image_root, info["file_name"]))
    if rows.skipped:
        logger.warning("COCO %s: skipped %s", folder, dict(rows.skipped))
    logger.info("COCO %s: %d caption rows over %d images", folder, len(rows), len(set(cols["image_id"])))
    return rows
