"""Run folders: claim one safely, hold it exclusively, load a run from it.

Invariant: routetune deletes only what it wrote. A run folder it writes carries the marker file
``.routetune-run``; ``--overwrite`` replaces a folder only when it is one (or an older run folder
holding nothing but a run's own files), and even then the old folder is first renamed aside and
deleted only once the new run has written its first checkpoint; if the new run fails before that,
the old folder is put back. ``train`` and ``resume`` hold an exclusive lock on the folder
(``.lock``, an ``flock`` the kernel releases when the process dies, however it dies), so a second
process can never clean up a live run's temporary checkpoint files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from routetune.config import config_from_run
from routetune.device import Hardware, inference_hardware
from routetune.errors import RunError
from routetune.model.routed import RoutedModel
from routetune.model.inference import for_inference
from routetune.model.load import load_tokenizer
from routetune.training import checkpoint as ckpt

log = logging.getLogger("routetune")

MARKER = ".routetune-run"
LOCK = ".lock"
# what a run folder holds (older folders have no marker; these names identify them)
RUN_ENTRIES = {"config.yaml", "labels.json", "metrics.jsonl", "plan.jsonl", "train.log", "summary.json",
               "before.json", "hardware.json", "checkpoints", "report", LOCK, MARKER}


def is_run_folder(path: Path) -> bool:
    """Whether routetune wrote `path`: its marker, or (older runs) a config.yaml and only run files."""
    if (path / MARKER).is_file():
        return True
    names = {p.name for p in path.iterdir()}
    return "config.yaml" in names and names <= RUN_ENTRIES


class Claim:
    """A run folder made ready for a new run; the folder it replaces (if any) waits aside until
    :meth:`commit` deletes it, or :meth:`rollback` puts it back."""

    def __init__(self, path: Path, aside: Path | None):
        self.path, self.aside = path, aside

    def commit(self) -> None:
        if self.aside is not None and self.aside.exists():
            shutil.rmtree(self.aside)
            log.info("--overwrite: the new run has its first checkpoint; removed the previous run folder")
        self.aside = None

    def rollback(self) -> None:
        if self.aside is None:
            return
        if self.path.exists():
            shutil.rmtree(self.path)  # ours: created by claim() and holding only this failed run
        os.replace(self.aside, self.path)
        log.warning("the new run failed before its first checkpoint; the previous run folder %s is back", self.path)
        self.aside = None


def check_claimable(path: Path, overwrite: bool) -> None:
    """Refuse, before any heavy work, a folder that may not be (re)used."""
    if path.exists() and not path.is_dir():
        raise RunError(f"{path}: exists and is not a folder")
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise RunError(f"{path}: run folder exists and is not empty; choose another run.name "
                       "or pass --overwrite to replace it")
    if not is_run_folder(path):
        raise RunError(f"{path}: --overwrite replaces only a run folder routetune wrote (it has no {MARKER} "
                       "marker and holds other files); nothing was deleted; choose another run.name")


def claim(path: Path, overwrite: bool) -> Claim:
    """Make `path` an empty, marked run folder. An existing run folder (with --overwrite) is
    renamed aside, not deleted: see :class:`Claim`."""
    check_claimable(path, overwrite)
    aside = None
    if path.exists() and any(path.iterdir()):
        with RunLock(path):  # not while another process trains in it
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


def load_run(run_dir: str | Path, checkpoint: str = "best"):
    """(config, model, tokenizer) of a run, from a verified checkpoint; the model is on the CPU."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    cfg = config_from_run(run_dir)
    folder = ckpt.run_checkpoint(run_dir, checkpoint)
    return cfg, RoutedModel.load(folder), load_tokenizer(str(folder))


def load_for_inference(run_dir: str | Path, checkpoint: str = "best", device: str | None = None,
                       precision: str | None = None) -> tuple:
    """(config, model, tokenizer, hardware) of a run, ready to evaluate, predict or serve on this
    machine: device and precision chosen here (`--device` / `--precision`, default auto), checked
    before the run is loaded, the model moved there and prepared for inference."""
    hw: Hardware = inference_hardware(device, precision)
    cfg, model, tokenizer = load_run(run_dir, checkpoint)
    for_inference(model, hw.precision, hw.device)
    return cfg, model, tokenizer, hw
