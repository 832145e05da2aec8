"""Plain text for language modelling: tokenised into blocks of `max_length` tokens.

* :class:`TextStream` reads lazily with a seeded shuffle buffer, so a corpus larger than memory
  works (its size is unknown; it restarts with a new shuffle when exhausted).
* :class:`TextBlocks` loads all blocks into memory: a sized source with an exact per-epoch shuffle
  (small domain corpora, and the primary source).

Both collate for their objective: masked-LM (15% of tokens, 80/10/10, masks drawn per example
from its id) or causal-LM (labels = inputs; the model shifts them).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import torch

from routetune.data.collate import mask_sequence, pad_batch
from routetune.data.readers import text_range
from routetune.data.sources import Draw, Encoded, MemorySource, special_affixes
from routetune.seeds import derive_seed
from routetune.errors import DataError

_CHUNK_CHARS = 1 << 16  # tokenise ~64 KB at a time


def text_parts(files: list[Path], start: float = 0.0, end: float = 1.0) -> list[tuple[Path, float, float]]:
    return [(f, start, end) for f in files]


def iter_blocks(parts: list[tuple[Path, float, float]], tokenizer, content: int, strip_gutenberg: bool
                ) -> Iterator[list[int]]:
    """Token blocks of `content` tokens, file by file (a file's short tail of >= 8 tokens too)."""
    for path, start, end in parts:
        carry: list[int] = []
        chunk: list[str] = []
        size = 0
        for line in text_range(path, start, end, strip_gutenberg):
            chunk.append(line)
            size += len(line) + 1
            if size >= _CHUNK_CHARS:
                carry.extend(_tokenize(tokenizer, chunk))
                chunk, size = [], 0
                while len(carry) >= content:
                    yield carry[:content]
                    carry = carry[content:]
        carry.extend(_tokenize(tokenizer, chunk))
        while len(carry) >= content:
            yield carry[:content]
            carry = carry[content:]
        if len(carry) >= 8:
            yield carry


def _tokenize(tokenizer, lines: list[str]) -> list[int]:
    text = "\n".join(lines).strip()
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []


class _LMCollate:
    """Turns token blocks into a masked-LM or causal-LM batch."""

    def _setup_lm(self, name: str, objective: str, tokenizer, max_length: int, seed: int, mlm_probability: float):
        if objective not in ("masked-lm", "causal-lm"):
            raise ValueError(f"text sources train masked-lm or causal-lm, not {objective!r}")
        if objective == "masked-lm" and tokenizer.mask_token_id is None:
            raise DataError(f"sources.{name}.objective: masked-lm needs a tokenizer with a mask token")
        self.name, self.objective, self.tokenizer, self.seed = name, objective, tokenizer, seed
        self.mlm_probability = mlm_probability
        self.prefix, self.suffix = special_affixes(tokenizer)
        self.content = max_length - len(self.prefix) - len(self.suffix)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def lm_batch(self, ids: list, blocks: list[list[int]]) -> tuple[dict[str, torch.Tensor], int]:
        seqs = [self.prefix + b + self.suffix for b in blocks]
        if self.objective == "causal-lm":
            batch = pad_batch(seqs, self.tokenizer.pad_token_id, seqs)
            return batch, sum(map(len, seqs))
        inputs, labels = [], []
        for example_id, seq in zip(ids, seqs):
            # Masks come from the example id alone: a resumed run masks exactly the same tokens.
            x, y = mask_sequence(seq, self.special_ids, self.mlm_probability, self.tokenizer.mask_token_id,
                                 len(self.tokenizer), derive_seed(self.seed, self.name, "mask", example_id))
            inputs.append(x)
            labels.append(y)
        return pad_batch(inputs, self.tokenizer.pad_token_id, labels), sum(map(len, inputs))


class TextStream(_LMCollate):
    """Lazy blocks with a seeded shuffle buffer; restarts with a new shuffle when exhausted."""

    def __init__(self, name: str, parts: list[tuple[Path, float, float]], tokenizer, max_length: int, seed: int, *,
                 objective: str = "masked-lm", strip_gutenberg: bool = False, shuffle_buffer: int = 1024,
                 mlm_probability: float = 0.15):
        self._setup_lm(name, objective, tokenizer, max_length, seed, mlm_probability)
        self.parts = parts
        self.files = [p for p, _, _ in parts]
        self.strip_gutenberg = strip_gutenberg
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.consumed = 0
        self._iter: Iterator[list[int]] | None = None
        if next(self._raw(self.parts), None) is None:
            raise DataError(f"no text found in {len(self.files)} file(s)", self.files[0] if self.files else None)

    def _raw(self, parts) -> Iterator[list[int]]:
        return iter_blocks(parts, self.tokenizer, self.content, self.strip_gutenberg)

    def _epoch_blocks(self, epoch: int) -> Iterator[list[int]]:
        rng = random.Random(derive_seed(self.seed, self.name, epoch))
        parts = list(self.parts)
        rng.shuffle(parts)
        buffer: list[list[int]] = []
        for block in self._raw(parts):
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
        return self.lm_batch(draw.ids, draw.payload)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed, self._iter = int(state["epoch"]), int(state["consumed"]), None


class TextBlocks(_LMCollate, MemorySource):
    """All blocks in memory: a sized source with an exact seeded shuffle per epoch."""

    def __init__(self, name: str, parts: list[tuple[Path, float, float]], tokenizer, max_length: int, seed: int, *,
                 objective: str = "causal-lm", strip_gutenberg: bool = False, mlm_probability: float = 0.15):
        self._setup_lm(name, objective, tokenizer, max_length, seed, mlm_probability)
        self.files = [p for p, _, _ in parts]
        blocks = list(iter_blocks(parts, tokenizer, self.content, strip_gutenberg))
        if not blocks:
            raise DataError(f"no text found in {len(self.files)} file(s)", self.files[0] if self.files else None)
        MemorySource.__init__(self, name, [Encoded(b, []) for b in blocks], tokenizer.pad_token_id, seed)

    def collate(self, draw: Draw, step: int) -> tuple[dict[str, torch.Tensor], int]:
        return self.lm_batch(draw.ids, [self.encoded[i].input_ids for i in draw.ids])
