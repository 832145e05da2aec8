"""One run's life, read in one place.

``workflow.py`` decides *which* run (a new one into a claimed folder, or the continuation of one)
and builds its :class:`~routetune.training.setup.Setup` (``prepare``: everything checked before
the folder is touched). :class:`Lifecycle` then takes the run through its phases, in this order:

1. ``open``: the run's log (train.log, with the set-up's lines held from before the folder
   existed), the start lines, ``hardware.json``, the metrics log and the trainer.
2. ``restore_or_score_base``: a resumed run restores its training state (training/state.py); a
   new one scores the base model on the general text (``before.json``, cached).
3. ``train``: the trackers join the metrics log, and the trainer runs the loop
   (training/engine.py), which owns nothing but the loop.
4. ``summarise``: the best checkpoint scored on the test sets and the general text
   (``summary.json``), and the results as the metrics log's last event.
5. ``close``: the trackers and the run's log closed, whatever happened.

Every rank trains; rank 0 alone logs to the run folder, scores and writes, and the others wait for
it at the end.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

from routetune.errors import RoutetuneError
from routetune.evaluate import retention
from routetune.evaluate.tasks import score_sets
from routetune.files import write_text_atomic
from routetune.model.trainable import parameter_groups
from routetune.run_folder import RunFolder
from routetune.runs import Claim
from routetune.training import checkpoint as ckpt
from routetune.training import compiled, distributed, events, tracking
from routetune.training.callbacks import MetricsLog
from routetune.training.engine import FitResult, Trainer
from routetune.training.setup import Setup

log = logging.getLogger("routetune")


class HeldLogs(logging.Handler):
    """Keeps the log records of the set-up (before the run folder exists) for train.log."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> HeldLogs:
        logging.getLogger("routetune").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("routetune").removeHandler(self)


