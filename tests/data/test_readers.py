import pytest

from routetune.data.readers import iob1_to_iob2, iter_text, read_conll, resolve_text_files
from routetune.errors import DataError


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_conll_docstart_blank_lines_crlf_bom_tab_only_lines(tmp_path):
    data = "\ufeff-DOCSTART- O\r\n\r\nJohn\tB-person\r\nruns\tO\r\n\t\r\n\r\n\r\nParis\tB-location\r\n"
    p = write(tmp_path, "a.conll", data.encode("utf-8"))
    sents = read_conll(p)
    assert [s.tokens for s in sents] == [["John", "runs"], ["Paris"]]
    assert [s.tags for s in sents] == [["B-person", "O"], ["B-location"]]
    assert sents[1].line == 8


def test_conll_configurable_columns_and_spaces(tmp_path):
    p = write(tmp_path, "b.conll", b"1 John NNP B-PER\n2 runs VBZ O\n")
    sents = read_conll(p, token_column=1, tag_column=3)
    assert sents[0].tokens == ["John", "runs"] and sents[0].tags == ["B-PER", "O"]


def test_iob1_to_iob2():
    assert iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-PER"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-PER"]


def test_conll_iob1_scheme(tmp_path):
    p = write(tmp_path, "c.conll", b"New I-LOC\nYork I-LOC\nis O\nbig O\n")
    assert read_conll(p, scheme="iob1")[0].tags == ["B-LOC", "I-LOC", "O", "O"]


@pytest.mark.parametrize("data, line, expected", [
    (b"John B-PER\nruns\n", 2, "expected at least 2 columns"),
    (b"John B-PER\nruns X-PER\n", 2, "expected a tag"),
    (b"ok O\n\xff\xfe bad O\n", 2, "invalid UTF-8"),
])
def test_conll_errors_name_file_and_line(tmp_path, data, line, expected):
    p = write(tmp_path, "bad.conll", data)
    with pytest.raises(DataError) as err:
        read_conll(p)
    assert f"{p}:{line}:" in str(err.value) and expected in str(err.value)
    assert err.value.line == line


@pytest.mark.parametrize("data", [b"", b"\n\n  \n", b"-DOCSTART- O\n\n"])
def test_conll_empty_files(tmp_path, data):
    p = write(tmp_path, "empty.conll", data)
    with pytest.raises(DataError, match="no sentences"):
        read_conll(p)


def test_conll_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_conll(tmp_path / "nope.conll")


def test_text_gutenberg_strip(tmp_path):
    p = write(tmp_path, "g.txt", b"header\n***START OF THE PROJECT GUTENBERG EBOOK X***\nbody one\nbody two\n"
                                 b"*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence\n")
    assert list(iter_text(p, strip_gutenberg=True)) == ["body one", "body two"]
    assert len(list(iter_text(p))) == 6


def test_text_gutenberg_missing_marker(tmp_path):
    p = write(tmp_path, "g.txt", b"just text\n")
    with pytest.raises(DataError, match="START OF"):
        list(iter_text(p, strip_gutenberg=True))


def test_resolve_text_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/a.txt", "d/sub/b.txt", "d/c.md"):
        (tmp_path / name).write_text("x")
    assert [f.name for f in resolve_text_files(str(tmp_path / "d"))] == ["a.txt", "b.txt"]
    assert [f.name for f in resolve_text_files(str(tmp_path / "d" / "*.md"))] == ["c.md"]
    with pytest.raises(DataError, match="no such file"):
        resolve_text_files(str(tmp_path / "missing*"))


# ---- line endings: every reader reads LF, CRLF, CR-only and mixed files alike ---------------

def _endings(text: str, style: str) -> bytes:
    lines = text.split("\n")
    if style == "lf":
        out = "\n".join(lines)
    elif style == "crlf":
        out = "\r\n".join(lines)
    elif style == "cr":
        out = "\r".join(lines)
    else:  # mixed: each line end chosen in turn (never a CR right before an LF: that is one CRLF)
        ends = ["\r", "\r\n", "\n"]
        out = "".join(line + (ends[i % 3] if i < len(lines) - 1 else "") for i, line in enumerate(lines))
    return out.encode("utf-8")


def _read_conll(p):
    return [(s.tokens, s.tags, s.line) for s in read_conll(p)]


def _read_text(p):
    return list(iter_text(p))


def _read_fielded(fmt):
    def read(p):
        from routetune.data.readers import read_examples

        return [(e.text, e.label, e.origin.rsplit(":", 1)[1]) for e in read_examples(str(p), fmt)]
    return read


def _read_lines_per_class(p):
    from routetune.data.readers import read_examples

    return [(e.text, e.label, e.origin.rsplit(":", 1)[1]) for e in read_examples(str(p.parent / "*.txt*"),
                                                                                  "lines-per-class")]


def _read_folders(p):
    from routetune.data.readers import read_examples

    return [(e.text, e.label) for e in read_examples(str(p.parent.parent), "folders")]


def _read_prompt_completion(p):
    from routetune.data.readers import read_prompt_completions

    return [(e.text, e.completion, e.origin.rsplit(":", 1)[1]) for e in read_prompt_completions(str(p))]


READERS = {
    "conll": ("a.conll", "John B-person\nruns O\n\nParis B-location\nrocks O\n\n\nBob B-person", _read_conll),
    "text": ("a.txt", "one line\n\ntwo line\nthree", _read_text),
    "jsonl": ("a.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": "neg"}', _read_fielded("jsonl")),
    "csv": ("a.csv", "text,label\ngood film,pos\n\"bad, sad\",neg\nfine,pos", _read_fielded("csv")),
    "tsv": ("a.tsv", "text\tlabel\ngood film\tpos\nbad\tneg", _read_fielded("tsv")),
    "lines-per-class": ("a.txt.pos", "great\nfine\n\nsuperb", _read_lines_per_class),
    "folders": ("classes/pos/a.txt", "a good\nfilm", _read_folders),
    "prompt-completion": ("pc.jsonl", '{"prompt": "Q1", "completion": "A1"}\n{"prompt": "Q2", "completion": "A2"}',
                          _read_prompt_completion),
}


@pytest.mark.parametrize("style", ["crlf", "cr", "mixed"])
@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_reads_any_line_ending_like_lf(tmp_path, reader, style):
    name, text, read = READERS[reader]
    results = {}
    for s in ("lf", style):
        folder = tmp_path / s
        p = folder / name
        p.parent.mkdir(parents=True)
        p.write_bytes(_endings(text, s))
        if reader == "lines-per-class":
            (folder / "a.txt.neg").write_bytes(_endings("awful\nbad", s))
        if reader == "folders":
            (folder / "classes" / "neg").mkdir()
            (folder / "classes" / "neg" / "b.txt").write_bytes(_endings("a bad\nfilm", s))
        results[s] = read(p)
    assert results[style] == results["lf"]
    assert len(results["lf"]) >= 2


@pytest.mark.parametrize("style", ["crlf", "cr", "mixed"])
def test_line_numbers_in_errors_count_any_line_ending(tmp_path, style):
    p = write(tmp_path, "bad.conll", _endings("John B-PER\nruns O\n\nParis X-LOC", style))
    with pytest.raises(DataError) as err:
        read_conll(p)
    assert err.value.line == 4
