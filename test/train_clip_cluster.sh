#!/usr/bin/env bash
# CLIP on several nodes: run the same line on every node with its own --node_rank, or, inside a SLURM allocation,
#   srun --nodes=N --ntasks-per-node=1 bash test/train_clip_cluster.sh --data_path=... --model_path=...
# (the node flags then come from SLURM). The node whose worker holds global rank 0 writes the summary.
# All flags and outputs: bash test/train_clip_cluster.sh --help (the implementation is clip_train/launch/).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/env_npu.sh" # CANN's libraries must be on the path before Python loads torch_npu
command -v "${PYTHON:-python3}" >/dev/null || { echo "[Error] no python at '${PYTHON:-python3}': put python3 on PATH or set PYTHON=/path/to/python" >&2; exit 1; }
PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m clip_train.launch cluster "$@"
