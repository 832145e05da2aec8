"""Instruction data for decoders (`format: chat` and `format: alpaca`): the conversation rendered
with the tokenizer's chat template, the loss on the assistant replies only."""

import json
import shutil

import pytest
import yaml

from routetune.config import load_config
from routetune.errors import DataError
from routetune.training.setup import prepare

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture
def chat_model(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    folder = tmp_path / "chat-llama"
    shutil.copytree(tiny_llama_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def _config(tmp_path, model, fmt, records, **extra):
    data = tmp_path / f"{fmt}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"model": {"name": str(model), "max_length": 96},
           "sources": {"sft": {"objective": "causal-lm", "format": fmt, "train": str(data), "eval_generate": 0,
                               **extra}},
           "train": {"precision": "fp32", "device": "cpu", "max_steps": 2, "batch_size": 2, "progress": False},
           "run": {"name": "r", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is paris"},
                      {"role": "assistant", "content": "in france"}, {"role": "user", "content": "and london"},
                      {"role": "assistant", "content": "the apple store"}]}] * 6


def _trained_part(setup, i=0):
    enc = setup.sources["sft"].encoded[i]
    tok = setup.tokenizer
    reply = [t for t, y in zip(enc.input_ids, enc.labels) if y != -100]
    return tok.decode(reply), tok.decode(enc.input_ids)


def test_chat_trains_on_every_assistant_reply(tmp_path, chat_model):
    setup = prepare(load_config(_config(tmp_path, chat_model, "chat", CHAT, holdout={"test": 0.34})))
    reply, whole = _trained_part(setup)
    # both replies with their end-of-turn markup; the system message and user turns are context
    assert reply.replace(" ", "") == "infrance</s>theapplestore</s>"
    assert "be brief" in whole and "where is paris" in whole and "and london" in whole
    from routetune.workflow import train

    _, summary = train(_config(tmp_path, chat_model, "chat", CHAT, holdout={"test": 0.34}))
    assert summary["test"]["sft"]["perplexity"] > 1


def test_alpaca_uses_the_chat_template_or_the_alpaca_prompt(tmp_path, chat_model, tiny_llama_dir):
    records = [{"instruction": "name a city", "input": "in france", "output": "paris"}] * 4
    reply, whole = _trained_part(prepare(load_config(_config(tmp_path, chat_model, "alpaca", records))))
    assert reply.replace(" ", "") == "paris</s>" and "user" in whole
    reply, whole = _trained_part(prepare(load_config(_config(tmp_path, tiny_llama_dir, "alpaca", records))))
    assert reply.replace(" ", "") == "paris</s>"
    assert "Instruction" in whole and "Response" in whole and "in france" in whole  # no template: Alpaca's prompt


def test_instruction_data_mistakes_name_file_and_line(tmp_path, chat_model, tiny_llama_dir):
    with pytest.raises(DataError, match="chat records need a tokenizer with a chat template"):
        prepare(load_config(_config(tmp_path, tiny_llama_dir, "chat", CHAT)))
    bad = CHAT[:1] + [{"messages": [{"role": "user", "content": "hello"}]}]
    with pytest.raises(DataError, match=r"chat.jsonl:2: the last message must be the assistant's"):
        prepare(load_config(_config(tmp_path, chat_model, "chat", bad)))
    with pytest.raises(DataError, match=r"alpaca.jsonl:1: missing field 'output'"):
        prepare(load_config(_config(tmp_path, chat_model, "alpaca", [{"instruction": "x"}])))


def test_a_template_that_rewrites_earlier_turns_trains_the_last_reply(tmp_path, chat_model, caplog):
    """A template whose rendering of a longer conversation does not start with that of a shorter
    one (here: earlier assistant turns are dropped) cannot mark earlier replies: the last only."""
    from transformers import AutoTokenizer

    from routetune.data.chat import conversation

    tok = AutoTokenizer.from_pretrained(chat_model)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<s>{{ m['role'] }}\n"
                         "{{ m['content'] }}</s>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<s>assistant\n"
                         "{% endif %}")
    with caplog.at_level("WARNING", logger="routetune"):
        example = conversation(tok, CHAT[0]["messages"], "x:1")
    assert example.trained == () and example.completion == "the apple store"
    assert "loss is on the last assistant reply only" in caplog.text


def test_a_bos_the_template_writes_is_there_once(chat_model):
    """A template that starts with the BOS token (SmolLM2's `<|im_start|>` is both): kept when
    encoding adds none, dropped when encoding adds it again; either way the ids hold it once."""
    from tokenizers.processors import TemplateProcessing

    from routetune.data.chat import render_chat
    from routetune.data.sources import encode_prompt
    from routetune.model.load import load_tokenizer

    messages = [{"role": "user", "content": "hi"}]
    plain = load_tokenizer(str(chat_model))  # adds no special tokens, as decoder tokenizers do
    adding = load_tokenizer(str(chat_model))
    adding._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    for tok, kept in ((plain, True), (adding, False)):
        text = render_chat(tok, messages)
        assert text.startswith("<s>user") == kept
        ids = encode_prompt(tok, text, None, 96)[0]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id, ids[:3]
