"""Quality parity: routetune's defaults against the Hugging Face Trainer's standard recipe, same
data, model, budget and evaluation code, over several seeds.

    .venv/bin/python bench/quality_parity.py --seeds 1 2 3 4 5             # WNUT-17 NER, fp32
    .venv/bin/python bench/quality_parity.py --seeds 1 2 3 --variants routetune hf hf-grouped
    .venv/bin/python bench/quality_parity.py --seeds 1 2 3 --variants routetune routetune:train.dropout_impl=torch

Work ``ner``: minilm-l6 token classification on WNUT-17 (train 3,394 / dev 1,009 / test 1,287
sentences), 3 epochs, batch 16, lr 5e-5, weight decay 0.01, no warm-up, max_length 128, fp32
(``--precision bf16`` where the CPU has native bf16).

* ``routetune``: examples/wnut17-minilm.yaml with the general text switched off
  (``routing.weights.general=0``, so the task source has all the weight) and every default as
  shipped: dev F1 each epoch, the best checkpoint scored on test. ``routetune:KEY=VALUE`` adds an
  override (a lever off, for ablations).
* ``hf``: AutoModelForTokenClassification + DataCollatorForTokenClassification + Trainer, the
  token-classification recipe of the transformers examples (the first sub-word of each word
  labelled, the rest -100), with the setting a competent user gives it to match routetune's
  checkpoint choice: evaluation each epoch and ``load_best_model_at_end`` on dev entity F1.
  ``hf-grouped`` adds ``train_sampling_strategy="group_by_length"``.

Both sides are scored by the same code: words tagged from the first sub-word's prediction (words
cut off by max_length tagged O), entity-level micro F1 by seqeval (routetune.evaluate.metrics).
Each variant and seed trains in this process, one after the other. Printed and written to
``--out`` (JSON): per variant dev and test F1 per seed, mean ± 95% t-interval, and the paired
difference (same seed) of each variant to ``routetune``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
DATA = Path(os.environ.get("ROUTETUNE_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("ROUTETUNE_DATA", str(DATA))  # the examples read their data from there
EPOCHS, BATCH, LR, WD, MAX_LENGTH = 3, 16, 5e-5, 0.01, 128


def run_routetune(seed: int, precision: str, extra: list[str], out: Path) -> dict:
    from routetune.workflow import train

    overrides = ["routing.weights.general=0", f"train.epochs={EPOCHS}", f"train.precision={precision}", f"train.seed={seed}",
                 f"routing.seed={seed}", "train.progress=false", f"run.output_dir={out}",
                 f"run.name=routetune-{seed}-{abs(hash(tuple(extra))) % 10**6}", *extra]
    _, summary = train(ROOT / "examples" / "wnut17-minilm.yaml", overrides, overwrite=True, run_test=True)
    events = [json.loads(x) for x in (Path(summary["run"]) / "metrics.jsonl").read_text().splitlines()]
    dev = [e["metrics"]["wnut17/f1"] for e in events if e["event"] == "eval" and e["step"] == summary["best"]["step"]]
    return {"dev": dev[-1], "test": summary["test"]["wnut17"]["f1"], "seconds": summary["train_seconds"]}


def _tag(model, tok, sents, labels: list[str]) -> list[list[str]]:
    """Word tags from the first sub-word's prediction; words past max_length get O."""
    import torch

    out = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(sents), 64):
            chunk = sents[i:i + 64]
            enc = tok([s.tokens for s in chunk], is_split_into_words=True, truncation=True, max_length=MAX_LENGTH,
                      padding=True, return_tensors="pt")
            pred = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1)
            for b, s in enumerate(chunk):
                tags, prev = ["O"] * len(s.tokens), None
                for pos, w in enumerate(enc.word_ids(b)):
                    if w is not None and w != prev:
                        tags[w] = labels[int(pred[b, pos])]
                    prev = w
                out.append(tags)
    return out


