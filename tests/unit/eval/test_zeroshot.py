"""Zero-shot classification end to end, on the demo's class folder (24 colour-shape classes, 5 pictures each).

One training run (module fixture: run_clip.py with --zeroshot_dir and an eval before training) is shared: the
untrained and the trained figures, the plot, all_results.json, the model card; then transformers' own pipeline,
2 gloo ranks against 1 and the evaluate command on that output folder and on a CLIPModel folder.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_py, spawn_ranks

import run_clip
from clip_train import evaluate
from clip_train.demo import classes_dir
from clip_train.eval import zeroshot
from clip_train.eval.templates import OPENAI_IMAGENET
from clip_train.train.trainer import normalize_pixels

ENV = {"OMP_NUM_THREADS": "1"}
TRAIN = (
    "--do_train --do_eval --max_steps 300 --per_device_train_batch_size 32 --learning_rate 2e-3 --warmup_steps 20 "
    "--lr_scheduler_type cosine --logging_steps 50 --save_strategy no --eval_on_start --per_device_eval_batch_size 64 "
    "--dataloader_num_workers 0 --report_to none --zeroshot_templates simple"
).split()
CLASSES, PER_CLASS = 24, 5
CHANCE = 100.0 / CLASSES  # 4.17%
FIGURES = ("eval_zeroshot_top1", "eval_zeroshot_top5", "eval_zeroshot_images", "eval_zeroshot_classes")


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """(data_dir, class folder, output folder) of one short training run on the demo."""
    data_dir, model_dir = demo
    out = str(tmp_path_factory.mktemp("zeroshot") / "out")
    classes = classes_dir(data_dir)
    args = ["run_clip.py", "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir,
            "--zeroshot_dir", classes, *TRAIN]  # fmt: skip
    r = run_py(args, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return data_dir, classes, out


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_training_lifts_top1_above_chance_and_the_untrained_model_stays_at_it(trained):
    _, _, out = trained
    history = load(os.path.join(out, "trainer_state.json"))["log_history"]
    before = next(h for h in history if "eval_zeroshot_top1" in h)
    after = load(os.path.join(out, "all_results.json"))
    assert before["step"] == 0
    for e in (before, after):
        assert (e["eval_zeroshot_images"], e["eval_zeroshot_classes"]) == (CLASSES * PER_CLASS, CLASSES)
    # Untrained: every prompt embeds to nearly the same vector, so every image gets one class (= chance exactly).
    # Trained (300 steps, ~10 s): 41.7% top-1 (training seed 42, the default), 36.7% (seed 1), 40.8% (seed 2), all
    # with 100% top-5: 9-10x chance; asserted at 4x.
    assert before["eval_zeroshot_top1"] <= 2 * CHANCE, before
    assert after["eval_zeroshot_top1"] >= 4 * CHANCE, after
    assert after["eval_zeroshot_top5"] >= after["eval_zeroshot_top1"]
    assert os.path.isfile(os.path.join(out, "zeroshot.png"))


def test_the_output_folder_gets_a_model_card(trained):
    _, classes, out = trained
    card = open(os.path.join(out, "README.md")).read()
    header = card.split("---")[1]
    assert "library_name: transformers" in header and "pipeline_tag: zero-shot-image-classification" in header
    after = load(os.path.join(out, "all_results.json"))
    for needle in ("python3 run_clip.py --output_dir", f"--zeroshot_dir {classes}", "Hardware: cpu", "Precision: fp32",
                   "train loss (last logged)", "eval loss", "text→image R@1", "zero-shot top-1 (%)",
                   f"{after['eval_zeroshot_top1']:.4f}".rstrip("0").rstrip("."), "from_pretrained"):  # fmt: skip
        assert needle in card, needle


def test_top1_equals_the_transformers_pipeline_image_for_image(trained):
    """Same single template: our prediction of every image is the pipeline's top label (its own preprocessing)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, pipeline

    _, classes, out = trained
    tok, proc = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
    model = AutoModel.from_pretrained(out)
    zs = zeroshot.prepare_zeroshot(classes, tok, image_size=64, templates="simple", use_cache=False)
    mean, std = torch.tensor(proc.image_mean).view(1, 3, 1, 1), torch.tensor(proc.image_std).view(1, 3, 1, 1)
    ours = zeroshot.predictions(model, zs, pad_id=tok.pad_token_id, batch_size=16, device="cpu",
                                pixels=lambda x: normalize_pixels(x, mean, std))  # fmt: skip
    classify = pipeline("zero-shot-image-classification", model=out)
    paths = [p for group in zeroshot.read_folder(classes)[1] for p in group]
    theirs = [
        zs.classnames.index(
            classify(p, candidate_labels=zs.classnames, hypothesis_template="a photo of a {}.")[0]["label"]
        )
        for p in paths
    ]
    assert ours.tolist() == theirs
    top1 = load(os.path.join(out, "all_results.json"))["eval_zeroshot_top1"]
    assert top1 == pytest.approx(100 * float(np.mean(np.array(theirs) == zs.labels)), abs=1e-3)


