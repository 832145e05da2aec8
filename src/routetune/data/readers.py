"""File formats -> examples. Every problem is a :class:`DataError` naming file:line.

Lines are read as bytes and decoded one by one so that bad UTF-8 is reported with its line
number; a leading BOM and CRLF line ends are accepted.
"""

from __future__ import annotations

import glob as globlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from routetune.errors import DataError

_TAG = re.compile(r"^(O|[BI]-\S+)$")
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF", re.IGNORECASE)


@dataclass(frozen=True)
class Sentence:
    tokens: list[str]
    tags: list[str]
    line: int  # 1-based line of the first token, for messages


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text without line end), decoding UTF-8 strictly per line."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    if path.is_dir():
        raise DataError("expected a file, got a folder", path)
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"invalid UTF-8 at byte {exc.start} of the line", path, number) from None
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield number, text.rstrip("\r\n")


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 uses B- only between two adjacent entities of one type; IOB2 starts every entity with B-."""
    out = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def read_conll(
    path: str | Path,
    token_column: int = 0,
    tag_column: int = -1,
    scheme: str = "iob2",
    separator: str | None = None,
) -> list[Sentence]:
    """Read a CoNLL-style file: one token per line, columns split by `separator` (default whitespace),
    blank lines between sentences, `-DOCSTART-` lines ignored."""
    need = max(token_column if token_column >= 0 else -token_column - 1,
               tag_column if tag_column >= 0 else -tag_column - 1) + 1
    need = max(need, 2)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0

    def flush() -> None:
        nonlocal tokens, tags
        if tokens:
            fixed = iob1_to_iob2(tags) if scheme == "iob1" else tags
            sentences.append(Sentence(tokens, fixed, start))
        tokens, tags = [], []

    for number, line in iter_lines(path):
        if not line.strip():
            flush()
            continue
        cols = line.split(separator) if separator is not None else line.split()
        cols = [c.strip() for c in cols]
        if cols[0] == "-DOCSTART-":
            flush()
            continue
        if len(cols) < need:
            raise DataError(
                f"expected at least {need} columns (token column {token_column}, tag column {tag_column}), "
                f"got {len(cols)}: {line[:80]!r}", path, number)
        token, tag = cols[token_column], cols[tag_column]
        if not token:
            raise DataError("empty token", path, number)
        if not _TAG.match(tag):
            raise DataError(f"expected a tag 'O', 'B-TYPE' or 'I-TYPE', got {tag[:40]!r}", path, number)
        if not tokens:
            start = number
        tokens.append(token)
        tags.append(tag)
    flush()
    if not sentences:
        raise DataError("no sentences found (the file is empty or holds only blank lines)", path)
    return sentences


def resolve_text_files(spec: str, pattern: str = "*.txt") -> list[Path]:
    """A file, a folder (searched recursively with `pattern`) or a glob -> sorted list of files."""
    p = Path(spec)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob(pattern) if f.is_file())
        if not files:
            raise DataError(f"no files matching {pattern!r} in this folder", p)
        return files
    files = sorted(Path(f) for f in globlib.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise DataError("no such file, folder, or matching glob", spec)
    return files


def iter_text(path: str | Path, strip_gutenberg: bool = False) -> Iterator[str]:
    """Stream the lines of a text file, lazily; optionally only those between the Gutenberg markers."""
    if not strip_gutenberg:
        for _, line in iter_lines(path):
            yield line
        return
    inside = False
    seen_start = False
    for number, line in iter_lines(path):
        if not inside:
            if _GUTENBERG_START.match(line):
                inside = seen_start = True
            continue
        if _GUTENBERG_END.match(line):
            return
        yield line
    if not seen_start:
        raise DataError("strip_gutenberg is set but no '*** START OF' marker line was found", path)
