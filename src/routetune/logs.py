"""Where routetune's log lines go: stderr (the CLI and the Python API alike), one line each,
with transformers' own progress bars off (routetune shows its own)."""

from __future__ import annotations

import logging
import os
import sys


_quiet = False
_verbose = False

# Libraries whose INFO lines are theirs, not the run's: quiet (WARNING) unless `routetune --verbose`.
THIRD_PARTY = ("mlflow", "alembic", "urllib3", "httpx", "filelock", "fsspec", "datasets", "huggingface_hub")


def set_quiet(flag: bool = True) -> None:
    """No progress bars at all (`routetune --quiet`)."""
    global _quiet
    _quiet = flag


def quiet() -> bool:
    return _quiet


def verbose() -> bool:
    return _verbose


def quiet_third_party() -> None:
    """Third-party loggers at WARNING, unless --verbose (then their INFO lines reach stderr). Called
    again after a library that sets its own level on import (MLflow) is imported."""
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.INFO if _verbose else logging.WARNING)


def bar(iterable, desc: str, total: int | None = None):
    """A progress bar over `iterable` for work that takes a while (evaluation, scoring, head
    fitting): shown on a terminal, hidden when stderr is not one (logs, CI) or with --quiet."""
    from tqdm.auto import tqdm  # light; imported where a bar is drawn

    return tqdm(iterable, desc=desc, total=total, disable=True if _quiet else None, leave=False,
                dynamic_ncols=True, mininterval=0.5)


def setup_logging(verbose: bool = False) -> None:
    """Give the `routetune` logger a stderr handler if it has none (a notebook's or an
    application's own handler is kept), at INFO. `verbose` (`routetune --verbose`): routetune's DEBUG
    lines, and third-party libraries' INFO lines through a root handler."""
    global _verbose
    _verbose = verbose
    logger = logging.getLogger("routetune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
    quiet_third_party()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers', the Hub's and datasets' progress bars off ("Generating train split"): our own is enough
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    else:  # read as they load (importing transformers here would cost seconds before a usage error)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
