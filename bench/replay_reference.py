"""Replay with the Hugging Face recipe, in the same harness as routetune: the reference a mixture
chosen by `routetune sweep` is compared with.

    .venv/bin/python bench/replay_reference.py --share 0.25 --seeds 1000 1001 1002
    .venv/bin/python bench/replay_reference.py --share 0 0.25 --seeds 1001 --steps 5 \
        --set evals.wikitext.max_blocks=40                                               # a quick look
    .venv/bin/python bench/replay_reference.py --sweep examples/sweep-shakespeare.yaml --share 0.25
        # the study's base config with its `set` overrides: the same dev/test split and test texts

Work: examples/shakespeare-smollm2.yaml, smollm2-135m with LoRA (r=8, alpha 16, dropout 0.05 on
q,k,v,o), causal-LM on 128-token blocks of Tiny Shakespeare (the last 10% held out as the domain
test set), general English (Project Gutenberg novels) replayed at a share of the examples,
150 steps of 8 blocks, lr 2e-4, no warm-up, no weight decay; WikiText-2 test is the held-out
general text (with ``--sweep``: every evals set with split test, e.g. the study's test texts).

* ``hf``: the standard recipe for replay with the Hugging Face stack: the two sets of blocks as
  ``datasets.Dataset``s mixed by ``datasets.interleave_datasets(probabilities=[1 - share, share],
  seed=seed, stopping_strategy="all_exhausted")``, ``peft.get_peft_model`` with the same LoRA
  settings, ``DataCollatorForLanguageModeling(mlm=False)`` and ``Trainer`` with the same budget
  (max_steps, batch, lr, linear schedule, precision, eager attention as routetune picks for
  decoders on CPU, seed). The blocks are routetune's own (the same tokens, cut the same way), so
  only the mixing, the order and the training loop differ.
* ``routetune``: ``routetune train`` of the same config with
  ``routing.weights={shakespeare: 1 - share, general: share}`` and the seed as ``train.seed`` and
  ``routing.seed``.

Both are scored by the same code (routetune.evaluate.tasks.text_scores: non-overlapping blocks,
mean token loss -> perplexity) on the domain test set and WikiText-2 test, before training (the
base model: both sides must print the same numbers) and after. Printed and written to ``--out``
(JSON): per variant and share, each seed's perplexities and the mean ± 95% t-interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("ROUTETUNE_DATA", str(ROOT.parent / "shared" / "data"))  # the example reads its data there
CONFIG = ROOT / "examples" / "shakespeare-smollm2.yaml"
TASK, GENERAL, HELD = "shakespeare", "general", "wikitext"


def _weights(share: float) -> list[str]:
    return [f"routing.weights.{TASK}={1 - share}", f"routing.weights.{GENERAL}={share}"]


def held_sets(cfg) -> list[str]:
    """The general texts both sides are scored on: every evals set with split test."""
    return [n for n, e in cfg.evals.items() if e.split == "test"]


def from_sweep(path: Path) -> tuple[Path, list[str]]:
    """A study's base config and its `set` overrides, so the reference trains and scores on exactly
    the data the study's trials and confirmation runs see."""
    from routetune.sweep.config import load_sweep
    from routetune.sweep.config import base_of

    return base_of(path, load_sweep(path))


def run_routetune(seed: int, share: float, steps: int, precision: str, out: Path, extra: list[str],
                  config: Path = CONFIG) -> dict:
    from routetune.config.load import load_config
    from routetune.workflow import train

    overrides = [*_weights(share), f"train.seed={seed}", f"routing.seed={seed}", f"train.max_steps={steps}",
                 f"train.precision={precision}", "train.progress=false", f"run.output_dir={out}",
                 f"run.name=routetune-{seed}-{share}", *extra]
    _, summary = train(config, overrides, overwrite=True, run_test=True)
    ba = summary["before_after"]
    return {name: {"before": ba[f"{name}/perplexity"]["before"], "after": ba[f"{name}/perplexity"]["after"]}
            for name in (TASK, *held_sets(load_config(config, overrides)))} | {"seconds": summary["train_seconds"]}


