"""Run folders: claim one safely, hold it exclusively, load a run from it.

Invariant: routetune deletes only files it wrote. A run folder it writes carries the marker file
``.routetune-run``. ``--overwrite`` replaces a folder only when it has the marker and every file in
it is one a run writes (:func:`inventory`): the fixed names at its top level, in ``checkpoints/``
exactly the files each checkpoint's SHA-256 manifest lists (or the temporary folders of a write in
progress), the report's and trackers' files. Anything else (a notebook, a plot, a folder of the
user's, a symbolic link) is named and the overwrite refused: nothing is deleted. Even then the old
folder is first renamed aside and its files deleted, one by one from the inventory, only once the
new run has written its first checkpoint; if the new run fails before that, the old folder is put
back. ``train`` and ``resume`` hold an exclusive lock on the folder (``.lock``, an ``flock`` the
kernel releases when the process dies, however it dies), so a second process can never clean up
a live run's temporary checkpoint files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from routetune import run_folder as rf
from routetune.config import config_from_run
from routetune.device import Hardware, inference_hardware
from routetune.errors import RunError
from routetune.model.routed import RoutedModel
from routetune.model.inference import for_inference
from routetune.model.load import load_tokenizer
from routetune.run_paths import check_new_run_folder, check_run_folder
from routetune.training import checkpoint as ckpt

log = logging.getLogger("routetune")

MARKER, LOCK = rf.MARKER, rf.LOCK
# the files a run writes at the top level of its folder (declared once, in run_folder.py), and the
# temporary file of each atomic write (files.write_text_atomic: NAME.tmp) a kill may leave; metrics.tmp
# and plan.tmp are the log rewrites of older versions
RUN_FILES = rf.WRITTEN | {f"{name}.tmp" for name in rf.WRITTEN} | {"metrics.tmp", "plan.tmp"}
# what `routetune report RUN` writes into RUN/report/
REPORT_FILES = re.compile(r"^(report\.(md|html)|(loss|dev|shares|retention|continual)\.png|"
                          r"(per_type|confusion)_.+\.png)$")
TENSORBOARD_FILE = re.compile(r"^events\.out\.tfevents\..+$")


def _checkpoint_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(ours, foreign) of one entry of checkpoints/: the files its manifest lists (and the manifest,
    marker and signature), or all of a temporary folder of save_atomic's."""
    files = [p for p in folder.rglob("*") if not p.is_dir()]
    if ckpt.PARTIAL.match(folder.name):
        return files, []
    if not (ckpt.STEP_DIR.match(folder.name) or folder.name == "best"):
        return [], files or [folder]
    try:
        listed = set(json.loads((folder / ckpt.MANIFEST).read_text()))
    except (OSError, ValueError):
        listed = set()
    own = {ckpt.MANIFEST, ckpt.COMPLETE, ckpt.SIGNATURE} if listed else set()
    ours, foreign = [], []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        (ours if (rel in listed or rel in own) and not p.is_symlink() else foreign).append(p)
    return ours, foreign


def inventory(path: Path) -> tuple[list[Path], list[Path]]:
    """(ours, foreign): the files of run folder `path` that a run writes, and everything else."""
    ours, foreign = [], []
    for entry in sorted(path.iterdir()):
        name = entry.name
        if entry.is_symlink():
            foreign.append(entry)
        elif entry.is_file():
            (ours if name in RUN_FILES else foreign).append(entry)
        elif name == rf.CHECKPOINTS:
            for sub in sorted(entry.iterdir()):
                if sub.is_dir() and not sub.is_symlink():
                    o, f = _checkpoint_files(sub)
                    ours += o
                    foreign += f
                else:
                    foreign.append(sub)
        elif name in (rf.REPORT, rf.TENSORBOARD):
            pattern = REPORT_FILES if name == rf.REPORT else TENSORBOARD_FILE
            for p in sorted(entry.rglob("*")):
                if not p.is_dir():
                    (ours if p.parent == entry and pattern.match(p.name) and not p.is_symlink() else foreign).append(p)
        elif name == rf.WANDB:  # wandb's own folder: routetune told wandb to write there
            ours += [p for p in entry.rglob("*") if not p.is_dir()]
        else:
            foreign += [p for p in entry.rglob("*") if not p.is_dir()] or [entry]
    return ours, foreign


def remove_own(path: Path) -> list[Path]:
    """Delete the files of `path` that a run writes, then the folders those files were in once they
    are empty (no other folder: an empty one of someone else's stays); returns what is left (files
    routetune did not write), which stays where it is."""
    ours, foreign = inventory(path)
    held = set()
    for p in ours:
        p.unlink()
        held.update(d for d in p.parents if d == path or path in d.parents)
    for d in sorted(held, key=lambda d: -len(d.parts)):  # deepest first
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return foreign


