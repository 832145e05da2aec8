"""Writing a file so that it is never seen half-written: a temporary file beside it, flushed to
disk, then renamed over it (a rename within one folder is atomic on POSIX file systems). A kill
leaves either the old content or the new one, never a cut file."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path`'s content with `text` (UTF-8), atomically."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
