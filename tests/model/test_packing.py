"""Padding-free batches (model/packing.py): the same per-example logits, losses and gradients as
the padded batch, for every objective, on an encoder and a decoder, with full fine-tuning and
LoRA; the model types and methods it does not cover train padded and say so."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml

from routetune.config import load_config
from routetune.model.lm_loss import SCORED_INDEX, scored_positions
from routetune.model import packing
from routetune.model.attention import use_packed_attention
from routetune.model.packing import PACKED, Layout
from routetune.training.setup import prepare
from routetune.training.weighting import micro_batches
from support.sample_files import GENERAL, write_ner

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
TEXTS = {"pos": ["a great film", "what a truly wonderful and moving story of two old friends", "fine",
                 "the best cast i have seen in years , funny and warm"],
         "neg": ["the worst store", "dull", "a long , slow and tiresome evening that never finds its feet at all",
                 "bad acting"]}
PROMPTS = [("where is paris", "in france"), ("name a large city in the north of england please", "leeds"),
           ("hi", "hello there , how are you today"), ("two and two", "four")]
CHATS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in PROMPTS]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, model_dir, decoder: bool, peft: dict, padding_free: bool, attention: str = "padded",
            device: str = "cpu"):
    cls = _write(tmp_path / "cls.jsonl", [{"text": t, "label": y} for y, ts in TEXTS.items() for t in ts] * 2)
    ner = write_ner(tmp_path / "ner")
    (tmp_path / "general.txt").write_text(GENERAL)
    sources = {"ner": {"objective": "token-classification", "train": str(ner["train"])},
               "cls": {"objective": "sequence-classification", "train": cls},
               "bin": {"objective": "binary-classification", "train": cls, "positive_label": "pos"},
               "general": {"objective": "language-modeling", "train": str(tmp_path / "general.txt")}}
    if decoder:
        sources["prompts"] = {"objective": "causal-lm", "format": "jsonl", "eval_generate": 0,
                              "train": _write(tmp_path / "p.jsonl", [{"prompt": p, "completion": c}
                                                                    for p, c in PROMPTS] * 2)}
        sources["chat"] = {"objective": "causal-lm", "format": "chat", "eval_generate": 0,
                           "train": _write(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS] * 2)}
    cfg = {"model": {"name": str(model_dir), "max_length": 40}, "sources": sources,
           "routing": {"strategy": "interleaved", "weights": dict.fromkeys(sources, 1.0)},
           "train": {"precision": "fp32", "device": device, "max_steps": 2, "batch_size": 4, "progress": False,
                     "seed": 5, "padding_free": padding_free, "packed_attention": attention},
           "peft": peft, "run": {"name": "r", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / f"c-{padding_free}-{attention}-{device}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-llama") / "m"
    shutil.copytree(tiny_llama_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def _batches(setup):
    """A batch of each source as a training step cuts it, its examples of different lengths (a
    text source's blocks all have one length: there the rows are cut short, as the last block of
    a text is)."""
    out, name_of = {}, {}
    for _ in range(40):
        for part in setup.batches.next():
            if part.source not in out and not part.stand_in:
                (piece, _), = micro_batches(part.tensors, setup.sources[part.source].objective, 1, True)
                out[part.source] = piece
                name_of[id(piece)] = setup.sources[part.source].objective
    for piece in out.values():
        mask = piece["attention_mask"]
        if mask.sum(1).unique().numel() == 1:
            width = mask.shape[1]
            for row in range(1, mask.shape[0]):
                cut = slice(width - 3 * row, None)
                mask[row, cut], piece["labels"][row, cut] = 0, -100
            piece[PACKED] = Layout.of(mask)
            piece[SCORED_INDEX] = scored_positions(name_of[id(piece)], piece["labels"])
        assert mask.sum(1).unique().numel() > 1
    assert set(out) == set(setup.sources)
    return out


def _outputs(model, name, objective, batch, grads: bool = True):
    """Per-example logits (rows of real positions, or one row per example), per-example losses,
    the batch loss and the trainable parameters' gradients (none with `grads` false: forward only)."""
    if not grads:
        with torch.no_grad():
            return _outputs(model, name, objective, batch, True)
    model.zero_grad(set_to_none=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    layout = batch.get(PACKED)
    if name in model.heads:
        logits = model.heads[name](model.hidden_states(ids, mask, layout), mask)
    else:
        logits = model.lm_logits(ids, mask, layout)
    if logits.dim() == 3:  # per token: real positions only (padding rows are not outputs)
        if objective == "causal-lm":
            logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:]
        per_example = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100,
                                                        reduction="none").sum(1)
        logits = logits[mask.bool()]
    elif labels.dtype.is_floating_point:
        per_example = torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), labels, reduction="none")
    else:
        per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    loss = model.loss(name, objective, batch)
    if loss.requires_grad:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), per_example.detach(), loss.detach(), grads


