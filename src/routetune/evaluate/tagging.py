"""Entity tagging scores: seqeval's entity-level precision, recall and F1, computed on words."""

from __future__ import annotations

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from routetune.data.readers import Sentence
from routetune.model.inference import tag_words


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro-averaged entity precision/recall/F1 and per-type scores (conlleval semantics)."""
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tag sequences differ in shape")
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                    "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    return {
        "precision": precision_score(gold, pred, zero_division=0),
        "recall": recall_score(gold, pred, zero_division=0),
        "f1": f1_score(gold, pred, zero_division=0),
        "per_type": per_type,
    }


def evaluate_tagging(model, head: str, tokenizer, sentences: list[Sentence], max_length: int,
                     batch_size: int = 64, precision: str = "fp32") -> dict:
    result = tag_words(model, head, tokenizer, [s.tokens for s in sentences], max_length,
                       batch_size, precision)
    scores = entity_scores([s.tags for s in sentences], result.tags)
    scores.update(sentences=len(sentences), words=sum(len(s.tokens) for s in sentences),
                  truncated_words=result.n_truncated_words,
                  truncated_sentences=result.n_truncated_sentences,
                  untokenizable_words=result.n_empty_words)
    return scores


def format_report(name: str, split: str, scores: dict) -> str:
    lines = [f"{name} ({split}): entity-level scores on words (seqeval)",
             f"{'type':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for typ, s in sorted(scores["per_type"].items()):
        lines.append(f"{typ:<16}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}{s['support']:>9}")
    support = sum(s["support"] for s in scores["per_type"].values())
    lines.append(f"{'micro avg':<16}{scores['precision']:>10.4f}{scores['recall']:>10.4f}"
                 f"{scores['f1']:>10.4f}{support:>9}")
    lines.append(f"{scores['sentences']} sentences, {scores['words']} words; "
                 f"{scores['truncated_words']} words in {scores['truncated_sentences']} sentences "
                 f"beyond max_length were predicted 'O'")
    return "\n".join(lines)
