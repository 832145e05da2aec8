"""The chunked causal-LM loss (model/lm_loss.py) against transformers' own loss."""

import pytest
import torch

from routetune.config import FreezeConfig, PeftConfig
from routetune.model import lm_loss
from routetune.model.routed import build_model
from routetune.model.lm_loss import linear_cross_entropy
from routetune.model.trainable import apply_method


def _reference(hidden, weight, targets):
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight).float(), targets)


@pytest.mark.parametrize("chunk", [1 << 25, 64])  # one piece; 16-row chunks (64 // vocab, floor 16)
def test_linear_cross_entropy_matches_cross_entropy_fp32(chunk, monkeypatch):
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(53, 24, generator=gen)
    weight = torch.randn(40, 24, generator=gen)
    targets = torch.randint(0, 40, (53,), generator=gen)
    got_h, got_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = linear_cross_entropy(got_h, got_w, targets)
    ref = _reference(ref_h, ref_w, targets)
    (2.5 * got).backward()  # the incoming gradient scales the stored one
    (2.5 * ref).backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(got_h.grad, ref_h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w.grad, ref_w.grad, rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_linear():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 32, generator=gen)
    weight = torch.randn(300, 32, generator=gen) * 0.2
    targets = torch.randint(0, 300, (40,), generator=gen)
    got_h, ref_h = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(got_h, weight, targets)  # frozen weight: the cached bf16 copy
        ref = _reference(ref_h, weight, targets)
    got.backward()
    ref.backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # the logit gradient is cast to bf16 before the backward matmul on both paths; the 1/n of the
    # mean is applied before that cast by autograd and after it here: bf16 roundings apart
    # (single elements near cancellation differ more; compared as a whole)
    assert (got_h.grad - ref_h.grad).norm() / ref_h.grad.norm() < 5e-3


@pytest.mark.parametrize("confident", [False, True])
def test_bf16_gradient_is_as_accurate_as_autocast(confident):
    """Against the exact fp32 gradient, the chunked loss under bf16 is no less accurate than
    transformers' path under autocast, also when most targets are predicted with p close to 1
    (where 1 - p must not be rounded away)."""
    gen = torch.Generator().manual_seed(2)
    # small integers: the logits are exact in bf16, so what differs is the gradient's rounding
    hidden = torch.randint(-2, 3, (500, 8), generator=gen).float()
    weight = torch.randint(-2, 3, (300, 8), generator=gen).float() * (2.0 if confident else 0.25)
    targets = (hidden @ weight.t()).argmax(-1) if confident else torch.randint(0, 300, (500,), generator=gen)
    exact_h, got_h, ref_h = (hidden.clone().requires_grad_() for _ in range(3))
    _reference(exact_h, weight, targets).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear_cross_entropy(got_h, weight, targets).backward()
        _reference(ref_h, weight, targets).backward()

    def error(h):
        return ((h.grad - exact_h.grad).norm() / exact_h.grad.norm()).item()

    # the mean's 1/n scales the bf16 result of the backward matmul here (a second rounding), the
    # fp32 logit gradient before its cast there: allow that, not more (rounding 1 - p away fails)
    assert error(got_h) <= 1.3 * error(ref_h), (error(got_h), error(ref_h))


def test_linear_cross_entropy_far_below_the_max_and_empty():
    # the target logit ~200 below the row's maximum: softmax underflows to 0, the exact path is used
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[200.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    targets = torch.tensor([1, 2])
    got = linear_cross_entropy(hidden, weight, targets)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(_reference(hidden, weight, targets).item(), rel=1e-6)
    # no scored rows: a zero loss that still backpropagates (transformers' mean would be NaN)
    h = torch.zeros(0, 2, requires_grad=True)
    empty = linear_cross_entropy(h, weight, torch.zeros(0, dtype=torch.long))
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(h.grad, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(torch.zeros(3, 4), weight, torch.zeros(3, dtype=torch.long))


def test_frozen_weight_is_cast_once_and_recast_after_a_change():
    weight = torch.randn(10, 4)
    first = lm_loss._cast_weight(weight, torch.bfloat16)
    assert lm_loss._cast_weight(weight, torch.bfloat16) is first
    with torch.no_grad():
        weight.add_(1.0)  # bumps the version counter
    again = lm_loss._cast_weight(weight, torch.bfloat16)
    assert again is not first and torch.equal(again, weight.to(torch.bfloat16))
    trained = torch.randn(10, 4, requires_grad=True)
    assert lm_loss._cast_weight(trained, torch.bfloat16).grad_fn is not None  # differentiable, not cached


def _batch():
    ids = torch.tensor([[5, 9, 14, 20, 31, 7, 11, 3], [6, 8, 10, 12, 3, 0, 0, 0]])
    mask = (torch.arange(8) < torch.tensor([[8], [5]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt: no loss on its tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("peft", [
    {"method": "none"},
    {"method": "lora", "r": 4},
    {"method": "prompt_tuning", "num_virtual_tokens": 3},
    {"method": "prefix_tuning", "num_virtual_tokens": 3},
])
def test_causal_lm_loss_equals_transformers_loss(tiny_llama_dir, peft):
    """Same loss and gradients as transformers' forward with labels, for full fine-tuning (the
    head is tied to the trained embeddings: both gradients reach one tensor), LoRA and the two
    virtual-token methods (prompt tuning shifts the positions)."""
    batch = _batch()
    results = []
    for fused in (True, False):
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        model = build_model(str(tiny_llama_dir), 0)
        apply_method(model, PeftConfig(**peft), FreezeConfig(), str(tiny_llama_dir))
        if peft["method"] == "lora":  # peft starts lora_B at zero; move it so every adapter tensor gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        model.eval()  # no dropout: both paths see the same network
        model.fused_lm_loss = fused
        assert (model._plain_lm_head() is not None) == fused
        loss = model.loss("text", "causal-lm", batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads))
    (fused_loss, fused_grads), (ref_loss, ref_grads) = results
    assert fused_loss == pytest.approx(ref_loss, rel=1e-6)
    assert fused_grads.keys() == ref_grads.keys() and fused_grads
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_unlisted_architectures_keep_transformers_loss(tiny_llama_dir):
    model = build_model(str(tiny_llama_dir), 0)
    assert model._plain_lm_head() is model.lm.lm_head
    model.config.model_type = "gemma2"  # soft-capped logits: not lm_head(hidden) alone
    assert model._plain_lm_head() is None
