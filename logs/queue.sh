#!/usr/bin/env bash
# CPU queue for this session: waits for the PEFT table, then continual examples, then the sweep.
cd /work/main
while pgrep -f peft_table.sh > /dev/null; do sleep 10; done
.venv/bin/routetune continual examples/continual-minilm.yaml > logs/continual.log 2>&1
.venv/bin/routetune continual examples/continual-minilm-replay.yaml > logs/continual-replay.log 2>&1
bash logs/sweep.sh
