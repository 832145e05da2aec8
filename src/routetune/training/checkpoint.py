"""Checkpoints that never half-exist.

A checkpoint is written into a temporary folder inside ``checkpoints/``, every file fsynced, a
``manifest.json`` of SHA-256 digests added, the folder renamed into place, and only then a
``COMPLETE`` marker (holding the manifest's own digest) written. A folder without the marker is
not loaded. :func:`recover` repairs what an interrupted write leaves, and deletes only what is
provably a partial write of routetune's own: a folder whose files match its manifest is completed,
never removed. Loading verifies every digest and names the first file that does not match.

The digests catch accidents (a cut copy, a bad disk, a file edited by mistake), not tampering:
whoever can write the folder can rewrite the manifest too. With ``ROUTETUNE_SIGNING_KEY`` set,
each checkpoint also gets a ``SIGNATURE`` (an HMAC-SHA256 of its manifest under that key), which
:func:`verify_signature` (``serve --require-signed``) checks.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
from pathlib import Path

from routetune.errors import RoutetuneError, RunError
from routetune.run_paths import replaced_hint
from routetune.model.methods import METHODS
from routetune.model.methods.base import FORMATS, NOTE
from routetune.model.routed import HEADS_SPEC

log = logging.getLogger("routetune")

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
SIGNATURE = "SIGNATURE"
SIGNING_KEY_ENV = "ROUTETUNE_SIGNING_KEY"
STEP_DIR = re.compile(r"^step-(\d{8})$")
PARTIAL = re.compile(r"^\.(tmp|old)-(best|step-\d{8})-\d+$")  # the temporary names save_atomic writes


class CheckpointError(RoutetuneError):
    """A checkpoint is incomplete, truncated or altered."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE, SIGNATURE))


def _no_space(exc: BaseException) -> bool:
    """A write failed because the disk is full (safetensors reports it in its own error type)."""
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc) \
        or "StorageFull" in str(exc)


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def _disk_full(folder: Path, tmp: Path) -> RunError:
    """The one-line error for a checkpoint that did not fit: where, how much it needs, how much is free."""
    written = _size_mb(tmp) if tmp.exists() else 0.0
    shutil.rmtree(tmp, ignore_errors=True)  # ours, and partial: never loaded
    done = step_checkpoints(folder.parent)
    need = max(written, _size_mb(done[-1][1]) if done else 0.0)
    free = shutil.disk_usage(folder.parent).free / 1e6
    kept = f"the checkpoint {done[-1][1].name} is intact; " if done else ""
    return RunError(f"{folder.parent}: no space left on the device while writing checkpoint {folder.name} "
                    f"(it needs about {need:.0f} MB; {free:.0f} MB free); {kept}free space, then continue with "
                    f"`routetune resume {folder.parent.parent}`")


def sign(folder: Path, key: str | None = None) -> bool:
    """Write SIGNATURE (HMAC-SHA256 of the manifest under the user's key) if a key is given or set in
    ROUTETUNE_SIGNING_KEY. Returns whether it signed."""
    key = key if key is not None else os.environ.get(SIGNING_KEY_ENV)
    if not key:
        return False
    mac = hmac.new(key.encode("utf-8"), (folder / MANIFEST).read_bytes(), hashlib.sha256).hexdigest()
    (folder / SIGNATURE).write_text(mac + "\n")
    return True


