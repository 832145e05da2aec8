"""Run-level workflows used by the CLI: train a config into a run folder, evaluate a run, load a
run for prediction. Each returns plain data; printing is the CLI's job."""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime
from pathlib import Path

from routetune.config import Config, config_from_run, dump_config, load_config
from routetune.data.sources import read_split
from routetune.errors import RunError
from routetune.evaluate.metrics import evaluate_tagging
from routetune.model.heads import RoutedModel
from routetune.model.load import load_tokenizer
from routetune.train.engine import evaluate_dev, fit
from routetune.train.setup import prepare

log = logging.getLogger("routetune")


def run_dir_for(cfg: Config, config_path: Path) -> Path:
    name = cfg.run.name or f"{config_path.stem}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.run.output_dir) / name


def claim_run_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise RunError(f"{path}: run folder exists and is not empty; choose another run.name "
                           "or pass --overwrite to replace it")
        log.warning("--overwrite: removing the existing run folder %s", path)
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _add_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("routetune").addHandler(handler)
    return handler


def train(config_path: str | Path, overrides: list[str] | None = None, overwrite: bool = False,
          run_test: bool = True) -> tuple[Path, dict]:
    """Validate everything, train, evaluate dev/test with the best checkpoint, write summary.json."""
    started = time.time()
    config_path = Path(config_path)
    cfg = load_config(config_path, overrides)
    run_dir = run_dir_for(cfg, config_path)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:  # refuse before any heavy work
        claim_run_dir(run_dir, overwrite)
    setup = prepare(cfg)  # reads and checks all data, loads the model: fails before the folder is touched
    claim_run_dir(run_dir, overwrite)
    handler = _add_file_log(run_dir / "train.log")
    try:
        (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        (run_dir / "labels.json").write_text(json.dumps(setup.labels, indent=2) + "\n", encoding="utf-8")
        log.info("run folder %s", run_dir)
        result = fit(setup, run_dir)
        checkpoint = "best" if (run_dir / "checkpoints" / "best").is_dir() else "last"
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
        }
        if run_test and setup.test:
            model = RoutedModel.load(run_dir / "checkpoints" / checkpoint) if checkpoint == "best" else setup.model
            setup.model = model
            _, full = evaluate_dev(setup, setup.test)
            summary["test"] = full
        summary["wall_seconds"] = round(time.time() - started, 2)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    finally:
        logging.getLogger("routetune").removeHandler(handler)
        handler.close()
    return run_dir, summary


def load_run(run_dir: str | Path, checkpoint: str = "best"):
    """(config, model, tokenizer) of a finished run; `best` falls back to `last` if no dev set existed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    cfg = config_from_run(run_dir)
    folder = run_dir / "checkpoints" / checkpoint
    if checkpoint == "best" and not folder.is_dir():
        folder = run_dir / "checkpoints" / "last"
    if not (folder / "heads.json").is_file():
        raise RunError(f"{folder}: no complete checkpoint (heads.json missing); did training finish?")
    return cfg, RoutedModel.load(folder), load_tokenizer(str(folder))


def evaluate(run_dir: str | Path, split: str = "test", checkpoint: str = "best",
             sources: list[str] | None = None) -> dict:
    cfg, model, tokenizer = load_run(run_dir, checkpoint)
    out = {}
    for name, head in model.heads.items():
        if sources and name not in sources:
            continue
        sc = cfg.sources[name]
        if getattr(sc, split) is None:
            continue
        sentences = read_split(sc, split, head.labels)
        out[name] = evaluate_tagging(model, name, tokenizer, sentences, cfg.model.max_length,
                                     cfg.train.eval_batch_size, cfg.train.precision)
    if not out:
        raise RunError(f"{run_dir}: no labelled source has a {split} file configured")
    return out
