"""Prediction throughput: routetune's Predictor vs a transformers pipeline, same model and inputs.

    .venv/bin/python bench/predict_throughput.py --run runs/wnut17-128

The run's best checkpoint is exported to a plain transformers token-classification folder
(`routetune export`), which the pipeline loads; routetune loads the run itself. Inputs: the
WNUT-17 test sentences (1,287), words joined by spaces. Both sides get the whole list:
routetune's Predictor (length-sorted batches of 64) and
`pipeline("token-classification", aggregation_strategy="first")` called with the list and
batch_size 64 (its documented batching), once in the given order and once fed the texts sorted
by length (results put back in order), as a competent user batching a pipeline would; both in
fp32 and bf16. Like for like: the pipeline truncates at the run's `model.max_length`, as
routetune does (its tokenizer's `model_max_length` set to it; otherwise it reads up to 512
tokens). Each configuration gets one warm-up pass, then `--rounds` rounds run every
configuration once in turn (so slow drifts of the machine hit all of them); the median time is
reported, as sentences/s, and routetune's ratio to the pipeline's best setting in the same
precision (the median of the per-round ratios). Entity agreement with the pipeline (same spans
and types) is printed as a sanity check.

    .venv/bin/python bench/predict_throughput.py --run runs/wnut17-128 --memory

runs each of the six configurations alone in a child process (load, a warm-up pass, one timed
pass) and prints its peak RSS: what a process serving that configuration holds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("ROUTETUNE_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("ROUTETUNE_DATA", str(DATA))  # the examples read their data from there


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def sorted_call(pipe, texts: list[str]) -> list:
    """The pipeline over length-sorted texts (little padding per batch), results in input order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = pipe([texts[i] for i in order], batch_size=64)
    back = [None] * len(texts)
    for i, r in zip(order, out):
        back[i] = r
    return back


NAMES = ("routetune fp32", "routetune bf16", "pipeline fp32", "pipeline fp32 sorted", "pipeline bf16",
         "pipeline bf16 sorted")


def test_texts(limit: int | None) -> list[str]:
    from routetune.data.readers import read_conll

    return [" ".join(s.tokens) for s in read_conll(DATA / "wnut17" / "emerging.test.annotated")[:limit]]


def side_calls(side: str, precision: str, args, texts: list[str], folder: Path, max_length: int) -> dict:
    """The calls one side makes in one precision, by NAMES: routetune's Predictor on a model of its
    own (for_inference(bf16) holds bf16 weight copies), or one pipeline called in input order and
    fed length-sorted texts, truncating at the run's max_length as routetune does (its tokenizer
    would otherwise read up to 512 tokens)."""
    import torch
    from transformers import pipeline

    from routetune.model.inference import for_inference
    from routetune.runs import load_run
    from routetune.serve.predictor import Predictor, item_from_text

    if side == "routetune":
        cfg, model, tokenizer = load_run(Path(args.run), "best")
        pred = Predictor(for_inference(model, precision), tokenizer, args.head, cfg.model.max_length, 64, precision)
        items = [item_from_text(t) for t in texts]
        return {f"routetune {precision}": lambda: pred.predict(items)}
    pipe = pipeline("token-classification", model=str(folder), aggregation_strategy="first", device=-1,
                    dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
    pipe.tokenizer.model_max_length = max_length
    return {f"pipeline {precision}": lambda: pipe(texts, batch_size=64),
            f"pipeline {precision} sorted": lambda: sorted_call(pipe, texts)}


def memory_child(args) -> None:
    """One configuration alone in this process: load, warm-up pass, one timed pass; its peak RSS."""
    texts = test_texts(args.limit)
    side, precision = args.child.split()[:2]
    fn = side_calls(side, precision, args, texts, args.folder, args.max_length)[args.child]
    fn()
    seconds = timed(fn)[0]
    print(f"RESULT {args.child}: {len(texts) / seconds:.1f} sentences/s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)


def memory(args) -> None:
    """--memory: each configuration in its own child process (its peak RSS is its own), in turn."""
    from routetune.config import config_from_run
    from routetune.export import export

    max_length = config_from_run(Path(args.run)).model.max_length
    with tempfile.TemporaryDirectory() as tmp:
        export(Path(args.run), Path(tmp) / "hf", "best")
        folder = Path(tmp) / "hf" / "heads" / args.head
        for name in NAMES:
            cmd = [sys.executable, __file__, "--run", args.run, "--head", args.head, "--child", name,
                   "--folder", str(folder), "--max-length", str(max_length)]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            print(lines[-1][7:] if lines else f"{name}: failed\n{out.stderr[-2000:]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/wnut17-fast")
    ap.add_argument("--head", default="wnut17")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="use the first N test sentences")
    ap.add_argument("--memory", action="store_true",
                    help="Peak RSS of each configuration, each alone in a child process (and one timed pass)")
    ap.add_argument("--child", choices=NAMES, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return memory_child(args)
    if args.memory:
        return memory(args)

    import torch

    from routetune.config import config_from_run
    from routetune.export import export

    texts = test_texts(args.limit)
    max_length = config_from_run(Path(args.run)).model.max_length
    tmp = tempfile.TemporaryDirectory()
    export(Path(args.run), Path(tmp.name) / "hf", "best")
    folder = Path(tmp.name) / "hf" / "heads" / args.head
    calls = {}
    for side in ("routetune", "pipeline"):
        for precision in ("fp32", "bf16"):
            calls |= side_calls(side, precision, args, texts, folder, max_length)
    outputs = {name: fn() for name, fn in calls.items()}  # warm-up
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            times[name].append(timed(fn)[0])
    tmp.cleanup()
    print(f"{len(texts)} sentences, {torch.get_num_threads()} threads, truncation at {max_length} tokens "
          f"on both sides, median of {args.rounds} rounds")
    for name, ts in times.items():
        print(f"{name:24s} {statistics.median(ts):7.2f} s  {len(texts) / statistics.median(ts):8.1f} sentences/s  "
              f"(rounds: {', '.join(f'{t:.2f}' for t in ts)} s)")
    for precision in ("fp32", "bf16"):
        ref = min((statistics.median(times[k]), k) for k in times if k.startswith(f"pipeline {precision}"))
        mine = times[f"routetune {precision}"]
        ratio = statistics.median(theirs / ours for theirs, ours in zip(times[ref[1]], mine))
        print(f"routetune {precision} vs the pipeline's best in {precision} ({ref[1]}): {ratio:.2f}x")
    ours, theirs = outputs["routetune fp32"], outputs["pipeline fp32"]
    same = sum({(e["type"], e["start"], e["end"]) for e in o["entities"]}
               == {(e["entity_group"], e["start"], e["end"]) for e in t} for o, t in zip(ours, theirs))
    print(f"sentences with identical entity spans and types (routetune fp32 vs pipeline fp32): "
          f"{same}/{len(texts)}")


if __name__ == "__main__":
    main()