def test_two_gloo_ranks_give_the_figures_of_one(trained, tmp_path):
    data_dir, classes, out = trained
    args = ["-m", "clip_train.evaluate", "--model", out, "--coco", data_dir, "--zeroshot_dir", classes,
            "--zeroshot_templates", "simple", "--batch_size", "16"]  # fmt: skip
    one = run_py([*args, "--output", str(tmp_path / "one.json")], env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "zero-shot top-1 (%)" in one.stdout and "text→image R@1 (%)" in one.stdout
    spawn_ranks([*args, "--output", str(tmp_path / "two.json")], env=ENV)
    a, b = load(tmp_path / "one.json")["metrics"], load(tmp_path / "two.json")["metrics"]
    keys = [k for k in a if "zeroshot" in k or "_R@" in k or "rank" in k or k.startswith("eval_retrieval_")]
    keys = [k for k in keys if not k.endswith("_runtime")]
    assert len(keys) >= 14 and {k: a[k] for k in keys} == {k: b[k] for k in keys}
    # The standalone figures are the training run's own final evaluation (same batch size, same code).
    final = load(os.path.join(out, "all_results.json"))
    assert (
        a["eval_zeroshot_top1"] == final["eval_zeroshot_top1"]
        and a["eval_zeroshot_top5"] == final["eval_zeroshot_top5"]
    )


def test_evaluate_command_on_a_clip_model_folder(demo, tmp_path):
    """A transformers CLIPModel (tiny configs, the demo's tokenizer) evaluates too, and gets a model card."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    data_dir, model_dir = demo
    tok = AutoTokenizer.from_pretrained(model_dir)
    folder = str(tmp_path / "clip")
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    r = run_py(["-m", "clip_train.evaluate", "--model", folder, "--coco", data_dir, "--zeroshot_dir",
                classes_dir(data_dir), "--output", str(tmp_path / "f.json"), "--model_card"], env=ENV)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CLIPModel" in r.stdout and "zero-shot top-1 (%)" in r.stdout
    got = load(tmp_path / "f.json")["metrics"]
    assert {"eval_loss", "eval_text_to_image_R@1", *FIGURES} <= set(got)
    assert got["eval_zeroshot_classes"] == CLASSES and got["eval_retrieval_images"] == 40
    card = open(os.path.join(folder, "README.md")).read()
    assert "pipeline_tag: zero-shot-image-classification" in card and "python3 -m clip_train.evaluate" in card


# --- bad input: one line each ---------------------------------------------------------------------------------------
def bad_folders(tmp) -> dict[str, str]:
    """Class folders that cannot work, and templates / names files."""
    (tmp / "empty").mkdir()
    (tmp / "noimages" / "cat").mkdir(parents=True)
    (tmp / "noimages" / "cat" / "notes.txt").write_text("no image here\n")
    (tmp / "a-file").write_text("x\n")
    (tmp / "nobraces.txt").write_text("a photo of a {}.\na photo of a cat.\n")
    (tmp / "two-names.txt").write_text("red circle\nblue square\n")
    return {
        name: str(tmp / name) for name in ("empty", "noimages", "a-file", "nobraces.txt", "two-names.txt")
    }


ROWS = [
    (["--zeroshot_dir", "{tmp}/missing"], "--zeroshot_dir {tmp}/missing: does not exist; expected a class folder"),
    (["--zeroshot_dir", "{a-file}"], "--zeroshot_dir {a-file}: is a file; expected a class folder"),
    (["--zeroshot_dir", "{empty}"], "--zeroshot_dir {empty}: has no class subfolders; expected"),
    (["--zeroshot_dir", "{noimages}"], "--zeroshot_dir {noimages}: has 1 class folders but no image file in them"),
    (["--zeroshot_dir", "{classes}", "--zeroshot_templates", "{nobraces.txt}"],
     "--zeroshot_templates {nobraces.txt}: line 2 'a photo of a cat.': a template needs exactly one {}"),
    (["--zeroshot_dir", "{classes}", "--zeroshot_templates", "imagenet"], "--zeroshot_templates imagenet: neither openai, simple nor a readable file"),
    (["--zeroshot_dir", "{classes}", "--zeroshot_classnames", "{two-names.txt}"],
     "--zeroshot_classnames {two-names.txt}: has 2 names for 24 class folders"),
    (["--zeroshot_classnames", "{two-names.txt}"], "--zeroshot_classnames {two-names.txt}: given without --zeroshot_dir"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_bad_zeroshot_argument_is_one_line(demo, tmp_path, capfd, extra, message) -> None:
    data_dir, model_dir = demo
    names = {**bad_folders(tmp_path), "tmp": str(tmp_path), "classes": classes_dir(data_dir)}

    def fill(text: str) -> str:
        for name, path in names.items():
            text = text.replace("{" + name + "}", path)
        return text

    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--model_name_or_path", model_dir, "--data_dir", data_dir, "--do_eval",
            "--report_to", "none", *[fill(a) for a in extra]]  # fmt: skip
    assert run_clip.cli(argv) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("run_clip.py: error:")]
    assert len(lines) == 1 and fill(message) in lines[0], err[-3000:]
    assert "Traceback" not in err and not out.exists()


def test_the_evaluate_command_says_bad_input_in_one_line(demo, tmp_path, capfd) -> None:
    data_dir, model_dir = demo
    names = bad_folders(tmp_path)
    for extra, message in [
        (["--zeroshot_dir", names["empty"]], f"--zeroshot_dir {names['empty']} has no class subfolders"),
        ([], "nothing to evaluate: give --coco DIR, --zeroshot_dir DIR or both"),
        (["--zeroshot_dir", classes_dir(data_dir), "--zeroshot_templates", names["nobraces.txt"]], "line 2"),
    ]:
        assert evaluate.cli(["--model", model_dir, *extra]) == 2
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("clip_train.evaluate: error:")]
        assert len(lines) == 1 and message in lines[0], err[-2000:]


def test_unreadable_images_are_counted_and_skipped(demo, tmp_path, caplog) -> None:
    """A broken file is left out and counted; a class whose every image is broken stays a candidate, with a warning."""
    import shutil

    from transformers import AutoTokenizer

    data_dir, model_dir = demo
    root = tmp_path / "classes"
    shutil.copytree(classes_dir(data_dir), root)
    (root / "red_circle" / "000.jpg").write_bytes(b"not a jpeg")
    for f in (root / "blue_square").iterdir():
        f.write_bytes(b"\xff\xd8 cut")
    tok = AutoTokenizer.from_pretrained(model_dir)
    zs = zeroshot.prepare_zeroshot(
        str(root), tok, image_size=64, templates="simple", cache_dir=str(tmp_path / "c")
    )
    assert zs.skipped == {"images": 1 + PER_CLASS, "classes": 1} and len(zs.classnames) == CLASSES
    assert len(zs.labels) == CLASSES * PER_CLASS - 1 - PER_CLASS
    assert any(
        "blue_square" in r.getMessage() and "no readable image" in r.getMessage() for r in caplog.records
    )
    for f in root.glob("*/*.jpg"):
        f.write_bytes(b"broken")
    with pytest.raises(zeroshot.DataError, match="none of its 120 images could be decoded"):
        zeroshot.prepare_zeroshot(
            str(root), tok, image_size=64, templates="simple", cache_dir=str(tmp_path / "c2")
        )


def test_templates() -> None:
    assert len(OPENAI_IMAGENET) == 80 and len(set(OPENAI_IMAGENET)) == 80
    assert all(t.count("{}") == 1 for t in OPENAI_IMAGENET) and "a photo of a {}." in OPENAI_IMAGENET
    assert zeroshot.load_templates("simple") == ["a photo of a {}."]
    assert zeroshot.class_names(["red_circle", "tench"]) == ["red circle", "tench"]


def test_scores_are_fp32_under_a_low_precision_autocast() -> None:
    """Two classes closer than bf16 can tell apart: under the Trainer's bf16 autocast a bf16 matmul would tie them
    (and ties count against the model); the scores are taken in fp32, so the right class still wins."""
    unit = torch.nn.functional.normalize
    image = unit(torch.tensor([[1.0, 0.0]]), dim=-1)
    classes = unit(torch.tensor([[1.0, 0.001], [1.0, 0.002]]), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (image @ classes.T)[0, 0] == (image @ classes.T)[0, 1]  # what bf16 would see
        got = zeroshot.topk_accuracy(image, classes, torch.tensor([0]), ks=(1,))
    assert got == {"zeroshot_top1": 100.0}


def test_a_demo_made_before_the_class_folder_gets_one(tmp_path) -> None:
    from clip_train.demo import prepare

    (tmp_path / "READY").write_text("ok\n")
    data_dir, _ = prepare(str(tmp_path))
    folders, files = zeroshot.read_folder(classes_dir(data_dir))
    assert (
        len(folders) == CLASSES and all(len(f) == PER_CLASS for f in files) and folders[0] == "black_circle"
    )


def test_overwrite_cache_rebuilds_the_class_folders_image_cache(demo, tmp_path, monkeypatch) -> None:
    """An image replaced in place (same name, size and time) is seen again only with --overwrite_cache."""
    import shutil
    import time

    from PIL import Image
    from transformers import AutoTokenizer

    from clip_train.data import images

    data_dir, model_dir = demo
    root = tmp_path / "classes"
    shutil.copytree(classes_dir(data_dir), root)
    tok = AutoTokenizer.from_pretrained(model_dir)

    def first_pixels(overwrite: bool) -> np.ndarray:
        zs = zeroshot.prepare_zeroshot(
            str(root),
            tok,
            image_size=64,
            templates="simple",
            cache_dir=str(tmp_path / "c"),
            overwrite=overwrite,
        )
        return np.asarray(zs.images[0]).copy()

    before = first_pixels(False)
    target = sorted(root.glob("*/*.jpg"))[0]
    stat = target.stat()
    Image.new("RGB", (64, 64), (0, 0, 0)).save(target, quality=95)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert np.array_equal(first_pixels(False), before)  # the cache does not look at each file
    # overwrite rebuilds caches made before this process started (a run's ranks share theirs): as a new run would
    monkeypatch.setattr(images, "_STARTED", time.time())
    assert not np.array_equal(first_pixels(True), before)


def test_the_cards_command_line_hides_tokens() -> None:
    """The card ships with the model: a hub token given on the command line must not."""
    from clip_train.eval.model_card import without_secrets

    argv = ["--token", "hf_secret", "--hub_token=hf_other", "--output_dir", "out", "--token=hf_third"]
    shown = without_secrets(argv)
    assert shown == ["--token", "***", "--hub_token=***", "--output_dir", "out", "--token=***"]
    assert not any("hf_" in a for a in shown)
