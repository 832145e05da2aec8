"""The set-up before the first step (training/setup.py) on its own: the exact number of steps and
the source table it logs, heads per labelled source with only what the method trains trainable, and
mistakes refused before any training with one line naming the key."""

from __future__ import annotations

import logging

import pytest

from support import make_config
from routetune.config import load_config
from routetune.errors import ConfigError
from routetune.training.setup import prepare


def test_steps_and_the_source_table(tmp_path, tiny_model_dir, ner_files, caplog):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.epochs": 2, "train.batch_size": 4,
                                                                "routing.weights": {"ner": 0.5, "general": 0.5}})
    logging.getLogger("routetune").setLevel(logging.INFO)
    with caplog.at_level(logging.INFO, logger="routetune"):
        setup = prepare(load_config(path))
    rows = {r["source"]: r for r in setup.source_table}
    assert rows["ner"]["share"] == rows["general"]["share"] == 0.5
    # epochs count passes over the primary source: 2 passes of ceil(size / 4) batches, about half the steps
    assert setup.primary_batches_per_epoch == -(-rows["ner"]["size"] // 4)
    assert rows["ner"]["expected_passes"] == pytest.approx(2, rel=0.35)
    assert setup.total_steps >= 2 * setup.primary_batches_per_epoch
    assert any(m.startswith("source ner") for m in caplog.messages)


def test_heads_and_what_trains(tmp_path, tiny_model_dir, ner_files):
    setup = prepare(load_config(make_config(tmp_path, tiny_model_dir, ner_files, **{"peft.method": "lora"})))
    assert list(setup.model.heads) == ["ner"] and setup.model.heads["ner"].labels == setup.sources["ner"].labels
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("heads.ner") for n in trainable)
    assert not any(n.startswith("lm.") and "lora_" not in n and ".encoder." in n for n in trainable)


@pytest.mark.parametrize("override, message", [
    ({"train.early_stopping.metric": "ner/nope"}, "train.early_stopping.metric: 'ner/nope' is not a dev metric"),
    ({"peft.method": "nope"}, "peft.method: expected one of"),
    ({"sources.general.text.stream": True, "train.primary": "general"}, "the primary source must be sized"),
])
def test_mistakes_are_refused_naming_the_key(tmp_path, tiny_model_dir, ner_files, override, message):
    with pytest.raises(ConfigError, match=message):
        prepare(load_config(make_config(tmp_path, tiny_model_dir, ner_files, **override)))