def verify_signature(folder: Path, key: str | None) -> None:
    """Raise CheckpointError unless `folder`'s SIGNATURE is the HMAC of its manifest under `key`
    (call after :func:`verify`, which checks the files against the manifest)."""
    if not key:
        raise CheckpointError(f"{folder}: a signed checkpoint is required but {SIGNING_KEY_ENV} is not set")
    sig = folder / SIGNATURE
    if not sig.is_file():
        raise CheckpointError(f"{sig}: missing; the checkpoint was not signed (set {SIGNING_KEY_ENV} when training "
                              "or exporting)")
    want = hmac.new(key.encode("utf-8"), (folder / MANIFEST).read_bytes(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sig.read_text().strip(), want):
        raise CheckpointError(f"{sig}: does not match the manifest under this key (altered, or signed with "
                              "another key)")


def save_atomic(folder: Path, write, after_files=None) -> None:
    """Call ``write(tmp)``; then fsync, add the manifest, rename to `folder`, mark COMPLETE.

    An existing `folder` is replaced only after the new one is complete on disk. `after_files`
    is a test hook called between writing the files and the rename. A full disk is a RunError
    naming the folder and the space needed; the partial folder goes, everything before it stays.
    """
    tmp = begin_atomic(folder)
    try:
        write(tmp)
    except Exception as exc:
        if _no_space(exc):
            raise _disk_full(folder, tmp) from None
        raise
    finish_atomic(folder, tmp, after_files)


def begin_atomic(folder: Path) -> Path:
    """The temporary folder a checkpoint of `folder` is written into (by one process, or by every
    process of a sharded save, each its part): a name `recover` knows as a partial write."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_atomic(folder: Path, tmp: Path, after_files=None) -> None:
    """Once every file is in `tmp`: fsync, manifest, rename to `folder`, COMPLETE (see save_atomic)."""
    try:
        manifest = {}
        for f in _files(tmp):
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
            manifest[f.relative_to(tmp).as_posix()] = _sha256(f)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        with (tmp / MANIFEST).open("rb") as fh:
            os.fsync(fh.fileno())
        sign(tmp)
        _fsync_dir(tmp)
    except Exception as exc:
        if _no_space(exc):
            raise _disk_full(folder, tmp) from None
        raise
    if after_files is not None:
        after_files(tmp)
    old = folder.parent / f".old-{folder.name}-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _mark_complete(folder)
    if old.exists():
        shutil.rmtree(old)


def _mark_complete(folder: Path) -> None:
    (folder / COMPLETE).write_text(_sha256(folder / MANIFEST) + "\n")
    with (folder / COMPLETE).open("rb") as fh:
        os.fsync(fh.fileno())
    _fsync_dir(folder.parent)


# The files a checkpoint of each format cannot be without, as the formats declare them
# (model/methods/base.py) with the heads' file (model/routed.py): a manifest that lists fewer (one
# rewritten after a file was removed) is refused, whatever its digests say. `full` also needs
# model.safetensors or its sharded index.
REQUIRED = {kind: files | {HEADS_SPEC} for kind, files in FORMATS.items()}
OPTIMIZER_TENSORS, OPTIMIZER_META, TRAINER_STATE = "optimizer.safetensors", "optimizer.json", "trainer_state.json"
RNG = "rng.safetensors"  # rank 0's random-number state (rng_file)
STEP_STATE = {OPTIMIZER_TENSORS, OPTIMIZER_META, RNG, TRAINER_STATE}
SHARDED = "sharded"  # a sharded step checkpoint's torch.distributed.checkpoint folder (model and optimizer)
SHARDED_META = f"{SHARDED}/.metadata"


def is_sharded(folder: Path) -> bool:
    """A step checkpoint each process of a sharded run wrote its part of (not loadable as a model)."""
    return (Path(folder) / SHARDED_META).is_file()


def _sharded_files(folder: Path) -> set[str]:
    """What a sharded step checkpoint cannot be without: its state, rank 0's random state, the
    metadata and one part per process that wrote it (trainer_state.json says how many)."""
    try:
        processes = int(json.loads((folder / TRAINER_STATE).read_text())["processes"])
    except (OSError, ValueError, KeyError, TypeError):
        processes = 1  # its digest check names the file
    return {TRAINER_STATE, RNG, SHARDED_META, *(f"{SHARDED}/__{r}_0.distcp" for r in range(processes))}


def _kind(folder: Path, listed: set[str]) -> str:
    """The checkpoint format (model/methods/base.py) of the method its routetune.json names."""
    if NOTE not in listed:
        return "full"
    try:
        note = json.loads((folder / NOTE).read_text())
    except (OSError, ValueError):
        return "adapter"  # its digest check below names the file
    method = METHODS.get(note.get("method"))
    return method.checkpoint if method is not None else ("adapter" if note.get("adapter") else "trained")


def _check_file_set(folder: Path, manifest: dict) -> None:
    listed = set(manifest)
    if SHARDED_META in listed and STEP_DIR.match(folder.name):
        kind, need = "sharded step", _sharded_files(folder)
    else:
        kind = _kind(folder, listed)
        need = set(REQUIRED[kind])
        if kind == "full" and "model.safetensors.index.json" not in listed:
            need.add("model.safetensors")
        if STEP_DIR.match(folder.name):
            need |= STEP_STATE
    missing = sorted(need - listed)
    if missing:
        raise CheckpointError(f"{folder / MANIFEST}: a {kind} checkpoint must list {', '.join(missing)}; "
                              "the manifest does not (altered, or written by something else)")
    unlisted = sorted(p.relative_to(folder).as_posix() for p in _files(folder)
                      if p.relative_to(folder).as_posix() not in listed)
    if unlisted:
        raise CheckpointError(f"{folder / unlisted[0]}: file not in the checkpoint's manifest (added afterwards)")


def verify(folder: Path) -> None:
    """Raise CheckpointError unless `folder` is complete, its manifest lists the full file set
    of its kind and nothing else, and every file matches its digest."""
    folder = Path(folder)
    if not (folder / COMPLETE).is_file():
        raise CheckpointError(f"{folder}: checkpoint is incomplete (no {COMPLETE} marker)")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file() or _sha256(manifest_path) != (folder / COMPLETE).read_text().strip():
        raise CheckpointError(f"{manifest_path}: manifest missing or altered")
    verify_files(folder)


def verify_files(folder: Path) -> None:
    """Raise CheckpointError unless the manifest lists the full file set of the checkpoint's kind
    and nothing else, and every file matches its digest (the COMPLETE marker is not consulted)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise CheckpointError(f"{manifest_path}: not valid JSON") from None
    _check_file_set(folder, manifest)
    for rel, digest in manifest.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: file listed in the manifest is missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: SHA-256 does not match the manifest (truncated or altered)")


def step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / COMPLETE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def newest_valid(root: Path) -> Path | None:
    """The newest step checkpoint that verifies; a damaged newer one is reported, not used."""
    errors = []
    for _, path in reversed(step_checkpoints(root)):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
            errors.append(str(exc))
    if errors:
        raise CheckpointError("no step checkpoint verifies: " + "; ".join(errors))
    return None


def recover(root: Path) -> dict[str, list[str]]:
    """Repair what an interrupted checkpoint write leaves in `root` (checkpoints/), deleting only
    what is provably a partial write of routetune's own. Returns what was done, by kind:

    * ``completed``: a checkpoint folder whose files match its manifest but which lacks COMPLETE
      (a kill between the rename and the marker) gets its marker;
    * ``restored``: a checkpoint moved aside (``.old-NAME-PID``) while its replacement was being
      renamed in, whose NAME is now missing, goes back under its name;
    * ``removed``: temporary folders (``.tmp-NAME-PID``, or ``.old-NAME-PID`` once NAME is complete);
    * ``kept``: a checkpoint-named folder without COMPLETE whose files do not match a manifest:
      not provably ours, so it is left as it is and never loaded.
    """
    done: dict[str, list[str]] = {"completed": [], "restored": [], "removed": [], "kept": []}
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = PARTIAL.match(p.name)
        if not (p.is_dir() and m and m.group(1) == "old"):
            continue
        target = root / m.group(2)
        if target.is_dir() and not (target / COMPLETE).is_file():
            _complete_or_keep(target, done)
        if (target / COMPLETE).is_file():  # its replacement is complete: the old copy was on its way out
            shutil.rmtree(p)
            done["removed"].append(p.name)
        elif not target.exists():  # killed between the two renames: the old copy is the checkpoint
            os.replace(p, target)
            done["restored"].append(target.name)
        else:
            done["kept"].append(p.name)
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if PARTIAL.match(p.name):  # .tmp-: written before its rename, so never the only copy of anything
            shutil.rmtree(p)
            done["removed"].append(p.name)
        elif (STEP_DIR.match(p.name) or p.name == "best") and not (p / COMPLETE).is_file():
            _complete_or_keep(p, done)
    return done


def _complete_or_keep(folder: Path, done: dict) -> None:
    try:
        verify_files(folder)
    except CheckpointError as exc:
        log.warning("%s: no %s marker and its files do not match a manifest (%s); left in place, not used",
                    folder, COMPLETE, exc)
        done["kept"].append(folder.name)
        return
    _mark_complete(folder)
    done["completed"].append(folder.name)


def prune(root: Path, keep_last: int) -> None:
    for _, path in step_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path)


# ---- optimizer and RNG state as tensors + JSON (never pickle) ------------------------------


def run_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """A run's checkpoint folder, verified: `best` (the newest step checkpoint when the run had no
    dev set), `last` (the newest step checkpoint), or a checkpoint folder name."""
    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir}: no such run folder{replaced_hint(run_dir)}")
    if which == "best" and (root / "best").is_dir():
        folder = root / "best"
    elif which in ("best", "last"):
        folder = newest_valid(root)
        if folder is None:
            raise RunError(f"{root}: no complete checkpoint; did training finish?{replaced_hint(run_dir)}")
    else:
        folder = root / which
        if not folder.is_dir() or "/" in which or which.startswith("."):
            there = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                if root.is_dir() else []
            raise RunError(f"{run_dir}: no checkpoint named {which!r} (this run has: "
                           f"{', '.join(['last', *there]) if there else 'none'})")
    verify(folder)
    if is_sharded(folder):
        raise RunError(f"{folder}: a sharded step checkpoint (each process of an FSDP run wrote its part, "
                       "train.distributed.checkpoint=sharded): it resumes the run (routetune resume), on any "
                       "number of processes; score, predict or export the run's gathered checkpoints "
                       "(best, or last once the run has finished)")
    return folder
