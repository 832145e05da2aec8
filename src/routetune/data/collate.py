"""Tokenisation with word alignment, dynamic padding, and masked-LM masking."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class EncodedSentence:
    input_ids: list[int]
    labels: list[int]  # label id on the first sub-token of each word, IGNORE elsewhere
    first_token: list[int]  # per word: index of its first sub-token, or -1 if it has none
    n_truncated: int  # words lost to max_length
    n_empty: int  # words the tokenizer turned into no sub-token at all


def encode_words(tokenizer, sentences: list[list[str]], max_length: int,
                 tag_ids: list[list[int]] | None = None) -> list[EncodedSentence]:
    """Tokenise pre-split sentences; the first sub-token of each word carries the word's label.

    Words that do not fit in `max_length` (or that produce no sub-token) get no position;
    decoding predicts 'O' for them and the counts are reported, so words in == words out.
    """
    enc = tokenizer(sentences, is_split_into_words=True, truncation=True, max_length=max_length,
                    add_special_tokens=True)
    out = []
    for i, words in enumerate(sentences):
        word_ids = enc.word_ids(i)
        ids = enc["input_ids"][i]
        first = [-1] * len(words)
        labels = [IGNORE] * len(ids)
        for pos, w in enumerate(word_ids):
            if w is not None and first[w] == -1:
                first[w] = pos
                if tag_ids is not None:
                    labels[pos] = tag_ids[i][w]
        last_present = max((w for w in word_ids if w is not None), default=-1)
        truncated = len(ids) >= max_length and last_present < len(words) - 1
        n_trunc = (len(words) - 1 - last_present) if truncated else 0
        n_empty = sum(1 for w, f in enumerate(first) if f == -1) - n_trunc
        out.append(EncodedSentence(ids, labels, first, n_trunc, n_empty))
    return out


def pad_batch(sequences: list[list[int]], pad_id: int, labels: list[list[int]] | None = None
              ) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (never to max_length)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        lab = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
        for row, seq in enumerate(labels):
            lab[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        batch["labels"] = lab
    return batch


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, probability: float, mask_id: int,
                vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select `probability` of the non-special tokens; of those 80% -> mask_id,
    10% -> a random token, 10% unchanged. Labels are IGNORE on unselected positions.

    transformers' DataCollatorForLanguageModeling does the same draws, but from the global RNG;
    routetune draws from an explicit generator seeded by (seed, step) so that a resumed run masks
    exactly the same tokens.
    """
    inputs = input_ids.clone()
    labels = input_ids.clone()
    prob = torch.full(inputs.shape, probability)
    prob.masked_fill_(special, 0.0)
    selected = torch.bernoulli(prob, generator=generator).bool()
    labels[~selected] = IGNORE
    replaced = torch.bernoulli(torch.full(inputs.shape, 0.8), generator=generator).bool() & selected
    inputs[replaced] = mask_id
    randomised = torch.bernoulli(torch.full(inputs.shape, 0.5), generator=generator).bool() & selected & ~replaced
    inputs[randomised] = torch.randint(vocab_size, inputs.shape, generator=generator)[randomised]
    return inputs, labels


def mask_sequence(seq: list[int], special_ids: torch.Tensor, probability: float, mask_id: int, vocab_size: int,
                  seed: int) -> tuple[list[int], list[int]]:
    """Mask one unpadded sequence from a generator seeded by `seed` alone, so its masks do not
    depend on batch composition, sharding or worker count."""
    t = torch.tensor(seq, dtype=torch.long)
    x, y = mask_tokens(t, torch.isin(t, special_ids), probability, mask_id, vocab_size,
                       torch.Generator().manual_seed(seed))
    return x.tolist(), y.tolist()