def _scorer(model, labels: list[str] = ()):
    """A transformers model through routetune's scoring interface, so the Trainer's side is scored
    by routetune's own code: `lm_logits(input_ids, attention_mask)` for text, and for a task model
    (`labels`: its classes) a head named "task" with `head_logits` / `token_logits` (for
    bench/quality_parity.py; checked to give the same F1 and accuracy as the hand-written scorers
    it replaced, on WNUT-17 dev and test and polarity dev)."""
    import torch

    class Scored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.heads = {"task": SimpleNamespace(labels=list(labels))}

        def lm_logits(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

        def head_logits(self, name, input_ids, attention_mask):  # the model's own head: its logits
            return self.lm_logits(input_ids, attention_mask)

        token_logits = head_logits

    return Scored()


_BEFORE: dict = {}
"""The base model's scores per (precision, overrides): they do not depend on the seed or share, so
an invocation computes them once (as routetune's cache of base-model scores does)."""


def run_hf(seed: int, share: float, steps: int, precision: str, extra: list[str], start: dict | None = None,
           order: list[list[int]] | None = None, config: Path = CONFIG, data_seed: int | None = None) -> dict:
    """The Trainer's run. `start` (LoRA tensors by routetune's parameter names) replaces peft's
    initialisation and `order` (blocks, in training order) the mixed, shuffled training set: with
    both, the Trainer trains from routetune's start on routetune's blocks (the one-time diagnosis
    bench/lm_same_start.py of commit 1aab64a),
    and the result gains "losses", the loss of every step. `data_seed`: the Trainer's own knob that
    seeds its sampler apart from `seed` (by default both come from the seed, so the block order and
    the LoRA initialisation are drawn from the same random stream)."""
    from datasets import Dataset, interleave_datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from routetune.config.load import load_config
    from routetune.data.build import build, build_evals, resolve_objective
    from routetune.evaluate.tasks import text_scores
    from routetune.model.load import load_tokenizer, pick_attention, resolve_model

    cfg = load_config(config, [*_weights(share), *extra])
    path = resolve_model(cfg.model.name)
    tok = load_tokenizer(path)
    objectives = {n: resolve_objective(sc.objective, True, n) for n, sc in cfg.sources.items()}
    sources, _, test = build(cfg, tok, objectives)
    general = build_evals(cfg, True)[0]
    sets = {TASK: test[TASK]} | {n: general[n] for n in held_sets(cfg)}
    data = {n: Dataset.from_dict({"input_ids": [s.prefix + e.input_ids + s.suffix for e in s.encoded]})
            for n, s in sources.items()}
    train_set = data[TASK] if share == 0 else interleave_datasets(
        [data[TASK], data[GENERAL]], probabilities=[1 - share, share], seed=seed, stopping_strategy="all_exhausted")
    p = cfg.peft
    set_seed(seed)  # as the Trainer's examples do before building the model: the LoRA initialisation follows the seed
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, attn_implementation=pick_attention("auto", True, "cpu")),
        LoraConfig(task_type="CAUSAL_LM", r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                   target_modules=list(p.target_modules)))
    if start is not None:
        # routetune injects the adapters into the transformers model itself; peft's wrapper adds
        # "base_model.model." in front of the same names
        own = {k: v for k, v in model.named_parameters() if "lora_" in k}
        if set(own) != {"base_model.model." + k for k in start}:
            raise ValueError("the LoRA parameters of the two models differ")
        with torch.no_grad():
            for name, value in start.items():
                own["base_model.model." + name].copy_(value)
    losses: list[float] = []

    class Reference(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            # routetune's order instead of the Trainer's shuffle
            return (
                SequentialSampler(self.train_dataset)
                if order is not None
                else super()._get_train_sampler(*args, **kwargs)
            )

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            if order is not None:
                losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
            return loss

    if order is not None:
        train_set = Dataset.from_dict({"input_ids": order})

    def score() -> dict:
        return {n: text_scores(_scorer(model), "causal-lm", tok, s, cfg.model.max_length, cfg.train, precision)
                ["perplexity"] for n, s in sets.items()}

    if (precision, str(config), tuple(extra)) not in _BEFORE:
        with model.disable_adapter():
            _BEFORE[precision, str(config), tuple(extra)] = score()
    before = _BEFORE[precision, str(config), tuple(extra)]
    t = cfg.train
    with tempfile.TemporaryDirectory() as out:
        # warmup_steps: a float below 1 is the share of the steps (transformers 5 folded warmup_ratio into it)
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=t.batch_size, learning_rate=t.lr,
                                 weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio, lr_scheduler_type="linear",
                                 bf16=precision == "bf16", use_cpu=True, seed=seed, data_seed=data_seed, report_to=[],
                                 save_strategy="no",
                                 logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True)
        trainer = Reference(model=model, args=args, train_dataset=train_set,
                            data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        started = time.time()
        trainer.train()
        seconds = time.time() - started
    after = score()
    return ({n: {"before": before[n], "after": after[n]} for n in sets} | {"seconds": round(seconds, 1)}
            | ({"losses": losses} if order is not None else {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=float, nargs="+", default=[0.25], help="General share(s) of the examples")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002])
    ap.add_argument("--variants", nargs="+", default=["hf", "routetune"], choices=["hf", "routetune"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: what routetune's train.precision=auto picks on this machine")
    ap.add_argument("--sweep", type=Path, help="A sweep file: its base config and `set` overrides for both sides")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="Config override for both sides (e.g. evals.wikitext.max_blocks=40 for a quick look)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "replay_reference.json")
    a = ap.parse_args()
    from routetune.device import resolve
    from routetune.sweep.confirm import interval

    config, extra = from_sweep(a.sweep) if a.sweep else (CONFIG, [])
    extra += a.set
    precision = resolve("cpu", a.precision).precision
    table = {"steps": a.steps, "precision": precision, "config": str(config), "overrides": extra,
             "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    with tempfile.TemporaryDirectory() as runs:
        for share in a.share:
            for seed in a.seeds:
                for variant in a.variants:
                    r = (run_hf(seed, share, a.steps, precision, extra, config=config) if variant == "hf"
                         else run_routetune(seed, share, a.steps, precision, Path(runs), extra, config=config))
                    table["runs"].setdefault(f"{variant} {share}", {})[str(seed)] = r
                    sets = [n for n in r if n != "seconds"]
                    print(f"share {share} seed {seed} {variant}: " + ", ".join(
                        f"{n} {r[n]['before']:.2f} -> {r[n]['after']:.2f}" for n in sets)
                        + f" ({r['seconds']:.0f} s)", flush=True)
                    a.out.parent.mkdir(parents=True, exist_ok=True)
                    a.out.write_text(json.dumps(table, indent=2) + "\n")
    print("\n| variant, share | seeds | " + " | ".join(f"{n} test ppl after" for n in sets)
          + " |\n|---|---|" + "---|" * len(sets))
    for key, by_seed in table["runs"].items():
        cells = []
        for n in sets:
            i = interval([r[n]["after"] for r in by_seed.values()])
            cells.append(f"{i['mean']:.2f}" + (f" ± {i['half']:.2f}" if i["half"] is not None else ""))
        print(f"| {key} | {', '.join(by_seed)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
