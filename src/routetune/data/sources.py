"""Sources: named streams of examples, each with an objective, that the router draws batches from.

Two kinds exist today:

* :class:`LabelledSource` holds tokenised labelled sentences in memory and walks a seeded
  per-epoch permutation of them.
* :class:`TextStream` streams plain text lazily from files, tokenises it into fixed blocks and
  shuffles them through a seeded buffer, so a corpus larger than memory works.

Both keep their position in a small ``state_dict()`` so that a run can resume the exact sequence.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from routetune.data.collate import EncodedSentence, encode_words, mask_tokens, pad_batch
from routetune.data.readers import Sentence, iter_text, read_conll, resolve_text_files
from routetune.errors import DataError

log = logging.getLogger("routetune")


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Draw:
    """What the router's plan takes from a source for one step: stable example ids (sentence index,
    or "epoch:block" for streams) and, for streams, the token blocks themselves."""

    source: str
    ids: list
    payload: list | None = None
    epoch_ended: bool = False  # this draw finished a pass over the source

    def shard(self, rank: int, world_size: int) -> "Draw":
        payload = self.payload[rank::world_size] if self.payload is not None else None
        return Draw(self.source, self.ids[rank::world_size], payload, self.epoch_ended)


@dataclass
class Batch:
    source: str
    example_ids: list
    tensors: dict[str, torch.Tensor]
    n_tokens: int  # non-padding tokens
    epoch_ended: bool = False


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


# ----------------------------------------------------------------------------------------------


def label_list_from(sentences: list[Sentence]) -> list[str]:
    """'O' first, then entity tags grouped by type (B before I) for stable, readable ids."""
    tags = {t for s in sentences for t in s.tags}
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def check_labels(sentences: list[Sentence], labels: list[str], path: str, split: str) -> None:
    known = set(labels)
    for s in sentences:
        for offset, tag in enumerate(s.tags):
            if tag not in known:
                raise DataError(f"{split} tag {tag!r} does not occur in the training data "
                                f"(known: {', '.join(labels)})", path, s.line + offset)


class LabelledSource:
    """Token-classification sentences, tokenised once, served in a seeded order per epoch."""

    objective = "token-classification"

    def __init__(self, name: str, sentences: list[Sentence], labels: list[str], tokenizer,
                 max_length: int, seed: int):
        self.name = name
        self.sentences = sentences
        self.labels = labels
        self.label2id = {t: i for i, t in enumerate(labels)}
        self.pad_id = tokenizer.pad_token_id
        self.seed = seed
        tag_ids = [[self.label2id[t] for t in s.tags] for s in sentences]
        self.encoded: list[EncodedSentence] = encode_words(
            tokenizer, [s.tokens for s in sentences], max_length, tag_ids)
        self.cursor = EpochCursor(len(self.encoded))
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def n_truncated_words(self) -> int:
        return sum(e.n_truncated for e in self.encoded)

    @property
    def n_truncated_sentences(self) -> int:
        return sum(1 for e in self.encoded if e.n_truncated)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(derive_seed(self.seed, self.name, epoch)).permutation(len(self))}
        return self._perms[epoch]

    def draw(self, n: int, wrap: bool = False) -> Draw:
        """The next `n` examples of the seeded order; without `wrap` a pass ends with a partial
        batch (no example is dropped or repeated within a pass)."""
        positions, ended = self.cursor.advance(n, wrap)
        ids = [int(self.permutation(e)[o]) for e, o in positions]
        return Draw(self.name, ids, None, ended)

    def collate(self, draw: Draw, step: int) -> tuple[dict[str, torch.Tensor], int]:
        rows = [self.encoded[i] for i in draw.ids]
        tensors = pad_batch([r.input_ids for r in rows], self.pad_id, [r.labels for r in rows])
        return tensors, sum(len(r.input_ids) for r in rows)

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)


def load_labelled(name: str, src_cfg, tokenizer, max_length: int, seed: int,
                  labels: list[str] | None = None, allow_new: bool = False) -> LabelledSource:
    """Read a labelled source. With `labels` (an earlier head's label list) the ids of those
    labels are kept; labels the data has beyond them are an error, or appended if `allow_new`."""
    fmt = src_cfg.conll
    sentences = read_conll(src_cfg.train, fmt.token_column, fmt.tag_column, fmt.scheme, fmt.separator)
    found = label_list_from(sentences)
    if labels is None:
        labels = found
    else:
        new = [t for t in found if t not in labels]
        if new and not allow_new:
            raise DataError(f"labels {new} are not in the label set of the earlier run's head for source "
                            f"{name!r} ({', '.join(labels)}); pass --allow-new-labels to add them", src_cfg.train)
        labels = list(labels) + new
    return LabelledSource(name, sentences, labels, tokenizer, max_length, seed)


def read_split(src_cfg, split: str, labels: list[str]) -> list[Sentence]:
    path = getattr(src_cfg, split)
    if path is None:
        raise DataError(f"this source has no {split} file configured")
    fmt = src_cfg.conll
    sentences = read_conll(path, fmt.token_column, fmt.tag_column, fmt.scheme, fmt.separator)
    check_labels(sentences, labels, path, split)
    return sentences


# ----------------------------------------------------------------------------------------------


class TextStream:
    """Plain text -> blocks of `max_length` tokens, streamed lazily with a seeded shuffle buffer."""

    objective = "masked-lm"
    _CHUNK_CHARS = 1 << 16  # tokenise ~64 KB at a time

    def __init__(self, name: str, spec: str, tokenizer, max_length: int, seed: int, *,
                 pattern: str = "*.txt", strip_gutenberg: bool = False, shuffle_buffer: int = 1024,
                 mlm_probability: float = 0.15):
        self.name = name
        self.files = resolve_text_files(spec, pattern)
        self.tokenizer = tokenizer
        self.prefix, self.suffix = special_affixes(tokenizer)
        self.content = max_length - len(self.prefix) - len(self.suffix)
        self.strip_gutenberg = strip_gutenberg
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.mlm_probability = mlm_probability
        self.special_ids = set(tokenizer.all_special_ids)
        self.epoch = 0
        self.consumed = 0
        self._iter: Iterator[list[int]] | None = None
        if next(self._raw_blocks(self.files), None) is None:
            raise DataError(f"no text found in {len(self.files)} file(s)", spec)

    def __len__(self) -> int:  # unknown without reading everything; the router does not need it
        raise TypeError("a TextStream has no length")

    def _raw_blocks(self, files: list[Path]) -> Iterator[list[int]]:
        for path in files:
            carry: list[int] = []
            chunk: list[str] = []
            size = 0
            for line in iter_text(path, self.strip_gutenberg):
                chunk.append(line)
                size += len(line) + 1
                if size >= self._CHUNK_CHARS:
                    carry.extend(self._tokenize(chunk))
                    chunk, size = [], 0
                    while len(carry) >= self.content:
                        yield carry[: self.content]
                        carry = carry[self.content :]
            carry.extend(self._tokenize(chunk))
            while len(carry) >= self.content:
                yield carry[: self.content]
                carry = carry[self.content :]
            if len(carry) >= 8:  # a short tail of the file is still text worth learning from
                yield carry

    def _tokenize(self, lines: list[str]) -> list[int]:
        text = "\n".join(lines).strip()
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _epoch_blocks(self, epoch: int) -> Iterator[list[int]]:
        rng = random.Random(derive_seed(self.seed, self.name, epoch))
        files = list(self.files)
        rng.shuffle(files)
        buffer: list[list[int]] = []
        for block in self._raw_blocks(files):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(block)
                continue
            i = rng.randrange(self.shuffle_buffer)
            yield buffer[i]
            buffer[i] = block
        rng.shuffle(buffer)
        yield from buffer

    def _next_block(self) -> tuple[str, list[int]]:
        if self._iter is None:
            self._iter = self._epoch_blocks(self.epoch)
            for _ in range(self.consumed):  # resume: replay the seeded stream up to the cursor
                next(self._iter)
        block = next(self._iter, None)
        if block is None:  # exhausted: restart with a new shuffle
            self.epoch, self.consumed = self.epoch + 1, 0
            self._iter = self._epoch_blocks(self.epoch)
            block = next(self._iter)
        example_id = f"{self.epoch}:{self.consumed}"
        self.consumed += 1
        return example_id, block

    def draw(self, n: int, wrap: bool = True) -> Draw:
        epoch_before = self.epoch
        pairs = [self._next_block() for _ in range(n)]
        return Draw(self.name, [p[0] for p in pairs], [p[1] for p in pairs], self.epoch != epoch_before)

    def collate(self, draw: Draw, step: int) -> tuple[dict[str, torch.Tensor], int]:
        special_ids = torch.tensor(sorted(self.special_ids))
        inputs, labels = [], []
        for example_id, block in zip(draw.ids, draw.payload):
            # Each example is masked (before padding) from a generator seeded by its id alone, so
            # masks do not depend on batch composition, sharding or worker count, and a resumed
            # run masks exactly the same tokens.
            seq = torch.tensor(self.prefix + block + self.suffix, dtype=torch.long)
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.name, "mask", example_id))
            x, y = mask_tokens(seq, torch.isin(seq, special_ids), self.mlm_probability,
                               self.tokenizer.mask_token_id, len(self.tokenizer), gen)
            inputs.append(x.tolist())
            labels.append(y.tolist())
        batch = pad_batch(inputs, self.tokenizer.pad_token_id, labels)
        return batch, sum(map(len, inputs))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed, self._iter = int(state["epoch"]), int(state["consumed"]), None


def build_sources(cfg, tokenizer, label_lists: dict[str, list[str]] | None = None,
                  allow_new_labels: bool = False) -> dict:
    """Instantiate every configured source (reading and validating its data) in config order."""
    sources = {}
    for name, sc in cfg.sources.items():
        seed = derive_seed(cfg.routing.seed, "source", name)
        if sc.objective == "token-classification":
            if sc.format != "conll":
                raise DataError(f"sources.{name}.format: token-classification reads conll, got {sc.format!r}")
            labels = (label_lists or {}).get(name)
            sources[name] = load_labelled(name, sc, tokenizer, cfg.model.max_length, seed, labels,
                                          allow_new_labels)
        elif sc.objective == "masked-lm":
            if sc.format != "text":
                raise DataError(f"sources.{name}.format: masked-lm reads text, got {sc.format!r}")
            if tokenizer.mask_token_id is None:
                raise DataError(f"sources.{name}.objective: masked-lm needs a tokenizer with a mask token")
            sources[name] = TextStream(name, sc.train, tokenizer, cfg.model.max_length, seed,
                                       pattern=sc.text.glob, strip_gutenberg=sc.text.strip_gutenberg,
                                       shuffle_buffer=sc.text.shuffle_buffer,
                                       mlm_probability=sc.mlm_probability)
    return sources


__all__ = ["Batch", "Draw", "EpochCursor", "LabelledSource", "TextStream", "build_sources", "derive_seed"]
