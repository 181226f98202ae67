#!/usr/bin/env bash
# CLIP on 8 cards of one node, the recipe's accuracy run: 3 epochs, then eval.
# All flags and outputs: bash test/train_clip_full_8p.sh --help (the implementation is test/launch.sh).
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" full_8p "$@"
