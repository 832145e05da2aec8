"""The loop's own rules, unit by unit: how a step weights each source's loss (with a fake model whose
gradient says what it was scaled by), when a dev evaluation and a checkpoint fall due, and that a
step checkpoint saved by one trainer and restored into a new one continues identically."""

from __future__ import annotations

import pytest
import torch

from support import make_config
from routetune.config import load_config
from routetune.training import state
from routetune.training.engine import Trainer
from routetune.training.setup import prepare


def _trainer(path, run_dir, *overrides) -> Trainer:
    setup = prepare(load_config(path, ["train.fast_dropout=false", *overrides]))
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(setup, run_dir)


class _Fake(torch.nn.Module):
    """Stands in for the routed model: source s's loss is w * c[s], so dloss/dw is c[s]."""

    def __init__(self, constants: dict[str, float]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.constants = constants

    def forward(self, source, objective, tensors, distill=None):
        return self.w * self.constants[source]


def test_a_steps_loss_weights_each_source_by_its_examples_and_loss_weight(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{
        "routing.granularity": "example", "routing.weights": {"ner": 0.5, "general": 0.5},
        "routing.loss_weights": {"general": 3.0}, "train.batch_size": 8, "train.grad_accum": 3})
    trainer = _trainer(path, tmp_path / "run")
    fake = _Fake({"ner": 2.0, "general": 5.0})
    trainer.ddp = fake
    grads = []
    trainer.update = lambda losses, totals: grads.append(fake.w.grad.item())
    for step in range(4):
        parts = trainer.batches.next()
        counts = {p.source: len(p.example_ids) for p in parts}
        n = sum(counts.values())
        expected = sum(counts[s] / n * {"ner": 1.0, "general": 3.0}[s] * fake.constants[s] for s in counts)
        fake.w.grad = None
        losses = trainer.train_step(step, parts)
        assert grads[-1] == pytest.approx(expected, rel=1e-6), (step, counts)
        assert losses == {s: pytest.approx(fake.constants[s]) for s in counts}  # each source's mean loss
    assert len(grads) == 4


def test_when_evaluations_and_checkpoints_fall_due(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files)
    trainer = _trainer(path, tmp_path / "run", "train.eval_every_steps=4", "train.eval_each_epoch=false",
                       "train.save_every_steps=3", "train.max_steps=10")
    trainer.batches.next()  # the last draws: not the end of a pass
    assert [d for d in range(1, 10) if trainer.eval_due(d)] == [4, 8]
    assert trainer.eval_due(10)  # the last step of a run that has had no evaluation
    trainer.stopper.update({trainer.stopper.metric: 0.5}, 8)
    assert not trainer.eval_due(10)  # it has had one
    assert [d for d in range(1, 11) if trainer.checkpoint_due(d)] == [1, 3, 6, 9]
    trainer.time_checkpoint = True  # rank 0's clock said so (save_every_minutes)
    assert trainer.checkpoint_due(5)


def test_a_saved_step_restored_into_a_new_trainer_continues_identically(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"train.max_steps": 6, "train.eval_each_epoch": False})
    first = _trainer(path, tmp_path / "run")
    for step in range(2):
        first.train_step(step, first.batches.next())
    saved_rng = torch.get_rng_state()
    first.save(2)
    folder = first.ckpt_dir / state.step_folder(2)
    second = _trainer(path, tmp_path / "run")  # a new process's trainer: the set-up's initial weights
    assert second.restore(folder) == 2
    assert torch.equal(torch.get_rng_state(), saved_rng)  # prepare() reseeded; the checkpoint's state is back
    assert second.batches.state_dict() == first.batches.state_dict()
    assert second.scheduler.get_last_lr() == first.scheduler.get_last_lr()
    assert second.stats.keys() == first.stats.keys()
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    a_state, b_state = first.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert a_state and all(torch.equal(a_state[k]["exp_avg"], b_state[k]["exp_avg"]) for k in a_state)
    first.train_step(2, first.batches.next())
    torch.set_rng_state(saved_rng)  # the same dropout draws for the second trainer's step
    second.train_step(2, second.batches.next())
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), f"after one more step: {name}"
