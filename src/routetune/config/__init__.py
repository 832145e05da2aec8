"""Typed run configuration: YAML file + dotted ``--set`` overrides -> validated :class:`Config`.

* ``schema.py``: the models of each section and the cross-checks between sections;
* ``routing.py``: the `routing` section and its checks against the sources;
* ``sources.py``: the models of a source and of an `evals` set (readers, fields, holdout);
* ``load.py``: reading a file, overrides, ``${VAR}``, errors that name file, line and key;
* ``docs.py``: docs/configuration.md rendered from the models (``python -m routetune.config.docs``).

The models are the single source of truth for keys, types, defaults and the documentation of
each key (attribute docstrings, rendered into docs/configuration.md by ``config/docs.py``).
"""

from routetune.config.load import (apply_override, config_from_dict, config_from_run, dump_config, load_config,
                                   parse_config, resolve_paths)
from routetune.config.schema import (Config, FreezeConfig, ModelConfig, PeftConfig, RetentionConfig, RoutingConfig,
                                     RunConfig, TrainConfig)
from routetune.config.sources import EvalTextConfig, SourceConfig

__all__ = ["Config", "EvalTextConfig", "FreezeConfig", "ModelConfig", "PeftConfig", "RetentionConfig",
           "RoutingConfig", "RunConfig", "SourceConfig", "TrainConfig", "apply_override", "config_from_run",
           "config_from_dict", "dump_config", "load_config", "parse_config", "resolve_paths"]
