import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from clip_train.data.images import BadImage, build_cache, load_image, resize_center_crop


def jpeg_bytes(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_resize_shorter_side_then_center_crop():
    # A 200x100 image with a red left half, blue right half and a green 20-px band in the middle.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:] = (0, 0, 255)
    arr[:, 90:110] = (0, 255, 0)
    out = resize_center_crop(Image.fromarray(arr), 50)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8
    # shorter side 100 -> 50, so the width becomes 100 and the crop keeps the middle 50 columns (x 25..75).
    assert tuple(out[25, 0]) == pytest.approx((255, 0, 0), abs=30)
    assert tuple(out[25, 49]) == pytest.approx((0, 0, 255), abs=30)
    assert tuple(out[25, 25]) == pytest.approx((0, 255, 0), abs=30)


def test_reads_from_zip_and_folder_alike_and_converts_to_rgb(tmp_path):
    gray = Image.fromarray(np.full((40, 60), 77, np.uint8), "L")
    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("imgs/a.jpg", jpeg_bytes(gray))
        z.writestr("imgs/b.jpg", jpeg_bytes(gray.convert("RGBA"), "PNG"))  # a PNG named .jpg
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(gray))
    from_zip = load_image(str(zpath / "imgs" / "a.jpg"), 32)
    from_dir = load_image(str(tmp_path / "a.jpg"), 32)
    assert from_zip.shape == (32, 32, 3)
    np.testing.assert_array_equal(from_zip, from_dir)
    assert abs(int(from_zip.mean()) - 77) <= 2
    assert load_image(str(zpath / "imgs" / "b.jpg"), 32).shape == (32, 32, 3)
    with pytest.raises(BadImage, match="cannot read"):
        load_image(str(zpath / "imgs" / "missing.jpg"), 32)


def test_cache_is_built_once_and_skips_bad_images(tmp_path):
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(jpeg_bytes(good) if i != 2 else jpeg_bytes(good)[:200])  # image 2 is truncated
        paths.append(str(p))
    cache = str(tmp_path / "cache")
    arr, meta = build_cache(paths, 32, cache, workers=2)
    assert arr.shape == (5, 32, 32, 3)
    assert list(meta["bad"]) == [2]
    np.testing.assert_array_equal(arr[0], load_image(paths[0], 32))
    stamp = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
    arr2, meta2 = build_cache(paths, 32, cache, workers=1)
    assert {
        f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)
    } == stamp  # reused, not rebuilt
    np.testing.assert_array_equal(arr2, arr)
    assert meta2["bad"].keys() == {2}
    assert not [f for f in os.listdir(cache) if f.endswith(".partial")]
