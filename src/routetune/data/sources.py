"""Sources: named streams of examples, each with an objective, that the router draws batches from.

* :class:`MemorySource` and its kinds hold tokenised examples in memory and walk a seeded
  per-epoch permutation: :class:`LabelledSource` (token classification),
  :class:`ClassificationSource` (multi-class or binary sequence classification),
  :class:`PromptSource` (causal-LM prompt/completion pairs, loss on the completion only).
* Text for language modelling lives in :mod:`routetune.data.text` (a lazy stream, or in-memory
  blocks).

Every source keeps its position in a small ``state_dict()`` so a run resumes the exact sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from routetune.data.collate import IGNORE, encode_words, pad_batch
from routetune.data.readers import Example, Sentence
from routetune.seeds import derive_seed
from routetune.errors import DataError


@dataclass
class Draw:
    """What the router's plan takes from a source for one step: stable example ids (index, or
    "epoch:block" for streams) and, for streams, the token blocks themselves."""

    source: str
    ids: list
    payload: list | None = None
    epoch_ended: bool = False  # this draw finished a pass over the source

    def shard(self, rank: int, world_size: int) -> Draw:
        payload = self.payload[rank::world_size] if self.payload is not None else None
        return Draw(self.source, self.ids[rank::world_size], payload, self.epoch_ended)


@dataclass
class Batch:
    source: str
    example_ids: list
    tensors: dict[str, torch.Tensor]
    n_tokens: int  # non-padding tokens
    epoch_ended: bool = False
    stand_in: bool = False  # data-parallel: this rank's share of the step is empty; trained with weight 0


class EpochCursor:
    """Position in a sized source: epoch and offset into that epoch's seeded permutation."""

    def __init__(self, size: int):
        self.size = size
        self.epoch = 0
        self.position = 0

    def advance(self, n: int, wrap: bool) -> tuple[list[tuple[int, int]], bool]:
        """Take `n` positions as (epoch, offset). Without `wrap` stop at the epoch's end (a partial
        batch); with `wrap` continue into the next epoch. Returns the positions and whether an
        epoch ended."""
        out, ended = [], False
        while len(out) < n:
            take = min(n - len(out), self.size - self.position)
            out += [(self.epoch, self.position + j) for j in range(take)]
            self.position += take
            if self.position >= self.size:
                self.epoch, self.position, ended = self.epoch + 1, 0, True
                if not wrap:
                    break
        return out, ended

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single sequence."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int] | int | float  # per-token labels, or one target for the whole sequence
    truncated: bool = False


class MemorySource:
    """A sized source held in memory, served in a seeded order per epoch."""

    objective = "?"

    def __init__(self, name: str, encoded: list[Encoded], pad_id: int, seed: int):
        if not encoded:
            raise DataError(f"source {name!r} has no examples")
        self.name = name
        self.encoded = encoded
        self.pad_id = pad_id
        self.seed = seed
        self.cursor = EpochCursor(len(encoded))
        self._perms: dict[int, np.ndarray] = {}
        self.group_batch = 0  # > 0: length-grouped order for batches of this size (group_by_length)

    def group_by_length(self, batch_size: int) -> None:
        """Serve each epoch in a length-grouped order (less padding per batch): the seeded
        permutation is cut into mega-batches of 50 batches, each sorted by length and cut into
        batches, and the batches of a mega-batch are served in a seeded random order. Like
        transformers' LengthGroupedSampler (which keeps the sorted order); written here because
        the router, not a DataLoader sampler, owns the order and the resumable cursor."""
        self.group_batch = batch_size
        self._perms = {}

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def n_truncated(self) -> int:
        return sum(1 for e in self.encoded if e.truncated)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            rng = np.random.default_rng(derive_seed(self.seed, self.name, epoch))
            perm = rng.permutation(len(self))
            if self.group_batch:
                perm = self._grouped(perm, rng)
            self._perms = {epoch: perm}
        return self._perms[epoch]

    def _grouped(self, perm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        b = self.group_batch
        lengths = np.fromiter((len(self.encoded[i].input_ids) for i in perm), dtype=np.int64, count=len(perm))
        out = []
        for start in range(0, len(perm), 50 * b):
            mega, lens = perm[start:start + 50 * b], lengths[start:start + 50 * b]
            mega = mega[np.argsort(-lens, kind="stable")]
            chunks = [mega[i:i + b] for i in range(0, len(mega), b)]
            out += [chunks[j] for j in rng.permutation(len(chunks))]
        return np.concatenate(out)

    def draw(self, n: int, wrap: bool = False) -> Draw:
        """The next `n` examples of the seeded order; without `wrap` a pass ends with a partial
        batch (no example is dropped or repeated within a pass)."""
        positions, ended = self.cursor.advance(n, wrap)
        ids = [int(self.permutation(e)[o]) for e, o in positions]
        return Draw(self.name, ids, None, ended)

    def collate(self, draw: Draw, step: int) -> tuple[dict[str, torch.Tensor], int]:
        rows = [self.encoded[i] for i in draw.ids]
        seqs = [r.input_ids for r in rows]
        if isinstance(rows[0].labels, list):
            tensors = pad_batch(seqs, self.pad_id, [r.labels for r in rows])
        else:
            tensors = pad_batch(seqs, self.pad_id)
            dtype = torch.float32 if isinstance(rows[0].labels, float) else torch.long
            tensors["labels"] = torch.tensor([r.labels for r in rows], dtype=dtype)
        return tensors, sum(map(len, seqs))

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)


