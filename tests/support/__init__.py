"""What the tests share besides fixtures (those are in tests/conftest.py): the files and configs they
write, command-line children, the fork server, the checkout's path."""

import torch

from support.cli_child import cli_env, run_cli
from support.paths import REPO
from support.sample_files import GENERAL, NER_TRAIN, POLARITY, WORDS, make_config, write_ner, write_task_and_general

CUDA = torch.cuda.is_available()

__all__ = ["CUDA", "GENERAL", "NER_TRAIN", "POLARITY", "REPO", "WORDS", "cli_env", "make_config", "run_cli",
           "write_ner", "write_task_and_general"]
