"""Seeds derived from a seed and any other parts (a step, a source name, an example id): every random
draw of a run is a pure function of its config's seeds, the same in any process and on resume."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
