"""The Python API: what the CLI does, from a notebook or a program (docs/python.md).

    import routetune

    run = routetune.train("examples/quickstart.yaml", train__epochs=1)     # or a dict
    run.summary["test"]
    run.predict(["Apple opened a store in Paris"])
    run.evaluate("dev")
    later = routetune.load(run.dir)

Overrides are keyword arguments with ``__`` for the dots of a config key (``train__lr=3e-5`` is
``--set train.lr=3e-5``); values are Python values. `callbacks` are called with every event of
the run's metrics.jsonl as it is written (training/events.py names them and their fields).
"""

from __future__ import annotations

import json
from pathlib import Path

from routetune.run_folder import RunFolder
from routetune.config import Config, config_from_dict, config_from_run, load_config
from routetune.errors import RoutetuneError, RunError
from routetune.export import export as export_run
from routetune.logs import setup_logging
from routetune.model.inference import generate
from routetune.run_paths import check_run_folder
from routetune.runs import load_for_inference
from routetune.serve.predictor import Predictor, item_from_text, item_from_tokens
from routetune.training import checkpoint as ckpt
from routetune.workflow import evaluate_run, plain, run_dir_for, train_config


def _overrides(overrides: dict) -> list[str]:
    """``train__lr=3e-5`` -> ``train.lr=3e-5`` (the value as JSON, which YAML reads back exactly)."""
    return [f"{key.replace('__', '.')}={json.dumps(value)}" for key, value in overrides.items()]


def train(config: str | Path | dict, *, overwrite: bool = False, test: bool = True, callbacks=(),
          **overrides) -> Run:
    """Train a config (a YAML file, or the same content as a dict; relative paths in a dict are
    resolved against the working directory) into a new run folder and return the run."""
    setup_logging()
    sets = _overrides(overrides)
    if isinstance(config, (str, Path)):
        cfg, stem = load_config(config, sets), Path(config).stem
    else:  # a mapping (checked there)
        cfg, stem = config_from_dict(config, sets), "run"
    run_dir, summary = train_config(cfg, run_dir_for(cfg, stem), overwrite, test, callbacks=list(callbacks))
    return Run(run_dir, summary)


def load(run_dir: str | Path, checkpoint: str = "best", device: str | None = None,
         precision: str | None = None) -> Run:
    """A finished (or interrupted) run folder. The folder and its checkpoint are checked now (a
    RunError names what is missing); the model is loaded when first used."""
    setup_logging()
    run_dir = Path(run_dir)
    config_from_run(check_run_folder(run_dir))  # a run folder with a readable config.yaml
    folder = ckpt.run_checkpoint(run_dir, checkpoint)  # exists and verifies, or one clear error now
    summary_path = RunFolder(run_dir).summary
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return Run(run_dir, summary, checkpoint, device, precision, verified=folder)


class Run:
    """A run folder: its summary, and its model for evaluation, prediction, generation, export."""

    def __init__(self, run_dir: Path, summary: dict, checkpoint: str = "best", device: str | None = None,
                 precision: str | None = None, verified: Path | None = None):
        self.dir, self.summary = Path(run_dir), summary
        self.checkpoint, self.device, self.precision = checkpoint, device, precision
        self._verified = verified  # the checkpoint folder load() verified: not hashed again when loaded
        self._loaded = None

    def __repr__(self) -> str:
        best = self.summary.get("best", {})
        return f"Run({str(self.dir)!r}, best {best.get('metric')}={best.get('value')})"

    @property
    def config(self) -> Config:
        return self._load()[0]

    @property
    def model(self):
        """The run's RoutedModel (backbone, LM head, task heads), loaded for inference."""
        return self._load()[1]

    @property
    def tokenizer(self):
        return self._load()[2]

    def predictor(self, source: str | None = None) -> Predictor:
        """The batched, length-sorted predictor of one head (default: the primary source's), as
        `predict`, `routetune predict` and `routetune serve` use it."""
        cfg, model, tokenizer, hw = self._load()
        return Predictor(model, tokenizer, source or cfg.train.primary, cfg.model.max_length,
                         cfg.train.eval_batch_size, hw.precision)

    def _load(self):
        if self._loaded is None:
            self._loaded = load_for_inference(self.dir, self.checkpoint, self.device, self.precision,
                                              self._verified)
        return self._loaded

    def evaluate(self, split: str = "test", sources: list[str] | None = None) -> dict:
        """Scores of the run's checkpoint on its sources' `dev` (also called `validation`) or `test`
        sets, as plain Python numbers."""
        return plain(evaluate_run(self.dir, split, self.checkpoint, sources, loaded=self._load))

    def predict(self, items: str | list[str] | list[list[str]], source: str | None = None) -> dict | list[dict]:
        """Tags and entity spans (token heads) or a label with probabilities (classification
        heads) per item: a text, or a list of words. One text in, one result out; a list in, a
        list out. `source`: the head (default: the primary)."""
        single = isinstance(items, str)
        batch = [items] if single else items
        if not isinstance(batch, (list, tuple)):
            raise RoutetuneError(f"predict: expected a text or a list of texts (or of word lists), got "
                                 f"{type(items).__name__}")
        for i, x in enumerate(batch):
            if not (isinstance(x, str) or (isinstance(x, list) and all(isinstance(w, str) for w in x))):
                raise RoutetuneError(f"predict: item {i} is a {type(x).__name__}; expected a text or a list of words")
        out = plain(self.predictor(source).predict([item_from_tokens(x) if isinstance(x, list) else item_from_text(x)
                                       for x in batch]))
        return out[0] if single else out

    def generate(self, prompts: str | list[str], max_new_tokens: int = 64) -> str | list[str]:
        """Greedy continuations (decoder runs); one prompt in, one string out."""
        cfg, model, tokenizer, hw = self._load()
        if not model.is_decoder:
            raise RunError(f"{self.dir}: generation needs a decoder backbone; this run's is an encoder")
        single = isinstance(prompts, str)
        out = generate(model, tokenizer, [prompts] if single else list(prompts), max_new_tokens,
                       cfg.model.max_length + max_new_tokens, cfg.train.eval_batch_size, hw.precision)
        return out[0] if single else out

    def export(self, folder: str | Path, merge: bool = False, overwrite: bool = False) -> list[str]:
        """Plain Hugging Face / PEFT folders (see `routetune export`)."""
        return export_run(self.dir, Path(folder), self.checkpoint, merge, overwrite)
