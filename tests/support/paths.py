"""Where the checkout is, for tests that read its files (docs, examples, src)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # tests/support/paths.py -> the checkout
