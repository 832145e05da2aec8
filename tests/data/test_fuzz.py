"""Hostile inputs: every reader and the config loader raise only routetune's own errors
(ValueError subclasses whose message names the file, as FILE:LINE where a line is at fault, and
the key for configs), never KeyError, IndexError,
UnicodeDecodeError or anything else. A fast subset runs by default; `-m slow` runs 10,000+
inputs per target."""

import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routetune.config import apply_override, load_config, parse_config
from routetune.data.readers import (iter_text, read_conll, read_examples, read_prompt_completions,
                                    resolve_text_files, text_range)
from routetune.errors import RoutetuneError
from routetune.serve.predictor import parse_line

# the slow run's size: 10,000 inputs per target (make test-slow); CI sets ROUTETUNE_FUZZ_INPUTS lower
FAST, SLOW = 150, int(os.environ.get("ROUTETUNE_FUZZ_INPUTS", "10000"))
TMP = Path(tempfile.mkdtemp(prefix="routetune-fuzz-"))

# Bytes that look like the formats: tokens, tags, separators, line ends, BOM, bad UTF-8.
pieces = st.sampled_from([b"John", b"B-PER", b"I-LOC", b"O", b"X-Y", b"B-", b"\t", b" ", b"  ", b"\n", b"\r\n",
                          b"\r", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xc3\xa9", b"-DOCSTART-", b"***START OF X***",
                          b"*** END OF", b"\x00", b"#", b"a" * 300])
files = st.one_of(st.binary(max_size=400), st.lists(pieces, max_size=60).map(b"".join))

json_lines = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "text": st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.integers())),
                "label": st.one_of(st.sampled_from(["a", "b", ""]), st.integers(), st.floats(), st.booleans()),
                "prompt": st.one_of(st.text(max_size=10), st.integers()),
                "completion": st.one_of(st.text(max_size=10), st.none()),
            },
        ),
        st.integers(),
        st.text(max_size=5),
    ),
    max_size=8,
).map(lambda rows: "\n".join(__import__("json").dumps(r) for r in rows).encode())
csv_lines = st.lists(st.lists(st.sampled_from(["text", "label", "a", "b", '"', '"x,y"', "", " ", "\t"]), max_size=4),
                     max_size=6).map(lambda rows: "\n".join(",".join(r) for r in rows).encode())

KEYS = ["model", "name", "max_length", "sources", "ner", "objective", "train", "dev", "routing", "weights",
        "strategy", "schedule", "kind", "end", "stages", "until", "counts", "repeat", "choose", "temperature",
        "granularity", "epochs", "lr", "batch_size", "early_stopping", "metric", "patience", "conll", "text",
        "token_column", "scheme", "x", "0"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["token-classification", "masked-lm", "iid", "linear",
                                                           "stages", "fast", "1e-3", "-1", "nan", "inf"]))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                     max_leaves=25)
yaml_texts = st.one_of(st.text(max_size=300), trees.map(lambda t: yaml.safe_dump(t, allow_unicode=True)))


def _file(data: bytes) -> Path:
    path = TMP / "input.dat"
    path.write_bytes(data)
    return path


def _only_ours(fn, *args, where: str | None = None, **kwargs):
    """Only routetune's own errors escape, each with a message; with `where`, the message names
    that file (as `FILE:LINE: ...` or `FILE: ...`) or input."""
    try:
        fn(*args, **kwargs)
    except RoutetuneError as exc:
        assert str(exc)  # always a message
        if where is not None:
            assert where in str(exc), (where, str(exc))
    # anything else propagates and fails the test


def conll_case(data, scheme, token_column, tag_column):
    path = _file(data)
    _only_ours(read_conll, path, token_column=token_column, tag_column=tag_column, scheme=scheme, where=str(path))


def text_case(data, strip):
    path = _file(data)
    _only_ours(lambda p: list(iter_text(p, strip_gutenberg=strip)), path, where=str(path))
    _only_ours(lambda p: list(text_range(p, 0.3, 0.9, strip)), path, where=str(path))


def examples_case(data, fmt):
    path = _file(data)
    _only_ours(read_examples, str(path), fmt, where=str(path))


def folder_case(files_data):
    root = TMP / "folders"
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    for i, (label, data) in enumerate(files_data):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i}.txt").write_bytes(data)
    _only_ours(read_examples, str(root), "folders", where=str(root))
    _only_ours(read_examples, str(root / "*" / "*.txt"), "lines-per-class")


def prompts_case(data):
    path = _file(data)
    _only_ours(read_prompt_completions, str(path), where=str(path))


def config_case(text):
    path = TMP / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else None
    if path.exists():
        _only_ours(load_config, path, where=str(path))


def tree_case(tree, override):
    _only_ours(parse_config, tree)
    if isinstance(tree, dict):
        _only_ours(apply_override, tree, override)


def predict_case(line, fmt):
    _only_ours(parse_line, line, fmt, "<fuzz>", 1, where="<fuzz>:1: ")


CASES = {
    "conll": (conll_case, (files, st.sampled_from(["iob1", "iob2"]), st.integers(-3, 3), st.integers(-3, 3))),
    "text": (text_case, (files, st.booleans())),
    "classification": (
        examples_case,
        (st.one_of(files, json_lines, csv_lines), st.sampled_from(["csv", "tsv", "jsonl"])),
    ),
    "class-folders": (folder_case, (st.lists(st.tuples(st.sampled_from(["pos", "neg", "x"]), files), max_size=4),)),
    "prompt-completion": (prompts_case, (st.one_of(files, json_lines),)),
    "config-text": (config_case, (yaml_texts,)),
    "config-tree": (tree_case, (trees, st.text(max_size=30))),
    "predict-line": (
        predict_case,
        (
            st.one_of(st.text(max_size=200), trees.map(lambda t: yaml.safe_dump(t))),
            st.sampled_from(["auto", "lines", "jsonl"]),
        ),
    ),
}


def _run(name, n):
    fn, strategies = CASES[name]
    settings(max_examples=n, deadline=None, database=None,
             suppress_health_check=list(HealthCheck))(given(*strategies)(fn))()


@pytest.mark.parametrize("name", CASES)
def test_fuzz_fast(name):
    _run(name, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_fuzz_10000(name):
    _run(name, SLOW)


def test_resolve_text_files_only_ours(tmp_path, monkeypatch):
    # from an empty folder: "" and the globs are relative to it, and an empty folder stands in for
    # "/" (a folder is searched recursively; the whole file system would take half a minute)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    for spec in ["", str(tmp_path / "empty"), "\x00", "*", "**/*.nothing", str(TMP / "missing"), "[", "~nobody/x"]:
        _only_ours(resolve_text_files, spec)
