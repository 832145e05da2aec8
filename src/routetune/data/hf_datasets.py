"""Sources read through Hugging Face `datasets` (``sources.NAME.dataset``).

``dataset.path`` is a folder written by ``save_to_disk``, a parquet / arrow / json(l) / csv file
(or glob), or a hub id (when the hub is reachable; offline it fails at once, naming
``HF_HUB_OFFLINE``). Its splits become the source's train / dev / test sets, and each row becomes
the same example routetune's own readers make, so routing, exact resume and the holdout rule
work as for files. Label names come from ``ClassLabel`` features when the column has one.
An error names the dataset, the split and the row (``data.parquet[train]:12: ...``).

``datasets`` is imported only by sources that name a dataset.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import tempfile
from pathlib import Path

from routetune import hub
from routetune.data import chat
from routetune.data.readers import Example, Sentence, iob1_to_iob2
from routetune.errors import ConfigError, DataError

FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
FIELDS = {"tags": ("tokens", "tags"), "classes": ("text", "label"), "prompts": ("prompt", "completion"),
          "text": ("text",)}


def load_splits(dc, key: str) -> dict:
    """The dataset's splits (name -> datasets.Dataset)."""
    try:
        import datasets  # a heavy optional import: only sources that name a dataset need it
    except ModuleNotFoundError:
        raise ConfigError(f"{key}: reading datasets needs the datasets package "
                          "(pip install 'routetune[datasets]')") from None

    path = Path(dc.path).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    files = (
        sorted(globlib.glob(str(path))) if any(c in dc.path for c in "*?[") else ([str(path)] if path.is_file() else [])
    )
    if files:
        builder = FILE_BUILDERS.get(Path(files[0]).suffix)
        if builder is None:
            raise ConfigError(f"{key}.path: {files[0]}: expected a parquet, arrow, json(l) or csv file "
                              "or a save_to_disk folder")
        return dict(datasets.load_dataset(builder, data_files={"train": files}))
    if path.exists():
        raise ConfigError(f"{key}.path: {path} is a folder but not one written by save_to_disk "
                          "(no dataset_dict.json or state.json)")
    if not hub.reachable():
        raise ConfigError(f"{key}.path: {dc.path!r} is no local dataset and the Hugging Face hub is unreachable "
                          "(HF_HUB_OFFLINE, no network): give a save_to_disk folder or a parquet/arrow/json/csv file")
    return dict(datasets.load_dataset(dc.path, dc.name))


def split_of(splits: dict, name: str, key: str, dc):
    if name not in splits:
        raise ConfigError(f"{key}: the dataset {dc.path} has no split {name!r} (splits: {', '.join(splits)})")
    return splits[name]


def _columns(ds, kind: str, mapping: dict, origin: str) -> tuple[str, ...]:
    want = tuple(mapping.get(f, f) for f in FIELDS[kind])
    missing = [c for c in want if c not in ds.column_names]
    if missing:
        raise DataError(f"no column {missing[0]!r} (columns: {', '.join(ds.column_names)}); map it with "
                        f"dataset.columns", origin)
    return want


def _names(ds, column: str):
    """Label names of a ClassLabel column (or a sequence of them), else None."""
    feature = ds.features[column]
    feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) / List(ClassLabel)
    return getattr(feature, "names", None)


def sentences(ds, mapping: dict, origin: str, scheme: str = "iob2") -> list[Sentence]:
    tok_col, tag_col = _columns(ds, "tags", mapping, origin)
    names = _names(ds, tag_col)
    out = []
    for i, row in enumerate(ds, start=1):
        tokens, tags = row[tok_col], row[tag_col]
        if names is not None:
            tags = [names[t] for t in tags]
        if not isinstance(tokens, list) or len(tokens) != len(tags):
            raise DataError(f"expected equal lists of tokens and tags, got {len(tokens or [])} and {len(tags or [])}",
                            origin, i)
        if tokens:
            out.append(Sentence([str(t) for t in tokens], iob1_to_iob2(tags) if scheme == "iob1" else list(tags), i))
    if not out:
        raise DataError("no sentences found", origin)
    return out


def examples(ds, mapping: dict, origin: str) -> list[Example]:
    text_col, label_col = _columns(ds, "classes", mapping, origin)
    names = _names(ds, label_col)
    out = []
    for i, row in enumerate(ds, start=1):
        text, label = row[text_col], row[label_col]
        label = names[label] if names is not None else str(label).strip()
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"column {text_col!r} is empty", origin, i)
        out.append(Example(text, label, f"{origin}:{i}"))
    if len({e.label for e in out}) < 2:
        raise DataError("fewer than two classes found; classification needs at least two", origin)
    return out


def _row_format(ds, mapping: dict) -> str | None:
    """chat when the rows hold `messages` (or ShareGPT's `conversations`), alpaca when they hold
    `instruction` and `output`, else None (prompt/completion pairs)."""
    have = set(ds.column_names)
    if mapping.get("messages", "messages") in have or "conversations" in have and "messages" not in mapping:
        return "chat"
    if {mapping.get("instruction", "instruction"), mapping.get("output", "output")} <= have:
        return "alpaca"
    return None


def prompts(ds, mapping: dict, origin: str, tokenizer=None) -> list[Example]:
    fmt = _row_format(ds, mapping)
    if fmt is not None:
        if fmt == "chat":
            chat.needs_template(tokenizer, origin)
        out = [chat.record(row, fmt, tokenizer, origin, i, mapping) for i, row in enumerate(ds, start=1)]
        if not out:
            raise DataError("no examples found", origin)
        return out
    if not {mapping.get(f, f) for f in FIELDS["prompts"]} <= set(ds.column_names):
        raise DataError(f"expected prompt and completion columns, a messages column (chat) or instruction and output "
                        f"(alpaca) (columns: {', '.join(ds.column_names)}); map them with dataset.columns, or map "
                        "`text` to train on plain text", origin)
    prompt_col, completion_col = _columns(ds, "prompts", mapping, origin)
    out = []
    for i, row in enumerate(ds, start=1):
        prompt, completion = row[prompt_col], row[completion_col]
        if not isinstance(completion, str) or not completion.strip():
            raise DataError(f"column {completion_col!r} is empty", origin, i)
        out.append(Example(str(prompt), None, f"{origin}:{i}", completion))
    if not out:
        raise DataError("no examples found", origin)
    return out


def text_file(ds, mapping: dict, origin: str) -> Path:
    """A text column written once to a file in routetune's cache (named by the SHA-256 of its
    content), one row per paragraph, so that a dataset's text is streamed, split by the holdout
    rule and resumed exactly as a text file is."""
    (column,) = _columns(ds, "text", mapping, origin)
    folder = hub.cache_dir() / "dataset-text"
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    rows = 0
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for batch in ds.select_columns([column]).iter(batch_size=1000):
                for value in batch[column]:
                    if value is not None and not isinstance(value, str):
                        raise DataError(f"column {column!r} holds {type(value).__name__}, expected text", origin)
                    text = (value or "").strip()
                    if text:
                        piece = text + "\n\n"
                        fh.write(piece)
                        digest.update(piece.encode())
                        rows += 1
        if not rows:
            raise DataError(f"column {column!r} holds no text", origin)
        target = folder / f"{digest.hexdigest()[:32]}.txt"
        os.replace(tmp, target)  # the same content always lands on the same name
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