# ---- token classification --------------------------------------------------------------------


def label_list_from(sentences: list[Sentence]) -> list[str]:
    """'O' first, then entity tags grouped by type (B before I) for stable, readable ids."""
    tags = {t for s in sentences for t in s.tags}
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def check_tags(sentences: list[Sentence], labels: list[str], path: str, split: str) -> None:
    known = set(labels)
    for s in sentences:
        for offset, tag in enumerate(s.tags):
            if tag not in known:
                raise DataError(f"{split} tag {tag!r} does not occur in the training data "
                                f"(known: {', '.join(labels)})", path, s.line + offset)


class LabelledSource(MemorySource):
    """Token-classification sentences; the first sub-token of each word carries its label."""

    objective = "token-classification"

    def __init__(self, name: str, sentences: list[Sentence], labels: list[str], tokenizer,
                 max_length: int, seed: int):
        self.sentences = sentences
        self.labels = labels
        self.label2id = {t: i for i, t in enumerate(labels)}
        tag_ids = [[self.label2id[t] for t in s.tags] for s in sentences]
        self.words = encode_words(tokenizer, [s.tokens for s in sentences], max_length, tag_ids)
        encoded = [Encoded(e.input_ids, e.labels, e.n_truncated > 0) for e in self.words]
        super().__init__(name, encoded, tokenizer.pad_token_id, seed)

    @property
    def n_truncated_words(self) -> int:
        return sum(e.n_truncated for e in self.words)

    @property
    def n_truncated_sentences(self) -> int:
        return self.n_truncated


# ---- sequence classification ------------------------------------------------------------------


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[tuple[list[int], bool]]:
    """Tokenise with the tokenizer's special tokens; cut the text (never the specials) to fit."""
    prefix, suffix = special_affixes(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    out = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        out.append((prefix + ids[:room] + suffix, len(ids) > room))
    return out


def class_list_from(examples: list[Example]) -> list[str]:
    return sorted({e.label for e in examples})


def check_classes(examples: list[Example], labels: list[str], split: str) -> None:
    known = set(labels)
    for e in examples:
        if e.label not in known:
            path, _, line = e.origin.rpartition(":")
            raise DataError(f"{split} label {e.label!r} does not occur in the training data "
                            f"(known: {', '.join(labels)})", path or e.origin, int(line) if line.isdigit() else None)


class ClassificationSource(MemorySource):
    """Texts with one class each. Binary sources use one logit (sigmoid + BCE): target 1.0 for the
    positive label, 0.0 for the other."""

    def __init__(self, name: str, examples: list[Example], labels: list[str], tokenizer, max_length: int,
                 seed: int, binary: bool = False):
        self.objective = "binary-classification" if binary else "sequence-classification"
        self.examples = examples
        self.labels = labels
        self.label2id = {t: i for i, t in enumerate(labels)}
        if binary and len(labels) != 2:
            raise DataError(f"binary-classification needs exactly two labels, found {len(labels)}: {labels[:6]}")
        encoded = []
        for e, (ids, cut) in zip(examples, encode_texts(tokenizer, [e.text for e in examples], max_length)):
            target = float(self.label2id[e.label]) if binary else self.label2id[e.label]
            encoded.append(Encoded(ids, target, cut))
        super().__init__(name, encoded, tokenizer.pad_token_id, seed)


# ---- prompt / completion (causal LM) -----------------------------------------------------------


def _encode_spans(tokenizer, text: str, trained) -> tuple[list[int], list[int]]:
    """Token ids of text and their labels: IGNORE, except on the trained character spans (each
    span is tokenized on its own, so its tokens are exactly the span's)."""
    ids, labels, at = [], [], 0
    for start, end in [*trained, (len(text), len(text))]:
        for piece, train in ((text[at:start], False), (text[start:end], True)):
            if piece:
                got = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
                ids += got
                labels += got if train else [IGNORE] * len(got)
        at = end
    return ids, labels


def encode_prompt(tokenizer, prompt: str, completion: str | None, max_length: int,
                  trained=()) -> tuple[list[int], list[int], bool]:
    """prefix + prompt (+ completion + eos). Labels are IGNORE on the prompt, except its trained
    spans (earlier assistant replies of a conversation). Too long: the prompt loses its start
    first, then the completion its end."""
    prefix, _ = special_affixes(tokenizer)
    p, p_labels = _encode_spans(tokenizer, prompt, trained)
    c = [] if completion is None else tokenizer(completion, add_special_tokens=False, verbose=False)["input_ids"]
    if completion is not None and tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    room = max_length - len(prefix)
    cut = len(p) + len(c) > room
    if cut:
        keep_prompt = max(room - len(c), min(len(p), room // 2))
        p, p_labels = (p[len(p) - keep_prompt:], p_labels[len(p) - keep_prompt:]) if keep_prompt else ([], [])
        c = c[: room - len(p)]
    ids = prefix + p + c
    labels = [IGNORE] * len(prefix) + p_labels + c
    return ids, labels, cut


class PromptSource(MemorySource):
    objective = "causal-lm"

    def __init__(self, name: str, examples: list[Example], tokenizer, max_length: int, seed: int):
        self.examples = examples
        encoded = []
        for e in examples:
            ids, labels, cut = encode_prompt(tokenizer, e.text, e.completion, max_length, e.trained)
            encoded.append(Encoded(ids, labels, cut))
        super().__init__(name, encoded, tokenizer.pad_token_id, seed)
