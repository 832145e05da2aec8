#!/usr/bin/env bash
# Run on a machine with the package index, from the checkout's root, before copying the checkout
# to an offline GPU machine: the shared kit (../shared/gpu/prepare.sh: wheels of the dependencies
# a CUDA PyTorch image lacks, model configs + tokenizers, WNUT-17 and Tiny Shakespeare) plus the
# pure-Python wheels bench/gpu_check.sh needs to run the cuda-marked tests (pytest) and serve (fastapi-offline).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash "${ROUTETUNE_GPU_KIT:-$root/../shared/gpu}/prepare.sh"
pins=()
for p in pytest pluggy iniconfig fastapi-offline; do
  pins+=("$(grep -i -E "^${p}==" constraints.txt | head -1)")
done
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl "${pins[@]}"
cp bench/gpu_check.sh .gpu/
du -sh .gpu
