"""Where routetune's log lines go: stderr (the CLI and the Python API alike), one line each,
with transformers' own progress bars off (routetune shows its own)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(verbose: bool = False) -> None:
    """Give the `routetune` logger a stderr handler if it has none (a notebook's or an
    application's own handler is kept), at INFO (DEBUG with `verbose`)."""
    logger = logging.getLogger("routetune")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers  # its logging switch; transformers imports torch lazily, so this stays light

    transformers.utils.logging.disable_progress_bar()  # our own bar is enough
