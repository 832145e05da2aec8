"""Run-level workflows used by the CLI: train a config into a run folder, evaluate a run, load a
run for prediction. Each returns plain data; printing is the CLI's job."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import datetime
from pathlib import Path


from routetune.run_folder import RunFolder
from routetune import objectives
from routetune.config import Config, config_from_run, dump_config, load_config
from routetune.errors import RoutetuneError, RunError
from routetune.files import write_text_atomic
from routetune.data.build import build, resolve_objective
from routetune.evaluate import retention
from routetune.evaluate.tasks import score_sets
from routetune.model.trainable import parameter_groups
from routetune.model.routed import RoutedModel
from routetune.runs import Claim, RunLock, check_claimable, claim, load_for_inference
from routetune.training import checkpoint as ckpt
from routetune.training import distributed, events, tracking
from routetune.training.engine import Trainer
from routetune.training.setup import Setup, prepare

log = logging.getLogger("routetune")


def run_dir_for(cfg: Config, stem: str) -> Path:
    """OUTPUT_DIR/run.name, or OUTPUT_DIR/STEM-<date-time> (STEM: the config file's, or `run`)."""
    name = cfg.run.name or f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.output_dir) / name


class _HeldLogs(logging.Handler):
    """Keeps the log records of the set-up (before the run folder exists) for train.log."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _HeldLogs:
        logging.getLogger("routetune").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("routetune").removeHandler(self)


def _add_file_log(path: Path, held: list | None = None) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for record in held or []:  # the set-up summary, logged before the folder existed
        handler.handle(record)
    logging.getLogger("routetune").addHandler(handler)
    return handler


def _parameter_summary(model) -> dict:
    groups = parameter_groups(model)
    return {"trainable": sum(t for t, _ in groups.values()), "total": sum(n for _, n in groups.values()),
            "groups": {g: {"trainable": t, "total": n} for g, (t, n) in sorted(groups.items())}}


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
    with _HeldLogs() as held:
        # reads and checks all data, loads the model: fails before the folder is touched
        setup = prepare(cfg, world=world)
    if not world.main:  # rank 0 claims and writes the run folder
        world.barrier()
        return _run(setup, run_dir, run_test, resume_from=None)
    claimed = claim(run_dir, overwrite)
    try:
        with RunLock(run_dir):
            write_text_atomic(RunFolder(run_dir).config, dump_config(cfg))
            write_text_atomic(RunFolder(run_dir).labels, json.dumps(setup.labels, indent=2) + "\n")
            world.barrier()
            return _run(setup, run_dir, run_test, resume_from=None, claimed=claimed, held=held.records,
                                   callbacks=callbacks)
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
        with _HeldLogs() as held:
            setup = prepare(cfg, device, precision, world=world)
        _check_labels(run_dir, setup.labels)
        return _run(setup, run_dir, run_test, resume_from=Path(folder), held=held.records,
                               callbacks=callbacks)


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


def _write_hardware(run_dir: Path, setup: Setup, resumed: bool) -> None:
    """hardware.json: the device, precision and processes of each session of the run (a resume appends)."""
    path = RunFolder(run_dir).hardware
    sessions = json.loads(path.read_text(encoding="utf-8")) if resumed and path.is_file() else []
    sessions.append({**setup.hardware.describe(), **setup.world.describe(),
                     "started": datetime.now().isoformat(timespec="seconds")})
    write_text_atomic(path, json.dumps(sessions, indent=2) + "\n")


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


class _RunLog:
    """train.log for the run (rank 0): the set-up lines held from before the folder existed, every
    line while the run goes, and a RoutetuneError that ends it (the CLI prints it as its last line)."""

    def __init__(self, run_dir: Path, held: list | None, main: bool):
        self.handler = _add_file_log(RunFolder(run_dir).log, held) if main else None

    def __enter__(self) -> _RunLog:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.handler is None:
            return
        if isinstance(exc, RoutetuneError):
            self.handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (exc,), None))
        logging.getLogger("routetune").removeHandler(self.handler)
        self.handler.close()


def _run(setup: Setup, run_dir: Path, run_test: bool, resume_from: Path | None, claimed: Claim | None = None,
         held: list | None = None, callbacks: list | None = None) -> tuple[Path, dict]:
    """One run, top to bottom: the log and hardware.json; the trainer, restored from `resume_from`
    or after the base model is scored (before.json); the trackers; training; the best checkpoint
    scored on the test sets and the retention text (summary.json); the results to the trackers.
    Every rank trains; rank 0 alone logs to the run folder, scores and writes, and the others wait
    for it at the end."""
    started, cfg, world = time.time(), setup.cfg, setup.world
    # the recipe of the MLM head fitted on both sides for masked-LM retention (rank 0 scores)
    fit = retention.fit_recipe(cfg, setup.before_sets(), setup.objectives) if world.main else None
    trackers: list = []
    with _RunLog(run_dir, held, world.main):
        try:
            _log_start(setup, run_dir, resumed=resume_from is not None)
            trainer = Trainer(setup, run_dir, listeners=list(callbacks or []))
            if claimed is not None:  # the replaced run folder goes once this one can be resumed
                trainer.after_checkpoint.append(lambda step: claimed.commit())
            step = None
            if resume_from is not None:
                step = trainer.restore(resume_from)
                log.info("resumed from %s at step %d of %d", resume_from.name, step, setup.total_steps)
            elif world.main and cfg.train.eval_before and setup.before_sets():
                _score_before(setup, run_dir, fit)
            if world.main:
                trackers = tracking.open_trackers(cfg, run_dir, step)
                trainer.metrics.listeners += trackers
            world.barrier()
            result = trainer.run()
            summary = _summarize(setup, run_dir, result, run_test, started, fit) if world.main else {}
            if world.main:  # the results reach the trackers and callbacks too
                trainer.metrics.write(events.FINAL, step=summary["steps"], test=summary.get("test", {}),
                                      dev=summary.get("dev", {}), before_after=summary.get("before_after", {}))
            world.barrier()  # the others leave once rank 0 has written the summary
            return run_dir, world.broadcast(summary)
        finally:
            for tracker in trackers:
                tracker.close()


def _log_start(setup: Setup, run_dir: Path, resumed: bool) -> None:
    world, hw = setup.world, setup.hardware
    log.info("run folder %s", run_dir)
    log.info("device %s, precision %s (%s)%s", hw.device, hw.precision, hw.reason,
             f"; {world.size} processes ({world.backend})" if world.distributed else "")
    if world.main:
        _write_hardware(run_dir, setup, resumed)


def _score_before(setup: Setup, run_dir: Path, fit: dict | None) -> None:
    """The base model's scores on the retention text (from the cache when it has them): before.json."""
    t0 = time.time()
    before = retention.score_before(setup.model, setup.model_path, setup.before_sets(), setup.objectives,
                                    setup.tokenizer, setup.cfg, setup.hardware, fit)
    if time.time() - t0 > 1:  # not from the cache
        log.info("scoring the base model on the general text took %.0f s (cached for later runs of this "
                 "model and text; `train --no-retention` skips it)", time.time() - t0)
    write_text_atomic(RunFolder(run_dir).before, json.dumps(before, indent=2) + "\n")


