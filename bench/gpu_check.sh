#!/usr/bin/env bash
# routetune on a CUDA GPU in one call (about 6 minutes on an H200, the Trainer reference included),
# from the checkout's root on an offline GPU machine prepared by ../shared/gpu/prepare.sh (its
# .gpu/ folder copied along):
#
#   PYTHONUNBUFFERED=1 bash bench/gpu_check.sh OUT     # OUT: results folder; OUT/results.tgz at the end
#   CHECK_DEVICE=cpu LIMIT_SCALE=6 PYTHON=.venv/bin/python bash bench/gpu_check.sh OUT   # a dry run on a CPU
#
# Every section runs, each under its own time limit, whatever the others did; the last lines are
# a PASS/FAIL summary (also OUT/summary.txt) and the exit status is the number of failures. Each
# section's output is in OUT/NAME.log. The sections (bench/gpu_check.py holds their checks):
#   tests        the cuda-marked tests, the CPU-side placement and host-sync tests, on this machine
#   quickstart   examples/quickstart.yaml as shipped (masked-LM head fit forced: random weights)
#   syncs        host synchronisations per training step (CUDA's sync debug mode): at most one
#   fp16         10 steps in fp16 with the gradient scaler, skipped steps counted
#   distill      a decoder with LoRA, general text self-distilled
#   prompt       prompt tuning on the encoder
#   decoder      decoder LoRA: train, generate offline and served (equal)
#   encoder      NER: train, dev F1 on the GPU and the CPU, predict offline and served (equal)
#   openai       the decoder over the OpenAI API on the GPU: a greedy completion equals generate
#   qlora        LoRA over an NF4 base (bitsandbytes on CUDA) beside LoRA over the bf16 base
#   ddp1         one process on one GPU through torchrun (nccl)
#   compile      compiled vs eager blocks, decoder LoRA at 16 x 1,024: tokens/s, MFU, graphs and why
#   flex         padding-free attention on the padded width vs FlexAttention, uneven decoder examples
#   resume_cpu   killed on the GPU after step 30, resumed on the CPU: the same plan
#   throughput   routetune (bench/gpu_throughput.py) and the Hugging Face Trainer reference
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT}
CHECK_DEVICE=${CHECK_DEVICE:-cuda}
LIMIT_SCALE=${LIMIT_SCALE:-1}  # the limits below are an H200's; a CPU dry run needs several times more
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SECONDS=0
if [ "$CHECK_DEVICE" = cuda ]; then  # the kit's wheels are for the GPU machine's Python (3.12)
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/site:$PWD/src ROUTETUNE_DATA=$PWD/.gpu/data HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 ROUTETUNE_BEFORE_CACHE=$OUT/before-cache
MODELS=/tmp/models DATA=$PWD/.gpu/data
{ command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"
$PY .gpu/random_weights.py .gpu/assets $MODELS > "$OUT/models.log" 2>&1 || echo "random weights failed: see models.log"

RESULTS=()
section() {  # section NAME LIMIT_S COMMAND...: run it, keep its log, record PASS or FAIL
  local name=$1 limit=$(( $2 * LIMIT_SCALE )) start=$SECONDS rc
  shift 2
  echo "== $name (at $SECONDS s, limit $limit s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -4 "$OUT/$name.log" | sed 's/^/   /'
  if [ $rc -eq 0 ]; then RESULTS+=("PASS  $name  $((SECONDS - start)) s")
  elif [ $rc -eq 124 ]; then RESULTS+=("FAIL  $name  timed out after $limit s")
  else RESULTS+=("FAIL  $name  exit $rc after $((SECONDS - start)) s"); fi
}
check() { section "$1" "$2" $PY bench/gpu_check.py "$1" "$OUT" $MODELS "$DATA" "$CHECK_DEVICE"; }

section tests 150 $PY -m pytest -q -p no:cacheprovider tests/model/test_placement.py tests/training/test_host_syncs.py \
  tests/test_device.py tests/training/test_distributed.py tests/model/test_packing.py -k "cuda or placement or sync or backend"
check quickstart 90
check syncs 60
check fp16 40
check distill 40
check prompt 40
check decoder 60
check encoder 90
check openai 60
check qlora 90
check ddp1 40
if [ "$CHECK_DEVICE" = cuda ]; then check fsdp1 120; else RESULTS+=("SKIP  fsdp1  (needs CUDA: nccl)"); fi
if [ "$CHECK_DEVICE" = cuda ]; then check compile 240; else RESULTS+=("SKIP  compile  (a GPU's step)"); fi
if [ "$CHECK_DEVICE" = cuda ]; then check flex 180; else RESULTS+=("SKIP  flex  (FlexAttention trains on CUDA only)"); fi
check resume_cpu 90
if [ "$CHECK_DEVICE" = cuda ]; then
  section throughput 240 bash -c "$PY bench/gpu_throughput.py $MODELS $DATA $OUT/routetune.json && \
    $PY .gpu/hf_anchor.py .gpu/assets .gpu/data $OUT/hf.json ner_default,ner_group_by_length,clm_lora"
else
  RESULTS+=("SKIP  throughput  (needs CUDA)")
fi

{ echo "== summary ($SECONDS s in all, device $CHECK_DEVICE)"; printf '%s\n' "${RESULTS[@]}"; } | tee "$OUT/summary.txt"
tar czf "$OUT/results.tgz" --exclude=checkpoints --exclude=results.tgz --exclude=before-cache -C "$OUT" . 2>/dev/null
FAILED=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^FAIL')
exit "$FAILED"
