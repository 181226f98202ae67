#!/usr/bin/env bash
# CLIP on one card, the recipe's accuracy run: 3 epochs, then eval; e.g. --data_path=/data/coco --model_path=./clip-roberta
# All flags and outputs: bash test/train_clip_full_1p.sh --help (the implementation is test/launch.sh).
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" full_1p "$@"
