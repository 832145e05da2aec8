"""Router benchmark: decision cost per example, and flat memory while streaming a large corpus.

The stream check uses a word-level tokenizer by default (see word_tokenizer); pass
--tokenizer FOLDER to stream through a real one.

    .venv/bin/python bench/router.py                 # decision costs + a 1 GB generated corpus
    .venv/bin/python bench/router.py --corpus-mb 64  # a quicker memory check

Prints microseconds per routing decision for each strategy (per-example granularity, i.e. one
decision per example), and the process RSS at 10%, 25%, 50%, 75% and 100% of the corpus
streamed through TextStream (tokenised into blocks, shuffled through the seeded buffer).
"""

from __future__ import annotations

import argparse
import os
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from routetune.data.mixing import Schedule  # noqa: E402
from routetune.data.router import AdaptiveRouter, IIDRouter, InterleavedRouter  # noqa: E402


def decision_costs(sources: int = 3, decisions: int = 1_000_000, slots: int = 256) -> dict[str, float]:
    names = [f"s{i}" for i in range(sources)]
    p = np.arange(1, sources + 1, dtype=float)
    p /= p.sum()
    routers = {
        "iid": IIDRouter(names, Schedule("constant", p), 0, 10**9),
        "iid+linear schedule": IIDRouter(names, Schedule("linear", p, p[::-1].copy()), 0, 10**9),
        "interleaved": InterleavedRouter(names, Schedule("constant", p), 0, 10**9),
        "adaptive": AdaptiveRouter(names, Schedule("constant", p), 0, 10**9, 0.5, 0.05, 0.9, 10),
    }
    out = {}
    for label, router in routers.items():
        steps = decisions // slots
        t0 = time.perf_counter()
        for step in range(steps):
            router.choose(step, slots)
            router.observe(step, {names[step % sources]: 1.0})
        out[label] = (time.perf_counter() - t0) / (steps * slots) * 1e6
    per_batch = IIDRouter(names, Schedule("constant", p), 0, 10**9)
    t0 = time.perf_counter()
    for step in range(100_000):
        per_batch.choose(step, 1)
    out["iid, one decision per batch"] = (time.perf_counter() - t0) / 100_000 * 1e6
    return out


def make_corpus(path: Path, megabytes: int) -> list[str]:
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    chunk = []
    for _ in range(2000):
        chunk.append(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + ".")
    block = ("\n".join(chunk) + "\n").encode()
    with path.open("wb") as fh:
        written = 0
        while written < megabytes * 2**20:
            fh.write(block)
            written += len(block)
    return words


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over the corpus vocabulary: the reader, block splitting and
    shuffle buffer under test are the real ones, only tokenisation is cheap, so 1 GB streams in
    minutes rather than the hour a WordPiece tokenizer needs on two cores."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def stream_rss(megabytes: int, tokenizer_path: str | None) -> list[tuple[float, float]]:
    from routetune.data.text import TextStream, text_parts
    from routetune.model.load import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        words = make_corpus(corpus, megabytes)
        tok = load_tokenizer(tokenizer_path) if tokenizer_path else word_tokenizer(words)
        size = corpus.stat().st_size
        stream = TextStream("general", text_parts([corpus]), tok, 128, seed=0, shuffle_buffer=1024)
        proc = psutil.Process(os.getpid())
        marks = [0.1, 0.25, 0.5, 0.75, 1.0]
        rows = []
        blocks = 0
        t0 = time.perf_counter()
        while stream.epoch == 0:
            stream.draw(256)
            blocks += 256
            done = _progress(stream, size)
            while marks and done >= marks[0]:
                rows.append((marks.pop(0), proc.memory_info().rss / 2**20))
        if marks:
            rows.append((1.0, proc.memory_info().rss / 2**20))
        print(f"streamed {size / 2**20:.0f} MB into {blocks} blocks of 128 tokens in {time.perf_counter() - t0:.0f} s")
        return rows


def _progress(stream, size: int) -> float:
    # blocks consumed x block bytes is unknown; use the open file position of the reader instead
    for obj in _open_files():
        if obj.path.endswith("corpus.txt"):
            return obj.position / size
    return 1.0


def _open_files():
    return psutil.Process(os.getpid()).open_files()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-mb", type=int, default=1024)
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder (default: a word-level tokenizer over the generated vocabulary)")
    ap.add_argument("--skip-stream", action="store_true")
    args = ap.parse_args()
    print("decision cost, microseconds per example (3 sources, 1M decisions, 256 per call):")
    for label, us in decision_costs().items():
        print(f"  {label:<30} {us:6.3f} us")
    if not args.skip_stream:
        rows = stream_rss(args.corpus_mb, args.tokenizer)
        print(f"RSS while streaming a generated {args.corpus_mb} MB corpus:")
        for frac, rss in rows:
            print(f"  {frac:>5.0%} streamed   RSS {rss:7.1f} MB")
        growth = rows[-1][1] - rows[0][1]
        print(f"  growth from 10% to 100%: {growth:+.1f} MB")


if __name__ == "__main__":
    main()
