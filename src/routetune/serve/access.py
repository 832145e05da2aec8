"""Who may reach the server: a non-loopback interface needs an API key. Kept apart from the app
(FastAPI, torch) so that `routetune serve --host 0.0.0.0` without a key is refused before they load."""

from __future__ import annotations

import logging

from routetune.errors import RoutetuneError

log = logging.getLogger("routetune")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to serve a non-loopback interface without an API key, unless told to (then warn)."""
    if is_loopback(host) or api_key:
        return
    if not allow_unauthenticated:
        raise RoutetuneError(f"--host {host}: serving beyond this machine needs an API key (--api-key or "
                             "ROUTETUNE_API_KEY); pass --allow-unauthenticated to serve it open anyway")
    log.warning("serving on %s WITHOUT an API key: anyone who can reach this address can use the model "
                "and its /docs and /metrics", host)
