"""Whether every data path and the model a config names are there, checked before torch and transformers load: a
mistyped file is one line naming its config key in well under a second, not after seconds of imports.
The readers check each file again (and its contents) when they read it."""

from __future__ import annotations

import glob
from pathlib import Path

from routetune.data.catalog import hint
from routetune.errors import ConfigError
from routetune.hub import check_model


def _named_paths(cfg) -> list[tuple[str, str]]:
    """(config key, path) of every local data path of `cfg` (paths are absolute after loading)."""
    out = []
    for name, sc in cfg.sources.items():
        out += [(f"sources.{name}.{split}", path) for split, path in
                (("train", sc.train), ("dev", sc.dev), ("test", sc.test)) if path is not None]
        if sc.dataset is not None and Path(sc.dataset.path).is_absolute():  # else a hub id
            out.append((f"sources.{name}.dataset.path", sc.dataset.path))
    out += [(f"evals.{name}.path", ev.path) for name, ev in cfg.evals.items()]
    if cfg.retention.fit_text is not None:
        out.append(("retention.fit_text", cfg.retention.fit_text))
    return out


def check_config_paths(cfg) -> None:
    """One ConfigError for the first data path that is neither a file, a folder nor a glob that matches."""
    for key, path in _named_paths(cfg):
        if not Path(path).exists() and not glob.glob(path, recursive=True):
            raise ConfigError(f"{key}: {path}: no such file, folder or matching glob{hint(path)}")
    init_from = cfg.model.init_from
    if init_from is not None and not Path(init_from).is_dir():
        raise ConfigError(f"model.init_from: {init_from}: no such run folder")


def check_inputs(cfg) -> None:
    """The config's data paths and model name (an alias, a local folder, a cached or reachable hub
    id; from `init_from`'s run otherwise), checked before torch and transformers load."""
    check_config_paths(cfg)
    if cfg.model.init_from is None:
        check_model(cfg.model.name)
