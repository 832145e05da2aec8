"""The "how to add" recipes of docs/architecture.md, tried: a new parameter-sharing method and a
new objective, each added as one object and one registry row, train, save, load and score like
the built-in ones. Plus: every registry and the config choices that name it agree."""

import json
import typing

import pytest
import yaml

from routetune import objectives
from routetune.config import Config, RoutingConfig
from routetune.data.router import STRATEGIES
from routetune.model import methods
from routetune.model.heads import HEADS
from routetune.model.methods.base import TrainedTensors


class NormsOnly(TrainedTensors):
    """A toy method: only the backbone's normalisation layers train (LayerNorm / RMSNorm)."""

    name = "norms_only"

    def trains(self, name: str) -> bool:
        return "norm" in name.lower()


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
def test_a_new_method_is_one_object_and_one_registry_row(tmp_path, tiny_model_dir, tiny_llama_dir, decoder,
                                                         monkeypatch):
    from support.methods import check_method_contract

    monkeypatch.setitem(methods.METHODS, NormsOnly.name, NormsOnly())  # the registry line
    check_method_contract(tmp_path, tiny_llama_dir if decoder else tiny_model_dir, decoder,
                          {"method": "norms_only"}, {}, "norms")  # the contract-table row


def test_an_unknown_method_names_the_key_and_the_choices(tmp_path, tiny_model_dir):
    from support.methods import _config

    from routetune.errors import ConfigError
    from routetune.workflow import train

    path = _config(tmp_path, tiny_model_dir, False, {"method": "lroa"}, {})
    with pytest.raises(ConfigError, match=r"peft.method: expected one of full, lora, .*got 'lroa'"):
        train(path)
    assert not (tmp_path / "runs").exists()


def test_a_new_objective_is_one_row(tmp_path, tiny_model_dir, class_files, monkeypatch):
    """A classification objective whose headline is macro F1: the default early-stopping metric,
    the dev metrics and `routetune eval` follow the row."""
    from routetune.workflow import evaluate_run, train

    row = objectives.Objective("balanced-classification", dict.fromkeys(objectives.CLASS_FORMATS, "classes"),
                               ("macro_f1", "accuracy"), head="sequence-classification")
    monkeypatch.setitem(objectives.OBJECTIVES, row.name, row)
    cfg = {"model": {"name": str(tiny_model_dir), "max_length": 24},
           "sources": {"cls": {"objective": row.name, "train": str(class_files["jsonl"]),
                               "dev": str(class_files["dev"]), "test": str(class_files["dev"])}},
           "train": {"precision": "fp32", "device": "cpu", "max_steps": 4, "batch_size": 4, "eval_every_steps": 2,
                     "progress": False},
           "run": {"name": "r", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir, summary = train(path)
    assert summary["best"]["metric"] == "cls/macro_f1"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dev = next(e for e in events if e["event"] == "eval")
    assert set(dev["metrics"]) == {"cls/macro_f1", "cls/accuracy"}
    scores = evaluate_run(run_dir, "test")["cls"]
    assert scores["macro_f1"] == pytest.approx(summary["test"]["cls"]["macro_f1"])


def test_registries_and_config_choices_agree():
    for name, o in objectives.OBJECTIVES.items():
        assert o.name == name and o.formats, name
        assert o.head is None or o.head in HEADS, name
        assert (o.head is None) == (o.lm_loss is not None or o.backbone == "follow"), name
    fields = Config.model_fields["sources"].annotation.__args__[1].model_fields
    assert fields["objective"].json_schema_extra["choices"] == objectives.names()
    assert set(typing.get_args(RoutingConfig.model_fields["strategy"].annotation)) == set(STRATEGIES)
    for name, m in methods.METHODS.items():
        assert m.name == name and m.checkpoint in ("full", "adapter", "trained"), name


def test_a_new_reader_is_one_function_one_table_line_and_the_format_in_its_objective(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    import dataclasses

    from routetune.data import readers
    from routetune.data.readers import Example
    from routetune.workflow import train

    def pipe_separated(path, text_field, label_field, pattern):
        for number, line in readers.iter_lines(path):
            label, _, text = line.partition("|")
            yield Example(text, label, f"{path}:{number}")

    monkeypatch.setitem(readers.CLASS_READERS, "psv", pipe_separated)
    row = objectives.OBJECTIVES["sequence-classification"]
    monkeypatch.setitem(objectives.OBJECTIVES, row.name,
                        dataclasses.replace(row, formats={**row.formats, "psv": "classes"}))
    data = tmp_path / "train.psv"
    data.write_text("".join(f"{y}|{t}\n" for t, y in [("a great film", "pos"), ("the worst store", "neg")] * 6))
    cfg = {"model": {"name": str(tiny_model_dir), "max_length": 24},
           "sources": {"cls": {"objective": "sequence-classification", "format": "psv", "train": str(data)}},
           "train": {"precision": "fp32", "device": "cpu", "max_steps": 2, "batch_size": 4, "progress": False},
           "run": {"name": "r", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir, summary = train(path)
    assert summary["steps"] == 2
    assert json.loads((run_dir / "labels.json").read_text()) == {"cls": ["neg", "pos"]}
