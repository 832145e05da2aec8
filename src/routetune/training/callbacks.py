"""What the loop keeps and logs beside the model: early stopping and the per-source counters
(each with a state a checkpoint saves, so a resumed run keeps, for example, the best value and
the patience left), metrics.jsonl, and its truncation when a resume redoes steps."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from routetune.errors import ConfigError, RunError
from routetune.files import write_text_atomic
from routetune.training.events import EVENTS

log = logging.getLogger("routetune")


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

    def __init__(self, path: Path, enabled: bool = True, listeners: list | None = None):
        self.path, self.enabled = path, enabled  # data-parallel ranks other than 0 write nothing
        self.listeners = list(listeners or [])
        self.t0 = time.time()

    def write(self, event: str, **fields) -> dict:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r} (training/events.py names them)")
        record = {"event": event, "time": round(time.time() - self.t0, 3), **fields}
        if not self.enabled:
            return record
        line = json.dumps(record, default=float)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        if self.listeners:  # callbacks and trackers get what the file holds: plain Python values
            event_record = json.loads(line)
            for listener in self.listeners:
                listener(event_record)
        return record


@dataclass
class SourceStats:
    batches: int = 0
    examples: int = 0
    tokens: int = 0
    loss_sum: float = 0.0  # since the last log event
    loss_n: int = 0
    ema: float | None = None

    def add(self, n_examples: int, n_tokens: int, loss: float) -> None:
        self.batches += 1
        self.examples += n_examples
        self.tokens += n_tokens
        self.loss_sum += loss
        self.loss_n += 1
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss

    def flush(self) -> dict:
        out = {"loss": self.loss_sum / self.loss_n if self.loss_n else None, "batches": self.batches,
               "examples": self.examples, "tokens": self.tokens}
        self.loss_sum, self.loss_n = 0.0, 0
        return out


def _check_line(path: Path, n: int, line: str, last: bool) -> dict | None:
    """One line of a run's JSONL log, parsed; None for a blank line or (`last`) one cut by a kill."""
    if not line.strip():
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        if last:
            log.warning("%s:%d: dropped a line cut off by an interrupted write", path, n)
            return None
        raise RunError(f"{path}:{n}: not a JSON line; the run's log is damaged (restore it from a copy, "
                       "or start a new run)") from None
    if not isinstance(event, dict):
        raise RunError(f"{path}:{n}: expected a JSON object per line; the run's log is damaged")
    step = event.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int):
        raise RunError(f"{path}:{n}: \"step\" is {step!r}, expected a whole number; the run's log is damaged")
    return event


def truncate_log(path: Path, step: int, size: int | None = None, check_only: bool = False) -> None:
    """Drop events logged after `step` (they belong to the part of a run that a resume redoes).

    `size` is the file's length when the step's checkpoint was written (checkpoints record it):
    the file is cut back to exactly that, and a file shorter than that was cut or edited since and
    is refused, naming the line where it ends. Without a recorded size (older checkpoints), events
    after `step` are dropped, and a last line cut off by a kill mid-write with a warning. A bad line
    elsewhere is an error naming file and line. `check_only`: refuse as above, change nothing (a
    resume checks every log before it cuts any)."""
    if not path.is_file():
        if size:
            raise RunError(f"{path}: missing, though the step-{step} checkpoint was written after it held "
                           f"{size} bytes; restore it from a copy, or start a new run")
        return
    data = path.read_bytes()
    if size is not None:
        if len(data) < size:
            n = data.count(b"\n") + 1
            raise RunError(f"{path}:{n}: the log ends here, {size - len(data)} bytes short of what it held when the "
                           f"step-{step} checkpoint was written (cut or edited since); restore it from a copy, or "
                           "start a new run")
        data = data[:size]
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise RunError(f"{path}: not valid UTF-8; the run's log is damaged") from None
    kept = []
    for n, line in enumerate(lines, start=1):
        event = _check_line(path, n, line, last=size is None and n == len(lines))
        if event is not None and (size is not None or event.get("step", 0) <= step):
            kept.append(line)
    if not check_only:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
