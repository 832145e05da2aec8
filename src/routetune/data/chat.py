"""Instruction data for decoders: `format: chat` (jsonl, ``{"messages": [{"role", "content"}, ...]}``)
and `format: alpaca` (jsonl, ``{"instruction", "input", "output"}``).

Each record becomes a prompt/completion pair: the prompt is the conversation up to its last
assistant turn, rendered with the tokenizer's chat template (with the generation prompt), and
the completion is that last assistant turn. So the loss is taken on the last assistant reply;
earlier turns, the system message and the template's markup are context. Alpaca records become
one user turn (instruction, then the input) and the reply; a tokenizer without a chat template
renders them with the Alpaca prompt instead, and refuses chat records.
"""

from __future__ import annotations

from pathlib import Path

from routetune.data.readers import Example, _field, _jsonl_records
from routetune.errors import DataError

ALPACA = ("Below is an instruction that describes a task{inp}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def _messages(obj: dict, path: Path, number: int) -> list[dict]:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("expected a non-empty list 'messages'", path, number)
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"messages[{i}]: expected an object with string 'role' and 'content'", path, number)
    if messages[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's (the reply trained on)", path, number)
    return messages


def _render(tokenizer, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text  # the prefix adds it once


def read_instructions(spec: str, fmt: str, tokenizer) -> list[Example]:
    path = Path(spec)
    template = getattr(tokenizer, "chat_template", None)
    if fmt == "chat" and not template:
        raise DataError("format chat needs a tokenizer with a chat template (this one has none); use "
                        "prompt/completion jsonl instead", path)
    out = []
    for number, obj in _jsonl_records(path):
        if fmt == "chat":
            messages = _messages(obj, path, number)
            prompt, reply = _render(tokenizer, messages[:-1]), messages[-1]["content"]
        else:
            instruction, reply = _field(obj, "instruction", path, number), _field(obj, "output", path, number)
            inp = str(obj.get("input") or "")
            if template:
                content = instruction + (f"\n\n{inp}" if inp else "")
                prompt = _render(tokenizer, [{"role": "user", "content": content}])
            else:
                prompt = ALPACA.format(inp=", paired with an input that provides further context" if inp else "",
                                       instruction=instruction, input=f"### Input:\n{inp}\n\n" if inp else "")
        if not reply.strip():
            raise DataError("the reply is empty", path, number)
        out.append(Example(prompt, None, f"{path}:{number}", reply))
    if not out:
        raise DataError("no examples found (the file is empty or holds only blank lines)", path)
    return out
