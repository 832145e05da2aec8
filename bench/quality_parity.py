"""Quality parity: routetune's defaults against the Hugging Face Trainer's standard recipe, same
data, model, budget and evaluation code, over several seeds.

    .venv/bin/python bench/quality_parity.py --seeds 1 2 3 4 5                   # WNUT-17 NER, fp32
    .venv/bin/python bench/quality_parity.py --work polarity --variants routetune hf hf-grouped
    .venv/bin/python bench/quality_parity.py --epochs 1 --variants routetune routetune:train.group_by_length=true
    .venv/bin/python bench/quality_parity.py --work lm --variants routetune hf       # causal-LM LoRA, 40 steps

Works (both fp32 by default; ``--precision bf16`` where the CPU has native bf16):

* ``ner``: minilm-l6 token classification on WNUT-17 (train 3,394 / dev 1,009 / test 1,287
  sentences), 3 epochs, batch 16, lr 5e-5, weight decay 0.01, no warm-up, max_length 128;
  entity-level micro F1 (seqeval).
* ``polarity``: minilm-l6 sequence classification on sentence polarity (10,662 sentences; 10% dev
  and 10% test held out by routetune's seeded rule, the same split on both sides), 2 epochs,
  batch 32, lr 5e-5, weight decay 0.01, no warm-up, max_length 64; accuracy.
* ``prompt``: sentence polarity as prompts and one-word completions for smollm2-135m with LoRA,
  100 steps of 8 (``--steps``), exact match of a greedy one-token answer on 320 dev and 320 test
  examples; the work and its Trainer side are described in ``bench/prompt_work.py``.
* ``lm``: smollm2-135m with LoRA (r=8, alpha 16, dropout 0.05 on q,k,v,o) trained on 128-token
  blocks of Tiny Shakespeare alone (examples/shakespeare-smollm2.yaml without its general replay),
  ``--steps`` steps (default 40) of 8 blocks, lr 2e-4; the score is the perplexity of the held-out
  last 10% of the text (lower is better), WikiText-2 test (its first 40 blocks) beside it. No
  checkpoint is chosen (the run ends at its last step), so there is no dev score. Both sides come
  from ``bench/replay_reference.py`` with a general share of 0: the Trainer gets routetune's own
  blocks, the same LoRA settings and ``DataCollatorForLanguageModeling``. Variant ``hf-data-seed``:
  the Trainer with ``data_seed=seed + 1000``, its block order drawn apart from its initialisation.

Variants:

* ``routetune``: the work's example config (examples/wnut17-minilm.yaml, polarity-minilm.yaml)
  with the general text switched off (``routing.weights.general=0``, so the task source has all
  the weight) and every default as shipped: dev score each epoch, the best checkpoint scored on
  test. ``routetune:KEY=VALUE[,KEY=VALUE]`` adds overrides (a lever switched, for ablations).
* ``hf``: AutoModelFor{TokenClassification,SequenceClassification} + the matching data collator
  + Trainer, the recipe of the transformers examples (for NER the first sub-word of each word
  labelled, the rest -100), with the setting a competent user gives it to match routetune's
  checkpoint choice: evaluation each epoch and ``load_best_model_at_end`` on the dev score.
  ``hf-grouped`` adds ``train_sampling_strategy="group_by_length"``.

Both sides are scored by routetune's own code (the Trainer's model through a small adapter): for
NER, words tagged from the first sub-word's prediction (words cut off by max_length tagged O) and
entity F1 by seqeval (routetune.evaluate.tagging); for polarity, the arg-max class. Each variant and seed trains in
this process, one after the other. Printed and written to ``--out`` (JSON): per variant dev and
test score per seed, mean ± 95% t-interval, and the paired difference (same seed) of each variant
to ``routetune``. ``--append`` adds this invocation's seeds to the results already in ``--out``
for the same work, epochs and precision (each seed records the commit it ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import prompt_work as pw  # bench/: the prompt/completion work
import replay_reference as rr  # bench/, this script's folder: the causal-LM work and the shared scoring adapter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("ROUTETUNE_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("ROUTETUNE_DATA", str(DATA))  # the examples read their data from there
# per work: example config, task source, score, and the budget both sides get
WORKS = {"ner": {"example": "wnut17-minilm.yaml", "source": "wnut17", "metric": "f1", "epochs": 3, "batch": 16,
                 "max_length": 128},
         "polarity": {"example": "polarity-minilm.yaml", "source": "polarity", "metric": "accuracy", "epochs": 2,
                      "batch": 32, "max_length": 64},
         "lm": {"example": "shakespeare-smollm2.yaml", "source": "shakespeare", "metric": "perplexity", "steps": 40},
         # its data and config are written by bench/prompt_work.py once per invocation (work["config"])
         "prompt": {"source": pw.NAME, "metric": "exact_match", "steps": pw.STEPS}}
LR, WD = 5e-5, 0.01


def run_routetune(work: dict, seed: int, precision: str, extra: list[str], out: Path) -> dict:
    from routetune.workflow import train

    src, key = work["source"], f"{work['source']}/{work['metric']}"
    budget = [f"train.max_steps={work['steps']}"] if work.get("steps") else \
        ["routing.weights.general=0", f"train.epochs={work['epochs']}"]
    overrides = [*budget, f"train.precision={precision}",
                 f"train.seed={seed}", f"routing.seed={seed}", "train.progress=false", f"run.output_dir={out}",
                 f"run.name=routetune-{seed}-{abs(hash(tuple(extra))) % 10**6}", *extra]
    _, summary = train(work.get("config") or ROOT / "examples" / work["example"], overrides, overwrite=True,
                       run_test=True)
    events = [json.loads(x) for x in (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()]
    dev = [e["metrics"][key] for e in events if e["event"] == "eval" and e["step"] == summary["best"]["step"]]
    return {"dev": dev[-1], "test": summary["test"][src][work["metric"]], "seconds": summary["train_seconds"]}


def run_lm(kind: str, work: dict, seed: int, precision: str, extra: list[str], out: Path) -> dict:
    """The causal-LM work through bench/replay_reference.py's two sides, general share 0."""
    if kind not in ("hf", "hf-data-seed", "routetune"):
        sys.exit(f"--variants: the lm work has routetune[:K=V], hf and hf-data-seed, not {kind} (its blocks all "
                 "have one length)")
    extra = ["evals.wikitext.max_blocks=40", *extra]
    # hf-data-seed: the Trainer's sampler seeded apart (data_seed = seed + 1000), so its block order no
    # longer comes from the random stream its LoRA initialisation came from
    data_seed = seed + 1000 if kind == "hf-data-seed" else None
    r = (rr.run_hf(seed, 0.0, work["steps"], precision, extra, data_seed=data_seed) if kind.startswith("hf")
         else rr.run_routetune(seed, 0.0, work["steps"], precision, out, extra))
    return {"test": r[rr.TASK]["after"], "wikitext": r[rr.HELD]["after"], "seconds": r["seconds"],
            "base": {"test": r[rr.TASK]["before"], "wikitext": r[rr.HELD]["before"]}}


