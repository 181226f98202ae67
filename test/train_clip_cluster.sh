#!/usr/bin/env bash
# CLIP on several nodes: run the same line on every node with its own --node_rank; the summary is written on node 0.
# All flags and outputs: bash test/train_clip_cluster.sh --help (the implementation is test/launch.sh).
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" cluster "$@"
