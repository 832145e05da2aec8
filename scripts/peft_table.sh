#!/usr/bin/env bash
# Train WNUT-17 with minilm-l6 under each parameter-sharing method (docs/results.md "PEFT methods").
# Each row: examples/wnut17-minilm.yaml, general routing 0, 3 epochs, batch 16, bf16, seed 42;
# the learning rate is set per method (adapters and virtual tokens need larger ones).
# Peak RSS comes from GNU time (-f %M, KB). Usage: scripts/peft_table.sh [row ...]
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A ROWS=(
  [full]="peft.method=none train.lr=5e-5"
  [top2]="freeze.top_k_layers=2 train.lr=5e-5"
  [head_only]="freeze.head_only=true train.lr=1e-3"
  [lora]="peft.method=lora peft.r=8 peft.alpha=16 train.lr=5e-4"
  [dora]="peft.method=dora peft.r=8 peft.alpha=16 train.lr=5e-4"
  [ia3]="peft.method=ia3 train.lr=3e-3"
  [adapter]="peft.method=adapter peft.adapter_size=64 train.lr=1e-3"
  [bitfit]="peft.method=bitfit train.lr=1e-3"
  [prompt]="peft.method=prompt_tuning peft.num_virtual_tokens=20 train.lr=3e-2"
  [prefix]="peft.method=prefix_tuning peft.num_virtual_tokens=20 train.lr=1e-2"
)
mkdir -p logs
for row in "${@:-full top2 head_only lora dora ia3 adapter bitfit prompt prefix}"; do
  for name in $row; do
    sets=(--set routing.weights.general=0 --set "run.name=peft-$name")
    for kv in ${ROWS[$name]}; do sets+=(--set "$kv"); done
    echo "== $name: routetune train examples/wnut17-minilm.yaml ${sets[*]}"
    /usr/bin/time -f "peak_rss_kb %M" -o "logs/peft-$name.time" \
      .venv/bin/routetune train examples/wnut17-minilm.yaml "${sets[@]}" --overwrite > "logs/peft-$name.log" 2>&1
  done
done
