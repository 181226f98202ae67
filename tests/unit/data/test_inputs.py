"""data/inputs.get_data: one record per split, whatever the source, from the demo COCO folder and from shards."""

from __future__ import annotations

from transformers import AutoTokenizer, TrainingArguments

from clip_train.config.args import DataTrainingArguments
from clip_train.data.coco import load_coco_split
from clip_train.data.dataset import ClipDataset, Collator
from clip_train.data.inputs import get_data
from clip_train.data.shard_stream import ShardLoader
from clip_train.shards import write_shards


def test_coco_folder_and_shards_give_records_the_trainer_reads_alike(demo, tmp_path):
    data_dir, model_dir = demo
    tok = AutoTokenizer.from_pretrained(model_dir)
    train = load_coco_split(data_dir, "train", "2017").columns
    write_shards({k: v[:200] for k, v in train.items()}, str(tmp_path / "shards"), 100)
    args = TrainingArguments(str(tmp_path / "out"), do_train=True, do_eval=True, use_cpu=True, report_to="none",
                             per_device_train_batch_size=8, dataloader_num_workers=1)  # fmt: skip
    cache = str(tmp_path / "cache")

    coco = get_data(DataTrainingArguments(data_dir=data_dir, max_train_samples=100), args, tok, 32, cache)
    assert set(coco) == {"train", "validation"}
    assert coco["train"].rows == 100 and coco["train"].images == 20 and coco["validation"].rows == 200
    assert isinstance(coco["validation"].dataset, ClipDataset) and coco["train"].make_loader is None
    assert coco["train"].progress is None and not coco["train"].skip_metrics("train")

    shards = DataTrainingArguments(data_dir=data_dir, train_shards=f"{tmp_path}/shards/{{00000..00001}}.tar",
                                   train_num_samples=150)  # fmt: skip
    streamed = get_data(shards, args, tok, 32, cache)["train"]
    assert streamed.rows == 144 and streamed.images is None  # 18 whole batches of 8 an epoch
    loader = streamed.make_loader(Collator(tok.pad_token_id, 16), args)
    assert isinstance(loader, ShardLoader) and len(loader) == 18
    assert streamed.progress is not None and streamed.skip_counts()["undecodable_image"] == 0
    assert args.ignore_data_skip is False  # get_data only reads training_args
