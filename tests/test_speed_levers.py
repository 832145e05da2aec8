"""The speed levers of issue #8 keep the semantics they claim."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from routetune.data.sources import Encoded, MemorySource
from routetune.model.fast_dropout import FastDropout, fast_dropout, use_fast_dropout
from routetune.model.frozen_bf16 import FrozenBf16
from routetune.model.load import pick_attention


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_fast_dropout_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = fast_dropout(x, p)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1 / 65536
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    assert abs(float(y.mean()) - 1.0) < 0.01  # inverted dropout keeps the expectation


def test_fast_dropout_is_seeded_and_masks_gradients():
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(1)
    a = fast_dropout(x, 0.3)
    torch.manual_seed(1)
    b = fast_dropout(x, 0.3)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad == 0, a == 0)


def test_use_fast_dropout_switches_modules_and_is_identity_in_eval(tiny_model_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir)
    n = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert use_fast_dropout(model) == n > 0
    assert all(type(m) is FastDropout for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.eval()
    x = torch.randn(3, 5)
    assert torch.equal(FastDropout(0.5).eval()(x), x)


def _source(lengths, seed=0):
    return MemorySource("s", [Encoded(list(range(n)), []) for n in lengths], 0, seed)


def test_length_grouped_order_serves_every_example_once_per_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=1003).tolist()
    src = _source(lengths)
    src.group_by_length(8)
    for epoch in range(3):
        perm = src.permutation(epoch)
        assert sorted(perm.tolist()) == list(range(1003))
    # less padding than the plain permutation: sum over batches of (max length * batch size)
    plain = _source(lengths)

    def padded(order):
        return sum(max(lengths[i] for i in order[k:k + 8]) * len(order[k:k + 8]) for k in range(0, len(order), 8))

    assert padded(src.permutation(0).tolist()) < 0.7 * padded(plain.permutation(0).tolist())
    assert not np.array_equal(src.permutation(0), src.permutation(1))  # still shuffled per epoch


def test_frozen_bf16_casts_only_frozen_linears_and_restores_exact_weights():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    original = model[1].weight.data.clone()
    frozen = FrozenBf16(model)
    frozen.cast()
    assert model[1].weight.dtype == torch.bfloat16 and model[2].weight.dtype == torch.float32
    with frozen.fp32():
        assert torch.equal(model[1].weight, original)
    assert model[1].weight.dtype == torch.bfloat16
    x = torch.randint(0, 10, (3, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x)
    frozen.restore()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = model(x)
    assert torch.equal(fast, slow)  # the same bf16 operands autocast would have made
    assert torch.equal(model[1].weight, original)


def test_attention_choice():
    assert pick_attention("sdpa", True) == "sdpa"
    assert pick_attention("auto", False) == "sdpa"
    assert pick_attention("auto", True) == ("sdpa" if torch.cuda.is_available() else "eager")


def _lora_config(tmp_path, model_dir, **train):
    from test_peft import _config

    return _config(tmp_path, model_dir, True, {"method": "lora", "r": 4}, {}, precision="bf16", max_steps=4, **train)


def test_levers_keep_training_equivalent_and_checkpoints_fp32(tmp_path, tiny_llama_dir):
    """bf16 frozen copies change nothing: same losses, same adapter weights as autocast alone;
    checkpoints hold fp32 tensors."""
    from routetune.workflow import train

    runs = {}
    for flag in (True, False):
        (tmp_path / str(flag)).mkdir()
        run_dir, _ = train(_lora_config(tmp_path / str(flag), tiny_llama_dir, bf16_frozen_weights=flag))
        losses = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
        runs[flag] = ([e["sources"] for e in losses if e["event"] == "train"],
                      load_file(str(last / "adapter_model.safetensors")))
    (fast_losses, fast), (slow_losses, slow) = runs[True], runs[False]
    assert fast_losses and fast_losses == slow_losses
    for k in fast:
        assert fast[k].dtype == torch.float32
        assert torch.equal(fast[k], slow[k]), k


def test_sgd_optimizer(tmp_path, tiny_llama_dir):
    from routetune.config import load_config
    from routetune.train.engine import build_optimizer
    from routetune.train.setup import prepare

    cfg = load_config(_lora_config(tmp_path, tiny_llama_dir), ["train.optimizer=sgd", "train.momentum=0.9"])
    opt = build_optimizer(prepare(cfg).model, cfg.train)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9


def test_embedding_grad_buffer_matches_torch_and_reuses_storage():
    from routetune.model.embedding_grad import BufferedGradEmbedding, use_embedding_grad_buffer

    torch.manual_seed(0)
    plain = torch.nn.Embedding(50, 8, padding_idx=0)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = plain.weight  # tied like an MLM decoder
    ours = torch.nn.Embedding(50, 8, padding_idx=0)
    ours.load_state_dict(plain.state_dict())
    ours.__class__ = BufferedGradEmbedding
    head2 = torch.nn.Linear(8, 50, bias=False)
    head2.weight = ours.weight
    ids = torch.tensor([[0, 3, 3, 7, 49], [5, 0, 0, 3, 1]])  # repeats and padding rows

    def loss(emb, lin):
        return (lin(emb(ids).tanh()) ** 2).mean()

    loss(plain, head).backward()
    loss(plain, head).backward()  # two backward passes accumulate
    loss(ours, head2).backward()
    loss(ours, head2).backward()
    assert torch.allclose(ours.weight.grad, plain.weight.grad, atol=1e-7)
    first = ours.weight.grad.data_ptr()
    for emb in (plain, ours):
        emb.weight.grad = None  # optimizer.zero_grad(set_to_none=True)
    emb_only = lambda e: (e(ids) ** 3).sum()  # noqa: E731
    emb_only(plain).backward()
    emb_only(ours).backward()
    assert torch.allclose(ours.weight.grad, plain.weight.grad, atol=1e-6)
    assert ours.weight.grad.data_ptr() == first  # the same storage, no new allocation
    assert float(ours.weight.grad[0].abs().sum()) == 0.0  # padding row untouched
    assert type(ours(ids).grad_fn).__name__ == "_LookupBackward"
    ours.eval()
    assert type(ours(ids).grad_fn).__name__ == "EmbeddingBackward0"  # evaluation: torch's own path
    bert_like = torch.nn.Module()
    bert_like.get_input_embeddings = lambda: plain
    assert use_embedding_grad_buffer(bert_like) and type(plain) is BufferedGradEmbedding


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_for_inference_gives_the_same_outputs(tiny_model_dir, precision):
    """predict/serve hold bf16 weight copies: exactly the operands autocast would cast to."""
    from routetune.model.heads import build_model
    from routetune.model.inference import autocast, for_inference

    model = build_model(str(tiny_model_dir), 0)
    model.add_head("ner", "token-classification", ["O", "B-x", "I-x"], seed=1)
    model.eval()
    ids = torch.randint(5, 90, (3, 9))
    mask = torch.ones_like(ids)
    with torch.inference_mode(), autocast(precision):
        before = model.head_logits("ner", ids, mask)
    for_inference(model, precision)
    assert not any(p.requires_grad for p in model.parameters())
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    with torch.inference_mode(), autocast(precision):
        after = model.head_logits("ner", ids, mask)
    assert torch.equal(before, after)
