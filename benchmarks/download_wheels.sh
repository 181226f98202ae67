#!/usr/bin/env bash
# Wheels for the GPU check on a machine that reaches no registry (Python 3.12, x86-64, torch/torchvision/timm/
# pandas/accelerate/huggingface_hub 1.33/pyarrow already there; datasets 5.2 needs pyarrow >= 24: check `pip show pyarrow`): what our code and the open_clip peer need beyond that image, into .whl/
# (gitignored). Carry .whl to the device machine and install with
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
# Usage: bash benchmarks/download_wheels.sh [PYTHON_VERSION (default 3.12)]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
WANT=(
  transformers==5.24.0 tokenizers==0.23.3 datasets==5.2.0 dill multiprocess
  open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth webdataset==1.0.2 braceexpand==0.1.7 xxhash==4.1.0
)
mkdir -p .whl
for spec in "${WANT[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
du -sh .whl
ls .whl
