#!/usr/bin/env bash
# CLIP on one card, the recipe's accuracy run: 3 epochs, then eval; e.g. --data_path=/data/coco --model_path=./clip-roberta
# All flags and outputs: bash test/train_clip_full_1p.sh --help (the implementation is clip_train/launch/).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/env_npu.sh" # CANN's libraries must be on the path before Python loads torch_npu
command -v "${PYTHON:-python3}" >/dev/null || { echo "[Error] no python at '${PYTHON:-python3}': put python3 on PATH or set PYTHON=/path/to/python" >&2; exit 1; }
PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m clip_train.launch full_1p "$@"
