"""Batched, length-sorted inference shared by evaluation and prediction (so both give equal outputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from routetune.data.collate import IGNORE, encode_words, mask_sequence, pad_batch
from routetune.data.sources import encode_prompt, encode_texts
from routetune.seeds import derive_seed
from routetune.device import autocast, model_device
from routetune.errors import RunError
from routetune.logs import bar
from routetune.model.frozen_bf16 import FrozenBf16


def for_inference(model: torch.nn.Module, precision: str, device: torch.device | str | None = None) -> torch.nn.Module:
    """Prepare a model loaded only to predict or serve: on `device` (default: where it is), no
    parameter needs gradients, and with bf16 the Linear weights are held as the bf16 copies
    autocast would otherwise make at every call (model/frozen_bf16.py), so outputs are the same
    and each batch skips the casts."""
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    if precision == "bf16":
        FrozenBf16(model).cast()
    return model.eval()


def _on(batch: dict, device: torch.device) -> dict:
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def length_sorted_batches(lengths: list[int], batch_size: int):
    """Index lists of batches of similar length (shortest first): little padding per batch.
    Prediction, evaluation and generation all batch this way, so their outputs agree."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


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
    device = model_device(model)
    encoded = encode_words(tokenizer, sentences, max_length)
    tags: list[list[str] | None] = [None] * len(encoded)
    batches = list(length_sorted_batches([len(e.input_ids) for e in encoded], batch_size))
    for idx in bar(batches, f"tagging ({head})"):
        batch = _on(pad_batch([encoded[i].input_ids for i in idx], tokenizer.pad_token_id), device)
        with autocast(precision, device.type):
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


@torch.inference_mode()
def classify(model, head: str, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
             precision: str = "fp32") -> tuple[torch.Tensor, int]:
    """Class probabilities (N x C; for a binary head the two columns are 1-p and p) and the
    number of texts cut to `max_length`."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    encoded = encode_texts(tokenizer, texts, max_length)
    binary = getattr(model.heads[head], "binary", False)
    out = torch.zeros(len(texts), 2 if binary else len(model.heads[head].labels))
    batches = list(length_sorted_batches([len(e[0]) for e in encoded], batch_size))
    for idx in bar(batches, f"classifying ({head})"):
        batch = _on(pad_batch([encoded[i][0] for i in idx], tokenizer.pad_token_id), device)
        with autocast(precision, device.type):
            logits = model.head_logits(head, batch["input_ids"], batch["attention_mask"]).float().cpu()
        if binary:
            p = torch.sigmoid(logits.squeeze(-1))
            out[idx] = torch.stack([1 - p, p], dim=-1)
        else:
            out[idx] = torch.softmax(logits, dim=-1)
    model.train(was_training)
    return out, sum(1 for _, cut in encoded if cut)


def _lm_scored(model, objective: str, blocks: list[list[int]], tokenizer, batch_size: int, precision: str,
               seed: int, labels: list[list[int]] | None):
    """(logits, targets) of each batch of `blocks` (in order) for the language-modelling loss: causal-LM
    next-token targets (the blocks themselves, or `labels` with -100 where no loss is taken, e.g. on
    prompts), or masked-LM targets with masks drawn from a fixed seed per block (so base and
    fine-tuned models are scored on the same masks)."""
    device = model_device(model)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    for start in bar(range(0, len(blocks), batch_size), f"{objective} loss"):
        chunk = blocks[start : start + batch_size]
        if objective == "causal-lm":
            targets_in = labels[start : start + batch_size] if labels is not None else chunk
            batch = _on(pad_batch(chunk, tokenizer.pad_token_id, targets_in), device)
            with autocast(precision, device.type):
                logits = model.lm_logits(batch["input_ids"], batch["attention_mask"])
            yield logits[:, :-1], batch["labels"][:, 1:]
        else:
            inputs, masked = [], []
            for i, seq in enumerate(chunk):
                x, y = mask_sequence(seq, special, 0.15, tokenizer.mask_token_id, len(tokenizer),
                                     derive_seed(seed, "eval-mask", start + i))
                inputs.append(x)
                masked.append(y)
            batch = _on(pad_batch(inputs, tokenizer.pad_token_id, masked), device)
            with autocast(precision, device.type):
                logits = model.lm_logits(batch["input_ids"], batch["attention_mask"])
            yield logits, batch["labels"]


@torch.inference_mode()
def lm_loss(model, objective: str, blocks: list[list[int]], tokenizer, batch_size: int = 16,
            precision: str = "fp32", seed: int = 0, labels: list[list[int]] | None = None) -> tuple[float, int]:
    """Mean token loss and token count over `blocks` (already with special tokens), causal-LM or
    masked-LM (`_lm_scored` says which targets)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for logits, targets in _lm_scored(model, objective, blocks, tokenizer, batch_size, precision, seed, labels):
        mask = targets != IGNORE
        total += torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask], reduction="sum").item()
        count += int(mask.sum())
    model.train(was_training)
    return (total / count if count else float("nan")), count


@torch.inference_mode()
def block_losses(model, objective: str, blocks: list[list[int]], tokenizer, batch_size: int = 16,
                 precision: str = "fp32", seed: int = 0) -> list[float]:
    """Each block's own mean token loss (NaN for a block with no target), in the order given: what a
    retention budget needs to tell a change of the text from the noise of its sample."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    for logits, targets in _lm_scored(model, objective, blocks, tokenizer, batch_size, precision, seed, None):
        mask = targets != IGNORE
        token = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets.masked_fill(~mask, 0),
                                                  reduction="none") * mask
        out += (token.sum(1) / mask.sum(1)).tolist()
    model.train(was_training)
    return out


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, max_length: int,
             batch_size: int = 16, precision: str = "fp32") -> list[str]:
    """Greedy continuations of each prompt (left-padded batches), cut at the end-of-sequence token."""
    if model.method.generate_refusal:
        raise RunError(model.method.generate_refusal)
    was_training = model.training
    model.eval()
    device = model_device(model)
    room = max(8, max_length - max_new_tokens)
    encoded = [encode_prompt(tokenizer, p, None, room)[0] for p in prompts]
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    batches = list(length_sorted_batches([len(e) for e in encoded], batch_size))
    for idx in bar(batches, "generating"):
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        ids, mask = ids.to(device), mask.to(device)
        with autocast(precision, device.type):
            if model.prompt is None:
                gen = model.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
                gen = gen[:, width:]
            else:  # prompt tuning: generate from embeddings (returns only the new tokens)
                inputs, _ = model.lm_inputs(ids, mask)
                gen = model.lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row], skip_special_tokens=True).strip()
    model.train(was_training)
    return out
