"""Instruction data for decoders: `format: chat` (jsonl, ``{"messages": [{"role", "content"}, ...]}``,
also ShareGPT's ``{"from", "value"}`` turns) and `format: alpaca` (jsonl, ``{"instruction",
"input", "output"}``); the same records from a Hugging Face dataset (format `dataset`).

Each record becomes one example: the prompt is the conversation up to its last assistant turn,
rendered with the tokenizer's chat template (with the generation prompt), and the completion is
that last reply. The loss is taken on every assistant reply: the spans of the earlier replies
inside the prompt are marked as trained (``Example.trained``), found by rendering the
conversation turn by turn (each rendering must start with the one before, as chat templates
render them). A template that rewrites earlier turns (some drop earlier reasoning) gives no such
prefixes; then only the last reply is trained, with one warning. The system message, user turns
and the template's markup are context. Alpaca records become one user turn (instruction, then
the input) and the reply; a tokenizer without a chat template renders them with the Alpaca
prompt instead, and refuses chat records.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from routetune.data.readers import Example, _jsonl_records
from routetune.data.sources import special_affixes
from routetune.errors import DataError

log = logging.getLogger("routetune")

ALPACA = ("Below is an instruction that describes a task{inp}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_warned: set[int] = set()


def _messages(obj: dict, origin, number: int | None, key: str = "messages") -> list[dict]:
    messages = obj.get(key)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list {key!r}", origin, number)
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and "from" in m and "value" in m and "role" not in m:  # ShareGPT turns
            m = {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{key}[{i}]: expected an object with string 'role' and 'content'", origin, number)
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError("the last message must be the assistant's (the reply trained on)", origin, number)
    return out


def render_chat(tokenizer, messages: list[dict], generation: bool = True) -> str:
    """The conversation as the tokenizer's chat template writes it. A leading BOS the template writes
    is dropped only when encoding adds it again (the prefix of data/sources.py), so it is there once;
    a tokenizer whose BOS is also its turn marker (SmolLM2's `<|im_start|>`) and adds none keeps it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.bos_token_id in _prefix(tokenizer):
        return text[len(bos):]
    return text


@functools.lru_cache(maxsize=8)
def _prefix(tokenizer) -> tuple[int, ...]:
    """The special tokens encoding puts first (asked once per tokenizer: renders are per turn; held
    by the cache, so an id is never that of another tokenizer)."""
    return tuple(special_affixes(tokenizer)[0])


def _reply_spans(tokenizer, context: list[dict], prompt: str) -> tuple[tuple[int, int], ...] | None:
    """Character spans of the assistant replies inside the rendered context, or None when the
    template does not render the conversation as a sequence of prefixes."""
    spans = []
    for j, m in enumerate(context):
        if m["role"] != "assistant":
            continue
        before, after = render_chat(tokenizer, context[:j]), render_chat(tokenizer, context[:j + 1], generation=False)
        if not (after.startswith(before) and prompt.startswith(after)):
            return None
        spans.append((len(before), len(after)))
    return tuple(spans)


def conversation(tokenizer, messages: list[dict], origin: str) -> Example:
    context, reply = messages[:-1], messages[-1]["content"]
    prompt = render_chat(tokenizer, context)
    spans = _reply_spans(tokenizer, context, prompt)
    if spans is None:
        if id(tokenizer) not in _warned:
            _warned.add(id(tokenizer))
            log.warning("the chat template does not render earlier turns as prefixes of later ones; "
                        "the loss is on the last assistant reply only")
        spans = ()
    return Example(prompt, None, origin, reply, spans)


def alpaca(tokenizer, instruction: str, inp: str, reply: str, origin: str) -> Example:
    if getattr(tokenizer, "chat_template", None):
        content = instruction + (f"\n\n{inp}" if inp else "")
        prompt = render_chat(tokenizer, [{"role": "user", "content": content}])
    else:
        prompt = ALPACA.format(inp=", paired with an input that provides further context" if inp else "",
                               instruction=instruction, input=f"### Input:\n{inp}\n\n" if inp else "")
    return Example(prompt, None, origin, reply)


def needs_template(tokenizer, origin) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat records need a tokenizer with a chat template (this one has none); use "
                        "prompt/completion pairs instead", origin)


def _text(obj: dict, name: str, origin, number: int | None, optional: bool = False) -> str:
    if name not in obj:
        if optional:
            return ""
        raise DataError(f"missing field {name!r} (fields: {', '.join(map(str, obj)) or 'none'})", origin, number)
    value = obj[name]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {name!r}: expected a string, got {type(value).__name__}", origin, number)
    return value


def record(obj: dict, fmt: str, tokenizer, origin, number: int | None, names: dict | None = None) -> Example:
    """One chat or alpaca record (a jsonl object or a dataset row) as an example; ``names`` maps
    the field names (``messages``, ``instruction``, ``input``, ``output``) to the record's own."""
    names = names or {}
    where = f"{origin}:{number}" if number is not None else str(origin)
    if fmt == "chat":
        key = names.get("messages") or ("conversations" if "messages" not in obj and "conversations" in obj
                                        else "messages")
        example = conversation(tokenizer, _messages(obj, origin, number, key), where)
    else:
        get = lambda field, optional=False: _text(obj, names.get(field, field), origin, number, optional)  # noqa: E731
        example = alpaca(tokenizer, get("instruction"), get("input", True), get("output"), where)
    if not example.completion.strip():
        raise DataError("the reply is empty", origin, number)
    return example


def read_instructions(spec: str, fmt: str, tokenizer) -> list[Example]:
    path = Path(spec)
    if fmt == "chat":
        needs_template(tokenizer, path)
    out = [record(obj, fmt, tokenizer, path, number) for number, obj in _jsonl_records(path)]
    if not out:
        raise DataError("no examples found (the file is empty or holds only blank lines)", path)
    return out
