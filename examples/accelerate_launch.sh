#!/usr/bin/env bash
# Prune during fine-tuning on 2 processes. On a CPU-only machine --multi_gpu with use_cpu runs two
# real gloo processes (plain --cpu --num_processes 2 would run only one). --pretrained false builds
# resnet18 from its config; drop it to start from the timm/resnet18 weights on the Hub.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-300}"
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    trainers/prune_finetune.py --model resnet18 --pretrained false --dataset builtin:digits --image_size 32 \
    --method depgraph --target_macs 0.5 --output_dir outputs/accelerate_example \
    --max_steps "$STEPS" --per_device_train_batch_size 32 --use_cpu --report_to none --save_strategy no
