"""Experiment trackers (`train.report_to`): each receives the events of metrics.jsonl as they are
written (training/events.py) and forwards them to its tool, as `TrainingArguments.report_to` does.

* ``tensorboard``: event files in ``RUN/tensorboard`` (``tensorboard --logdir runs``): per-source
  loss, realised and target share, learning rate, tokens/s, dev metrics; the resolved config as
  text. A resumed run drops the events after its checkpoint's step (``purge_step``).
* ``mlflow``: one MLflow run per routetune run (its id kept in ``RUN/mlflow.json``, so a resume
  continues it), the resolved config as parameters, the same metrics by step. The tracking URI
  is ``MLFLOW_TRACKING_URI`` when set, else a SQLite store, ``RUN/mlflow.db``
  (``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``).
* ``trackio``: one run named after the run folder in the project ``$TRACKIO_PROJECT`` (default
  ``routetune``), stored locally (``$TRACKIO_DIR``, else ``~/.cache/huggingface/trackio``;
  ``trackio show``); the resolved config as the run's config, the same metrics by step.
* ``wandb``: one Weights & Biases run in ``$WANDB_PROJECT`` (default ``routetune``), its id kept
  in ``RUN/wandb.json`` so a resume continues it; files under ``RUN/wandb``. Offline machines:
  ``WANDB_MODE=offline``, then ``wandb sync RUN/wandb/offline-run-*``.

The packages are optional (``pip install 'routetune[tracking]'`` has TensorBoard, MLflow and
trackio; ``pip install wandb`` for W&B); a tracker whose package is missing is refused before
training starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from routetune.run_folder import MLFLOW_DB, RunFolder, tracker_note
from routetune import logs
from routetune.config import Config, dump_config
from routetune.errors import ConfigError
from routetune.files import write_text_atomic
from routetune.training.events import BUDGET, COUNTS, EARLY_STOP, EVAL, FINAL, TRAIN

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}


def check_available(names: list[str]) -> None:
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            how = "pip install wandb" if name == "wandb" else "pip install 'routetune[tracking]'"
            raise ConfigError(f"train.report_to: {name} needs the {PACKAGES[name]} package ({how})")


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one event, by tracker name (e.g. ``train/wnut17/loss``, ``dev/wnut17/f1``)."""
    out: dict[str, float] = {}
    if record["event"] == TRAIN:
        out["train/lr"] = record["lr"]
        out["train/tokens_per_s"] = record["tokens_per_s"]
        for name, s in record["sources"].items():
            if s.get("loss") is not None:
                out[f"train/{name}/loss"] = s["loss"]
            out[f"train/{name}/share"] = s["share"]
            out[f"train/{name}/target_share"] = s["target"]
    elif record["event"] == EVAL:
        out.update({f"dev/{k}": v for k, v in record["metrics"].items()})
    elif record["event"] == EARLY_STOP:
        out["dev/early_stop_best"] = record["best"]
    elif record["event"] == BUDGET:  # the retention budget's control trace
        out.update({f"budget/{k}": record[k] for k in ("loss", "change", "share", "multiplier")})
    elif record["event"] == FINAL:  # the numbers a user opens the tracker for: test and retention
        for split in ("test", "dev"):
            for source, scores in record.get(split, {}).items():
                out.update({f"{split}/{source}/{k}": v for k, v in scores.items() if k not in COUNTS})
        for name, change in record.get("before_after", {}).items():
            out.update({f"retention/{name}/{k}": change[k] for k in ("before", "after", "ratio") if k in change})
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


class TensorBoard:
    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # optional package: imported when asked for

        self.writer = SummaryWriter(str(RunFolder(run_dir).tensorboard), purge_step=resume_step)
        if resume_step is None:
            self.writer.add_text("config", "```\n" + dump_config(cfg) + "```", 0)

    def __call__(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record.get("step", 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:  # strings as they are (not JSON-quoted); anything else as JSON
            out[f"{prefix}{k}"] = (v if isinstance(v, str) else json.dumps(v))[:500]  # MLflow's limit
    return out


class _Forwarder:
    """A tracker that takes each event's numbers as one dict per step (MLflow, trackio, W&B)."""

    def __call__(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.log(values, record.get("step", 0))


def _saved_run_id(run_dir: Path, tool: str, resume_step: int | None) -> str | None:
    """The tool's run id kept in RUN/<tool>.json, when resuming (a resume continues the same run)."""
    note = run_dir / tracker_note(tool)
    return json.loads(note.read_text())["run_id"] if resume_step is not None and note.is_file() else None


def _save_run_id(run_dir: Path, tool: str, run_id: str) -> None:
    write_text_atomic(run_dir / tracker_note(tool), json.dumps({"run_id": run_id}) + "\n")


class MLflow(_Forwarder):
    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None):
        import mlflow  # optional package: imported when asked for

        logs.quiet_third_party()  # MLflow sets its own level on import; its INFO lines are not the run's
        self.mlflow = mlflow
        # MLflow 3 keeps its file store for reading old runs only: the default is SQLite in the run folder
        mlflow.set_tracking_uri(
            os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"
        )
        mlflow.set_experiment("routetune")
        run_id = _saved_run_id(run_dir, "mlflow", resume_step)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
        if run_id is None:
            _save_run_id(run_dir, "mlflow", self.run.info.run_id)
            mlflow.log_params(_flat(cfg.model_dump(mode="json")))

    def log(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackio(_Forwarder):
    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None):
        import trackio  # optional package: imported when asked for

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT") or "routetune", name=run_dir.name,
                     config=cfg.model_dump(mode="json"), resume="never" if resume_step is None else "allow",
                     embed=False, auto_log_gpu=False, auto_log_cpu=False)

    def log(self, values: dict, step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class WandB(_Forwarder):
    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None):
        import wandb  # optional package: imported when asked for

        run_id = _saved_run_id(run_dir, "wandb", resume_step)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "routetune", name=run_dir.name,
                              id=run_id, resume="allow" if run_id else None, dir=str(run_dir),
                              config=cfg.model_dump(mode="json"))
        if run_id is None:
            _save_run_id(run_dir, "wandb", self.run.id)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "trackio": Trackio, "wandb": WandB}


def open_trackers(cfg: Config, run_dir: Path, resume_step: int | None) -> list:
    """The trackers of `train.report_to` (their packages were checked when the run was prepared)."""
    return [TRACKERS[name](run_dir, cfg, resume_step) for name in cfg.train.report_to]
