"""Self-distillation on language-modelling sources (`sources.NAME.distill`): the loss against a
direct computation with the plain base model as the teacher, for each way the teacher is held."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from routetune.config import load_config
from routetune.errors import ConfigError
from routetune.training.checkpoint import run_checkpoint
from routetune.training.setup import prepare
from routetune.workflow import train


def _config(tmp_path, model_dir, peft, distill=1.0, cls_extra=None):
    """test_peft's two-source config (classification + general text), fp32, general distilled."""
    from support.methods import _config as peft_config

    path = peft_config(tmp_path, model_dir, None, peft, {}, precision="fp32")
    cfg = yaml.safe_load(path.read_text())
    cfg["sources"]["general"]["distill"] = distill
    cfg["sources"]["cls"].update(cls_extra or {})
    path.write_text(yaml.safe_dump(cfg))
    return path


CASES = [  # (decoder, peft): the teacher is the model with adapters/prompt off, or a frozen copy
    (True, {"method": "lora", "r": 4}),
    (True, {"method": "prefix_tuning", "num_virtual_tokens": 3}),
    (True, {"method": "none"}),
    (False, {"method": "lora", "r": 4}),
    (False, {"method": "bitfit"}),
    (False, {"method": "none"}),
]


@pytest.mark.parametrize(
    "decoder, peft", CASES, ids=[f"{'decoder' if d else 'encoder'}-{p['method']}" for d, p in CASES]
)
def test_distill_loss_matches_direct_computation(tmp_path, tiny_model_dir, tiny_llama_dir, decoder, peft):
    model_dir = tiny_llama_dir if decoder else tiny_model_dir
    model = prepare(load_config(_config(tmp_path, model_dir, peft))).model
    objective = "causal-lm" if decoder else "masked-lm"
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    if decoder:
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.full_like(ids, -100)
        labels[:, [1, 4, 6]] = ids[:, [1, 4, 6]]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()  # dropout off: the comparison is exact

    if peft["method"] != "prefix_tuning":  # (a prefix starts random: it changes the model at once)
        # at the start the model is its own teacher: the KL term is zero
        assert model.distill_loss(objective, batch, 1.0).item() == pytest.approx(0.0, abs=1e-6)

    with torch.no_grad():  # move every trainable tensor: the student now differs from the teacher
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    share = 0.3
    loss = model.distill_loss(objective, batch, share)

    plain = (AutoModelForCausalLM if decoder else AutoModelForMaskedLM).from_pretrained(model_dir).eval()
    with torch.no_grad():
        teacher = plain(input_ids=ids, attention_mask=mask).logits
        student = model.lm_logits(ids, mask)
    if decoder:
        teacher, student, targets = teacher[:, :-1], student[:, :-1], labels[:, 1:]
    else:
        targets = labels
    keep = targets != -100
    p_t = teacher[keep].softmax(-1)
    log_q = student[keep].log_softmax(-1)
    kl = (p_t * (p_t.log() - log_q)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(student[keep], targets[keep])
    assert kl.item() > 1e-4
    assert loss.item() == pytest.approx(((1 - share) * ce + share * kl).item(), rel=1e-4)

    loss.backward()  # gradients reach the trained tensors; the teacher's switches are put back
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # the frozen copy (full fine-tuning, bitfit) is not part of the module: not saved or trained
    assert not any("teacher" in n for n in model.state_dict())


def test_distilled_training_run_saves_only_the_student(tmp_path, tiny_llama_dir):
    """A LoRA run with general text distilled trains, logs a general loss that is a KL (>= 0,
    small: the adapter starts as the identity), and its checkpoint is the usual adapter folder."""
    run_dir, _ = train(_config(tmp_path, tiny_llama_dir, {"method": "lora", "r": 4}))
    folder = run_checkpoint(run_dir, "last")
    assert (folder / "adapter_config.json").is_file()
    assert all("lora_" in k for k in load_file(str(folder / "adapter_model.safetensors")))
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    general = [e["sources"]["general"]["loss"] for e in losses
               if e.get("event") == "train" and e.get("sources", {}).get("general", {}).get("loss") is not None]
    assert general and all(0.0 <= v < 0.5 for v in general)


def test_distill_on_a_supervised_source_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"sources\.cls.*distill: self-distillation applies to language-modelling"):
        load_config(_config(tmp_path, tiny_model_dir, {"method": "none"}, cls_extra={"distill": 0.5}))


def test_distill_with_adaptive_routing_is_refused(tmp_path, tiny_model_dir):
    path = _config(tmp_path, tiny_model_dir, {"method": "none"})
    cfg = yaml.safe_load(path.read_text())
    cfg["routing"]["strategy"] = "adaptive"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"sources\.general\.distill: the adaptive strategy rewards"):
        load_config(path)
