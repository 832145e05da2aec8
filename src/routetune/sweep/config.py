"""The sweep file: a base run config, the search space over its dotted keys, the objectives, the
budget and the storage. Validated like a run config (errors name the file, line and key)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from routetune.config.base import Strict
from routetune.config.load import read_yaml_model
from routetune.errors import ConfigError


class Param(Strict):
    """One dimension of the search space, at a dotted config key."""

    type: Literal["float", "int", "categorical", "simplex"]
    """`float` / `int` between `low` and `high` (`log: true` samples on a log scale, `step` on a grid); `categorical`
    one of `choices`; `simplex`: weights over `keys` under the dotted key that sum to 1 (e.g. `routing.weights` over the
    sources), drawn as normalised exponentials so every mixture is equally likely."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    keys: list[str] | None = None
    """simplex: the names the weights go to (`routing.weights.<name>`)."""
    when: dict[str, Any] = Field(default_factory=dict)
    """Conditional dimension: sampled only in trials where these other keys of the space took these values (e.g.
    `{peft.method: lora}`); otherwise the base config's value stays."""

    @model_validator(mode="after")
    def _check(self) -> Param:
        if self.type in ("float", "int"):
            if self.low is None or self.high is None:
                raise ValueError(f"low: a {self.type} dimension needs low and high")
            if not self.low < self.high:
                raise ValueError(f"high: expected a value above low ({self.low:g}), got {self.high:g}")
            if self.log and self.low <= 0:
                raise ValueError("low: log: true needs low > 0")
        elif self.type == "categorical" and not self.choices:
            raise ValueError("choices: a categorical dimension needs a non-empty list")
        elif self.type == "simplex" and (not self.keys or len(self.keys) < 2):
            raise ValueError("keys: a simplex needs at least two")
        return self


class Objective(Strict):
    kind: Literal["task", "retention"]
    """`task`: a dev metric of the trained run at its best checkpoint (maximised, or minimised for losses and
    perplexity); `retention`: the relative change of an `evals` set with `split: dev` (general text) from the base model
    to the trained one (minimised; +0.05 = 5% higher loss)."""
    metric: str | None = None
    """task: `SOURCE/METRIC` (default: the base config's `train.early_stopping.metric`); retention: the name of the dev
    `evals` set (default: the only one)."""


class SweepConfig(Strict):
    base: str
    """The run config every trial starts from (relative to the sweep file)."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Fixed overrides for every trial, by dotted key (e.g. `{train.epochs: 2}`)."""
    name: str | None = None
    """Study name (default: the sweep file's name without `.yaml`); its folder is `output_dir/name`."""
    output_dir: str = "runs"
    """Where the study folder goes (relative to the working directory, like `run.output_dir`)."""
    storage: str | None = None
    """optuna storage URL; default SQLite in the study folder (`sqlite:///STUDY/study.db`). Give a PostgreSQL/MySQL URL
    to share one study between machines."""
    objectives: list[Objective] = Field(default_factory=lambda: [Objective(kind="task")], min_length=1, max_length=2)
    """One objective (single-objective study) or `task` and `retention` (multi-objective: the Pareto front)."""
    max_retention: float | None = None
    """Constraint: trials whose retention change exceeds this (e.g. 0.02) are infeasible; the best trial is chosen among
    the others. Needs a dev `evals` set."""
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    """optuna sampler (TPE handles several objectives too; `nsga2` the genetic NSGA-II)."""
    pruner: Literal["none", "median", "asha"] = "none"
    """Stop unpromising trials early on their intermediate dev scores (single-objective studies only): `median` or
    `asha` (successive halving)."""
    trials: int = Field(20, ge=1)
    """Trials to complete (all workers together; pruned trials count)."""
    timeout: float | None = Field(None, gt=0)
    """Wall-clock budget of this process in seconds: no trial starts after it."""
    repeats: int = Field(1, ge=1)
    """Seeds per setting: each trial trains `repeats` runs (train.seed and routing.seed + 0, 1, ...) and scores their
    mean."""
    seed: int = 0
    """Seed of the sampler."""
    heartbeat: int = Field(60, ge=1)
    """Seconds between a running trial's heartbeats; a trial silent for twice as long (its process was killed) is marked
    failed and its setting tried again."""
    space: dict[str, Param] = Field(min_length=1)
    """The search space: dotted config key -> dimension."""
    baselines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Named override sets confirmed next to the chosen settings with the same seeds (e.g. `{plain:
    {routing.weights.general: 0}}`)."""
    confirm_points: int = Field(4, ge=1)
    """Multi-objective studies: how many points of the feasible Pareto front `--confirm` trains (spread along it, both
    ends first; 1: the end best on the task). Each point costs K runs; may change after the search."""

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        kinds = [o.kind for o in self.objectives]
        if len(set(kinds)) != len(kinds):
            raise ValueError("objectives: each kind at most once")
        if self.pruner != "none" and len(self.objectives) > 1:
            raise ValueError("pruner: pruning needs a single objective")
        for key, p in self.space.items():
            for other, value in p.when.items():
                if other not in self.space or other == key:
                    raise ValueError(f"space.{key}.when: {other} is not another key of the space")
                if self.space[other].type == "categorical" and value not in self.space[other].choices:
                    raise ValueError(f"space.{key}.when: {value!r} is not a choice of {other}")
        return self

    @property
    def uses_retention(self) -> bool:
        return self.max_retention is not None or any(o.kind == "retention" for o in self.objectives)


def load_sweep(path: str | Path, trials: int | None = None, sets: list[str] | None = None) -> SweepConfig:
    """The sweep file, with the command line's `--trials N` (the budget) and `--set KEY=VALUE`
    (added to the file's `set:`, the fixed overrides of every trial)."""
    import yaml

    cfg = read_yaml_model(Path(path), SweepConfig)
    extra = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item}: expected KEY=VALUE (e.g. --set train.epochs=1)")
        extra[key.strip()] = yaml.safe_load(value)
    if trials is None and not extra:
        return cfg
    data = cfg.model_dump(mode="json")
    data["set"] = {**data.get("set", {}), **extra}
    if trials is not None:
        data["trials"] = trials
    return SweepConfig.model_validate(data)


def overrides(values: dict) -> list[str]:
    """`--set` lines of a mapping of dotted keys to values."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def base_of(sweep_path: Path, cfg: SweepConfig) -> tuple[Path, list[str]]:
    """The base config a sweep file names (relative to the sweep file) and its `set` overrides:
    what every trial, confirmation run and reference run (bench/replay_reference.py) starts from."""
    return (Path(sweep_path).parent / cfg.base).resolve(), overrides(cfg.set)
