"""`routetune continual CONFIG`: train a sequence of tasks on one backbone, each stage starting
from the previous one (``model.init_from``), optionally replaying earlier tasks through the
router, and write the matrix R[i][j] = test score on task j after training stage i.

A continual config names the stages' ordinary run configs::

    name: polarity-then-wnut
    output_dir: ../runs            # relative to this file
    replay: 0.2                    # share of batches that replay earlier tasks (0: none)
    forward_transfer: false        # also train each later task alone from the base model
    tasks:
      - config: polarity-minilm.yaml
        set: [train.epochs=1]      # overrides, as with `routetune train --set`
      - config: wnut17-minilm.yaml

Each task's config must have one labelled source (its task); other sources of that config
(general text) are kept. Stage i's run folder is ``OUTPUT/NAME/i-SOURCE``. With replay, stage i
also routes the earlier tasks' training sources at ``replay`` in total (split evenly), the current
config's weights scaled to the rest. Without replay, an earlier task's head is carried unchanged
(frozen) so its score shows what the shared backbone forgot.

Metrics (a task's headline metric: entity F1 for NER, accuracy for classification):
average = mean of the last row; backward transfer BWT = mean over j < T of R[T][j] - R[j][j]
(Lopez-Paz & Ranzato, 2017); forward transfer FWT = mean over j > 1 of R[j][j] - b[j], where b[j]
is task j trained alone from the base model with the same config (only with
``forward_transfer: true``; it costs one extra run per later task). R[i][j] for j > i is empty:
the task's head does not exist yet.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from routetune.run_folder import RunFolder
from routetune import objectives
from routetune.config import load_config
from routetune.errors import ConfigError, RunError
from routetune.files import write_text_atomic
from routetune.training import distributed
from routetune.workflow import evaluate_run, train

log = logging.getLogger("routetune")

class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str
    set: list[str] = Field(default_factory=list)


class ContinualConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    output_dir: str = "runs"
    replay: float = Field(0.0, ge=0.0, lt=1.0)
    forward_transfer: bool = False
    tasks: list[Task] = Field(min_length=2)


def load_continual(path: Path) -> ContinualConfig:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the continual config: {exc}") from None
    try:
        return ContinualConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def task_source(cfg) -> str:
    labelled = [n for n, sc in cfg.sources.items() if sc.supervised]
    if len(labelled) != 1:
        raise ConfigError(f"a continual task config needs exactly one labelled source, found {labelled or 'none'}")
    return labelled[0]


def stage_overrides(ccfg: ContinualConfig, i: int, base: Path, previous: Path | None, names: list[str],
                    configs: list) -> list[str]:
    task = ccfg.tasks[i]
    cfg = configs[i]
    sets = [*task.set, f"run.output_dir={base}", f"run.name={i + 1}-{names[i]}", f"train.primary={names[i]}"]
    if previous is not None:
        sets.append(f"model.init_from={previous}")
    if ccfg.replay > 0 and i > 0:
        weights = dict(cfg.routing.weights or dict.fromkeys(cfg.sources, 1.0))
        total = sum(weights.values())
        for name, w in weights.items():
            sets.append(f"routing.weights.{name}={(1 - ccfg.replay) * w / total}")
        for j in range(i):
            src = configs[j].sources[names[j]]
            sets.append(f"sources.{names[j]}={json.dumps(src.model_dump(mode='json', exclude_defaults=True))}")
            sets.append(f"routing.weights.{names[j]}={ccfg.replay / i}")
    return sets


def score(run_dir: Path, task_cfg, source: str) -> tuple[float, str]:
    """Test score of `source` (as its own task config defines it) with the run's best model, in
    the device and precision of that config: its headline metric (objectives.py)."""
    tc = task_cfg.train
    scores = evaluate_run(run_dir, "test", "best", [source], tc.device, tc.precision, cfg=task_cfg)[source]
    metric = objectives.get(task_cfg.sources[source].objective).headline
    return float(scores[metric]), metric


def run_continual(path: Path, overwrite: bool = False) -> dict:
    """Train the stages; under torchrun each stage trains on every process and rank 0 scores and
    writes (the other ranks receive its numbers)."""
    path = Path(path)
    ccfg = load_continual(path)
    base = (path.parent / ccfg.output_dir / ccfg.name).resolve()
    if RunFolder(base).continual.exists() and not overwrite:
        raise RunError(f"{base}: a continual run is already there; pass --overwrite to replace it")
    base.mkdir(parents=True, exist_ok=True)
    task_paths = [(path.parent / t.config).resolve() for t in ccfg.tasks]
    configs = [load_config(p, t.set) for p, t in zip(task_paths, ccfg.tasks)]
    world = distributed.world(configs[0].train.device if configs else None)
    names = [task_source(c) for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: tasks: each task needs its own source name (got {names})")
    R: list[list[float | None]] = []
    stages, previous, metrics = [], None, [None] * len(names)
    for i in range(len(names)):
        sets = stage_overrides(ccfg, i, base, previous, names, configs)
        log.info("continual stage %d/%d: %s (%s)", i + 1, len(names), names[i], task_paths[i])
        run_dir, _ = train(task_paths[i], sets, overwrite=overwrite)
        row = [score(run_dir, configs[j], names[j]) if j <= i else None for j in range(len(names))] \
            if world.main else None
        row = world.broadcast(row)
        metrics[: i + 1] = [cell[1] for cell in row[: i + 1]]
        row = [cell[0] if cell is not None else None for cell in row]
        R.append(row)
        stages.append({"task": names[i], "run": str(run_dir), "overrides": sets})
        log.info("after %s: %s", names[i], "  ".join(f"{n}={v:.4f}" for n, v in zip(names, row) if v is not None))
        previous = run_dir
    T = len(names)
    result = {
        "tasks": names, "metrics": metrics, "R": R, "replay": ccfg.replay,
        "average": sum(R[-1]) / T,
        "bwt": sum(R[-1][j] - R[j][j] for j in range(T - 1)) / (T - 1),
        "fwt": None, "baselines": None, "stages": stages,
        "metric_note": "test " + ", ".join(f"{n} {m}" for n, m in zip(names, metrics)),
    }
    if ccfg.forward_transfer:
        baselines = [None]
        for j in range(1, T):
            sets = [*ccfg.tasks[j].set, f"run.output_dir={base}", f"run.name=alone-{names[j]}"]
            run_dir, _ = train(task_paths[j], sets, overwrite=overwrite)
            baselines.append(world.broadcast(score(run_dir, configs[j], names[j])[0] if world.main else None))
        result["baselines"] = baselines
        result["fwt"] = sum(R[j][j] - baselines[j] for j in range(1, T)) / (T - 1)
    if world.main:
        write_text_atomic(RunFolder(base).continual, json.dumps(result, indent=2) + "\n")
    return result


def format_matrix(result: dict) -> str:
    names = result["tasks"]
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"R[i][j] ({result['metric_note']}), replay {result['replay']}",
             " " * (width + 6) + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, result["R"]):
        lines.append(f"after {name:<{width}}" + "".join(f"{'-' if v is None else f'{v:.4f}':>{width}}" for v in row))
    lines.append(f"average (last row) {result['average']:.4f}   backward transfer {result['bwt']:+.4f}"
                 + (f"   forward transfer {result['fwt']:+.4f}" if result.get("fwt") is not None else ""))
    return "\n".join(lines)
