#!/usr/bin/env bash
# Benchmarks, then the Shakespeare routing sweep (issue #9): examples/shakespeare-smollm2.yaml + overrides.
cd /work/main
run() { name=$1; shift; echo "== $name: $*"; .venv/bin/routetune train examples/shakespeare-smollm2.yaml --set run.name=sweep-$name "$@" --overwrite > logs/sweep-$name.log 2>&1; }
.venv/bin/python bench/serve_load.py --run runs/peft-full --duration 60 --cap 16 > logs/serve-load.log 2>&1
.venv/bin/python bench/predict_throughput.py --run runs/peft-full > logs/predict-bench2.log 2>&1
.venv/bin/python bench/train_throughput.py --json logs/train-bench.json > logs/train-bench.log 2>&1
bash bench/ablation.sh 30 6 > logs/ablation.log 2>&1
run g25
run g25-example --set routing.granularity=example
run linear-example --set routing.granularity=example --set 'routing.schedule={kind: linear, end: {shakespeare: 0.6, general: 0.4}}' --set 'routing.weights={shakespeare: 0.9, general: 0.1}'
run adaptive --set routing.strategy=adaptive
