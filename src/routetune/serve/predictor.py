"""Prediction for a trained run: raw text or pre-split tokens -> tags and entity spans with
character offsets, or class labels with probabilities. Uses the same batched inference functions
as evaluation, so outputs are identical for the same inputs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from seqeval.metrics.sequence_labeling import get_entities

from routetune.errors import DataError
from routetune.model.inference import classify, tag_words

# URLs, @mentions/#hashtags and words (with inner apostrophes or hyphens) stay whole; any other
# non-space character is its own token, as in the CoNLL/WNUT tokenisation.
_WORD = re.compile(r"https?://\S+|[@#]?\w+(?:['’\-]\w+)*|[^\w\s]")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Split raw text into (word, start, end) with character offsets into `text`."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


@dataclass
class Item:
    text: str
    tokens: list[str]
    offsets: list[tuple[int, int]]
    id: object = None  # a JSONL input's "id", echoed in its result so outputs join back to inputs


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be encoded as UTF-8 (a lone surrogate, e.g. from a JSON escape
    "\\ud800"), or None. Tokenizers fail on such strings with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode: a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}"
    return None


def item_from_text(text: str) -> Item:
    words = split_words(text)
    return Item(text, [w for w, _, _ in words], [(s, e) for _, s, e in words])


def item_from_tokens(tokens: list[str]) -> Item:
    offsets, pos = [], 0
    for t in tokens:
        offsets.append((pos, pos + len(t)))
        pos += len(t) + 1
    return Item(" ".join(tokens), list(tokens), offsets)


def parse_line(line: str, fmt: str, path: str = "<stdin>", lineno: int | None = None) -> Item | None:
    """One input line -> Item. fmt: 'lines' (raw text), 'jsonl' ({"text": ...} or {"tokens": [...]}),
    or 'auto' (JSONL when the line starts with '{')."""
    stripped = line.strip()
    if not stripped:
        return None
    if fmt == "lines" or (fmt == "auto" and not stripped.startswith("{")):
        if problem := unicode_problem(line):
            raise DataError(problem, path, lineno)
        return item_from_text(line.rstrip("\r\n"))
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", path, lineno) from None
    if not isinstance(obj, dict):
        raise DataError("expected a JSON object with 'text' or 'tokens'", path, lineno)
    if isinstance(obj.get("tokens"), list) and all(isinstance(t, str) and t for t in obj["tokens"]):
        for t in obj["tokens"]:
            if problem := unicode_problem(t):
                raise DataError(f"'tokens': {problem}", path, lineno)
        item = item_from_tokens(obj["tokens"])
    elif isinstance(obj.get("text"), str):
        if problem := unicode_problem(obj["text"]):
            raise DataError(f"'text': {problem}", path, lineno)
        item = item_from_text(obj["text"])
    else:
        raise DataError("expected 'text' (a string) or 'tokens' (a list of non-empty strings)", path, lineno)
    if isinstance(obj.get("id"), str) and (problem := unicode_problem(obj["id"])):
        raise DataError(f"'id': {problem}", path, lineno)
    item.id = obj.get("id")
    return item


class Predictor:
    """Predictions of one task head: entity tags and spans (token classification), or a label with
    class probabilities (sequence / binary classification). Same code path as evaluation."""

    def __init__(self, model, tokenizer, head: str, max_length: int, batch_size: int = 64,
                 precision: str = "fp32"):
        if head not in model.heads:
            raise DataError(f"no task head named {head!r} (heads: {', '.join(model.heads) or 'none'})")
        self.model, self.tokenizer, self.head = model, tokenizer, head
        self.kind = model.heads[head].kind
        self.max_length, self.batch_size, self.precision = max_length, batch_size, precision

    def predict(self, items: list[Item]) -> list[dict]:
        out = self._tag(items) if self.kind == "token-classification" else self._classify(items)
        return [{"id": it.id, **r} if it.id is not None else r for it, r in zip(items, out)]

    def empty(self) -> dict:
        """The result of a blank input line (kept, so output line N answers input line N)."""
        if self.kind == "token-classification":
            return {"text": "", "tokens": [], "tags": [], "entities": []}
        return {"text": "", "label": None, "probabilities": {}}

    def _tag(self, items: list[Item]) -> list[dict]:
        result = tag_words(self.model, self.head, self.tokenizer, [it.tokens for it in items],
                           self.max_length, self.batch_size, self.precision)
        out = []
        for item, tags in zip(items, result.tags):
            entities = []
            for typ, first, last in get_entities(tags):
                start, end = item.offsets[first][0], item.offsets[last][1]
                entities.append({"type": typ, "text": item.text[start:end], "start": start, "end": end,
                                 "token_start": first, "token_end": last + 1})
            out.append({"text": item.text, "tokens": item.tokens, "tags": tags, "entities": entities})
        return out

    def _classify(self, items: list[Item]) -> list[dict]:
        head = self.model.heads[self.head]
        probs, _ = classify(self.model, self.head, self.tokenizer, [it.text for it in items], self.max_length,
                            self.batch_size, self.precision)
        out = []
        for item, p in zip(items, probs.tolist()):
            if head.binary:
                label = head.labels[1] if p[1] > head.threshold else head.labels[0]
            else:
                label = head.labels[max(range(len(p)), key=p.__getitem__)]
            out.append({"text": item.text, "label": label,
                        "probabilities": {t: round(q, 6) for t, q in zip(head.labels, p)}})
        return out
