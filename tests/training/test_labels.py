"""Label-set contracts: label2id stored per run; resume and init_from refuse changed label sets
unless new labels are explicitly allowed, which keeps old classes' weights exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from support import make_config
from routetune.config import load_config
from routetune.errors import DataError, RunError
from routetune.training.checkpoint import run_checkpoint
from routetune.training.setup import prepare
from routetune.workflow import resume_run, train


@pytest.fixture
def earlier(tmp_path, tiny_model_dir, ner_files):
    cfg = make_config(tmp_path / "a", tiny_model_dir, ner_files, **{"train.max_steps": 6})
    run_dir, _ = train(cfg)
    return run_dir


def _add_label(path):
    with path.open("a") as fh:
        fh.write("\nPhone\tB-product\nX\tI-product\n")


def test_labels_are_stored(earlier):
    labels = json.loads((earlier / "labels.json").read_text())
    assert labels == {"ner": ["O", "B-corporation", "I-corporation", "B-location", "I-location",
                              "B-person", "I-person"]}


def test_init_from_copies_backbone_and_heads(tmp_path, tiny_model_dir, ner_files, earlier):
    cfg = load_config(make_config(tmp_path / "b", tiny_model_dir, ner_files, **{"model.init_from": str(earlier)}))
    setup = prepare(cfg)
    best = load_file(str(run_checkpoint(earlier) / "heads.safetensors"))
    assert torch.equal(setup.model.heads["ner"].classifier.weight, best["ner.classifier.weight"])
    lm = load_file(str(run_checkpoint(earlier) / "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(setup.model.lm.state_dict()[key], lm[key])


def test_new_labels_refused_then_allowed_keeping_old_rows(tmp_path, tiny_model_dir, ner_files, earlier):
    _add_label(ner_files["train"])
    path = make_config(tmp_path / "c", tiny_model_dir, ner_files, **{"model.init_from": str(earlier)})
    with pytest.raises(
        DataError, match=r"train.conll: labels \['B-product', 'I-product'\] are not in .*--allow-new-labels"
    ):
        prepare(load_config(path))
    setup = prepare(load_config(path, ["model.allow_new_labels=true"]))
    head = setup.model.heads["ner"]
    assert head.labels[-2:] == ["B-product", "I-product"] and len(head.labels) == 9
    best = load_file(str(run_checkpoint(earlier) / "heads.safetensors"))
    assert torch.equal(head.classifier.weight[:7], best["ner.classifier.weight"])
    assert torch.equal(head.classifier.bias[:7], best["ner.classifier.bias"])


def test_resume_refuses_a_changed_label_set(tmp_path, tiny_model_dir, ner_files, earlier):
    _add_label(ner_files["train"])
    (earlier / "summary.json").unlink()  # as if it had been interrupted (a finished run is not resumed)
    with pytest.raises(RunError, match=r"label set of source 'ner' changed .*new: \['B-product', 'I-product'\]"):
        resume_run(earlier)
