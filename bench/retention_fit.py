"""How long the retention MLM-head fit must be: the before/after figure at several fit lengths, over seeds.

    .venv/bin/python bench/retention_fit.py --run runs/quickstart --seeds 0 1 2 3 4 --at 25 50 100 200 \
        --out docs/records/retention_fit.json

For an encoder published without a masked-LM head (minilm-l6), retention is scored through a head
fitted on each backbone (base and fine-tuned) with the same seeded recipe (evaluate/retention.py).
This runs that recipe once per side and seed for the longest length in `--at`, scoring the held-out
`evals` sets after each length in `--at`, so one fit gives every shorter recipe's figure too (the
recipe is the same up to that step). Printed per length: the relative change after/before per seed,
its mean and spread, and the fit's seconds per side; the JSON keeps every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("ROUTETUNE_DATA", str(ROOT.parent / "shared" / "data"))

import torch  # noqa: E402

from routetune.data.build import build_evals, resolve_objective  # noqa: E402
from routetune.evaluate import retention  # noqa: E402
from routetune.evaluate.tasks import text_scores  # noqa: E402
from routetune.model.routed import build_model  # noqa: E402
from routetune.runs import load_run  # noqa: E402


def fit_curve(model, fit: dict, sets: dict, tokenizer, cfg, at: list[int]) -> dict:
    """Held-out mlm_loss of each set after each length in `at` (one fit of max(at) steps)."""
    from itertools import islice

    from routetune.data.readers import resolve_text_files
    from routetune.data.sources import special_affixes
    from routetune.data.text import iter_blocks, text_parts

    prefix, suffix = special_affixes(tokenizer)
    content = cfg.model.max_length - len(prefix) - len(suffix)
    parts = text_parts(resolve_text_files(fit["text"], "*.txt"))
    blocks = [prefix + b + suffix for b in islice(iter_blocks(parts, tokenizer, content, fit["strip_gutenberg"]),
                                                  fit["blocks"])]
    out, started, scoring = {}, time.perf_counter(), 0.0

    def on_step(step, losses):
        nonlocal scoring
        if step in at:
            t0 = time.perf_counter()
            out[step] = {n: text_scores(model, "masked-lm", tokenizer, s, cfg.model.max_length, cfg.train,
                                        "fp32")["mlm_loss"] for n, s in sets.items()}
            out[step]["fit_loss"] = sum(losses[-10:]) / len(losses[-10:])
            out[step]["fit_seconds"] = round(time.perf_counter() - started - scoring, 2)
            scoring += time.perf_counter() - t0

    retention.fit_mlm_head(model, blocks, tokenizer, max(at), fit["batch_size"], fit["lr"], fit["seed"], "fp32",
                           on_step=on_step)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished run whose config has masked-LM `evals`")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--at", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--out", help="write every number here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg, tuned, tokenizer = load_run(args.run)
    sets, objectives_of = build_evals(cfg, decoder=False)
    sets = {n: s for n, s in sets.items() if objectives_of[n] == "masked-lm"}
    objectives_of.update({n: resolve_objective(sc.objective, False, n) for n, sc in cfg.sources.items()})
    recipe = retention.fit_recipe(cfg, sets, objectives_of)
    if recipe is None:
        sys.exit(f"{args.run}: its masked-LM retention does not fit a head (the base has its own)")
    records = []
    for seed in args.seeds:
        fit = {**recipe, "seed": seed}
        torch.manual_seed(cfg.train.seed)
        base = build_model(recipe["base"], cfg.train.seed, cfg.model.attention, "cpu")
        before = fit_curve(base, fit, sets, tokenizer, cfg, args.at)
        after = fit_curve(tuned, fit, sets, tokenizer, cfg, args.at)
        records.append({"seed": seed, "before": before, "after": after})
        print(json.dumps(records[-1]), flush=True)
    print(f"\n{args.run}: relative change of held-out mlm_loss (after/before - 1), per fit length, seeds {args.seeds}")
    summary = {}
    for name in sets:
        for step in args.at:
            changes = [r["after"][step][name] / r["before"][step][name] - 1 for r in records]
            secs = [r["after"][step]["fit_seconds"] for r in records]
            summary[f"{name}@{step}"] = {"changes": changes, "mean": statistics.mean(changes),
                                         "sd": statistics.stdev(changes) if len(changes) > 1 else 0.0,
                                         "fit_seconds_median": statistics.median(secs)}
            s = summary[f"{name}@{step}"]
            print(f"  {name:20s} {step:4d} steps: mean {s['mean']:+.4f} sd {s['sd']:.4f}  "
                  f"({', '.join(f'{c:+.4f}' for c in changes)})  fit {s['fit_seconds_median']:.1f} s/side")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"run": args.run, "seeds": args.seeds, "at": args.at,
                                              "records": records, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
