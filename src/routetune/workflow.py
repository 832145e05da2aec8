"""Run-level workflows used by the CLI and the Python API: which run (a new one into a claimed
folder, or the continuation of one), its set-up checked before the folder is touched, then its
life (lifecycle.py); and evaluating a run. Each returns plain data; printing is the CLI's job."""

from __future__ import annotations

import contextlib
import json
import logging
from datetime import datetime
from pathlib import Path


from routetune.run_folder import RunFolder
from routetune import objectives
from routetune.config import Config, config_from_run, dump_config, load_config
from routetune.errors import RunError
from routetune.files import write_text_atomic
from routetune.data.build import build, resolve_objective
from routetune.evaluate.tasks import score_sets
from routetune.lifecycle import HeldLogs, Lifecycle
from routetune.runs import RunLock, check_claimable, claim, load_for_inference
from routetune.training import checkpoint as ckpt
from routetune.training import distributed
from routetune.training.setup import prepare

log = logging.getLogger("routetune")


def run_dir_for(cfg: Config, stem: str) -> Path:
    """OUTPUT_DIR/run.name, or OUTPUT_DIR/STEM-<date-time> (STEM: the config file's, or `run`)."""
    name = cfg.run.name or f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.output_dir) / name


def train(config_path: str | Path, overrides: list[str] | None = None, overwrite: bool = False,
          run_test: bool = True, resume: bool = False) -> tuple[Path, dict]:
    """Validate everything, train, evaluate dev/test with the best checkpoint, write summary.json.

    With `resume`, continue the run folder this config names from its newest complete checkpoint
    (the config must equal the one saved in the run folder)."""
    config_path = Path(config_path)
    return train_loaded(load_config(config_path, overrides), config_path.stem, overwrite, run_test, resume)


def train_loaded(cfg: Config, stem: str, overwrite: bool = False, run_test: bool = True,
                 resume: bool = False) -> tuple[Path, dict]:
    """:func:`train` of a config already loaded (the command line loads it once and checks it, its
    data paths and its model before torch loads); `stem` names a run without run.name."""
    run_dir = run_dir_for(cfg, stem)
    if not resume:
        return train_config(cfg, run_dir, overwrite, run_test)
    if cfg.run.name is None:
        raise RunError("--resume needs run.name in the config (or use: routetune resume RUN)")
    saved = config_from_run(run_dir) if run_dir.is_dir() else None
    if saved is None:
        raise RunError(f"{run_dir}: no run folder to resume")
    diff = _config_diff(saved.model_dump(mode="json"), cfg.model_dump(mode="json"))
    if diff:
        raise RunError(f"{run_dir}: the config differs from the run's saved config at "
                       f"{', '.join(diff[:5])}; resume with the same config (or start a new run)")
    return resume_run(run_dir, run_test)


def train_config(cfg: Config, run_dir: Path, overwrite: bool = False, run_test: bool = True,
                 callbacks: list | None = None) -> tuple[Path, dict]:
    """Train a validated config into `run_dir` (see :func:`train`). `callbacks` are called with
    every event of metrics.jsonl as it is written (rank 0)."""
    world = distributed.world(cfg.train.device)  # one process, or this rank of a torchrun launch
    distributed.quiet_other_ranks(world)
    if world.main:
        check_claimable(run_dir, overwrite)  # refuse before any heavy work
    with HeldLogs() as held:
        # reads and checks all data, loads the model: fails before the folder is touched
        setup = prepare(cfg, world=world)
    if not world.main:  # rank 0 claims and writes the run folder
        world.barrier()
        return Lifecycle(setup, run_dir, run_test).run()
    claimed = claim(run_dir, overwrite)
    try:
        with RunLock(run_dir):
            write_text_atomic(RunFolder(run_dir).config, dump_config(cfg))
            write_text_atomic(RunFolder(run_dir).labels, json.dumps(setup.labels, indent=2) + "\n")
            world.barrier()
            return Lifecycle(setup, run_dir, run_test, claimed=claimed, held=held.records,
                             callbacks=callbacks).run()
    except BaseException:
        claimed.rollback()  # a no-op once the new run has its first checkpoint
        raise


