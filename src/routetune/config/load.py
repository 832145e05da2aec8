"""Reading a config: YAML file + dotted ``--set`` overrides + ``${VAR}`` -> validated
:class:`Config`, with every error naming the file and line (or the override) and the key."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from routetune.run_folder import RunFolder
from routetune.config.schema import Config
from routetune.errors import ConfigError


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            got = os.environ.get(var)
            if got is None:
                if default is None:
                    raise ConfigError(f"environment variable {var} is not set (used as ${{{var}}})")
                return default
            return got
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                key = (*path, str(i))
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to the raw config dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=3e-5")
    key, _, text = assignment.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({exc.__class__.__name__})") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {key}: {where} is a {type(child).__name__}, not a mapping")
        node = child
    node[parts[-1]] = value


_TYPE_WORDS = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "missing": "required key is missing",
    "extra_forbidden": "unknown key",
}
# keys whose values must match a pattern: what a user is told instead of the regular expression
_PATTERN_WORDS = {
    ("train", "device"): "expected auto, cpu, cuda or cuda:N",
    ("run", "name"): "expected one folder name (letters, digits, '.', '_', '-', not starting with '.'); "
                     "set run.output_dir to write runs elsewhere",
}


def _format_errors(exc: ValidationError, lines: dict, origin: str, overrides: dict | None = None) -> str:
    """One line per error, naming where the value came from: `FILE:LINE:`, or `--set K=V:` when a
    command-line override set it."""
    msgs = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        etype = err["type"]
        line, where = None, None
        for n in range(len(loc), 0, -1):
            if overrides and loc[:n] in overrides:
                where = f"--set {overrides[loc[:n]]}: "
                break
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        if where is None:
            where = f"{origin}:{line}: " if line else f"{origin}: "
        if etype == "value_error":
            text = str(err.get("ctx", {}).get("error", err["msg"]))
            # top-level cross-checks name their whole key; a nested model's check names its own
            # field, so the path to that model goes in front (sources.NAME.format: ...)
            msgs.append(f"{where}{key}.{text}" if loc else text)
            continue
        word = _TYPE_WORDS.get(etype, err["msg"].lower() if etype not in ("literal_error",) else err["msg"])
        if etype == "string_pattern_mismatch":
            word = _PATTERN_WORDS.get(loc, word)
        got = "" if etype in ("missing",) else f", got {err.get('input')!r}"
        if etype == "extra_forbidden":
            got = ""
            parent = loc[:-1]
            word = f"unknown key{' under ' + '.'.join(parent) if parent else ''}"
        msgs.append(f"{where}{key}: {word}{got}")
    return "\n".join(msgs)


def parse_config(raw: Any, origin: str = "<config>", lines: dict | None = None,
                 overrides: dict | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    raw = _expand_env(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, lines or {}, origin, overrides)) from None


def _read_yaml(path: Path) -> tuple[dict, str]:
    """The top-level mapping of a YAML file and its text; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (UnicodeDecodeError, IsADirectoryError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    return raw, text


def read_yaml_model(path: Path, model):
    """A YAML file validated against another pydantic model than the run config (a sweep file),
    with the same one-line errors naming file, line and key."""
    raw, text = _read_yaml(Path(path))
    try:
        return model.model_validate(_expand_env(raw))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, _line_map(text), str(path))) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``KEY=VALUE`` overrides, validate, and resolve relative paths."""
    path = Path(path)
    raw, text = _read_yaml(path)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    given = {tuple(a.partition("=")[0].strip().split(".")): a for a in overrides or []}
    cfg = parse_config(raw, origin=str(path), lines=_line_map(text), overrides=given)
    return resolve_paths(cfg, path.parent)


def config_from_dict(raw: dict, overrides: list[str] | None = None, base: Path | None = None) -> Config:
    """A config given as a Python mapping (the Python API): the same overrides, checks and path
    resolution as a file, relative paths against `base` (default: the working directory)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    given = {tuple(a.partition("=")[0].strip().split(".")): a for a in overrides or []}
    cfg = parse_config(raw, origin="config", overrides=given)
    return resolve_paths(cfg, base or Path.cwd())


def _resolve(p: str, base: Path) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def resolve_paths(cfg: Config, base: Path) -> Config:
    """Make data paths absolute (relative to the config file's folder) so the saved config is self-contained."""
    for src in cfg.sources.values():
        for split in ("train", "dev", "test"):
            value = getattr(src, split)
            if value is not None:
                object.__setattr__(src, split, _resolve(value, base))
        ds = src.dataset
        if ds is not None and (ds.path.startswith((".", "/", "~")) or (base / ds.path).exists()):
            object.__setattr__(ds, "path", _resolve(ds.path, base))  # a local dataset (else a hub id)
    for ev in cfg.evals.values():
        object.__setattr__(ev, "path", _resolve(ev.path, base))
    if cfg.retention.fit_text is not None:
        object.__setattr__(cfg.retention, "fit_text", _resolve(cfg.retention.fit_text, base))
    if cfg.model.init_from is not None:
        object.__setattr__(cfg.model, "init_from", str(Path(cfg.model.init_from).expanduser().resolve()))
    name = cfg.model.name
    if name.startswith((".", "/", "~")) or (base / name).is_dir():
        object.__setattr__(cfg.model, "name", _resolve(name, base))
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_from_run(run_dir: str | Path) -> Config:
    path = RunFolder(run_dir).config
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {run_dir} a routetune run folder?")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8; the run's config is damaged") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)}); the run's config is "
                          "damaged") from None
    return parse_config(raw, origin=str(path), lines=_line_map(text))