@pytest.mark.parametrize("attention", ["padded", "per_example"])
@pytest.mark.parametrize("peft", [{"method": "none"}, {"method": "lora", "r": 4}], ids=["full", "lora"])
@pytest.mark.parametrize("backbone", ["encoder", "decoder"])
def test_padding_free_batches_give_the_padded_batch_s_outputs(tmp_path, tiny_model_dir, chat_llama, backbone,
                                                              peft, attention):
    """Packed, with attention on the padded width or on each example's own length."""
    decoder = backbone == "decoder"
    model_dir = chat_llama if decoder else tiny_model_dir
    padded = prepare(load_config(_config(tmp_path, model_dir, decoder, peft, False)))
    packed = prepare(load_config(_config(tmp_path, model_dir, decoder, peft, True, attention)))
    assert packed.model.padding_free and not padded.model.padding_free
    assert packed.model.packed_attention == attention
    expected = {"encoder": {"token-classification", "sequence-classification", "binary-classification", "masked-lm"},
                "decoder": {"token-classification", "sequence-classification", "binary-classification",
                            "causal-lm"}}[backbone]
    assert {s.objective for s in packed.sources.values()} == expected
    for model in (padded.model, packed.model):
        model.eval()  # no dropout: the two layouts compute the same function
    for name, batch in _batches(padded).items():
        src = padded.sources[name]
        a = _outputs(padded.model, name, src.objective, batch)
        b = _outputs(packed.model, name, src.objective, batch)
        for what, x, y in zip(("logits", "per-example losses", "loss"), a, b):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {what}: {m}")
        assert a[3].keys() == b[3].keys() and a[3]
        for key in a[3]:
            torch.testing.assert_close(b[3][key], a[3][key], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} gradient of {key}: {m}")


@pytest.mark.parametrize("peft", [{"method": "none"}, {"method": "lora", "r": 4}], ids=["full", "lora"])
def test_flex_attention_gives_the_padded_batch_s_outputs(tmp_path, chat_llama, peft, device):
    """train.packed_attention=flex on a decoder, every objective: the padded batch's logits and
    losses (and on a GPU, where FlexAttention trains, its gradients). On the CPU, which has no
    FlexAttention backward, the forward alone, with the attention switched after setup."""
    padded = prepare(load_config(_config(tmp_path, chat_llama, True, peft, False, device=device)))
    flex = prepare(load_config(_config(tmp_path, chat_llama, True, peft, True, "flex" if device == "cuda" else "padded",
                                       device=device)))
    flex.model.packed_attention = "flex"
    for model in (padded.model, flex.model):
        model.eval()
    for name, batch in _batches(padded).items():
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        src = padded.sources[name]
        a = _outputs(padded.model, name, src.objective, batch, grads=device == "cuda")
        b = _outputs(flex.model, name, src.objective, batch, grads=device == "cuda")
        for what, x, y in zip(("logits", "per-example losses", "loss"), a, b):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {what}: {m}")
        assert a[3].keys() == b[3].keys() and (bool(a[3]) == (device == "cuda"))
        for key in a[3]:
            torch.testing.assert_close(b[3][key], a[3][key], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name} gradient of {key}: {m}")


def test_flex_attention_is_refused_where_it_cannot_train(tmp_path, tiny_model_dir, chat_llama):
    """One line naming the key: an encoder that trains with attention dropout (FlexAttention has
    none), and any model on the CPU (no FlexAttention backward there)."""
    from routetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^train\.packed_attention=flex: bert trains with attention dropout 0\.1"):
        prepare(load_config(_config(tmp_path, tiny_model_dir, False, {"method": "none"}, True, "flex")))
    with pytest.raises(ConfigError, match=r"^train\.packed_attention=flex: trains on CUDA only .* backward on cpu\)"):
        prepare(load_config(_config(tmp_path, chat_llama, True, {"method": "none"}, True, "flex")))