def resume_run(run_dir: str | Path, run_test: bool = True, device: str | None = None,
               precision: str | None = None, callbacks: list | None = None) -> tuple[Path, dict]:
    """Continue a run from its newest complete checkpoint, exactly where it stopped. `device` and
    `precision` override the run's (a GPU run can continue on a CPU; exact continuation holds on
    the same device type and precision)."""
    run_dir = Path(run_dir)
    cfg = config_from_run(run_dir)
    finished = RunFolder(run_dir).summary
    if finished.is_file():
        try:
            summary = json.loads(finished.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise RunError(f"{finished}: not valid JSON, so whether the run finished is unknown; if it did not, "
                           "move the file away and resume again") from None
        log.info("%s finished at step %s of %s (summary.json); nothing to resume, nothing changed", run_dir,
                 summary.get("steps"), summary.get("planned_steps"))
        return run_dir, summary
    world = distributed.world(device or cfg.train.device)
    distributed.quiet_other_ranks(world)
    # rank 0 holds the lock: a live run's temporary checkpoint folders are not ours to clean
    with RunLock(run_dir) if world.main else contextlib.nullcontext():
        folder = _resume_point(run_dir) if world.main else None
        folder = world.broadcast(folder)
        if folder is None:
            raise RunError(f"{run_dir}: no complete checkpoint to resume from{ckpt.replaced_hint(run_dir)}")
        with HeldLogs() as held:
            setup = prepare(cfg, device, precision, world=world)
        _check_labels(run_dir, setup.labels)
        return Lifecycle(setup, run_dir, run_test, resume_from=Path(folder), held=held.records,
                         callbacks=callbacks).run()


def _resume_point(run_dir: Path) -> str | None:
    done = ckpt.recover(RunFolder(run_dir).checkpoints)
    for kind, what in (("completed", "checkpoints whose files match their manifest, marked complete"),
                       ("restored", "checkpoints put back from an interrupted replacement"),
                       ("removed", "temporary folders of an interrupted checkpoint write, removed"),
                       ("kept", "unverifiable checkpoint folders, left in place and not used")):
        if done[kind]:
            log.warning("%s: %s", what, ", ".join(done[kind]))
    folder = ckpt.newest_valid(RunFolder(run_dir).checkpoints)
    return str(folder) if folder is not None else None


def _check_labels(run_dir: Path, labels: dict) -> None:
    path = RunFolder(run_dir).labels
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing; a resumed run checks its label sets against it. Restore it from a copy "
                       "(the label lists are also in each checkpoint's heads.json), or start a new run") from None
    except (ValueError, UnicodeDecodeError):
        raise RunError(f"{path}: not valid JSON; restore it from a copy, or start a new run") from None
    if not isinstance(saved, dict):
        raise RunError(f"{path}: expected a JSON object of label lists by source")
    for name in set(saved) | set(labels):
        if saved.get(name) != labels.get(name):
            new = sorted(set(labels.get(name, [])) - set(saved.get(name, [])))
            gone = sorted(set(saved.get(name, [])) - set(labels.get(name, [])))
            raise RunError(f"{run_dir}/labels.json: the label set of source {name!r} changed since the run started "
                           f"(new: {new or 'none'}; missing: {gone or 'none'}); a resumed run must see the same labels")


def _config_diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


SPLITS = {"dev": "dev", "validation": "dev", "test": "test"}  # what `evaluate` takes (datasets say "validation")


def plain(value):
    """`value` with NumPy numbers (metrics libraries return them) as plain Python ones."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy scalars (and 0-d arrays)
    return item() if callable(item) and type(value).__module__ == "numpy" else value


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = "best",
             sources: list[str] | None = None, device: str | None = None, precision: str | None = None,
             cfg: Config | None = None, loaded=None) -> dict:
    """Score a run's checkpoint on the dev or test sets of its sources (files or holdout). `cfg`
    gives the sources to score instead of the run's own config (a continual stage scores each
    earlier task as its own config defines it). `split`: dev (or validation) or test. `loaded`:
    a function giving the run as load_for_inference does (a routetune.Run's, loaded once)."""
    if split not in SPLITS:
        raise RunError(f"split: expected dev, validation or test, got {split!r}")
    split = SPLITS[split]
    run_cfg, model, tokenizer, hw = loaded() if loaded else load_for_inference(run_dir, checkpoint, device, precision)
    cfg = cfg or run_cfg
    missing = [n for n in sources or [] if n not in cfg.sources]
    if missing:
        raise RunError(f"{run_dir}: no source named {missing[0]!r} (sources: {', '.join(cfg.sources)})")
    objectives_of = {n: resolve_objective(sc.objective, model.is_decoder, n) for n, sc in cfg.sources.items()}
    for name in sources or []:
        if objectives.get(objectives_of[name]).supervised and name not in model.heads:
            raise RunError(f"{run_dir}: has no head {name!r}")
    labels = {n: h.labels for n, h in model.heads.items()}
    _, dev, test = build(cfg, tokenizer, objectives_of, labels, allow_new_labels=False)
    sets = {n: s for n, s in (dev if split == "dev" else test).items() if not sources or n in sources}
    if not sets:
        raise RunError(f"{run_dir}: no {'source' if not sources else 'source of ' + ', '.join(sources)} "
                       f"has a {split} set")
    return score_sets(model, sets, objectives_of, tokenizer, cfg, hw.precision)[1]