def run_hf(seed: int, precision: str, grouped: bool) -> dict:
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments)

    from routetune.data.readers import read_conll
    from routetune.evaluate.metrics import entity_scores
    from routetune.model.load import pick_attention, resolve_model

    path = resolve_model("minilm-l6")
    split = {n: read_conll(DATA / "wnut17" / f) for n, f in
             [("train", "wnut17train.conll"), ("dev", "emerging.dev.conll"), ("test", "emerging.test.annotated")]}
    labels = sorted({t for s in split["train"] for t in s.tags})
    tok = AutoTokenizer.from_pretrained(path)

    def rows(sents):
        out = []
        for s in sents:
            enc = tok(s.tokens, is_split_into_words=True, truncation=True, max_length=MAX_LENGTH)
            prev, lab = None, []
            for w in enc.word_ids():
                lab.append(-100 if w is None or w == prev else labels.index(s.tags[w]) if s.tags[w] in labels else 0)
                prev = w
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": lab})
        return out

    dev_rows = rows(split["dev"])

    def dev_f1(_):  # the same word-level seqeval scoring as routetune's, on the model being trained
        return {"f1": entity_scores([s.tags for s in split["dev"]], _tag(trainer.model, tok, split["dev"], labels))["f1"]}

    model = AutoModelForTokenClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={t: i for i, t in enumerate(labels)},
        attn_implementation=pick_attention("auto", False, "cpu"))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                                 per_device_eval_batch_size=64, learning_rate=LR, weight_decay=WD,
                                 bf16=precision == "bf16", use_cpu=True, seed=seed, report_to=[],
                                 eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                                 metric_for_best_model="f1", save_total_limit=1, logging_strategy="no",
                                 dataloader_num_workers=0,
                                 train_sampling_strategy="group_by_length" if grouped else "random")
        # the Trainer's own evaluation loop runs on one row; compute_metrics scores the whole dev set
        # with the word-level scorer above, so the checkpoint is chosen on the same F1 as routetune's
        trainer = Trainer(model=model, args=args, train_dataset=rows(split["train"]), eval_dataset=dev_rows[:1],
                          data_collator=DataCollatorForTokenClassification(tok),
                          compute_metrics=dev_f1)
        started = time.time()
        trainer.train()
        seconds = time.time() - started
    scores = {n: entity_scores([s.tags for s in split[n]], _tag(trainer.model, tok, split[n], labels))["f1"]
              for n in ("dev", "test")}
    return {**scores, "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--variants", nargs="+", default=["routetune", "hf"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--epochs", type=int, default=3, help="Fewer for a quick check of the harness only")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality_parity.json")
    a = ap.parse_args()
    import torch

    from routetune.sweep.confirm import interval  # mean and 95% t-interval, as --confirm reports them

    globals()["EPOCHS"] = a.epochs
    results: dict = {}
    with tempfile.TemporaryDirectory() as runs:
        for seed in a.seeds:
            for variant in a.variants:
                kind, _, extra = variant.partition(":")
                if kind == "routetune":
                    r = run_routetune(seed, a.precision, extra.split(",") if extra else [], Path(runs))
                else:
                    r = run_hf(seed, a.precision, grouped=kind == "hf-grouped")
                results.setdefault(variant, {})[seed] = r
                print(f"seed {seed} {variant}: dev F1 {r['dev']:.4f} test F1 {r['test']:.4f} ({r['seconds']:.0f} s)",
                      flush=True)
    table = {"work": "ner (WNUT-17, minilm-l6, 3 epochs)", "precision": a.precision, "seeds": a.seeds,
             "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
             "date": time.strftime("%Y-%m-%d %H:%M"), "variants": {}}
    for variant, by_seed in results.items():
        table["variants"][variant] = {s: interval([r[s] for r in by_seed.values()]) for s in ("dev", "test")}
        table["variants"][variant]["per_seed"] = by_seed
        if variant != "routetune" and "routetune" in results:
            for s in ("dev", "test"):
                diffs = [results["routetune"][k][s] - r[s] for k, r in by_seed.items()]
                table["variants"][variant][f"routetune_minus_this_{s}"] = interval(diffs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(table, indent=2) + "\n")
    fmt = lambda i: f"{i['mean']:.4f}" + (f" ± {i['half']:.4f}" if i["half"] is not None else "")  # noqa: E731
    print("\n| variant | dev F1 | test F1 | routetune − variant, test (paired) |\n|---|---|---|---|")
    for variant, v in table["variants"].items():
        paired = fmt(v["routetune_minus_this_test"]) if "routetune_minus_this_test" in v else ""
        print(f"| {variant} | {fmt(v['dev'])} | {fmt(v['test'])} | {paired} |")


if __name__ == "__main__":
    main()
