#!/usr/bin/env bash
# CLIP on 8 cards of one node, the recipe's performance run: 1000 steps; reports images/sec.
# All flags and outputs: bash test/train_clip_performance_8p.sh --help (the implementation is test/launch.sh).
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" performance_8p "$@"
