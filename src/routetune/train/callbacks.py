"""Stateful training callbacks. Each one has state_dict()/load_state_dict() so a resumed run
keeps, for example, the best value and the patience left."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from routetune.errors import ConfigError
from routetune.train.events import EVENTS


class EarlyStopping:
    """Stop when `metric` has not improved by more than `min_delta` for `patience` evaluations."""

    def __init__(self, metric: str, mode: str = "max", patience: int | None = None, min_delta: float = 0.0):
        if mode not in ("max", "min"):
            raise ValueError(f"early_stopping.mode: expected 'max' or 'min', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, metrics: dict, step: int) -> tuple[bool, bool]:
        """Record one evaluation. Returns (is_new_best, should_stop)."""
        if self.metric not in metrics:
            raise ConfigError(f"train.early_stopping.metric: {self.metric!r} is not among the dev metrics "
                           f"({', '.join(sorted(metrics))})")
        value = float(metrics[self.metric])
        if math.isnan(value):
            value = -math.inf if self.mode == "max" else math.inf
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True, False
        self.bad_evals += 1
        stop = self.patience is not None and self.bad_evals >= self.patience
        if stop:
            self.stopped_at = step
        return False, stop

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_evals, self.stopped_at = state["bad_evals"], state["stopped_at"]


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl, flushed at once (a crash loses nothing)."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()

    def write(self, event: str, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r} (train/events.py names them)")
        record = {"event": event, "time": round(time.time() - self.t0, 3), **fields}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        return record
