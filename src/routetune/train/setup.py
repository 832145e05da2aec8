"""Everything a run needs, built and validated before the first step: tokenizer, backbone + heads,
sources, dev/test sets, router and the exact number of steps."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from routetune.config import Config
from routetune.data.readers import Sentence
from routetune.data.plan import RoutedBatches, plan_run
from routetune.data.sources import LabelledSource, build_sources, derive_seed, read_split
from routetune.errors import ConfigError
from routetune.model.heads import RoutedModel, build_model
from routetune.model.load import load_tokenizer, resolve_model
from routetune.train.checkpoint import run_checkpoint

log = logging.getLogger("routetune")
TAG_METRICS = ("f1", "precision", "recall")


@dataclass
class Setup:
    cfg: Config
    model_path: str
    tokenizer: object
    model: RoutedModel
    sources: dict
    batches: RoutedBatches
    total_steps: int
    primary_batches_per_epoch: int
    dev: dict[str, list[Sentence]] = field(default_factory=dict)
    test: dict[str, list[Sentence]] = field(default_factory=dict)
    source_table: list[dict] = field(default_factory=list)

    @property
    def labels(self) -> dict[str, list[str]]:
        return {n: s.labels for n, s in self.sources.items() if isinstance(s, LabelledSource)}


def prepare(cfg: Config) -> Setup:
    earlier_labels, earlier = {}, None
    if cfg.model.init_from:
        earlier = run_checkpoint(Path(cfg.model.init_from), "best")
        earlier_labels = json.loads((earlier / "heads.json").read_text())
        earlier_labels = {n: spec["labels"] for n, spec in earlier_labels.items()}
        model_path = str(earlier)
        log.info("init_from %s: backbone, LM head and heads %s", earlier, ", ".join(earlier_labels) or "-")
    else:
        model_path = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    sources = build_sources(cfg, tokenizer, earlier_labels, cfg.model.allow_new_labels)
    dev, test = {}, {}
    for name, src in sources.items():
        if isinstance(src, LabelledSource):
            sc = cfg.sources[name]
            if sc.dev:
                dev[name] = read_split(sc, "dev", src.labels)
            if sc.test:
                test[name] = read_split(sc, "test", src.labels)
    _check_early_stopping(cfg, dev)

    torch.manual_seed(cfg.train.seed)  # newly initialised LM-head weights, dropout
    model = build_model(model_path, cfg.train.seed)
    for name, src in sources.items():
        if isinstance(src, LabelledSource):
            model.add_token_head(name, src.labels, derive_seed(cfg.train.seed, "head", name))
    if earlier is not None:
        model.load_heads_from(earlier, [n for n in earlier_labels if n in model.heads])

    sizes = {n: len(s) if isinstance(s, LabelledSource) else None for n, s in sources.items()}
    router, total, _ = plan_run(cfg, sizes)
    r = cfg.routing
    batches = RoutedBatches(router, sources, cfg.train.batch_size, r.granularity, r.on_exhausted)
    per_epoch = math.ceil(len(sources[cfg.train.primary]) / cfg.train.batch_size)
    setup = Setup(cfg, model_path, tokenizer, model, sources, batches, total, per_epoch, dev, test)
    describe(setup)
    return setup


def _check_early_stopping(cfg: Config, dev: dict) -> None:
    es = cfg.train.early_stopping
    available = [f"{n}/{m}" for n in dev for m in TAG_METRICS]
    if not dev:
        if es.patience is not None:
            raise ConfigError("train.early_stopping.patience: early stopping needs a dev file on a labelled source")
        return
    if es.metric not in available:
        raise ConfigError(f"train.early_stopping.metric: {es.metric!r} is not a dev metric of this run "
                          f"(available: {', '.join(available)})")


def describe(setup: Setup) -> list[dict]:
    """Log each source's size, weight, expected share and expected passes over the run."""
    cfg, total = setup.cfg, setup.total_steps
    router = setup.batches.router
    names = router.names
    shares = [router.schedule.mean(i) if router.schedule.kind != "constant" else float(router.schedule.start[i])
              for i in range(len(names))]
    per_step = 1 if cfg.routing.granularity == "batch" else cfg.train.batch_size
    rows = []
    log.info("model %s -> %s", cfg.model.name, setup.model_path)
    log.info("routing: strategy %s, granularity %s, schedule %s, on_exhausted %s, seed %d", cfg.routing.strategy,
             cfg.routing.granularity, router.schedule.kind, cfg.routing.on_exhausted, cfg.routing.seed)
    for i, (name, src) in enumerate(setup.sources.items()):
        decisions = total * per_step * shares[i]
        examples = decisions * (cfg.train.batch_size if per_step == 1 else 1)
        if isinstance(src, LabelledSource):
            size = len(src)
            passes = decisions / setup.primary_batches_per_epoch if (per_step == 1 and name == cfg.train.primary) \
                else examples / size
            log.info("source %-12s %-22s %6d sentences  share %5.1f%%  ~%d examples  ~%.2f passes",
                     name, src.objective, size, 100 * shares[i], round(examples), passes)
            if src.n_truncated_words:
                log.warning("source %s: %d words in %d sentences are beyond max_length=%d and are not trained on",
                            name, src.n_truncated_words, src.n_truncated_sentences, cfg.model.max_length)
        else:
            size, passes = None, None
            log.info("source %-12s %-22s %6s  share %5.1f%%  ~%d blocks (stream of %d files, size unknown)",
                     name, src.objective, "-", 100 * shares[i], round(examples), len(src.files))
        rows.append({"source": name, "objective": src.objective, "size": size, "share": shares[i],
                     "expected_examples": examples, "expected_passes": passes})
    log.info("%d steps of batch %d (%g epochs of %s%s)", total, cfg.train.batch_size, cfg.train.epochs,
             cfg.train.primary, f", max_steps {cfg.train.max_steps}" if cfg.train.max_steps else "")
    setup.source_table = rows
    return rows