class Lifecycle:
    """A run from its first log line to its summary (see the module's docstring for the phases)."""

    def __init__(self, setup: Setup, run_dir: Path, run_test: bool, resume_from: Path | None = None,
                 claimed: Claim | None = None, held: list | None = None, callbacks: list | None = None):
        self.setup, self.folder, self.run_test = setup, RunFolder(run_dir), run_test
        self.resume_from, self.claimed, self.held = resume_from, claimed, held
        self.callbacks = list(callbacks or [])
        self.main = setup.world.main
        self.started = time.time()
        self.handler: logging.Handler | None = None
        self.trackers: list = []
        self.metrics: MetricsLog | None = None
        self.trainer: Trainer | None = None
        self.fit: dict | None = None  # the recipe of the MLM head fitted on both sides (masked-LM retention)

    def run(self) -> tuple[Path, dict]:
        """The phases in order; returns (run folder, summary) on every rank."""
        try:
            self.open()
            self.restore_or_score_base()
            result = self.train()
            summary = self.summarise(result)
            return self.folder.path, summary
        except RoutetuneError as exc:
            if self.handler is not None:  # the error that ends the run is train.log's last line
                self.handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (exc,), None))
            raise
        finally:
            self.close()

    # ---------------------------------------------------------------- phases
    def open(self) -> None:
        setup, world, hw = self.setup, self.setup.world, self.setup.hardware
        if self.main:
            self.handler = _add_file_log(self.folder.log, self.held)
            self.fit = retention.fit_recipe(setup.cfg, setup.before_sets(), setup.objectives)
        log.info("run folder %s", self.folder.path)
        log.info("device %s, precision %s (%s)%s", hw.device, hw.precision, hw.reason,
                 f"; {world.size} processes ({world.backend})" if world.distributed else "")
        if self.main:
            self._write_hardware()
        # rank 0 writes metrics.jsonl; the callbacks (and, once training starts, the trackers) get every event
        self.metrics = MetricsLog(self.folder.metrics, enabled=self.main, listeners=self.callbacks)
        hooks = [lambda step: self.claimed.commit()] if self.claimed is not None else []
        # the folder an --overwrite replaced goes once this run can be resumed (its first checkpoint)
        self.trainer = Trainer(setup, self.folder.path, metrics=self.metrics, after_checkpoint=hooks)

    def restore_or_score_base(self) -> None:
        setup = self.setup
        if self.resume_from is not None:
            step = self.trainer.restore(self.resume_from)
            log.info("resumed from %s at step %d of %d", self.resume_from.name, step, setup.total_steps)
        elif setup.cfg.train.eval_before and setup.before_sets():
            # sharded: gathered on every rank, rank 0 scores; compiled blocks score eagerly
            with distributed.full_params(self.trainer.ddp), compiled.eager(self.trainer.compiler):
                if self.main:
                    self._score_base()

    def train(self) -> FitResult:
        if self.main:
            self.trackers = tracking.open_trackers(self.setup.cfg, self.folder.path,
                                                   self.trainer.batches.step if self.resume_from else None)
            self.metrics.listeners += self.trackers
        self.setup.world.barrier()
        return self.trainer.run()

    def summarise(self, result: FitResult) -> dict:
        world = self.setup.world
        best = self.folder.checkpoints / "best"
        if (best / ckpt.COMPLETE).is_file():  # into the trained model on every rank: no second copy of the base
            ckpt.verify(best)
            with distributed.loading(self.trainer.ddp):  # sharded: each rank keeps its slice
                self.setup.model.load_weights(best)
        with distributed.full_params(self.trainer.ddp):  # sharded: gathered for rank 0's scoring
            summary = self._summary(result) if self.main else {}
            if self.main:  # the results reach the trackers and callbacks too
                self.metrics.write(events.FINAL, step=summary["steps"], test=summary.get("test", {}),
                                   dev=summary.get("dev", {}), before_after=summary.get("before_after", {}))
            world.barrier()  # the others leave once rank 0 has written the summary
        return world.broadcast(summary)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        if self.handler is not None:
            logging.getLogger("routetune").removeHandler(self.handler)
            self.handler.close()

    # ---------------------------------------------------------------- what the phases write
    def _write_hardware(self) -> None:
        """hardware.json: the device, precision and processes of each session of the run (a resume appends)."""
        path, setup = self.folder.hardware, self.setup
        sessions = json.loads(path.read_text(encoding="utf-8")) if self.resume_from and path.is_file() else []
        sessions.append({**setup.hardware.describe(), **setup.world.describe(),
                         "started": datetime.now().isoformat(timespec="seconds")})
        write_text_atomic(path, json.dumps(sessions, indent=2) + "\n")

    def _score_base(self) -> None:
        """The base model's scores on the retention text (from the cache when it has them): before.json."""
        setup, t0 = self.setup, time.time()
        before = retention.score_before(setup.model, setup.model_path, setup.before_sets(), setup.objectives,
                                        setup.tokenizer, setup.cfg, setup.hardware, self.fit)
        if time.time() - t0 > 1:  # not from the cache
            log.info("scoring the base model on the general text took %.0f s (cached for later runs of this "
                     "model and text; `train --no-retention` skips it)", time.time() - t0)
        write_text_atomic(self.folder.before, json.dumps(before, indent=2) + "\n")

    def _summary(self, result: FitResult) -> dict:
        """summary.json: the run, its best checkpoint's test scores, base vs fine-tuned."""
        setup, cfg = self.setup, self.setup.cfg
        best = self.folder.checkpoints / "best"
        checkpoint = "best" if (best / ckpt.COMPLETE).is_file() else "last"
        summary = {
            "run": str(self.folder.path),
            "steps": result.steps,
            "planned_steps": setup.total_steps,
            "stopped_early": result.stopped_early,
            "best": {"metric": cfg.train.early_stopping.metric, "value": result.best_metric,
                     "step": result.best_step, "checkpoint": checkpoint},
            "sources": result.sources,
            "train_seconds": round(result.train_seconds, 2),
            "tokens_per_s": round(result.tokens / max(result.train_seconds, 1e-9), 1),
            **({"compiled": result.compiled} if result.compiled else {}),
            "parameters": parameter_summary(setup.model),
            "hardware": {**setup.hardware.describe(), **setup.world.describe()},
        }
        evals = setup.evals if cfg.retention.score else {}  # else only a retention budget's measure
        dev_evals = {n: s for n, s in evals.items() if cfg.evals[n].split == "dev"}
        test_sets = {**setup.test, **{n: s for n, s in evals.items() if n not in dev_evals}}
        wanted = {k: sets for k, sets in (("test", test_sets if self.run_test else {}), ("dev", dev_evals)) if sets}
        if wanted:
            model = setup.model  # the best checkpoint's weights when there is one (loaded by `summarise`)
            scores = self._score_final(model, {n: s for sets in wanted.values() for n, s in sets.items()}, summary)
            for key, sets in wanted.items():  # dev `evals` sets are scored with or without --test
                summary[key] = {n: scores[n] for n in sets if n in scores}
        if self.folder.before.is_file():
            summary["before"] = json.loads(self.folder.before.read_text(encoding="utf-8"))
            summary["before_after"] = retention.before_after(summary["before"],
                                                             {**summary.get("test", {}), **summary.get("dev", {})})
        summary["wall_seconds"] = round(time.time() - self.started, 2)
        write_text_atomic(self.folder.summary, json.dumps(summary, indent=2) + "\n")
        return summary

    def _score_final(self, model, sets: dict, summary: dict) -> dict:
        """`model`'s scores on `sets`; masked-LM retention sets through an MLM head fitted with the
        recipe the base model's head was fitted with."""
        setup, cfg = self.setup, self.setup.cfg
        _, scores = score_sets(model, sets, setup.objectives, setup.tokenizer, cfg, setup.hardware.precision)
        lm_sets = {n: s for n, s in setup.before_sets().items() if n in sets}
        if self.fit is not None and lm_sets:
            t0 = time.time()
            scores.update(retention.score_with_fitted_head(model, self.fit, lm_sets, setup.objectives,
                                                           setup.tokenizer, cfg, setup.hardware.precision))
            summary["retention_note"] = retention.fit_note(self.fit)
            log.info("general-text retention: the masked-LM head fit and scoring of the fine-tuned model took "
                     "%.0f s (`train --no-retention` skips the before/after scoring, for a quick check)",
                     time.time() - t0)
        return scores


def _add_file_log(path: Path, held: list | None = None) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for record in held or []:  # the set-up summary, logged before the folder existed
        handler.handle(record)
    logging.getLogger("routetune").addHandler(handler)
    return handler


def parameter_summary(model) -> dict:
    groups = parameter_groups(model)
    return {"trainable": sum(t for t, _ in groups.values()), "total": sum(n for _, n in groups.values()),
            "groups": {g: {"trainable": t, "total": n} for g, (t, n) in sorted(groups.items())}}
