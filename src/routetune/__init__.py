"""routetune: fine-tune pretrained language models with seeded random routing of sources."""

import os

# Transparent huge pages for PyTorch's large CPU buffers (torch's own switch: c10's CPU allocator
# madvises MADV_HUGEPAGE on allocations of 2 MB and more when THP_MEM_ALLOC_ENABLE is set). A
# training step frees and re-allocates its big buffers (gradients, logits, activations); with 4 KB
# pages every step page-faults them in again (the word-embedding gradient most of all). Torch reads
# the variable once per process, so it is set on import, before routetune imports torch; a value
# the user set (e.g. THP_MEM_ALLOC_ENABLE=0) is kept. Measured in docs/benchmarks.md (speed levers,
# `bench/ab.py --lever huge-pages`).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from routetune.errors import ConfigError, DataError, RoutetuneError, RunError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "Run", "RoutetuneError", "RunError", "__version__", "load", "train"]


def __getattr__(name: str):
    """`routetune.train`, `routetune.load`, `routetune.Run` (routetune/api.py), imported on first
    use so that `import routetune` stays light (no torch)."""
    if name in ("train", "load", "Run"):
        from routetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'routetune' has no attribute {name!r}")
