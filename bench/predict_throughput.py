"""Prediction throughput: routetune's Predictor vs a transformers pipeline, same model and inputs.

    .venv/bin/python bench/predict_throughput.py --run runs/wnut17-fast

The run's best checkpoint is exported to a plain transformers token-classification folder
(`routetune export`), which the pipeline loads; routetune loads the run itself. Inputs: the
WNUT-17 test sentences (1,287), words joined by spaces. Both sides get the whole list:
routetune's Predictor (length-sorted batches of 64) and
`pipeline("token-classification", aggregation_strategy="first")` called with the list and
batch_size 64 (its documented batching), once in the given order and once fed the texts sorted
by length (results put back in order), as a competent user batching a pipeline would; both in
fp32 and bf16. Each configuration runs `--repeats` times after one warm-up pass; the best time is
reported, as sentences/s, and routetune's ratio to the pipeline's best setting in the same
precision. Entity agreement with the pipeline (same spans and types) is printed as a sanity check.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("ROUTETUNE_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("ROUTETUNE_DATA", str(DATA))  # the examples read their data from there


def best_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def sorted_call(pipe, texts: list[str]) -> list:
    """The pipeline over length-sorted texts (little padding per batch), results in input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = pipe([texts[i] for i in order], batch_size=64)
    back = [None] * len(texts)
    for i, r in zip(order, out):
        back[i] = r
    return back


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/wnut17-fast")
    ap.add_argument("--head", default="wnut17")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="use the first N test sentences")
    args = ap.parse_args()

    import torch
    from transformers import pipeline

    from routetune.data.readers import read_conll
    from routetune.export import export
    from routetune.model.inference import for_inference
    from routetune.serve.predictor import Predictor, item_from_text
    from routetune.runs import load_run

    sents = read_conll(DATA / "wnut17" / "emerging.test.annotated")[: args.limit]
    texts = [" ".join(s.tokens) for s in sents]
    cfg, model, tokenizer = load_run(Path(args.run), "best")
    items = [item_from_text(t) for t in texts]
    results = {}
    for precision in ("fp32", "bf16"):  # fp32 first: for_inference(bf16) holds bf16 weight copies
        pred = Predictor(for_inference(model, precision), tokenizer, args.head, cfg.model.max_length, 64, precision)
        results[f"routetune {precision}"] = best_time(lambda p=pred: p.predict(items), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        export(Path(args.run), Path(tmp) / "hf", "best")
        folder = Path(tmp) / "hf" / "heads" / args.head
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            pipe = pipeline("token-classification", model=str(folder), aggregation_strategy="first",
                            device=-1, dtype=dtype)
            results[f"pipeline {precision}"] = best_time(lambda p=pipe: p(texts, batch_size=64), args.repeats)
            results[f"pipeline {precision} sorted"] = best_time(lambda p=pipe: sorted_call(p, texts), args.repeats)
    print(f"{len(texts)} sentences, {torch.get_num_threads()} threads, best of {args.repeats}")
    for name, (seconds, _) in results.items():
        print(f"{name:24s} {seconds:7.2f} s  {len(texts) / seconds:8.1f} sentences/s")
    for precision in ("fp32", "bf16"):
        ref = min((results[k][0], k) for k in results if k.startswith(f"pipeline {precision}"))
        print(f"routetune {precision} vs the pipeline's best in {precision} ({ref[1]}): "
              f"{ref[0] / results[f'routetune {precision}'][0]:.2f}x")
    ours = results["routetune fp32"][1]
    theirs = results["pipeline fp32"][1]
    same = sum({(e["type"], e["start"], e["end"]) for e in o["entities"]}
               == {(e["entity_group"], e["start"], e["end"]) for e in t} for o, t in zip(ours, theirs))
    print(f"sentences with identical entity spans and types (routetune fp32 vs pipeline fp32): "
          f"{same}/{len(texts)}")


if __name__ == "__main__":
    main()