def _names(paths: list[Path], root: Path, most: int = 5) -> str:
    shown = ", ".join(p.relative_to(root).as_posix() for p in paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


class Claim:
    """A run folder made ready for a new run; the folder it replaces (if any) waits aside until
    :meth:`commit` deletes its files, or :meth:`rollback` puts it back."""

    def __init__(self, path: Path, aside: Path | None):
        self.path, self.aside = path, aside

    def commit(self) -> None:
        if self.aside is not None and self.aside.exists():
            left = remove_own(self.aside)
            if left:
                log.warning("--overwrite: files routetune did not write appeared in the previous run folder while "
                            "the new run started; they are kept in %s: %s", self.aside, _names(left, self.aside))
            else:
                log.info("--overwrite: the new run has its first checkpoint; removed the previous run folder")
        self.aside = None

    def rollback(self) -> None:
        if self.aside is None:
            return
        left = remove_own(self.path) if self.path.exists() else []
        if left:  # someone added files to the new folder: keep both, say where
            log.warning("the new run failed before its first checkpoint; %s holds files routetune did not write "
                        "(%s), so the previous run stays at %s", self.path, _names(left, self.path), self.aside)
        else:
            os.replace(self.aside, self.path)
            log.warning("the new run failed before its first checkpoint; the previous run folder %s is back",
                        self.path)
        self.aside = None


def check_claimable(path: Path, overwrite: bool) -> None:
    """Refuse, before any heavy work, a folder that may not be (re)used."""
    if not check_new_run_folder(path, overwrite):
        return
    if not (path / MARKER).is_file():
        raise RunError(f"{path}: --overwrite replaces only a run folder routetune wrote (it has no {MARKER} "
                       "marker); nothing was deleted; choose another run.name")
    _, foreign = inventory(path)
    if foreign:
        raise RunError(f"{path}: --overwrite replaces only a run folder routetune wrote, and this one holds "
                       f"files it did not write ({_names(foreign, path)}); nothing was deleted; move them out "
                       "or choose another run.name")


def claim(path: Path, overwrite: bool) -> Claim:
    """Make `path` an empty, marked run folder. An existing run folder (with --overwrite) is
    renamed aside, not deleted: see :class:`Claim`."""
    check_claimable(path, overwrite)
    aside = None
    if path.exists() and any(path.iterdir()):
        with RunLock(path):  # not while another process trains in it
            check_claimable(path, overwrite)  # again, under the lock: nothing may have been added since
            aside = path.parent / f".replaced-{path.name}-{os.getpid()}-{int(time.time())}"
            os.replace(path, aside)
        log.warning("--overwrite: the previous run folder is moved to %s until the new run's first checkpoint",
                    aside)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           "pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    return Claim(path, aside)


class RunLock:
    """An exclusive lock on a run folder for the life of this process (or the `with` block)."""

    def __init__(self, path: Path):
        self.path = Path(path) / LOCK
        self.fh = None

    def acquire(self) -> RunLock:
        import fcntl

        try:
            self.fh = self.path.open("a+")
        except OSError as exc:
            raise RunError(f"{self.path}: cannot open the run's lock file ({exc.strerror})") from None
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            self.fh = None
            raise RunError(f"{self.path.parent}: the run folder is in use ({holder}); wait for that process "
                           "or stop it first") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.fh.flush()
        return self

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()  # closing the file releases the flock
            self.fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def load_run(run_dir: str | Path, checkpoint: str = "best", device_type: str = "cpu", verified: Path | None = None):
    """(config, model, tokenizer) of a run, from a verified checkpoint; the model is on the CPU,
    its attention implementation the run's `model.attention` for `device_type`. `verified`: the
    checkpoint folder when the caller has just verified it (routetune.load), so its files are not
    hashed twice."""
    run_dir = check_run_folder(run_dir)
    cfg = config_from_run(run_dir)
    folder = verified or ckpt.run_checkpoint(run_dir, checkpoint)
    return cfg, RoutedModel.load(folder, cfg.model.attention, device_type), load_tokenizer(str(folder))


def load_for_inference(run_dir: str | Path, checkpoint: str = "best", device: str | None = None,
                       precision: str | None = None, verified: Path | None = None) -> tuple:
    """(config, model, tokenizer, hardware) of a run, ready to evaluate, predict or serve on this
    machine: device and precision chosen here (`--device` / `--precision`, default auto), checked
    before the run is loaded, the model moved there and prepared for inference."""
    hw: Hardware = inference_hardware(device, precision)
    cfg, model, tokenizer = load_run(run_dir, checkpoint, hw.device.type, verified)
    for_inference(model, hw.precision, hw.device)
    return cfg, model, tokenizer, hw
