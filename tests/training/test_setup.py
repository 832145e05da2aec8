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


@pytest.mark.parametrize("method, base_dtype, held", [
    ("lora", "auto", "bfloat16"), ("ia3", "auto", "bfloat16"), ("prompt_tuning", "auto", "bfloat16"),
    ("adapter", "auto", "bfloat16"), ("bitfit", "auto", "float32"), ("dora", "auto", "float32"),
    ("full", "auto", "float32"), ("lora", "fp32", "float32")])
def test_a_frozen_base_is_held_once_in_the_training_precision(tmp_path, tiny_model_dir, ner_files, method,
                                                               base_dtype, held):
    """No fp32 copy of a frozen base: its weights are the training precision's (bf16 here); what trains (adapters,
    biases, virtual tokens, heads) and so its optimizer state is fp32. Full fine-tuning and DoRA keep fp32."""
    import torch

    from routetune.training.engine import Trainer

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{
        "peft.method": method, "model.base_dtype": base_dtype, "train.precision": "bf16", "train.device": "cpu"})
    setup = prepare(load_config(path))
    frozen = {p.dtype for p in setup.model.lm.parameters() if not p.requires_grad}
    trained = [p for p in setup.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert frozen <= {getattr(torch, held)} and (frozen or method == "full")
    trainer = Trainer(setup, tmp_path / "run")
    trainer.train_step(0, setup.batches.next())
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_weights_hold_every_weight_gradient_and_optimizer_state_in_bf16(tmp_path, tiny_model_dir, ner_files,
                                                                              method):
    """model.base_dtype=bf16 (torchtune's `dtype: bf16`): the trained parameters, their gradients and AdamW's
    state are bf16 too (half the bytes of fp32), and a step changes the weights."""
    import torch

    from routetune.training.engine import Trainer

    path = make_config(tmp_path, tiny_model_dir, ner_files, **{
        "peft.method": method, "model.base_dtype": "bf16", "train.precision": "bf16", "train.device": "cpu"})
    setup = prepare(load_config(path))
    assert {p.dtype for p in setup.model.parameters()} == {torch.bfloat16}
    trained = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    trainer = Trainer(setup, tmp_path / "run")
    trainer.train_step(0, setup.batches.next())
    state = trainer.optimizer.state_dict()["state"]
    assert state and {v.dtype for s in state.values() for k, v in s.items() if k != "step"} == {torch.bfloat16}
    after = dict(setup.model.named_parameters())
    assert any(not torch.equal(after[n], before) for n, before in trained.items())


@pytest.mark.parametrize("override, message", [
    ({"train.precision": "fp32"}, r"^model\.base_dtype=bf16: needs train\.precision bf16 \(it is fp32 here\)$"),
    ({"train.precision": "bf16", "model.quantize": "nf4", "peft.method": "lora"},
     r"^model\.base_dtype=bf16: not with model\.quantize")])
def test_bf16_weights_are_refused_where_they_cannot_apply(tmp_path, tiny_model_dir, ner_files, override, message):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"model.base_dtype": "bf16", "train.device": "cpu",
                                                               **override})
    with pytest.raises(ConfigError, match=message):
        prepare(load_config(path))
