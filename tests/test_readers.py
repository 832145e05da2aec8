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
