"""Checks of run-folder paths that need nothing heavy: the command line makes them before torch
and transformers load, so a mistyped folder is reported in well under a second."""

from __future__ import annotations

from pathlib import Path

from routetune.errors import RunError


def replaced_hint(run_dir: str | Path) -> str:
    """Where an interrupted --overwrite left the run it was replacing (``.replaced-NAME-PID-TIME``
    beside the run folder), as a clause to add to a message; empty if there is none."""
    run_dir = Path(run_dir)
    parent = run_dir.parent if run_dir.parent.is_dir() else None
    copies = sorted(parent.glob(f".replaced-{run_dir.name}-*")) if parent is not None else []
    if not copies:
        return ""
    newest = copies[-1]
    return (f"; an interrupted --overwrite left the earlier run of this name at {newest}: to get it back, "
            f"move {run_dir} away and run `mv {newest} {run_dir}`")


def check_run_folder(run_dir: str | Path) -> Path:
    """An existing run folder, or one clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder{replaced_hint(run_dir)}")
    return run_dir


def check_new_run_folder(path: Path, overwrite: bool) -> bool:
    """Whether `path` is free for a new run (absent or empty); refuses a symbolic link, a file, or
    (without --overwrite) a folder with something in it. True: an existing folder to replace."""
    if path.is_symlink():
        raise RunError(f"{path}: is a symbolic link; a run folder must be a real folder (nothing was deleted); "
                       "choose another run.name or run.output_dir")
    if path.exists() and not path.is_dir():
        raise RunError(f"{path}: exists and is not a folder")
    if not path.exists() or not any(path.iterdir()):
        return False
    if not overwrite:
        raise RunError(f"{path}: run folder exists and is not empty; choose another run.name "
                       "or pass --overwrite to replace it")
    return True
