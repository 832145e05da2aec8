"""Checkpoint folders, written atomically: into a temporary folder, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def save_atomic(folder: Path, write) -> None:
    """Call ``write(tmp_folder)`` and move the result to `folder`, replacing any older version only
    once the new one is complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    old = folder.parent / f".old-{folder.name}"
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
