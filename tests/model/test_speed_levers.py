"""The speed levers (docs/benchmarks.md) keep the semantics they claim."""

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from routetune.data.sources import Encoded, MemorySource
from routetune.model.fast_dropout import FastDropout, fast_dropout, use_fast_dropout
from routetune.model.frozen_bf16 import FrozenBf16
from routetune.model.routed import build_model
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
    """LoRA in bf16 over an fp32 base (`model.base_dtype: fp32`): the levers act on fp32 frozen weights
    (a base held in bf16 needs no bf16 copies), and last-bit differences stay last-bit differences
    (a bf16 residual stream would round them up into bf16 steps)."""
    from support.methods import _config

    path = _config(tmp_path, model_dir, True, {"method": "lora", "r": 4}, {}, precision="bf16", max_steps=4, **train)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["base_dtype"] = "fp32"
    path.write_text(yaml.safe_dump(cfg))
    return path


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


def test_bf16_frozen_weights_say_where_they_are_skipped(tmp_path, tiny_llama_dir, caplog):
    from support.methods import _config

    from routetune.workflow import train

    skipped = "train.bf16_frozen_weights: skipped in fp32"
    with caplog.at_level(logging.INFO, logger="routetune"):
        train(_config(tmp_path, tiny_llama_dir, True, {"method": "lora", "r": 4}, {}, max_steps=1))
    assert skipped in caplog.text  # fp32 (the default on CPUs without native bf16) has no casts to save
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="routetune"):
        train(_config(tmp_path, tiny_llama_dir, True, {"method": "lora", "r": 4}, {}, max_steps=1, precision="bf16"),
              overwrite=True)
    assert "train.bf16_frozen_weights" not in caplog.text


def test_sgd_optimizer(tmp_path, tiny_llama_dir):
    from routetune.config import load_config
    from routetune.training.optimizer import build_optimizer
    from routetune.training.setup import prepare

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
    from routetune.model.routed import build_model
    from routetune.device import autocast
    from routetune.model.inference import for_inference

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


def _qkv(b=2, h=3, n=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none", "causal"])
def test_math_attention_without_dropout_equals_sdpa(mask_kind):
    """The attention function behind fast attention dropout computes what SDPA computes."""
    from routetune.model.attention import math_attention

    q, k, v = _qkv()
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "bool":
        mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
        mask[1, :, :, 5:] = False  # padding keys of the second sequence
    elif mask_kind == "float":
        mask = torch.zeros(2, 1, 7, 7)
        mask[0, :, :, 4:] = -1e4
    ours = math_attention(torch.nn.Module(), q, k, v, mask, 0.0, 0.3, causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                                           is_causal=causal).transpose(1, 2)
    assert torch.allclose(ours, ref, atol=1e-5)
    ours.sum().backward()
    assert q.grad is not None and v.grad is not None


def test_fast_attention_dropout_is_used_only_while_training_with_dropout(tiny_model_dir, monkeypatch):
    import routetune.model.attention as attention
    from routetune.model.attention import use_fast_attention_dropout

    model = build_model(str(tiny_model_dir), seed=0)
    ids = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    model.eval()
    before = model.lm_logits(ids, mask)
    assert use_fast_attention_dropout(model.lm)
    assert model.lm.config._attn_implementation == attention.NAME
    calls = []
    real = attention.math_attention
    monkeypatch.setattr(attention, "math_attention", lambda *a: calls.append(a[5]) or real(*a))
    assert torch.equal(model.lm_logits(ids, mask), before)  # evaluation: transformers' SDPA, unchanged
    assert not calls
    model.train()
    torch.manual_seed(5)
    a = model.lm_logits(ids, mask)
    torch.manual_seed(5)
    b = model.lm_logits(ids, mask)
    assert calls and all(p == model.lm.config.attention_probs_dropout_prob for p in calls)
    assert torch.equal(a, b) and not torch.allclose(a, before)  # seeded, and dropout does act
    # an eager model, or one without attention dropout, is left alone
    eager = build_model(str(tiny_model_dir), seed=0, attention="eager")
    assert not use_fast_attention_dropout(eager.lm)


def test_clipping_inside_fused_adamw_equals_clip_grad_norm(tmp_path, tiny_llama_dir, monkeypatch):
    """With the fused AdamW the optimizer divides the gradients by the clip factor (grad_scale);
    the weights after training are those of torch's clip_grad_norm_ followed by the same step."""
    from routetune.training.engine import Trainer
    from routetune.workflow import train

    def run(name, in_optimizer, max_grad_norm):
        folder = tmp_path / name
        folder.mkdir()
        real_init = Trainer.__init__

        def init(self, *a, **k):
            real_init(self, *a, **k)
            assert self.clip_in_optimizer  # the default with fused AdamW
            self.clip_in_optimizer = in_optimizer

        monkeypatch.setattr(Trainer, "__init__", init)
        run_dir, _ = train(_lora_config(folder, tiny_llama_dir, max_grad_norm=max_grad_norm))
        monkeypatch.undo()
        return load_file(str(sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "adapter_model.safetensors"))

    fused, torch_clip = run("fused", True, 1e-3), run("torch", False, 1e-3)
    unclipped = run("none", True, None)
    for k in fused:
        assert torch.allclose(fused[k], torch_clip[k], rtol=1e-5, atol=1e-7), k
    assert any(not torch.allclose(fused[k], unclipped[k]) for k in fused)  # clipping did act


_HUGE_PAGE_PROBE = """
import os
import sys
if sys.argv[1] == "routetune":
    import routetune  # noqa: F401
import torch
t = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
t += 1
print(next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")),
      os.environ.get("THP_MEM_ALLOC_ENABLE", "unset"))
"""


@pytest.mark.parametrize("setting", [None, "0"])
def test_importing_routetune_gives_large_buffers_huge_pages(setting, tmp_path):
    """routetune/__init__.py switches on torch's THP allocation (madvise for buffers >= 2 MB) unless
    the user set THP_MEM_ALLOC_ENABLE; checked on the kernel's own accounting of the process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or not Path("/proc/self/smaps_rollup").exists() or "[never]" in mode.read_text():
        pytest.skip("transparent huge pages are not available on this kernel")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    env["OMP_NUM_THREADS"] = "1"
    probe = tmp_path / "probe.py"
    probe.write_text(_HUGE_PAGE_PROBE)

    def probe_run(*args) -> tuple[int, str]:
        kb, switch = subprocess.run([sys.executable, str(probe), *args], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
        return int(kb), switch

    def huge_kb(*args) -> int:
        return probe_run(*args)[0]

    with_routetune, switch = probe_run("routetune")
    # in every kernel mode: routetune keeps the user's setting, and switches torch's on when there is none
    assert switch == ("0" if setting == "0" else "1")
    if setting == "0":
        if "[madvise]" in mode.read_text():  # with "always" the kernel uses huge pages regardless
            assert with_routetune == 0 and huge_kb("plain") == 0
    else:
        assert with_routetune > 0
        if "[madvise]" in mode.read_text():
            assert huge_kb("plain") == 0  # torch alone does not ask for them
