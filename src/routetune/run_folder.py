"""A run folder's layout, named in one place.

Every file a run writes at the top of its folder is declared here once, as a :class:`RunFolder`
attribute; every module that writes or reads one asks a ``RunFolder`` for its path. The inventory
``--overwrite`` may delete (``runs.py``) is :data:`WRITTEN`, made from the same declarations, so a
new file a run writes is one line here and nothing else to keep in step. (What a checkpoint folder
must hold is declared by the checkpoint formats, ``model/methods/base.py``, and the step state,
``training/checkpoint.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"  # the validated config the run was started with (resume compares against it)
LABELS = "labels.json"  # the label set of each labelled source (resume checks it)
METRICS = "metrics.jsonl"  # the events of training/events.py, appended
PLAN = "plan.jsonl"  # every step's source and example ids, appended
LOG = "train.log"
SUMMARY = "summary.json"  # written last: its presence means the run finished
BEFORE = "before.json"  # the base model's scores on general text
HARDWARE = "hardware.json"  # each session's device, precision and processes
CONTINUAL = "continual.json"  # a continual sequence's matrix (in the sequence's folder)
MLFLOW_DB, MLFLOW_NOTE, WANDB_NOTE = "mlflow.db", "mlflow.json", "wandb.json"  # trackers' files
MARKER = ".routetune-run"  # routetune wrote this folder
LOCK = ".lock"  # the flock of the process that trains in it

CHECKPOINTS = "checkpoints"
REPORT = "report"  # `routetune report RUN`
TENSORBOARD = "tensorboard"  # train.report_to: tensorboard
WANDB = "wandb"  # train.report_to: wandb (its own files; routetune tells it to write there)

APPEND_LOGS = (METRICS, PLAN)
"""The append-only logs, cut back to a checkpoint's length on resume."""

WRITTEN = frozenset({CONFIG, LABELS, METRICS, PLAN, LOG, SUMMARY, BEFORE, HARDWARE, MLFLOW_DB, MLFLOW_NOTE, WANDB_NOTE,
                     MARKER, LOCK})
"""The files a run writes at the top level of its folder (not CONTINUAL: a continual sequence
writes it in the sequence's folder, so in a run folder it is someone else's and stays)."""


def tracker_note(tool: str) -> str:
    """The file a tracker keeps its run id in, so that a resume continues the same tracked run."""
    name = f"{tool}.json"
    if name not in (MLFLOW_NOTE, WANDB_NOTE):
        raise ValueError(f"no note file is declared for tracker {tool!r} (run_folder.py)")
    return name


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder's files."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    config = property(lambda self: self.path / CONFIG)
    labels = property(lambda self: self.path / LABELS)
    metrics = property(lambda self: self.path / METRICS)
    plan = property(lambda self: self.path / PLAN)
    log = property(lambda self: self.path / LOG)
    summary = property(lambda self: self.path / SUMMARY)
    before = property(lambda self: self.path / BEFORE)
    hardware = property(lambda self: self.path / HARDWARE)
    continual = property(lambda self: self.path / CONTINUAL)
    marker = property(lambda self: self.path / MARKER)
    lock = property(lambda self: self.path / LOCK)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    report = property(lambda self: self.path / REPORT)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
