"""What merging a QLoRA run costs: an NF4 LoRA run on smollm2-135m (6 steps of Tiny Shakespeare)
scored on the last 256 tokens of Tiny Shakespeare as trained (4-bit base + adapter), against (a)
routetune's `export --merge` (the adapter folded into the dequantized weights: a plain fp32 folder),
(b) peft's `merge_and_unload` into the 4-bit base (the merged weights quantized again), (c) the
adapter put on the original full-precision base (what the adapter folder gives a user who loads
the base unquantized).

    .venv/bin/python bench/qlora_merge.py docs/records/qlora_merge.json
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from routetune.export import export
from routetune.model.load import resolve_model
from routetune.runs import load_run
from routetune.workflow import train

root = Path(tempfile.mkdtemp())
base = Path(resolve_model("smollm2-135m"))
DATA = Path(os.environ.get("ROUTETUNE_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
text = DATA / "tinyshakespeare" / "input.txt"
cfg = {"model": {"name": str(base), "max_length": 64, "quantize": "nf4"},
       "sources": {"lm": {"objective": "causal-lm", "train": str(text), "text": {"stream": False}}},
       "peft": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
       "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-3, "precision": "fp32", "device": "cpu", "progress": False},
       "run": {"name": "q", "output_dir": str(root / "runs")}}
(root / "q.yaml").write_text(yaml.safe_dump(cfg))
run_dir, _ = train(root / "q.yaml", run_test=False)
_, ours, tok = load_run(run_dir)
ids = tok(text.read_text()[-3000:], return_tensors="pt")["input_ids"][:, :256]
def nll(model):
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.loss.item(), out.logits
ref_loss, ref = nll(ours.lm)
export(run_dir, root / "merged", merge=True)
export(run_dir, root / "adapter")
plain = AutoModelForCausalLM.from_pretrained(root / "merged" / "lm").eval()
a_loss, a = nll(plain)
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
four_bit = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map={"": "cpu"})
pm = PeftModel.from_pretrained(four_bit, root / "adapter" / "adapter").eval()
b_loss, b = nll(pm.merge_and_unload())
fp = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), root / "adapter" / "adapter").eval()
c_loss, c = nll(fp)
res = {"qlora_ppl": round(float(torch.exp(torch.tensor(ref_loss))), 4)}
for name, loss, logits in (("dequantizing_merge", a_loss, a), ("peft_merge_into_4bit", b_loss, b),
                           ("adapter_on_fp32_base", c_loss, c)):
    res[name] = {"ppl": round(float(torch.exp(torch.tensor(loss))), 4),
                 "max_abs_logit_diff": round((logits - ref).abs().max().item(), 5)}
print(json.dumps(res, indent=1))
if len(sys.argv) > 1:
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1) + "\n")