def ner_task(tok, max_length: int) -> dict:
    """WNUT-17 for the Trainer: rows, the model class, and the word-level scorer."""
    from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

    from routetune.data.readers import read_conll
    from routetune.evaluate.tagging import evaluate_tagging

    split = {n: read_conll(DATA / "wnut17" / f) for n, f in
             [("train", "wnut17train.conll"), ("dev", "emerging.dev.conll"), ("test", "emerging.test.annotated")]}
    labels = sorted({t for s in split["train"] for t in s.tags})

    def row(s):
        enc = tok(s.tokens, is_split_into_words=True, truncation=True, max_length=max_length)
        prev, lab = None, []
        for w in enc.word_ids():
            lab.append(-100 if w is None or w == prev else labels.index(s.tags[w]) if s.tags[w] in labels else 0)
            prev = w
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": lab}

    def score(model, name):
        return evaluate_tagging(rr._scorer(model, labels), "task", tok, split[name], max_length)["f1"]

    return {"train": [row(s) for s in split["train"]], "dev_row": row(split["dev"][0]), "labels": labels,
            "model": AutoModelForTokenClassification, "collator": DataCollatorForTokenClassification(tok),
            "score": score}


def polarity_task(tok, max_length: int) -> dict:
    """Sentence polarity for the Trainer, split by routetune's own holdout rule (the same sentences)."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from routetune.config.load import load_config
    from routetune.data.build import _split
    from routetune.data.readers import read_examples
    from routetune.model.inference import classify

    sc = load_config(ROOT / "examples" / WORKS["polarity"]["example"]).sources["polarity"]
    train, dev, test = _split(read_examples(sc.train, sc.format), sc, "polarity")
    split = {"train": train, "dev": dev, "test": test}
    labels = sorted({e.label for e in train})

    def row(e):
        enc = tok(e.text, truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels.index(e.label)}

    def score(model, name):
        probs, _ = classify(rr._scorer(model, labels), "task", tok, [e.text for e in split[name]], max_length)
        return sum(labels[p] == e.label for p, e in zip(probs.argmax(-1).tolist(), split[name])) / len(split[name])

    return {"train": [row(e) for e in train], "dev_row": row(dev[0]), "labels": labels,
            "model": AutoModelForSequenceClassification, "collator": DataCollatorWithPadding(tok), "score": score}


def run_hf(work_name: str, seed: int, precision: str, grouped: bool) -> dict:
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from routetune.model.load import pick_attention, resolve_model

    work = WORKS[work_name]
    path = resolve_model("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    task = (ner_task if work_name == "ner" else polarity_task)(tok, work["max_length"])
    labels = task["labels"]
    model = task["model"].from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={t: i for i, t in enumerate(labels)},
        attn_implementation=pick_attention("auto", False, "cpu"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, num_train_epochs=work["epochs"], per_device_train_batch_size=work["batch"],
                                 per_device_eval_batch_size=64, learning_rate=LR, weight_decay=WD,
                                 bf16=precision == "bf16", use_cpu=True, seed=seed, report_to=[],
                                 eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                                 metric_for_best_model="score", save_total_limit=1, logging_strategy="no",
                                 dataloader_num_workers=0,
                                 train_sampling_strategy="group_by_length" if grouped else "random")
        # the Trainer's own evaluation loop runs on one row; compute_metrics scores the whole dev set
        # with the scorer above, so the checkpoint is chosen on the same dev score as routetune's
        trainer = Trainer(model=model, args=args, train_dataset=task["train"], eval_dataset=[task["dev_row"]],
                          data_collator=task["collator"],
                          compute_metrics=lambda _: {"score": task["score"](trainer.model, "dev")})
        started = time.time()
        trainer.train()
        seconds = time.time() - started
    return {**{n: task["score"](trainer.model, n) for n in ("dev", "test")}, "seconds": round(seconds, 1)}


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarise(table: dict) -> None:
    """Mean ± 95% interval per variant and the paired difference to ``routetune`` (same seeds)."""
    from routetune.sweep.confirm import interval  # mean and 95% t-interval, as --confirm reports them

    runs = table["runs"]
    base = runs.get("routetune", {})
    table["variants"] = {}
    for variant, by_seed in runs.items():
        scores = [s for s in ("dev", "test", "wikitext") if all(s in r for r in by_seed.values())]
        v = {s: interval([r[s] for r in by_seed.values()]) for s in scores}
        paired = [k for k in by_seed if k in base]
        if variant != "routetune" and paired:
            for s in scores:
                v[f"routetune_minus_this_{s}"] = interval([base[k][s] - by_seed[k][s] for k in paired])
        table["variants"][variant] = v


def print_table(table: dict, out: Path) -> None:
    fmt = lambda i: f"{i['mean']:.4f}" + (f" ± {i['half']:.4f}" if i["half"] is not None else "")  # noqa: E731
    scores = [s for s in ("dev", "test", "wikitext") if all(s in v for v in table["variants"].values())]
    print(f"\n{table['work']}, {_budget(table)}, {table['precision']}, {table['metric']} (written to {out})")
    print(f"| variant | seeds | {' | '.join(scores)} | routetune − variant, test (paired) |\n|---|---|---|---|---|")
    for variant, v in table["variants"].items():
        paired = fmt(v["routetune_minus_this_test"]) if "routetune_minus_this_test" in v else ""
        cells = " | ".join(fmt(v[s]) for s in scores)
        print(f"| {variant} | {', '.join(table['runs'][variant])} | {cells} | {paired} |")


def _budget(table: dict) -> str:
    return f"{table['steps']} steps" if table.get("steps") else f"{table['epochs']} epochs"


def _kind(table: dict) -> tuple:
    return table["work"], table.get("epochs"), table.get("steps"), table["precision"]


def merge(files: list[Path], out: Path) -> None:
    """One table from the runs of several invocations of the same work, epochs and precision
    (e.g. run side by side): a later file's run of a variant and seed replaces an earlier one."""
    tables = [json.loads(f.read_text()) for f in files]
    kinds = {_kind(t) for t in tables}
    if len(kinds) != 1:
        sys.exit(f"--merge: the files hold different works, budgets or precisions: {sorted(kinds, key=str)}")
    table = {k: tables[0].get(k) for k in ("work", "epochs", "steps", "precision", "metric")}
    table["runs"] = {}
    for t in tables:
        for variant, by_seed in t["runs"].items():
            table["runs"].setdefault(variant, {}).update(by_seed)
    table["merged_from"] = [str(f) for f in files]
    summarise(table)
    out.write_text(json.dumps(table, indent=2) + "\n")
    print_table(table, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="ner", choices=sorted(WORKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--variants", nargs="+", help="Default: routetune hf hf-grouped (lm: routetune hf)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--epochs", type=int, help="Instead of the work's own (3 for ner, 2 for polarity)")
    ap.add_argument("--steps", type=int, help="lm, prompt: instead of their 40 and 100 steps")
    ap.add_argument("--out", type=Path, help="JSON results (default runs/quality_parity_WORK_BUDGET_PRECISION.json)")
    ap.add_argument("--append", action="store_true", help="Add to the runs already in --out")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="Train nothing: one table from these results files, written to --out")
    a = ap.parse_args()
    if a.merge:
        return merge(a.merge, a.out or ROOT / "runs" / "quality_parity_merged.json")
    import torch

    work = WORKS[a.work]
    two = a.work in ("lm", "prompt")
    a.variants = a.variants or (["routetune", "hf"] if two else ["routetune", "hf", "hf-grouped"])
    if a.epochs and "epochs" in work:
        work["epochs"] = a.epochs
    if a.steps and "steps" in work:
        work["steps"] = a.steps
    table = {"work": a.work, "epochs": work.get("epochs"), "steps": work.get("steps"), "precision": a.precision,
             "metric": work["metric"], "runs": {}}
    budget = f"s{table['steps']}" if table["steps"] else f"e{table['epochs']}"
    out = a.out or ROOT / "runs" / f"quality_parity_{a.work}_{budget}_{a.precision}.json"
    if a.append and out.exists():
        old = json.loads(out.read_text())
        if _kind(old) != _kind(table):
            sys.exit(f"--append: {out} holds work {old['work']}, {_budget(old)}, {old['precision']}")
        table = old
    bad = [v for v in a.variants if a.work == "prompt" and v.partition(":")[0] not in ("hf", "routetune")]
    if bad:
        sys.exit(f"--variants: the prompt work has routetune[:K=V] and hf, not {' '.join(bad)}")
    table.update(cpu=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
    commit = _commit()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as runs:
        if a.work == "prompt":
            work["config"] = pw.write_work(DATA, Path(runs) / "prompt-work")
        for seed in a.seeds:
            for variant in a.variants:
                kind, _, extra = variant.partition(":")
                if a.work == "lm":
                    r = run_lm(kind, work, seed, a.precision, extra.split(",") if extra else [], Path(runs))
                elif kind == "hf" and a.work == "prompt":
                    r = pw.run_hf(work["config"], seed, a.precision, work["steps"])
                elif kind == "routetune":
                    r = run_routetune(work, seed, a.precision, extra.split(",") if extra else [], Path(runs))
                else:
                    r = run_hf(a.work, seed, a.precision, grouped=kind == "hf-grouped")
                r.update(commit=commit, date=time.strftime("%Y-%m-%d %H:%M"), threads=torch.get_num_threads())
                table["runs"].setdefault(variant, {})[str(seed)] = r
                print(f"seed {seed} {variant}: " + " ".join(f"{k} {r[k]:.4f}" for k in ("dev", "test", "wikitext")
                                                             if k in r) + f" ({r['seconds']:.0f} s)", flush=True)
                summarise(table)
                out.write_text(json.dumps(table, indent=2) + "\n")  # after every run: a killed bench keeps them
    print_table(table, out)


if __name__ == "__main__":
    main()
