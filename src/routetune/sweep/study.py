"""`routetune sweep`: an optuna study whose trials are ordinary routetune runs.

The study lives in its own folder (``output_dir/NAME``): ``sweep.json`` (the sweep as read),
``study.db`` (optuna's SQLite storage, unless ``storage`` names another), one run folder per trial
(``trial-0007``, or ``trial-0007-r1`` for a further seed), and later ``confirm/``. A trial's
process that dies (kill -9, a lost machine) stops sending heartbeats; after twice the heartbeat
interval its trial is marked failed and its setting is tried again, resuming the dead trial's
run folder from its last checkpoint when it has one. Several ``routetune sweep --resume``
processes on one storage share the work (optuna hands each a different trial).

Objectives are read on held-out *dev* data only: the task's dev metric at the run's best
checkpoint, and retention as the relative change of a dev general-text set (``evals`` with
``split: dev``) from the base model. Test sets are touched by ``--confirm`` alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from routetune.run_folder import RunFolder
from routetune import objectives as objective_table
from routetune.config import Config, EvalTextConfig, load_config
from routetune.errors import ConfigError, RunError
from routetune.sweep.config import SweepConfig, base_of, load_sweep, overrides
from routetune.training.events import EVAL

log = logging.getLogger("routetune")
MARK = "sweep.json"


@dataclass
class Study:
    cfg: SweepConfig
    sweep_path: Path
    base_path: Path
    folder: Path
    study: object  # optuna.Study

    @property
    def directions(self) -> list[str]:
        return [direction(self, o) for o in self.cfg.objectives]


def trial_config(st: Study, values: dict) -> Config:
    return load_config(st.base_path, overrides({**st.cfg.set, **values}))


def task_metric(st: Study, obj=None) -> str:
    if obj is not None and obj.metric:
        return obj.metric
    return trial_config(st, {}).train.early_stopping.metric


def retention_set(st: Study) -> str:
    """The dev `evals` set retention is measured on."""
    base = trial_config(st, {})
    dev = [n for n, e in base.evals.items() if e.split == "dev"]
    named = next((o.metric for o in st.cfg.objectives if o.kind == "retention" and o.metric), None)
    if named:
        if named not in dev:
            raise ConfigError(f"objectives: retention: {named!r} is not an evals set with split: dev "
                              f"(dev sets: {', '.join(dev) or 'none'})")
        return named
    if len(dev) != 1:
        raise ConfigError(f"objectives: retention needs exactly one evals set with split: dev in {st.base_path} "
                          f"(found {len(dev)}), or name it with objectives[].metric")
    return dev[0]


def direction(st: Study, obj) -> str:
    if obj.kind == "retention":
        return "minimize"
    return "minimize" if objective_table.lower_is_better(task_metric(st, obj).split("/")[-1]) else "maximize"


def _check_space(st: Study) -> None:
    """Every dimension of the space at a value it can take gives a valid run config (fails in
    seconds, naming the key, instead of in the first trial)."""
    try:
        trial_config(st, {})  # the fixed overrides (`set:`, `--set`) alone
    except ConfigError as exc:
        raise ConfigError(f"{st.sweep_path}: set: {exc}") from None
    for key, p in st.cfg.space.items():
        if p.type == "simplex":
            sample = {f"{key}.{n}": 1 / len(p.keys) for n in p.keys}
        else:
            sample = {key: p.choices[0] if p.type == "categorical" else (int(p.low) if p.type == "int" else p.low)}
        try:
            trial_config(st, sample)
        except ConfigError as exc:
            raise ConfigError(f"{st.sweep_path}: space.{key}: {exc}") from None
    if st.cfg.uses_retention:
        retention_set(st)
    _check_dev_evaluation(st)


def _check_dev_evaluation(st: Study) -> None:
    """Each task objective's source has a dev set and the runs evaluate on it (else the first
    trial would train and only then find nothing to score)."""
    base = trial_config(st, {})
    for obj in st.cfg.objectives:
        if obj.kind != "task":
            continue
        metric = task_metric(st, obj)
        source = base.sources.get(metric.split("/")[0])
        if source is None:
            raise ConfigError(f"{st.sweep_path}: objectives: {metric!r} names no source of {st.base_path.name} "
                              f"(sources: {', '.join(base.sources)})")
        if not source.has_split("dev"):
            raise ConfigError(f"{st.sweep_path}: objectives: {metric!r} is read on dev data, and source "
                              f"{metric.split('/')[0]!r} has none: give it dev, holdout.dev or dataset.dev")
        if not (base.train.eval_each_epoch or base.train.eval_every_steps):
            raise ConfigError(f"{st.sweep_path}: objectives: {metric!r} is read on dev data, and the runs never "
                              "evaluate: set train.eval_each_epoch or train.eval_every_steps (in set:)")


def open_study(sweep_path: str | Path, resume: bool, trials: int | None = None, sets: list[str] | None = None
               ) -> Study:
    """Read the sweep (with the command line's `--trials` and `--set`), check it, create (or, with
    resume, join) its study."""
    import optuna  # heavy: imported when a sweep runs
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: years old

    sweep_path = Path(sweep_path)
    cfg = load_sweep(sweep_path, trials, sets)
    name = cfg.name or sweep_path.stem
    folder = Path(cfg.output_dir).expanduser() / name
    st = Study(cfg, sweep_path, base_of(sweep_path, cfg)[0], folder, None)
    _check_space(st)
    mark = folder / MARK
    if folder.exists() and not mark.is_file():
        raise RunError(f"{folder}: exists and is not a routetune study; choose another name or output_dir")
    if mark.is_file() and not resume:
        raise RunError(f"{folder}: the study exists; --resume continues it (also from a second process)")
    if resume and not mark.is_file() and cfg.storage is None:
        raise RunError(f"{folder}: no study to resume (run without --resume to start it)")
    if resume and mark.is_file():
        _check_unchanged(st, json.loads(mark.read_text(encoding="utf-8")))
    folder.mkdir(parents=True, exist_ok=True)
    if not mark.is_file():
        mark.write_text(json.dumps({"sweep": str(sweep_path.resolve()), "base": str(st.base_path),
                                    "config": cfg.model_dump(mode="json")}, indent=2) + "\n", encoding="utf-8")
    url = cfg.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    storage = RDBStorage(url, heartbeat_interval=cfg.heartbeat, grace_period=2 * cfg.heartbeat,
                         heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                             max_retry=3, inherit_intermediate_values=True),
                         engine_kwargs={"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failing trial's error reaches the user as routetune's own
    # a joining or resumed process samples from its own stream, so two workers do not propose the same points
    seed = cfg.seed if not resume else int(hashlib.sha256(f"{cfg.seed}:{os.getpid()}:{time.time()}".encode())
                                           .hexdigest()[:8], 16)
    st.study = optuna.create_study(storage=storage, study_name=name, directions=st.directions,
                                   sampler=_sampler(cfg, seed), pruner=_pruner(cfg), load_if_exists=True)
    return st


# What a resumed study may change: the budget, the workers' settings, what --confirm adds
# (baselines, and general texts scored on test only, which no trial reads).
# base: as resolved, below
_FREE = ("trials", "timeout", "heartbeat", "storage", "seed", "baselines", "confirm_points", "base")


def _trial_view(config: dict) -> dict:
    view = {k: v for k, v in config.items() if k not in _FREE}
    view["set"] = {k: v for k, v in config.get("set", {}).items()
                   if not (k.startswith("evals.") and isinstance(v, dict)
                            and v.get("split", EvalTextConfig.model_fields["split"].default) == "test")}
    return view


def _check_unchanged(st: Study, recorded: dict) -> None:
    """A resumed study's sweep file says what its finished trials ran with: a changed space,
    objective, base or override would mix two studies in one front."""
    now, then = _trial_view(st.cfg.model_dump(mode="json")), _trial_view(recorded["config"])
    changed = sorted(k for k in then if now.get(k) != then[k])  # a key newer than the study: not compared
    if recorded.get("base", str(st.base_path)) != str(st.base_path):
        changed.insert(0, "base")
    if changed:
        raise ConfigError(
            f"{st.sweep_path}: {', '.join(changed)} differ{'s' if len(changed) == 1 else ''} from the study's "
            f"({st.folder / MARK}), which "
            "its finished trials ran with; change only trials, timeout, baselines or test-split evals "
            "of a running study, or start a new one (another name)"
        )


def _constraints(trial) -> list[float]:
    return trial.user_attrs.get("constraint", [0.0])


def _sampler(cfg: SweepConfig, seed: int):
    import optuna

    constraints = _constraints if cfg.max_retention is not None else None
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints,
                                             population_size=max(4, min(50, cfg.trials // 2)))
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, max(2, cfg.trials // 3)),
                                      constraints_func=constraints)


def _pruner(cfg: SweepConfig):
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if cfg.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def trial_name(number: int, repeat: int) -> str:
    return f"trial-{number:04d}" + (f"-r{repeat}" if repeat else "")


def dev_metric(run_dir: Path, summary: dict, metric: str) -> float:
    """The dev metric at the run's best checkpoint (the last evaluation when it kept none)."""
    evals = [json.loads(line) for line in RunFolder(run_dir).metrics.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    evals = [e for e in evals if e.get("event") == EVAL and metric in e.get("metrics", {})]
    if not evals:
        raise ConfigError(f"objectives: the runs have no dev evaluation of {metric!r}; the base config needs a dev "
                          "set for that source (dev, holdout.dev or dataset.dev) and train.eval_each_epoch or "
                          "train.eval_every_steps")
    at = [e for e in evals if e["step"] == summary["best"]["step"]]
    return float((at or evals)[-1]["metrics"][metric])


def retention_change(summary: dict, name: str) -> float:
    pairs = [v for k, v in summary.get("before_after", {}).items() if k.split("/")[0] == name]
    if not pairs or pairs[0]["ratio"] is None:
        raise ConfigError(f"objectives: retention: no before/after score of evals set {name!r} "
                          "(is train.eval_before off?)")
    return pairs[0]["ratio"] - 1.0


def scores(st: Study, run_dir: Path, summary: dict) -> list[float]:
    out = []
    for obj in st.cfg.objectives:
        out.append(dev_metric(run_dir, summary, task_metric(st, obj)) if obj.kind == "task"
                   else retention_change(summary, retention_set(st)))
    return out
