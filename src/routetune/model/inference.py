"""Batched, length-sorted inference shared by evaluation and prediction (so both give equal outputs)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from routetune.data.collate import encode_words, pad_batch


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TaggingResult:
    tags: list[list[str]]  # one tag per input word, always
    n_truncated_words: int
    n_truncated_sentences: int
    n_empty_words: int


@torch.inference_mode()
def tag_words(model, head: str, tokenizer, sentences: list[list[str]], max_length: int,
              batch_size: int = 64, precision: str = "fp32") -> TaggingResult:
    """Predict one tag per word: the argmax at the word's first sub-token; 'O' for words that
    have no sub-token inside `max_length` (counted in the result)."""
    labels = model.heads[head].labels
    was_training = model.training
    model.eval()
    encoded = encode_words(tokenizer, sentences, max_length)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    tags: list[list[str] | None] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = pad_batch([encoded[i].input_ids for i in idx], tokenizer.pad_token_id)
        with autocast(precision):
            logits = model.token_logits(head, batch["input_ids"], batch["attention_mask"])
        best = logits.float().argmax(-1).tolist()
        for row, i in enumerate(idx):
            tags[i] = [labels[best[row][pos]] if pos >= 0 else "O" for pos in encoded[i].first_token]
    model.train(was_training)
    return TaggingResult(
        tags=tags,  # type: ignore[arg-type]
        n_truncated_words=sum(e.n_truncated for e in encoded),
        n_truncated_sentences=sum(1 for e in encoded if e.n_truncated),
        n_empty_words=sum(e.n_empty for e in encoded),
    )
