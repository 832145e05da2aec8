#!/usr/bin/env bash
# Ablation of the speed levers (docs/benchmarks.md): routetune alone, each lever switched off in turn.
# Usage: bench/ablation.sh [NER_STEPS] [CLM_STEPS]   (writes logs/ablation-*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
ner=${1:-40}; clm=${2:-8}
mkdir -p logs
declare -A OFF=(
  [all-on]=""
  [fused-off]="train.fused=false"
  [fast-dropout-off]="train.fast_dropout=false"
  [group-by-length-off]="train.group_by_length=false"
  [bf16-frozen-off]="train.bf16_frozen_weights=false"
  [sdpa-attention]="model.attention=sdpa"
  [fp32]="train.precision=fp32"
)
for name in all-on fused-off fast-dropout-off group-by-length-off bf16-frozen-off sdpa-attention fp32; do
  sets=()
  for kv in ${OFF[$name]}; do sets+=(--set "$kv"); done
  echo "== $name ${sets[*]:-}"
  .venv/bin/python bench/train_throughput.py --only routetune --ner-steps "$ner" --clm-steps "$clm" \
    "${sets[@]}" --json "logs/ablation-$name.json"
done
