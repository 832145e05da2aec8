"""The Hugging Face hub, asked before anything is downloaded: whether an id is in the local
cache, and whether the hub can be reached at all, so that an offline machine fails in seconds
with a clear line instead of after a minute of download retries."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


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
