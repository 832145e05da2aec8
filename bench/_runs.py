"""Shared by the bench scripts: a routetune training run of a shipped example, with every step
going through a wrapper (timers, A/B switches, profilers)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
# the examples read the public data sets from $ROUTETUNE_DATA; here the shared copy beside the checkout
os.environ.setdefault("ROUTETUNE_DATA", str(ROOT.parent / "shared" / "data"))

# the bench work: only the example's primary source, no evaluations, logging or progress bar
BENCH_SETTINGS = ("routing.weights.general=0", "train.eval_each_epoch=false", "train.eval_before=false",
                  "train.log_every=1000000", "train.progress=false")


def prepare_example(example: str, steps: int, overrides=()):
    """The Setup of examples/`example` for `steps` optimizer steps of the bench work."""
    import routetune  # noqa: F401  (first, as the CLI does: it sets torch's allocator switch)
    from routetune.config import load_config
    from routetune.training.setup import prepare

    cfg = load_config(ROOT / "examples" / example, [*BENCH_SETTINGS, f"train.max_steps={steps}", *overrides])
    return prepare(cfg)


def run_steps(setup, wrap):
    """Train `setup` to the end in a temporary run folder, each step through
    ``wrap(trainer, original_train_step)``; returns the trainer."""
    from routetune.training.engine import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(setup, Path(out))
        trainer.train_step = wrap(trainer, trainer.train_step)
        trainer.run()
    return trainer
