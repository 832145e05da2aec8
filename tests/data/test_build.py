"""config -> sources, dev and test sets (data/build.py) on its own: each source built by the builder
of its kind of examples, labelled holdout splits that are seeded, disjoint and complete, labels
carried from an earlier run (new ones refused unless allowed), and an objective the backbone cannot
train named by its key."""

from __future__ import annotations

import pytest

from support import make_config
from routetune.config import load_config
from routetune.data.build import build, resolve_objective
from routetune.data.sources import LabelledSource
from routetune.data.text import TextStream
from routetune.errors import ConfigError, DataError


def _build(tmp_path, tiny_model_dir, files, tokenizer, earlier=None, allow_new=False, **over):
    cfg = load_config(make_config(tmp_path, tiny_model_dir, files, **over))
    objectives = {n: resolve_objective(sc.objective, False, n) for n, sc in cfg.sources.items()}
    return build(cfg, tokenizer, objectives, earlier, allow_new)


def test_each_source_is_built_by_its_kind(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer):
    sources, dev, test = _build(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer)
    assert isinstance(sources["ner"], LabelledSource) and sources["ner"].labels[0] == "O"
    assert isinstance(sources["general"], (TextStream,)) or len(sources["general"]) > 0
    assert "ner" in dev and dev["ner"].items


def test_a_holdout_split_is_seeded_disjoint_and_complete(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer):
    over = {"sources.ner.dev": None, "sources.ner.holdout": {"dev": 0.25, "test": 0.25, "seed": 5}}
    one = _build(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer, **over)
    two = _build(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer, **over)
    train, dev, test = one[0]["ner"], one[1]["ner"].items, one[2]["ner"].items
    assert dev == two[1]["ner"].items and test == two[2]["ner"].items
    n = len(train) + len(dev) + len(test)
    assert len(dev) == round(0.25 * n) == len(test)
    other = _build(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer,
                   **{**over, "sources.ner.holdout": {"dev": 0.25, "test": 0.25, "seed": 6}})
    assert other[1]["ner"].items != dev


def test_labels_of_an_earlier_run_come_first_and_new_ones_need_allowing(tmp_path, tiny_model_dir, ner_files,
                                                                      tiny_tokenizer):
    sources, _, _ = _build(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer)
    found = sources["ner"].labels
    earlier = {"ner": ["O", "B-XYZ", "I-XYZ"]}
    with pytest.raises(DataError, match="are not in the label set of the earlier run's head for source 'ner'"):
        _build(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer, earlier)
    merged = _build(tmp_path, tiny_model_dir, ner_files, tiny_tokenizer, earlier, allow_new=True)[0]["ner"].labels
    assert merged[:3] == earlier["ner"] and set(merged) == set(found) | set(earlier["ner"])


def test_an_objective_the_backbone_cannot_train_names_its_key():
    with pytest.raises(ConfigError, match=r"^sources\.gen\.objective: "):
        resolve_objective("causal-lm", False, "gen")
    with pytest.raises(ConfigError, match=r"^evals\.held\.objective: "):
        resolve_objective("masked-lm", True, "evals.held")
