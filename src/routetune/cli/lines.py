"""The files of `routetune predict` and `routetune generate`: one item per line in (strict UTF-8,
errors naming file and line), one JSON object per line out. Imported by those commands only, so
that the other commands start without loading the model stack."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from routetune.errors import RoutetuneError
from routetune.serve.predictor import unicode_problem


def parse_prompt(line: str, where: str, n: int):
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RoutetuneError(f"{where}:{n}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise RoutetuneError(f"{where}:{n}: expected a JSON object with a string field 'prompt'")
        if problem := unicode_problem(obj["prompt"]):
            raise RoutetuneError(f"{where}:{n}: 'prompt': {problem}")
        return obj["prompt"]
    return text


def generate_file(run, input_file, max_new_tokens, output) -> None:
    """The prompts of `input_file` (or stdin) through `run.generate` (a routetune.Run), as JSONL."""
    prompts = [p for p in read_items(input_file, parse_prompt) if p is not None]
    outputs = run.generate(prompts, max_new_tokens)
    write_jsonl(output, ({"prompt": p, "completion": o} for p, o in zip(prompts, outputs)))


def read_items(input_file: Optional[Path], parse) -> list:
    """Parse every line of the input file or of standard input. Lines are decoded as strict UTF-8
    here, one by one, so an undecodable byte is reported with its line (Python's own stdin would
    hand it on as a lone surrogate, which tokenizers reject with a TypeError)."""
    name = str(input_file) if input_file else "<stdin>"
    if input_file is not None and not input_file.is_file():
        raise RoutetuneError(f"{input_file}: input file not found")
    stream = input_file.open("rb") if input_file else sys.stdin.buffer
    try:
        out = []
        for lineno, raw in enumerate(stream, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RoutetuneError(f"{name}:{lineno}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
            out.append(parse(line.removeprefix("\ufeff") if lineno == 1 else line, name, lineno))
        return out
    finally:
        if input_file:
            stream.close()


def write_jsonl(output: Optional[Path], records) -> None:
    out = output.open("w", encoding="utf-8") if output else sys.stdout
    for record in records:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    if output:
        out.close()
