import json
import os
import zipfile

import pytest

from clip_train.data.coco import COLUMNS, load_coco_split
from clip_train.errors import DataError


def extract(src: str, dst: str) -> str:
    for name in ("train2017.zip", "val2017.zip", "annotations_trainval2017.zip"):
        with zipfile.ZipFile(os.path.join(src, name)) as z:
            z.extractall(dst)
    return dst


def test_zips_and_extracted_folder_give_identical_rows(demo, tmp_path):
    data_dir, _ = demo
    plain = extract(data_dir, str(tmp_path / "plain"))
    for split, n_images in (("train", 160), ("validation", 40)):
        a = load_coco_split(data_dir, split)
        b = load_coco_split(plain, split)
        assert list(a.columns) == COLUMNS
        assert len(a) == n_images * 5 and not a.skipped
        for col in COLUMNS:
            if col != "image_path":
                assert a.columns[col] == b.columns[col], col
        assert [os.path.basename(p) for p in a.columns["image_path"]] == a.columns["file_name"]
        assert a.columns["image_path"] != b.columns["image_path"]  # one reads the zip, the other the folder


def test_rows_follow_annotation_order_with_hub_columns(demo):
    data_dir, _ = demo
    with zipfile.ZipFile(os.path.join(data_dir, "annotations_trainval2017.zip")) as z:
        ann = json.loads(z.read("annotations/captions_val2017.json"))
    rows = load_coco_split(data_dir, "validation")
    assert rows.columns["caption_id"] == [a["id"] for a in ann["annotations"]]
    assert rows.columns["caption"] == [a["caption"] for a in ann["annotations"]]
    first = ann["images"][0]
    assert rows.columns["height"][0] == first["height"] and rows.columns["width"][0] == first["width"]
    assert rows.columns["image_path"][0].endswith(os.path.join("val2017.zip", "val2017", first["file_name"]))


def test_bad_annotations_are_skipped_and_counted(demo, tmp_path):
    data_dir, _ = demo
    plain = extract(data_dir, str(tmp_path / "plain"))
    path = os.path.join(plain, "annotations", "captions_val2017.json")
    ann = json.load(open(path))
    ann["annotations"][0]["caption"] = "   "
    ann["annotations"][1]["caption"] = None
    ann["annotations"][2]["image_id"] = 999_999
    ann["annotations"][3]["caption"] = "ein rotes Quadrat – 赤い四角"
    os.remove(os.path.join(plain, "val2017", ann["images"][-1]["file_name"]))
    json.dump(ann, open(path, "w"))
    rows = load_coco_split(plain, "validation")
    assert rows.skipped == {"empty_caption": 2, "unknown_image_id": 1, "missing_image": 5}
    assert len(rows) == 200 - 8
    assert "ein rotes Quadrat – 赤い四角" in rows.columns["caption"]


def test_wrong_folder_names_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_coco_split(str(tmp_path / "nope"), "train")
    with pytest.raises(DataError, match="annotations_trainval2017.zip"):
        load_coco_split(str(tmp_path), "train")
