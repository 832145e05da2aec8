"""export.py on its own, over small runs made once: which folders each method's export writes (and
the marker naming the run), a refusal before anything is written for what a method cannot export,
and `--overwrite` replacing an earlier export whole."""

from __future__ import annotations

import json

import pytest
import yaml

from support import GENERAL
from routetune.errors import RunError
from routetune.export import EXPORT_MARKER, _replaceable, export


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    from routetune.workflow import train

    root = tmp_path_factory.mktemp("export")
    (root / "t.txt").write_text(GENERAL)
    out = {}
    for method in ("lora", "prompt_tuning", "adapter"):
        cfg = {"model": {"name": str(tiny_llama_dir), "max_length": 24},
               "sources": {"lm": {"objective": "causal-lm", "train": str(root / "t.txt"), "text": {"stream": False}}},
               "peft": {"method": method}, "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32",
                                                     "device": "cpu", "progress": False},
               "run": {"name": method, "output_dir": str(root / "runs")}}
        (root / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
        out[method] = train(root / f"{method}.yaml")[0]
    return out


@pytest.mark.parametrize("merge, parts", [(False, {"adapter"}), (True, {"lm"})])
def test_what_an_export_writes(runs, tmp_path, merge, parts):
    written = export(runs["lora"], tmp_path / "out", "last", merge=merge)
    assert {p.rpartition("/")[2] for p in written} == parts
    marker = json.loads((tmp_path / "out" / EXPORT_MARKER).read_text())
    assert marker == {"run": "lora", "checkpoint": "last", "merge": merge, "method": "lora"}
    assert all((tmp_path / "out" / part / "README.md").is_file() for part in parts)
    assert not list(tmp_path.glob(".tmp-export-*"))  # the temporary folder is gone


@pytest.mark.parametrize("method, merge, message", [("prompt_tuning", True, "cannot be merged into the weights"),
                                                    ("adapter", False, "cannot be merged into plain transformers")])
def test_what_a_method_cannot_export_is_refused_before_anything_is_written(runs, tmp_path, method, merge, message):
    with pytest.raises(RunError, match=message):
        export(runs[method], tmp_path / "out", "last", merge=merge)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-export-*"))


def test_overwrite_replaces_an_earlier_export_whole(runs, tmp_path):
    export(runs["lora"], tmp_path / "out", "last", merge=True)
    with pytest.raises(RunError, match="exists and is not empty; pass --overwrite"):
        export(runs["lora"], tmp_path / "out", "last")
    assert _replaceable(tmp_path / "out")
    export(runs["lora"], tmp_path / "out", "last", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter", EXPORT_MARKER]
    assert not list(tmp_path.glob(".old-export-*"))