def _summarize(setup: Setup, run_dir: Path, result, run_test: bool, started: float, fit: dict | None) -> dict:
    """summary.json: the run, its best checkpoint's test scores, base vs fine-tuned."""
    cfg = setup.cfg
    best = RunFolder(run_dir).checkpoints / "best"
    checkpoint = "best" if (best / ckpt.COMPLETE).is_file() else "last"
    summary = {
        "run": str(run_dir),
        "steps": result.steps,
        "planned_steps": setup.total_steps,
        "stopped_early": result.stopped_early,
        "best": {"metric": cfg.train.early_stopping.metric, "value": result.best_metric,
                 "step": result.best_step, "checkpoint": checkpoint},
        "sources": result.sources,
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_s": round(result.tokens / max(result.train_seconds, 1e-9), 1),
        "parameters": _parameter_summary(setup.model),
        "hardware": {**setup.hardware.describe(), **setup.world.describe()},
    }
    evals = setup.evals if cfg.retention.score else {}  # else only a retention budget's measure
    dev_evals = {n: s for n, s in evals.items() if cfg.evals[n].split == "dev"}
    test_sets = {**setup.test, **{n: s for n, s in evals.items() if n not in dev_evals}}
    wanted = {k: sets for k, sets in (("test", test_sets if run_test else {}), ("dev", dev_evals)) if sets}
    if wanted:
        model = setup.model  # the last step's weights, unless the best checkpoint is another
        if checkpoint == "best":
            ckpt.verify(best)
            model = RoutedModel.load(best, cfg.model.attention, setup.hardware.device.type).to(setup.hardware.device)
        scores = _score_final(setup, model, {n: s for sets in wanted.values() for n, s in sets.items()}, summary, fit)
        for key, sets in wanted.items():  # dev `evals` sets are scored with or without --test
            summary[key] = {n: scores[n] for n in sets if n in scores}
    before_path = RunFolder(run_dir).before
    if before_path.is_file():
        summary["before"] = json.loads(before_path.read_text(encoding="utf-8"))
        summary["before_after"] = retention.before_after(summary["before"],
                                                         {**summary.get("test", {}), **summary.get("dev", {})})
    summary["wall_seconds"] = round(time.time() - started, 2)
    write_text_atomic(RunFolder(run_dir).summary, json.dumps(summary, indent=2) + "\n")
    return summary


def _score_final(setup: Setup, model, sets: dict, summary: dict, fit: dict | None) -> dict:
    """`model`'s scores on `sets`; masked-LM retention sets through an MLM head fitted with `fit`,
    the recipe the base model's head was fitted with."""
    cfg = setup.cfg
    _, scores = score_sets(model, sets, setup.objectives, setup.tokenizer, cfg, setup.hardware.precision)
    lm_sets = {n: s for n, s in setup.before_sets().items() if n in sets}
    if fit is not None and lm_sets:
        t0 = time.time()
        scores.update(retention.score_with_fitted_head(model, fit, lm_sets, setup.objectives,
                                                       setup.tokenizer, cfg, setup.hardware.precision))
        summary["retention_note"] = retention.fit_note(fit)
        log.info("general-text retention: the masked-LM head fit and scoring of the fine-tuned model took %.0f s "
                 "(`train --no-retention` skips the before/after scoring, for a quick check)", time.time() - t0)
    return scores


SPLITS = {"dev": "dev", "validation": "dev", "test": "test"}  # what `evaluate` takes (datasets say "validation")


def plain(value):
    """`value` with NumPy numbers (metrics libraries return them) as plain Python ones."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy scalars (and 0-d arrays)
    return item() if callable(item) and type(value).__module__ == "numpy" else value


def evaluate(run_dir: str | Path, split: str = "test", checkpoint: str = "best",
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
