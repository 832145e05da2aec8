"""train.grad_accum: k micro-batches per step give the update one batch gives (the reference is
the same run with grad_accum 1), for every objective and both routing granularities."""

from __future__ import annotations

import pytest
import torch

from support import make_config
from routetune.config import load_config


def _weights_after(path, accum: int, steps: int = 3) -> dict:
    """Each step's accumulated gradients (captured before the update), for `steps` steps."""
    from routetune.training.engine import Trainer
    from routetune.training.setup import prepare

    setup = prepare(load_config(path, [f"train.grad_accum={accum}", f"train.max_steps={steps}",
                                       "train.fast_dropout=false", "train.eval_each_epoch=false"]))
    for m in setup.model.modules():  # dropout off: the two runs must see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer = Trainer(setup, path.parent / f"run-{accum}")
    (path.parent / f"run-{accum}").mkdir()
    grads, update = {}, trainer.update

    def capture(parts, losses):
        for n, p in setup.model.named_parameters():
            if p.grad is not None:
                grads[f"{len(grads)}:{n}"] = p.grad.detach().clone()
        update(parts, losses)

    trainer.update = capture
    for step in range(steps):
        trainer.train_step(step, setup.batches.next())
    return grads


@pytest.mark.parametrize("granularity", ["batch", "example"])
def test_grad_accum_equals_one_batch_encoder(tmp_path, tiny_model_dir, ner_files, granularity):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{
        "train.batch_size": 8, "routing.granularity": granularity, "routing.weights": {"ner": 0.5, "general": 0.5}})
    one = _weights_after(path, 1)
    assert one
    for k in (2, 3, 8):
        many = _weights_after(path, k)
        for name, w in one.items():
            torch.testing.assert_close(many[name], w, rtol=1e-4, atol=1e-7, msg=f"grad_accum={k}: {name}")


def test_grad_accum_equals_one_batch_causal_lm_and_classification(tmp_path, tiny_llama_dir, class_files):
    import yaml

    from support import GENERAL

    text = tmp_path / "t.txt"
    text.write_text(GENERAL)
    cfg = {"model": {"name": str(tiny_llama_dir), "max_length": 24},
           "sources": {"cls": {"objective": "sequence-classification", "train": str(class_files["jsonl"])},
                       "lm": {"objective": "causal-lm", "train": str(text), "text": {"stream": False}}},
           "routing": {"weights": {"cls": 0.5, "lm": 0.5}, "seed": 2},
           "peft": {"method": "lora", "r": 2},
           "train": {"precision": "fp32", "device": "cpu", "batch_size": 6, "lr": 1e-2, "progress": False},
           "run": {"name": "x", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = _weights_after(path, 1, steps=4)
    many = _weights_after(path, 3, steps=4)
    for name, w in one.items():
        torch.testing.assert_close(many[name], w, rtol=1e-4, atol=1e-7, msg=name)
