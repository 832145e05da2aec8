"""Evaluate one source's dev/test set with the metrics of its task.

Which metrics a set has is its objective's (objectives.py); how a set is scored is its kind's
(``SCORERS``):

| set kind | metrics |
|---|---|
| tags (token classification) | entity precision / recall / f1 (seqeval, on words), per type |
| classes (sequence / binary classification) | accuracy, macro_f1, per-class report, confusion matrix (scikit-learn) |
| prompts (causal-LM prompt/completion) | perplexity of the completions; exact_match, token_f1 of greedy generations |
| text (language modelling) | perplexity (causal-LM) or mlm_loss (masked-LM, fixed masks) |
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from itertools import islice

from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

from routetune import objectives
from routetune.data.build import EvalSet
from routetune.data.sources import encode_prompt, special_affixes
from routetune.data.text import iter_blocks
from routetune.evaluate.tagging import evaluate_tagging, format_report
from routetune.model.inference import classify, generate, lm_loss

def metric_names(evalset: EvalSet, objective: str, source_cfg=None) -> tuple[str, ...]:
    """The flat metrics of a set (dev metrics, early stopping): its objective's, plus generation
    metrics for prompt sets that are generated."""
    spec = objectives.get(objective)
    if evalset.kind == "prompts" and source_cfg is not None and source_cfg.eval_generate:
        return spec.metrics + spec.generation_metrics
    return spec.metrics


def evaluate_set(model, name: str, objective: str, evalset: EvalSet, tokenizer, cfg, precision: str) -> dict:
    """Score `evalset` with `model` (on its device) in the resolved `precision` (fp32, bf16, fp16)
    by the scorer of its kind of examples."""
    return SCORERS[evalset.kind](model, name, objective, evalset, tokenizer, cfg, precision)


def score_sets(model, sets: dict, objectives_of: dict, tokenizer, cfg, precision: str) -> tuple[dict, dict]:
    """Score every set of `sets` (name -> EvalSet); returns (flat `name/metric` values, full reports).
    Dev evaluation during training, before/after scoring, `routetune eval` and continual stages
    all score through here."""
    flat, full = {}, {}
    for name, evalset in sets.items():
        scores = evaluate_set(model, name, objectives_of[name], evalset, tokenizer, cfg, precision)
        full[name] = scores
        flat.update(
            {f"{name}/{m}": scores[m] for m in metric_names(evalset, objectives_of[name], cfg.sources.get(name))}
        )
    return flat, full


def _tags(model, name, objective, evalset, tokenizer, cfg, precision) -> dict:
    return evaluate_tagging(model, name, tokenizer, evalset.items, cfg.model.max_length, cfg.train.eval_batch_size,
                            precision)


def _classes(model, name, objective, evalset, tokenizer, cfg, precision) -> dict:
    return classification_scores(model, name, tokenizer, evalset.items, cfg.model.max_length, cfg.train,
                                 cfg.sources.get(name), precision)


def _prompts(model, name, objective, evalset, tokenizer, cfg, precision) -> dict:
    return prompt_scores(model, tokenizer, evalset.items, cfg.model.max_length, cfg.train, cfg.sources.get(name),
                         precision)


def _text(model, name, objective, evalset, tokenizer, cfg, precision) -> dict:
    return text_scores(model, objective, tokenizer, evalset, cfg.model.max_length, cfg.train, precision)


def classification_scores(model, name, tokenizer, examples, max_length, tc, sc, precision: str) -> dict:
    head = model.heads[name]
    probs, cut = classify(model, name, tokenizer, [e.text for e in examples], max_length,
                          tc.eval_batch_size, precision)
    if getattr(head, "binary", False):
        pred = (probs[:, 1] > head.threshold).long().tolist()
    else:
        pred = probs.argmax(-1).tolist()
    ids = {t: i for i, t in enumerate(head.labels)}
    gold = [ids[e.label] for e in examples]
    labels = list(range(len(head.labels)))
    report = classification_report(gold, pred, labels=labels, target_names=head.labels, output_dict=True,
                                   zero_division=0)
    return {"accuracy": accuracy_score(gold, pred),
            "macro_f1": f1_score(gold, pred, labels=labels, average="macro", zero_division=0),
            "per_class": {t: {"precision": report[t]["precision"], "recall": report[t]["recall"],
                              "f1": report[t]["f1-score"], "support": int(report[t]["support"])} for t in head.labels},
            "confusion": confusion_matrix(gold, pred, labels=labels).tolist(), "labels": head.labels,
            "examples": len(examples), "truncated": cut}


def _normalise(text: str) -> list[str]:
    """SQuAD-style: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    p, r = _normalise(prediction), _normalise(reference)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def prompt_scores(model, tokenizer, examples, max_length, tc, sc, precision: str) -> dict:
    # perplexity of the completions (and of earlier chat replies) given their prompts (teacher forcing)
    rows = [encode_prompt(tokenizer, e.text, e.completion, max_length, e.trained) for e in examples]
    loss, count = lm_loss(model, "causal-lm", [r[0] for r in rows], tokenizer, tc.eval_batch_size, precision,
                          labels=[r[1] for r in rows])
    out = {"perplexity": math.exp(loss) if count else float("nan"), "examples": len(examples),
           "completion_tokens": count}
    if sc.eval_generate:
        subset = examples[: sc.eval_generate]
        outputs = generate(model, tokenizer, [e.text for e in subset], sc.max_new_tokens, max_length,
                           tc.eval_batch_size, precision)
        out["exact_match"] = sum(_normalise(o) == _normalise(e.completion) for o, e in zip(outputs, subset)) / len(
            subset
        )
        out["token_f1"] = sum(token_f1(o, e.completion) for o, e in zip(outputs, subset)) / len(subset)
        out["generated"] = len(subset)
        out["samples"] = [
            {"prompt": e.text, "reference": e.completion, "output": o} for e, o in zip(subset[:3], outputs)
        ]
    return out


