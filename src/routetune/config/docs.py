"""Render docs/configuration.md from the config schema (the single source of truth).

    python -m routetune.config.docs > docs/configuration.md
"""

from __future__ import annotations

import re
import typing

from pydantic import BaseModel

from routetune.config import Config


def _type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if args and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return re.sub(r"routetune\.config\.[a-z_]+\.", "", str(annotation).replace("typing.", ""))


def _constraint(meta) -> str:
    for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if hasattr(meta, attr):
            return f"{op} {getattr(meta, attr)}"
    return str(meta)


def _default(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        nested = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        args = typing.get_args(ann)
        optional = [a for a in args if a is not type(None)] if type(None) in args else []
        if len(optional) == 1 and isinstance(optional[0], type) and issubclass(optional[0], BaseModel):
            # an optional section
            rows.append((key, "mapping or null", "`null`", " ".join((field.description or "").split())))
            rows += _rows(optional[0], key + ".")
            continue
        if nested is None and len(args) == 2 and args[0] is str and isinstance(args[1], type) \
                and issubclass(args[1], BaseModel):
            rows.append((key, "mapping of name -> " + args[1].__name__, "required" if field.is_required() else "",
                         " ".join((field.description or "").split())))
            rows += _rows(args[1], f"{key}.<name>.")
            continue
        if nested is not None:
            rows.append((key, "mapping", "", " ".join((field.description or "").split())))
            rows += _rows(nested, key + ".")
            continue
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "`{}`"
        else:
            default = _default(field.default)
        constraints = ", ".join(_constraint(m) for m in field.metadata)
        extra = field.json_schema_extra or {}
        choices = extra.get("choices")  # values checked against a registry
        if extra.get("registry") == "methods":  # checked when a run is prepared (the methods load torch)
            from routetune.model.methods import METHODS

            choices = list(METHODS)
        kind = _type_name(ann)
        if choices:
            kind = "one of " + ", ".join(f"`{c}`" for c in choices) + (" or null" if type(None) in args else "")
        rows.append((key, kind + (f" ({constraints})" if constraints else ""), default,
                     " ".join((field.description or "").split())))
    return rows


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `src/routetune/config/` by `python -m routetune.config.docs`; a test keeps",
        "this file in step with the schema. Unknown keys and wrong types are refused with the dotted",
        "key and the line of the YAML file. Any key can be overridden with `--set key.path=value`",
        "(the value is parsed as YAML). Strings may use `${VAR}` or `${VAR:-default}`; relative data",
        "paths are resolved against the config file's folder.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, typ, default, doc in _rows(Config, ""):
        lines.append(f"| `{key}` | {typ.replace('|', 'or')} | {default} | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
