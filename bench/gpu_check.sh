#!/usr/bin/env bash
# routetune on a CUDA GPU, in one go (under 8 minutes on an H200), from the checkout's root on an
# offline GPU machine prepared by bench/gpu_prepare.sh (its .gpu/ folder copied along):
#
#   bash bench/gpu_check.sh [OUT]          # OUT: results folder (default /tmp/gpu-check)
#   CHECK_DEVICE=cpu bash bench/gpu_check.sh   # a dry run of the script on a CPU-only machine
#
# 1. the cuda-marked tests (tests/test_device.py: a run on the GPU, a GPU run killed mid-way and
#    resumed on the CPU; tests/test_distributed.py: one GPU through torchrun with nccl, and two
#    GPUs where the machine has them);
# 2. a real round trip on the GPU with a random-weight minilm: train, eval, predict, serve;
# 3. that run killed mid-way and resumed on the CPU (checkpoints carry no device);
# 4. throughput: routetune (bench/gpu_throughput.py) and the Hugging Face Trainer reference
#    (.gpu/hf_anchor.py, default sampler, length grouping, LoRA eager) on the same works.
set -euo pipefail
OUT=${1:-/tmp/gpu-check}
CHECK_DEVICE=${CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
SECONDS=0
if [ "$CHECK_DEVICE" = cuda ]; then  # the kit's wheels are for the GPU machine's Python (3.12)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2 || true
fi
export PYTHONPATH=/tmp/site:$PWD/src ROUTETUNE_DATA=$PWD/.gpu/data HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RT="python3 -m routetune.cli"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
python3 .gpu/random_weights.py .gpu/assets /tmp/models > /dev/null

echo "== 1. cuda tests ($SECONDS s)"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_device.py tests/test_distributed.py 2>&1 | tee "$OUT/cuda-tests.txt" | tail -3

echo "== 2. round trip on the GPU ($SECONDS s)"
cat > "$OUT/ner.yaml" <<YAML
model: {name: /tmp/models/minilm, max_length: 128}
sources:
  wnut17:
    objective: token-classification
    train: $ROUTETUNE_DATA/wnut17/wnut17train.conll
    dev: $ROUTETUNE_DATA/wnut17/emerging.dev.conll
    test: $ROUTETUNE_DATA/wnut17/emerging.test.annotated
train: {max_steps: 60, batch_size: 16, lr: 5.0e-5, eval_every_steps: 30, eval_each_epoch: false,
        save_every_steps: 20, keep_last: 5, progress: false}
run: {name: gpu-ner, output_dir: $OUT/runs}
YAML
$RT train "$OUT/ner.yaml" --overwrite 2>&1 | tail -2
python3 - "$OUT/runs/gpu-ner" "$CHECK_DEVICE" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
assert s["hardware"]["device"].startswith(sys.argv[2]), s["hardware"]
print("trained on", s["hardware"].get("gpu", s["hardware"]["cpu"]), "in", s["hardware"]["precision"], "-",
      s["hardware"]["reason"], f"; {s['tokens_per_s']:.0f} tokens/s incl. evaluation steps")
PY
$RT eval "$OUT/runs/gpu-ner" --split dev --json > "$OUT/eval-gpu.json"
$RT eval "$OUT/runs/gpu-ner" --split dev --json --device cpu --precision fp32 > "$OUT/eval-cpu.json"
python3 - "$OUT" <<'PY'
import json, sys
g, c = (json.load(open(f"{sys.argv[1]}/eval-{d}.json"))["scores"]["wnut17"]["f1"] for d in ("gpu", "cpu"))
print(f"dev F1 on the GPU {g:.4f}, the same checkpoint on the CPU (fp32) {c:.4f}")
assert abs(g - c) < 0.02, (g, c)
PY
echo "Apple opened a store in Paris" | $RT predict "$OUT/runs/gpu-ner" > "$OUT/predict.jsonl"
$RT serve "$OUT/runs/gpu-ner" --port 8765 > "$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 60); do curl -sf localhost:8765/healthz > /dev/null && break; sleep 1; done
curl -sf -X POST localhost:8765/v1/ner -H 'content-type: application/json' \
  -d '{"texts": ["Apple opened a store in Paris"]}' > "$OUT/served.json"
kill $SERVER; wait $SERVER 2>/dev/null || true
python3 - "$OUT" <<'PY'
import json, sys
offline = json.loads(open(f"{sys.argv[1]}/predict.jsonl").readline())
served = json.load(open(f"{sys.argv[1]}/served.json"))
print("served:", json.dumps(served)[:160])
assert served["results"][0]["tags"] == offline["tags"], (served, offline)
PY

echo "== 3. killed on the GPU at step 30, resumed on the CPU ($SECONDS s)"
sed -e "s/name: gpu-ner/name: gpu-kill/" "$OUT/ner.yaml" > "$OUT/kill.yaml"
ROUTETUNE_FAULT=after_step:30 $RT train "$OUT/kill.yaml" --overwrite --no-test > /dev/null 2>&1 || true
$RT resume "$OUT/runs/gpu-kill" --device cpu --precision fp32 --no-test 2>&1 | tail -1
python3 - "$OUT/runs" <<'PY'
import json, sys
root = sys.argv[1]
a, b = (open(f"{root}/{r}/plan.jsonl").read() for r in ("gpu-ner", "gpu-kill"))
assert a == b, "the resumed run's plan differs"
print("plan identical;", [h["device"] for h in json.load(open(f"{root}/gpu-kill/hardware.json"))])
PY

echo "== 4. throughput, routetune and the Trainer reference ($SECONDS s)"
if [ "$CHECK_DEVICE" != cuda ]; then  # a dry run: the throughput scripts need CUDA (the Trainer's bf16 too)
  python3 bench/gpu_throughput.py /tmp/models .gpu/data "$OUT/routetune.json" --set train.device=cpu --set train.max_steps=14
  echo "== dry run done in $SECONDS s; results in $OUT"
  exit 0
fi
python3 bench/gpu_throughput.py /tmp/models .gpu/data "$OUT/routetune.json"
python3 .gpu/hf_anchor.py .gpu/assets .gpu/data "$OUT/hf.json" ner_default,ner_group_by_length,clm_lora 2>&1 | grep -v Warning | tail -4
python3 - "$OUT" <<'PY'
import json, sys
rt = {r["work"]: r["tokens_per_s"] for r in json.load(open(f"{sys.argv[1]}/routetune.json"))}
hf = json.load(open(f"{sys.argv[1]}/hf.json"))
rows = {"ner": ("ner_default", "ner_group_by_length"), "clm": ("clm_lora",)}
for work, names in rows.items():
    ref = {n: hf[n]["tokens_per_s"] for n in names if "tokens_per_s" in hf.get(n, {})}
    best = max(ref, key=ref.get)
    print(f"{work}: routetune {rt[work]:,.0f} tokens/s; Trainer " + ", ".join(f"{n} {v:,.0f}" for n, v in ref.items())
          + f"; ratio vs its best ({best}) {rt[work] / ref[best]:.2f}")
print("bf16 matmul peak", round(hf["matmul_peak_tflops"]), "TFLOP/s")
PY
echo "== done in $SECONDS s; results in $OUT"