def text_blocks(tokenizer, evalset: EvalSet, max_length: int, limit: int | None) -> list[list[int]]:
    """The first `limit` (all if None) non-overlapping blocks of `max_length` tokens of a text set, with
    the tokenizer's special tokens, as in training."""
    prefix, suffix = special_affixes(tokenizer)
    content = max_length - len(prefix) - len(suffix)
    blocks = iter_blocks(evalset.items, tokenizer, content, evalset.strip_gutenberg)
    return [prefix + b + suffix for b in islice(blocks, limit)]


def text_scores(model, objective, tokenizer, evalset: EvalSet, max_length, tc, precision: str) -> dict:
    """Non-overlapping blocks of `max_length` tokens, as in training."""
    blocks = text_blocks(tokenizer, evalset, max_length, evalset.max_blocks)
    loss, tokens = lm_loss(model, objective, blocks, tokenizer, tc.eval_batch_size, precision)
    if objective == "causal-lm":
        return {"perplexity": math.exp(loss), "loss": loss, "tokens": tokens, "blocks": len(blocks)}
    return {"mlm_loss": loss, "tokens": tokens, "blocks": len(blocks)}


SCORERS = {"tags": _tags, "classes": _classes, "prompts": _prompts, "text": _text}
"""Kind of examples (objectives.py) -> scorer of a set: a dict of metrics and details."""


def format_scores(name: str, split: str, scores: dict) -> str:
    """A readable report of any task's scores."""
    if "per_type" in scores:
        return format_report(name, split, scores)
    if "per_class" in scores:
        lines = [f"{name} ({split}): classification (scikit-learn)",
                 f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
        for label, s in scores["per_class"].items():
            lines.append(f"{label:<16}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}{s['support']:>9}")
        lines.append(f"accuracy {scores['accuracy']:.4f}   macro F1 {scores['macro_f1']:.4f}   "
                     f"({scores['examples']} examples, {scores['truncated']} cut to max_length)")
        lines.append("confusion (rows: gold, columns: predicted): " + str(scores["confusion"]))
        return "\n".join(lines)
    keys = [k for k in ("perplexity", "loss", "mlm_loss", "exact_match", "token_f1") if k in scores]
    counts = ", ".join(f"{k} {scores[k]}" for k in ("tokens", "blocks", "examples", "generated") if k in scores)
    return (
        f"{name} ({split}): " + "   ".join(f"{k} {scores[k]:.4f}" for k in keys) + (f"   ({counts})" if counts else "")
    )
