import os

from conftest import run_py
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, VisionTextDualEncoderModel


def test_builds_a_reloadable_folder_from_local_towers(demo, tmp_path):
    towers = os.path.join(os.environ["CLIP_DEMO_ROOT"], "towers")
    out = str(tmp_path / "clip-roberta")
    r = run_py(["save_clip_roberta.py", "--vision_model", f"{towers}/vision", "--text_model", f"{towers}/text",
                "--output_dir", out])  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reloaded and checked" in r.stdout
    for f in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
    ):
        assert os.path.isfile(os.path.join(out, f)), f
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, VisionTextDualEncoderModel)
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.text_config.model_type == "roberta"
    assert len(AutoTokenizer.from_pretrained(out)) == model.config.text_config.vocab_size
    assert (
        AutoImageProcessor.from_pretrained(out).crop_size["height"] == model.config.vision_config.image_size
    )


def test_unreachable_hub_id_gives_one_clear_message(tmp_path):
    r = run_py(["save_clip_roberta.py", "--output_dir", str(tmp_path / "x")], env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert "Pass local folders" in r.stderr and "--text_model" in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_builds_the_same_model_every_time(tmp_path):
    # The README's demo figures must repeat on another machine: same images, tokenizer and random-init weights.
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from clip_train.demo import prepare

    torch.manual_seed(123)  # the caller's RNG state must not matter, nor be changed
    state = torch.random.get_rng_state()
    built = [prepare(str(tmp_path / name), n_train=8, n_val=4) for name in ("a", "b")]
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [load_file(os.path.join(model_dir, "model.safetensors")) for _, model_dir in built]
    assert weights[0].keys() == weights[1].keys()
    for key, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][key]), key
    tokens = [AutoTokenizer.from_pretrained(model_dir)("a red circle")["input_ids"] for _, model_dir in built]
    assert tokens[0] == tokens[1]
    images = [np.fromfile(os.path.join(data_dir, "val2017.zip"), np.uint8).size for data_dir, _ in built]
    assert images[0] == images[1]
