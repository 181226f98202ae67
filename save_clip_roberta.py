#!/usr/bin/env python3
"""Build ./clip-roberta (the recipe's model folder) from a CLIP vision checkpoint and a RoBERTa checkpoint.

python3 save_clip_roberta.py                                  # openai/clip-vit-base-patch32 + roberta-base
python3 save_clip_roberta.py --vision_model /models/clip-vit-base-patch32 --text_model /models/roberta-base
"""

from __future__ import annotations

import argparse
import os
import sys

from clip_train.model import AssembleError, build_clip_roberta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision_model", default="openai/clip-vit-base-patch32", help="hub id or local folder")
    p.add_argument("--text_model", default="roberta-base", help="hub id or local folder")
    p.add_argument("--output_dir", default="./clip-roberta")
    a = p.parse_args(argv)
    try:
        files = build_clip_roberta(a.vision_model, a.text_model, a.output_dir)
    except AssembleError as e:
        print(f"save_clip_roberta.py: error: {e}", file=sys.stderr)
        return 1
    print(
        f"Wrote {os.path.abspath(a.output_dir)} (VisionTextDualEncoderModel + processor), reloaded and checked:"
    )
    for f in files:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
