#!/usr/bin/env bash
# Prune during fine-tuning on 2 processes with `hf-prune train` (any method: --method updp, rd, ...).
# On a CPU-only machine --multi_gpu with --use-cpu runs two real gloo processes (plain --cpu
# --num_processes 2 would run only one). resnet18 is built from its timm name with random weights;
# add --pretrained to start from the timm/resnet18 weights on the Hub. Only the main process saves.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-300}"
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m hf_prune.cli.main train resnet18 --dataset builtin:digits --image-size 32 \
    --method depgraph --target-macs 0.5 --output-dir outputs/accelerate_example \
    --max-steps "$STEPS" --per-device-train-batch-size 32 --use-cpu --report-to none --save-strategy no
