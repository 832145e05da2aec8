"""routetune: fine-tune pretrained language models with seeded random routing of sources."""

from routetune.errors import ConfigError, DataError, RoutetuneError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "RoutetuneError", "__version__"]
