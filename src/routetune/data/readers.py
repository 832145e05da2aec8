"""File formats -> examples. Every problem is a :class:`DataError` naming file:line.

Lines are read as bytes and decoded one by one so that bad UTF-8 is reported with its line
number; a leading BOM is accepted, and LF, CRLF and CR-only line ends (mixed too) each end a line.
"""

from __future__ import annotations

import glob as globlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from routetune.data.catalog import hint
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
        raise DataError("file not found" + hint(path), path)
    if path.is_dir():
        raise DataError("expected a file, got a folder", path)
    number = 0
    with path.open("rb") as fh:
        for raw in fh:  # split on LF; a CR inside what is left ends a line too (CR-only and mixed files)
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            for piece in raw.split(b"\r"):
                number += 1
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"invalid UTF-8 at byte {exc.start} of the line", path, number) from None
                if number == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                yield number, text


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
        raise DataError("no such file, folder, or matching glob" + hint(spec), spec)
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


# ---- classification and prompt/completion formats --------------------------------------------


@dataclass(frozen=True)
class Example:
    text: str
    label: str | None
    origin: str  # "file:line" (or the file, for one-example-per-file layouts), for messages
    completion: str | None = None
    trained: tuple[tuple[int, int], ...] = ()  # character spans of `text` also trained on (earlier chat replies)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    import json

    for number, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", path, number) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, number)
        yield number, obj


def _field(obj: dict, name: str, path: Path, number: int, kind: str = "a string") -> str:
    if name not in obj:
        raise DataError(f"missing field {name!r} (fields: {', '.join(map(str, obj)) or 'none'})", path, number)
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"field {name!r}: expected {kind}, got {type(value).__name__}", path, number)
    return str(value)


def _delimited_records(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    import csv
    import io

    header: list[str] | None = None
    for number, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            row = next(csv.reader(io.StringIO(line), delimiter=delimiter))
        except csv.Error as exc:
            raise DataError(f"cannot parse the line ({exc})", path, number) from None
        if header is None:
            header = [h.strip() for h in row]
            continue
        if len(row) != len(header):
            raise DataError(f"expected {len(header)} columns ({', '.join(header)}), got {len(row)}", path, number)
        yield number, dict(zip(header, row))
    if header is None:
        raise DataError("empty file: expected a header line naming the columns", path)


def _fielded(delimited: str | None):
    """csv / tsv (a header names the columns) or jsonl (one object per line): the named fields."""
    def read(path: Path, text_field: str, label_field: str, pattern: str) -> Iterator[Example]:
        records = _jsonl_records(path) if delimited is None else _delimited_records(path, delimited)
        for number, rec in records:
            text = _field(rec, text_field, path, number)
            label = _field(rec, label_field, path, number, "a string or an integer").strip()
            if not text.strip():
                raise DataError(f"field {text_field!r} is empty", path, number)
            if not label:
                raise DataError(f"field {label_field!r} is empty", path, number)
            yield Example(text, label, f"{path}:{number}")
    return read


def _folders(path: Path, text_field: str, label_field: str, pattern: str) -> Iterator[Example]:
    """One sub-folder per class, one file per example."""
    if not path.is_dir():
        raise DataError("expected a folder with one sub-folder per class", path)
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        for f in sorted(q for q in class_dir.rglob(pattern) if q.is_file()):
            text = "\n".join(line for _, line in iter_lines(f)).strip()
            if text:
                yield Example(text, class_dir.name, str(f))


def _lines_per_class(path: Path, text_field: str, label_field: str, pattern: str) -> Iterator[Example]:
    """One file per class named by its suffix (e.g. `rt-polarity.pos`), one example per line."""
    for f in resolve_text_files(str(path), "*"):
        label = f.suffix.lstrip(".") or f.stem
        for number, line in iter_lines(f):
            if line.strip():
                yield Example(line.strip(), label, f"{f}:{number}")


CLASS_READERS = {"jsonl": _fielded(None), "csv": _fielded(","), "tsv": _fielded("\t"), "folders": _folders,
                 "lines-per-class": _lines_per_class}
"""`format` of a classification source -> reader (path, text field, label field, glob) -> Examples.
Adding a reader: a function here, a line in this table, and the format in the rows of the
objectives that read it (objectives.py)."""


def read_examples(spec: str, fmt: str, text_field: str = "text", label_field: str = "label",
                  pattern: str = "*.txt") -> list[Example]:
    """Labelled texts by the reader of `fmt` (CLASS_READERS), checked: some examples, two classes."""
    if fmt not in CLASS_READERS:
        raise DataError(f"unknown classification format {fmt!r}", spec)
    out = list(CLASS_READERS[fmt](Path(spec), text_field, label_field, pattern))
    if not out:
        raise DataError("no examples found", spec)
    if len({e.label for e in out}) < 2:
        raise DataError(f"only one class ({out[0].label!r}) found; classification needs at least two", spec)
    return out


def read_prompt_completions(spec: str, prompt_field: str = "prompt", completion_field: str = "completion"
                            ) -> list[Example]:
    path = Path(spec)
    out = []
    for number, rec in _jsonl_records(path):
        prompt = _field(rec, prompt_field, path, number)
        completion = _field(rec, completion_field, path, number)
        if not completion.strip():
            raise DataError(f"field {completion_field!r} is empty", path, number)
        out.append(Example(prompt, None, f"{path}:{number}", completion))
    if not out:
        raise DataError("no examples found (the file is empty or holds only blank lines)", path)
    return out


def text_range(path: str | Path, start: float, end: float, strip_gutenberg: bool = False) -> Iterator[str]:
    """Lines of a text file whose starting byte lies in [start, end) of the file (fractions), so a
    file can be split into train / held-out parts by a fixed, documented rule."""
    size = Path(path).stat().st_size
    lo, hi = start * size, end * size
    offset = 0
    lines = iter_text(path, strip_gutenberg) if strip_gutenberg else (line for _, line in iter_lines(path))
    for line in lines:
        here = offset
        offset += len(line.encode("utf-8")) + 1
        if lo <= here < hi:
            yield line
        elif here >= hi:
            return
