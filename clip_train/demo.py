"""The embedded default: a small COCO-2017-format folder and a tiny clip-roberta, made locally, once.

The images are coloured shapes on plain backgrounds with captions that describe them, so a tiny model can learn
real image-text alignment in a minute. Everything is real: JPEGs in zips, captions_*.json, a byte-level BPE
tokenizer trained on the captions, and a clip-roberta folder put together by save_clip_roberta.py's code path.

    python3 -m clip_train.demo                 # make (once) and train on it with the recipe's flags
    python3 -m clip_train.demo --print-paths   # make (once) and print data_dir=... and model_dir=...
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import zipfile

from PIL import Image, ImageDraw

from clip_train.model import build_clip_roberta

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
    "purple": (140, 40, 170), "orange": (250, 140, 10), "white": (250, 250, 250), "black": (15, 15, 15),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"gray": (128, 128, 128), "pale blue": (170, 200, 230), "beige": (225, 210, 180)}
TEMPLATES = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a {c} {s} on a {b} background",
    "there is a {s} that is {c}",
    "a {size} {c} {s} in the picture",
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_root() -> str:
    return os.environ.get("CLIP_DEMO_ROOT") or os.path.join(REPO, ".cache", "demo")


def draw(
    colour: str,
    shape: str,
    bg: str,
    big: bool,
    rng: random.Random,
    size: tuple[int, int] | None = None,
    grain: float = 0.0,
) -> Image.Image:
    """One shape on a plain background; ``size`` (w, h) fixes the picture size, ``grain`` adds photo-like noise."""
    w, h = rng.choice([(96, 72), (80, 96), (112, 84), (72, 72)])
    if size is not None:
        w, h = size
    img = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    side = int(min(w, h) * (0.8 if big else 0.5))
    x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
    box = (x0, y0, x0 + side, y0 + side)
    d = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    if grain > 0:
        img = _add_grain(img, grain, rng.getrandbits(32))
    return img


def _add_grain(img: Image.Image, grain: float, seed: int) -> Image.Image:
    """Blotches plus per-pixel noise: flat drawings compress to a few KB and decode unrealistically fast, so
    benchmarks use this to get photo-sized JPEGs (grain 10 at 640x480, quality 90: ~140 KB, COCO's are ~160 KB)."""
    import numpy as np

    g = np.random.default_rng(seed)
    w, h = img.size
    blotches = g.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    blotches = np.asarray(Image.fromarray(blotches).resize((w, h), Image.BICUBIC), np.float32)
    arr = 0.7 * np.asarray(img, np.float32) + 0.3 * blotches + g.normal(0.0, grain, (h, w, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_coco(
    root: str,
    n_train: int,
    n_val: int,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
    grain: float = 0.0,
) -> list[str]:
    """train2017.zip, val2017.zip and annotations_trainval2017.zip in ``root``; returns all captions.

    By default the pictures are small (72-112 px) and flat; ``image_size=(640, 480), grain=10`` gives
    COCO-sized JPEGs with photo-like file sizes for benchmarks.
    """
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    captions_all: list[str] = []
    ann_zip = zipfile.ZipFile(os.path.join(root, "annotations_trainval2017.zip"), "w")
    next_image, next_caption = 1, 1
    for folder, n in (("train2017", n_train), ("val2017", n_val)):
        images, annotations = [], []
        with zipfile.ZipFile(os.path.join(root, f"{folder}.zip"), "w", zipfile.ZIP_STORED) as z:
            for _ in range(n):
                c, s, b = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
                big = rng.random() < 0.5
                img = draw(c, s, b, big, rng, image_size, grain)
                name = f"{next_image:012d}.jpg"
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                z.writestr(f"{folder}/{name}", buf.getvalue())
                images.append({"id": next_image, "file_name": name, "height": img.height, "width": img.width,
                               "coco_url": f"http://images.cocodataset.org/{folder}/{name}"})  # fmt: skip
                for t in TEMPLATES:
                    cap = t.format(c=c, s=s, b=b, size="big" if big else "small")
                    annotations.append({"image_id": next_image, "id": next_caption, "caption": cap})
                    captions_all.append(cap)
                    next_caption += 1
                next_image += 1
        ann = {"info": {"description": "CLIP_for_PyTorch demo"}, "images": images, "annotations": annotations}
        ann_zip.writestr(f"annotations/captions_{folder}.json", json.dumps(ann))
    ann_zip.close()
    return captions_all


def write_classes(root: str, per_class: int = 5, seed: int = 1) -> str:
    """A labelled image folder for zero-shot: one subfolder per colour and shape (``red_circle`` ...: 24 classes)."""
    rng = random.Random(seed)
    for c in COLOURS:
        for s in SHAPES:
            folder = os.path.join(root, f"{c}_{s}")
            os.makedirs(folder, exist_ok=True)
            for k in range(per_class):
                img = draw(c, s, rng.choice(list(BACKGROUNDS)), rng.random() < 0.5, rng)
                img.save(os.path.join(folder, f"{k:03d}.jpg"), "JPEG", quality=90)
    return root


def classes_dir(data_dir: str) -> str:
    """The demo's class folder, next to its COCO folder (made by ``prepare``)."""
    return os.path.join(os.path.dirname(data_dir), "classes")


def write_tiny_towers(root: str, captions: list[str], image_size: int = 64) -> tuple[str, str]:
    """A tiny CLIP checkpoint (vision side used) and a tiny RoBERTa with a BPE tokenizer trained on ``captions``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        AutoTokenizer,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        RobertaConfig,
        RobertaModel,
    )

    vision_dir, text_dir = os.path.join(root, "vision"), os.path.join(root, "text")
    os.makedirs(text_dir, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(captions, vocab_size=400, min_frequency=1, special_tokens=specials)
    bpe.save_model(text_dir)  # vocab.json + merges.txt
    with open(os.path.join(text_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "RobertaTokenizer", "model_max_length": 128}, f)
    text_cfg = RobertaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=128, max_position_embeddings=130,
                             pad_token_id=1, bos_token_id=0, eos_token_id=2)  # fmt: skip
    RobertaModel(text_cfg).save_pretrained(text_dir)
    tok = AutoTokenizer.from_pretrained(text_dir)
    if len(tok) != bpe.get_vocab_size():
        raise RuntimeError(f"tokenizer reloads with {len(tok)} tokens, expected {bpe.get_vocab_size()}")

    clip_cfg = CLIPConfig(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": image_size, "patch_size": 16},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100},
        projection_dim=32,
    )  # fmt: skip
    CLIPModel(clip_cfg).save_pretrained(vision_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(vision_dir)  # fmt: skip
    return vision_dir, text_dir


def prepare(root: str | None = None, n_train: int = 600, n_val: int = 100) -> tuple[str, str]:
    """Make the demo data and model once under ``root`` (atomically); return (data_dir, model_dir)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the towers' load reports are expected here and only noise
    root = root or default_root()
    data_dir, model_dir = os.path.join(root, "coco"), os.path.join(root, "clip-roberta")
    if os.path.isfile(os.path.join(root, "READY")):
        if not os.path.isdir(classes_dir(data_dir)):  # a demo made before it had a class folder
            tmp = tempfile.mkdtemp(prefix=".classes-", dir=root)
            try:
                os.replace(write_classes(tmp), classes_dir(data_dir))
            except OSError:  # another process put one there first
                shutil.rmtree(tmp, ignore_errors=True)
        return data_dir, model_dir
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=os.path.dirname(os.path.abspath(root)))
    try:
        captions = write_coco(os.path.join(tmp, "coco"), n_train, n_val)
        write_classes(os.path.join(tmp, "classes"))
        # Random-init weights, the same on every build (the demo's figures repeat); the caller's RNG is left as is.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            vision, text = write_tiny_towers(os.path.join(tmp, "towers"), captions)
            build_clip_roberta(vision, text, os.path.join(tmp, "clip-roberta"))
        with open(os.path.join(tmp, "READY"), "w") as f:
            f.write("ok\n")
        if os.path.isfile(os.path.join(root, "READY")):  # another process finished first
            return data_dir, model_dir
        shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_dir, model_dir


def recipe_args(data_dir: str, model_dir: str, output_dir: str) -> list[str]:
    """The recipe's run_clip.py command line, sized for the demo (3 epochs, batch 64)."""
    return [
        "--output_dir", output_dir, "--num_train_epochs", "3", "--model_name_or_path", model_dir,
        "--data_dir", data_dir, "--dataset_name", "ydshieh/coco_dataset_script", "--dataset_config_name=2017",
        "--dataloader_num_workers", "2", "--image_column", "image_path", "--caption_column", "caption",
        "--remove_unused_columns=False", "--do_train", "--do_eval", "--fp16", "--dataloader_drop_last",
        "--fp16_opt_level", "O2", "--loss_scale", "12800000", "--optim", "adamw_apex_fused_npu", "--use_combine_grad",
        "--per_device_train_batch_size=64", "--per_device_eval_batch_size=64", "--learning_rate=5e-4",
        "--warmup_steps=0", "--weight_decay", "0.1", "--skip_steps", "10", "--overwrite_output_dir",
        "--save_steps", "150000", "--logging_steps", "10",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--root", default=None, help="where the demo lives (default .cache/demo or $CLIP_DEMO_ROOT)"
    )
    p.add_argument("--print-paths", action="store_true", help="make the demo, print its paths, do not train")
    a, extra = p.parse_known_args(argv)
    data_dir, model_dir = prepare(a.root)
    if a.print_paths:
        print(f"data_dir={data_dir}\nmodel_dir={model_dir}\nclasses_dir={classes_dir(data_dir)}")
        return 0
    sys.path.insert(0, REPO)
    import run_clip

    output_dir = os.path.join(a.root or default_root(), "output")
    # Zero-shot on the class folder at each evaluation: top-1 against chance (1 in 24) in the first minute.
    zeroshot = ["--zeroshot_dir", classes_dir(data_dir), "--zeroshot_templates", "simple"]
    run_clip.main(recipe_args(data_dir, model_dir, output_dir) + zeroshot + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
