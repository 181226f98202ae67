"""Every bad set-up ends in one clear message naming the fix, exit code 2 and no traceback.

Extends tests/runs/test_run_clip.py::test_bad_setups_get_one_clear_error, which runs run_clip.py as a process for a
wrong --data_dir, --max_steps 0, an unknown flag and a folder that is not a model (so the process plumbing,
``sys.exit(cli())``, is covered there). Here ``run_clip.cli(argv)`` runs in this process on real files: Python
start-up is most of a case's cost on a small machine, and an exception cli() does not turn into a message would
still fail the test. Remote code is tested in real processes, since the code it guards would run in ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

import run_clip
from clip_train.demo import write_coco


def base_args(data_dir: str, model_dir: str, out: str) -> list[str]:
    return [
        "--output_dir", out, "--model_name_or_path", model_dir, "--data_dir", data_dir,
        "--do_train", "--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none",
    ]  # fmt: skip


def model_without(model_dir: str, dst: str, *names: str) -> str:
    shutil.copytree(model_dir, dst)
    for name in names:
        os.remove(os.path.join(dst, name))
    return dst


def broken_coco(root: str, what: str) -> str:
    """A demo COCO folder without its annotations or train images, or with a cut zip or a broken JSON file."""
    write_coco(root, 4, 4)
    ann, train = os.path.join(root, "annotations_trainval2017.zip"), os.path.join(root, "train2017.zip")
    if what in ("no-annotations", "no-images"):
        os.remove(ann if what == "no-annotations" else train)
    elif what == "cut-zip":  # an interrupted download
        blob = open(train, "rb").read()
        open(train, "wb").write(blob[: len(blob) // 2])
    else:
        os.makedirs(os.path.join(root, "annotations"))
        open(os.path.join(root, "annotations", "captions_train2017.json"), "w").write('{"images": [')
    return root


def check_one_clear_error(capfd, args: list[str], message: str) -> None:
    rc = run_clip.cli(args)
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("run_clip.py: error:")]
    assert rc == 2, err[-3000:]
    assert len(errors) == 1 and message in errors[0], err[-3000:]
    assert "Traceback" not in err


CASES = {  # name: (what to change in the demo set-up, words the one error line must hold)
    "no annotations": ({"data": "no-annotations"}, "No caption annotations in"),
    "no train images": ({"data": "no-images"}, "No images for train2017 in"),
    "train zip cut short": ({"data": "cut-zip"}, "train2017.zip is not a valid zip"),
    "annotations not JSON": ({"data": "bad-json"}, "captions_train2017.json is not valid JSON"),
    "model folder without image processor": ({"model": "no-processor"}, "Could not load the image processor"),
    "model folder without tokenizer": ({"model": "no-tokenizer"}, "Could not load the tokenizer"),
    "model path missing": ({"model": "missing"}, "no-such-model: is not a folder (nothing is there)"),
    "output_dir is under a file": ({"out": "under-a-file"}, "is not writable"),
    "output_dir is /dev/null/x": ({"out": "/dev/null/x"}, "is not writable"),
    "fewer rows than one batch with drop_last": (
        {"extra": ["--max_train_samples", "6", "--dataloader_drop_last"]},
        "fewer than one batch",
    ),
    "save_total_limit 1": (
        {"extra": ["--save_total_limit", "1"]},
        "--save_total_limit 1 can leave no complete",
    ),
    "negative save_minutes": (
        {"extra": ["--save_minutes", "-1"]},
        "--save_minutes -1.0: expected minutes >= 0",
    ),
    "resume from a folder that is no checkpoint": (
        {"extra": ["--resume_from_checkpoint", "{tmp}"]},
        "not a checkpoint folder (no trainer_state.json)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_clear_message_exit_2_no_traceback(demo, tmp_path, capfd, case):
    data_dir, model_dir = demo
    change, message = CASES[case]
    data = broken_coco(str(tmp_path / "coco"), change["data"]) if "data" in change else data_dir
    model = {
        "no-processor": lambda: model_without(
            model_dir, str(tmp_path / "m"), "preprocessor_config.json", "processor_config.json"
        ),
        "no-tokenizer": lambda: model_without(
            model_dir, str(tmp_path / "m"), "tokenizer.json", "tokenizer_config.json"
        ),
        "missing": lambda: str(tmp_path / "no-such-model"),
    }.get(change.get("model"), lambda: model_dir)()
    out = change.get("out", str(tmp_path / "out"))
    if out == "under-a-file":
        (tmp_path / "a-file").write_text("a file, not a folder")
        out = str(tmp_path / "a-file" / "out")
    extra = [a.format(tmp=tmp_path) for a in change.get("extra", [])]
    check_one_clear_error(capfd, base_args(data, model, out) + extra, message)


def model_with_remote_code(model_dir: str, dst: str) -> str:
    """A model folder whose config asks for code of its own; importing that code leaves a file ``ran`` there."""
    shutil.copytree(model_dir, dst)
    cfg_path = os.path.join(dst, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "evil-dual-encoder"
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    json.dump(cfg, open(cfg_path, "w"))
    with open(os.path.join(dst, "evil.py"), "w") as f:
        f.write(f"open({os.path.join(dst, 'ran')!r}, 'w').write('remote code ran')\nraise SystemExit(3)\n")
    return dst


def test_remote_code_never_runs_unless_asked(demo, tmp_path):
    data_dir, model_dir = demo
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    procs = {}
    for asked in (False, True):
        model = model_with_remote_code(model_dir, str(tmp_path / f"remote-{asked}"))
        args = base_args(data_dir, model, str(tmp_path / f"out-{asked}")) + (
            ["--trust_remote_code"] if asked else []
        )
        procs[asked] = (model, subprocess.Popen([sys.executable, "run_clip.py", *args], cwd=REPO, env=env,
                                                text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL))  # fmt: skip
    results = {
        asked: (model, p.communicate(timeout=300)[1], p.returncode) for asked, (model, p) in procs.items()
    }
    model, err, rc = results[False]
    assert rc == 2 and not os.path.exists(os.path.join(model, "ran")), err[-3000:]
    assert (
        "run_clip.py: error: The model in" in err and "--trust_remote_code" in err and "Traceback" not in err
    )
    model, err, rc = results[True]  # the check above can fail: asked for, the folder's code is imported
    assert os.path.exists(os.path.join(model, "ran")), err[-3000:]