@pytest.mark.parametrize("attention", ["padded", "flex"])
def test_no_example_attends_to_another(tiny_model_dir, attention):
    """Each example's hidden states are those of the example alone (the packed row holds the
    others), and padding comes back as zeros."""
    from routetune.model.routed import build_model

    model = build_model(str(tiny_model_dir), seed=0, attention="sdpa")
    model.eval().requires_grad_(False)  # FlexAttention's forward only on the CPU
    use_packed_attention(model.lm)
    model.padding_free = True
    model.packed_attention = attention
    ids = torch.tensor([[2, 10, 11, 12, 3, 0, 0], [2, 20, 21, 22, 23, 24, 3], [2, 30, 3, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    together = model.hidden_states(ids, mask)
    for row, n in enumerate(mask.sum(1).tolist()):
        alone = model.hidden_states(ids[row:row + 1, :n], mask[row:row + 1, :n])
        torch.testing.assert_close(together[row, :n], alone[0], rtol=1e-5, atol=1e-6)
        assert together[row, n:].abs().sum() == 0


def test_layout_round_trips_and_restarts_positions():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])  # right and left padding
    layout = Layout.of(mask)
    assert layout.positions.tolist() == [[0, 1, 2, 0, 1, 2, 0]]
    x = torch.arange(12.0).view(3, 4)
    packed = layout.pack(x)
    assert packed.tolist() == [[0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 8.0]]
    assert torch.equal(layout.unpack(packed), x * mask)


def test_models_and_methods_that_cannot_pack_train_padded_and_say_so(tmp_path, tiny_model_dir, caplog):
    path = _config(tmp_path, tiny_model_dir, False, {"method": "prompt_tuning", "num_virtual_tokens": 3}, True)
    caplog.set_level(logging.INFO, logger="routetune")
    setup = prepare(load_config(path))
    assert not setup.model.padding_free
    lines = [r.getMessage() for r in caplog.records if "padding_free" in r.getMessage()]
    assert lines == ["train.padding_free: padded batches (prompt_tuning adds virtual tokens to every example)"]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", sorted(packing.PACKABLE_TYPES))
def test_every_packable_model_type_gives_the_padded_hidden_states(model_type, attention):
    """Each model type routetune packs, as a tiny random model: the same hidden states at every
    real position as the padded batch. Right padding, as routetune
    pads: with left padding a padded call counts the padding in its position ids, packing does not."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from routetune.model.routed import RoutedModel

    size = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    if model_type != "bert":
        size.update(num_key_value_heads=2, head_dim=8, sliding_window=None)
    cfg = AutoConfig.for_model(model_type, **size, attn_implementation=attention)
    torch.manual_seed(0)
    lm = (AutoModelForMaskedLM if model_type == "bert" else AutoModelForCausalLM).from_config(cfg)
    model = RoutedModel(lm).eval()
    assert packing.why_not(model) is None
    ids = torch.randint(4, 60, (4, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7])
    padded = model.hidden_states(ids, mask)
    use_packed_attention(model.lm)
    model.padding_free = True
    packed = model.hidden_states(ids, mask)
    torch.testing.assert_close(packed[mask.bool()], padded[mask.bool()], rtol=1e-4, atol=1e-5)
    model.packed_attention = "per_example"  # each example's attention on its own length
    each = model.hidden_states(ids, mask)
    torch.testing.assert_close(each[mask.bool()], padded[mask.bool()], rtol=1e-4, atol=1e-5)
    assert each[~mask.bool()].abs().sum() == 0
    model.packed_attention = "flex"  # FlexAttention on the packed row (its forward only, on the CPU)
    with torch.no_grad():
        flex = model.hidden_states(ids, mask)
    torch.testing.assert_close(flex[mask.bool()], padded[mask.bool()].detach(), rtol=1e-4, atol=1e-5)
    assert flex[~mask.bool()].abs().sum() == 0


def test_sliding_window_models_train_padded():
    from transformers import MistralConfig, MistralForCausalLM

    from routetune.model.routed import RoutedModel

    lm = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, intermediate_size=32, sliding_window=8))
    assert packing.why_not(RoutedModel(lm)) == "sliding-window attention"


def test_an_unchecked_model_type_trains_padded(tmp_path):
    from transformers import GPT2Config

    from routetune.model import packing
    from routetune.model.routed import RoutedModel

    lm = __import__("transformers").GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    reason = packing.why_not(RoutedModel(lm))
    assert reason is not None and "'gpt2'" in reason
