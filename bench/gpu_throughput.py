"""routetune's training throughput on a CUDA GPU, on the works of the Hugging Face Trainer
reference (../shared/gpu/hf_anchor.py), so the two can be compared in one invocation:

* ner: minilm-l6 architecture (random weights), WNUT-17 train, batch 16, max_length 128, one
  epoch (212 steps), AdamW lr 5e-5, weight decay 0.01;
* clm: smollm2-135m architecture (random weights), LoRA r=8 alpha 16 dropout 0.05 on q,k,v,o,
  150 steps of 8 x 128-token blocks of Tiny Shakespeare, lr 2e-4.

Both in routetune's `auto` precision (bf16 on GPUs that have it). Tokens/s counts the non-padding
tokens of steps WARM+1 to the end, timed between two `torch.cuda.synchronize()` (none inside the
timed steps), as the reference does.

    python bench/gpu_throughput.py MODELS DATA OUT.json [--work ner,clm] [--set KEY=VALUE ...]

MODELS holds `minilm` and `smollm2` folders (../shared/gpu/random_weights.py), DATA the
`wnut17` and `tinyshakespeare` folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
WARM = 10


def work_config(work: str, models: Path, data: Path) -> dict:
    quiet = {"eval_each_epoch": False, "eval_before": False, "log_every": 1000000, "progress": False,
             "device": "auto", "precision": "auto", "seed": 42}
    if work == "ner":
        return {"model": {"name": str(models / "minilm"), "max_length": 128},
                "sources": {"wnut17": {"objective": "token-classification",
                                       "train": str(data / "wnut17" / "wnut17train.conll")}},
                "train": {**quiet, "epochs": 1, "batch_size": 16, "lr": 5e-5, "weight_decay": 0.01}}
    return {"model": {"name": str(models / "smollm2"), "max_length": 128},
            "sources": {"shakespeare": {"objective": "causal-lm", "train": str(data / "tinyshakespeare" / "input.txt"),
                                        "text": {"stream": False}}},
            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {**quiet, "max_steps": 150, "batch_size": 8, "lr": 2e-4, "weight_decay": 0.0}}


def measure(work: str, models: Path, data: Path, overrides: list[str]) -> dict:
    import torch

    import routetune  # noqa: F401
    from routetune.config import apply_override, parse_config
    from routetune.training.engine import Trainer
    from routetune.training.setup import prepare

    raw = work_config(work, models, data)
    for o in overrides:
        apply_override(raw, o)
    setup = prepare(parse_config(raw))
    clock = {"tokens": 0}
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # a CPU smoke run (--set train.device=cpu) works too

    def wrap(original):
        def step(i, parts):
            if i == WARM:
                sync()
                clock["t0"] = time.perf_counter()
            if i >= WARM:
                clock["tokens"] += sum(p.n_tokens for p in parts)
            return original(i, parts)
        return step

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(setup, Path(out))
        trainer.train_step = wrap(trainer.train_step)
        trainer.save = lambda step: None  # the reference saves nothing either
        t_start = time.perf_counter()
        trainer.run()
        sync()
        t_end = time.perf_counter()
    timed = t_end - clock["t0"]
    return {"work": work, "overrides": overrides, "steps": setup.total_steps, "precision": setup.hardware.precision,
            "device": setup.hardware.describe().get("gpu", str(setup.hardware.device)),
            "timed_s": timed, "tokens_per_s": clock["tokens"] / timed, "wall_s": t_end - t_start,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--work", default="ner,clm")
    ap.add_argument("--set", action="append", default=[], help="config override for every work (a lever A/B)")
    args = ap.parse_args()
    results = []
    for work in args.work.split(","):
        r = measure(work, args.models, args.data, args.set)
        results.append(r)
        print(f"routetune {work}: {r['tokens_per_s']:,.0f} tokens/s over steps {WARM + 1}-{r['steps']} "
              f"({r['precision']}, {r['device']}), peak GPU memory {r['peak_mem_gb']:.2f} GB", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
