"""Running a study: each trial trains its setting (for each repeat seed) as an ordinary run
folder in the study folder and scores it on dev data; the loop stops at the trial budget (all
workers together) or this process's time budget."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from routetune.errors import RunError
from routetune.sweep.space import suggest
from routetune.sweep.study import (Study, open_study, retention_change, retention_set, scores, task_metric,
                                   trial_config, trial_name)
from routetune.training.events import EVAL
from routetune.workflow import resume_run, train_config

log = logging.getLogger("routetune")


def _pruning_listener(st: Study, trial):
    import optuna

    metric = task_metric(st, st.cfg.objectives[0])

    def listen(record: dict) -> None:
        if record.get("event") == EVAL and metric in record.get("metrics", {}):
            trial.report(float(record["metrics"][metric]), record["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {record['step']}")
    return listen


def _train_one(st: Study, trial, setting: dict, repeat: int, listeners: list) -> tuple[Path, dict]:
    """One seed of a trial's setting. A retried trial continues the dead trial's run folder from its
    last checkpoint when it has one."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    earlier = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    earlier = frozen.user_attrs.get("retry_of") if earlier is None else earlier
    old = st.folder / trial_name(earlier, repeat) if earlier is not None else None
    if old is not None and (old / "checkpoints").is_dir():
        try:
            log.info("trial %d: continuing %s (its process stopped)", trial.number, old.name)
            return resume_run(old, run_test=False, callbacks=listeners)
        except RunError:  # it stopped before its first checkpoint: trained afresh below, its folder kept
            log.info("trial %d: %s has no complete checkpoint; training the setting afresh", trial.number, old.name)
    cfg = trial_config(st, setting)
    seeds = {"train.seed": cfg.train.seed + repeat, "routing.seed": cfg.routing.seed + repeat} if repeat else {}
    name = trial_name(trial.number, repeat)
    cfg = trial_config(st, {**setting, **seeds, "run.name": name, "run.output_dir": str(st.folder)})
    return train_config(cfg, st.folder / name, run_test=False, callbacks=listeners)


def objective(st: Study):
    def run(trial):
        try:
            return _run(trial)
        except KeyboardInterrupt:  # Ctrl-C: optuna marks the trial failed; --resume tries it again
            trial.set_user_attr("interrupted", True)
            raise

    def _run(trial):
        setting = suggest(trial, st.cfg.space)
        trial.set_user_attr("setting", setting)
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in setting.items()))
        totals, changes = None, []
        for repeat in range(st.cfg.repeats):
            listeners = [_pruning_listener(st, trial)] if st.cfg.pruner != "none" and repeat == 0 else []
            run_dir, summary = _train_one(st, trial, setting, repeat, listeners)
            values = scores(st, run_dir, summary)
            trial.set_user_attr(f"run{repeat}", {"run": str(run_dir), "values": values})
            totals = values if totals is None else [a + b for a, b in zip(totals, values)]
            if st.cfg.max_retention is not None:  # the constraint's retention, objective or not
                changes.append(retention_change(summary, retention_set(st)))
        values = [v / st.cfg.repeats for v in totals]
        if st.cfg.max_retention is not None:
            change = sum(changes) / len(changes)
            trial.set_user_attr("retention", change)
            trial.set_user_attr("constraint", [change - st.cfg.max_retention])
        log.info(
            "trial %d: %s", trial.number, ", ".join(f"{o.kind} {v:.4f}" for o, v in zip(st.cfg.objectives, values))
        )
        return values[0] if len(values) == 1 else tuple(values)
    return run


def _requeue_interrupted(study) -> None:
    """Trials stopped with Ctrl-C (marked failed by optuna) are queued again once; their retry
    continues the stopped run folder, as for a dead worker's trial."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def _counts(study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials of the study, all workers."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return (sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states), states.count(TrialState.RUNNING),
            states.count(TrialState.WAITING))


class _BudgetLock:
    """An exclusive lock on the study folder from counting the trials to starting one, so that two
    workers that both see one trial missing do not both start it (workers on one file system; the
    kernel releases it if the process dies). Written by hand: optuna has no atomic "ask if under
    budget"."""

    def __init__(self, folder: Path):
        import fcntl

        self.fh = (Path(folder) / ".budget.lock").open("a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def optimize(sweep_path: str | Path, resume: bool = False, trials: int | None = None,
             sets: list[str] | None = None) -> Study:
    """Run trials until the study has `trials` finished ones (all workers) or `timeout` passes.
    Dead trials are failed once their heartbeat is stale and their settings queued again."""
    from optuna.storages import fail_stale_trials

    st = open_study(sweep_path, resume, trials, sets)
    started, cfg = time.time(), st.cfg
    if resume:
        _requeue_interrupted(st.study)
    run = objective(st)
    log.info("study %s: %d trials wanted (%d finished so far)", st.folder, cfg.trials, _counts(st.study)[0])
    while True:
        lock = _BudgetLock(st.folder)  # counting and starting a trial: one worker at a time
        try:
            fail_stale_trials(st.study)  # a dead worker's trial: failed, its setting queued again (WAITING)
            done, running, waiting = _counts(st.study)
            if done >= cfg.trials or (cfg.timeout is not None and time.time() - started > cfg.timeout):
                break
            if not waiting and done + running >= cfg.trials:  # the rest is with other workers (alive or not)
                lock.release()
                time.sleep(min(cfg.heartbeat, 10))
                continue
            # the trial exists (RUNNING) when optuna calls the objective: the lock goes then
            st.study.optimize(lambda trial: lock.release() or run(trial), n_trials=1, catch=())
        finally:
            lock.release()
    done, _, _ = _counts(st.study)
    log.info("study %s: %d trials finished", st.folder, done)
    return st
