"""The `routetune` application: the typer app, its root options (--version, --quiet, --verbose)
and the options several commands share. Commands are registered by the modules of this package
(cli/__init__.py imports them in the order `routetune --help` lists them)."""

from __future__ import annotations

from typing import Optional

import typer

from routetune.logs import set_quiet, setup_logging
from routetune.serve.limits import Limits

_LIMITS = Limits()  # the serving defaults, defined once (serve/limits.py)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Fine-tune pretrained language models with seeded routing of task and general data.")


DEVICE_HELP = "auto (a CUDA GPU when PyTorch sees one, else the CPU), cpu, cuda or cuda:N"
PRECISION_HELP = ("auto (bf16 where this device computes it natively, fp16 on GPUs without bf16, else fp32), "
                  "fp32, bf16 or fp16; chosen for this machine, not copied from the run")


NPROC_HELP = ("Data-parallel processes on this machine (one per GPU, or per CPU socket), started with torchrun; "
              "across machines use torchrun itself (docs/distributed.md)")


def _spelling(option: str):
    """A callback that checks how --device or --precision is spelled before anything heavy loads
    (what the value means on this machine is checked once torch is there)."""
    def check(value: Optional[str]) -> Optional[str]:
        if value is None:  # not given: nothing to check (and nothing to import)
            return None
        from routetune.config.schema import check_device, check_precision

        return (check_device if option == "--device" else check_precision)(value, option)
    return check


def _device_option(help_text: str = DEVICE_HELP):
    return typer.Option(None, "--device", help=help_text, callback=_spelling("--device"))


def _precision_option(help_text: str = PRECISION_HELP):
    return typer.Option(None, "--precision", help=help_text, callback=_spelling("--precision"))


def _version(value: bool) -> None:
    if value:
        import importlib.metadata

        from routetune import __version__

        try:
            import torch

            torch_line = f"torch {torch.__version__}"
        except ImportError:  # pragma: no cover
            torch_line = "torch not installed"
        typer.echo(f"routetune {__version__} ({torch_line}, transformers "
                   f"{importlib.metadata.version('transformers')})")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the versions of routetune, torch and transformers and exit"),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (when stderr is not a "
                                     "terminal, evaluation shows none anyway and the training bar "
                                     "updates every 30 s)"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="routetune's debug lines, and the INFO lines "
                                       "of the libraries it uses (transformers, MLflow, datasets, ...)")) -> None:
    """Fine-tune pretrained language models with seeded routing of task and general data."""
    set_quiet(quiet)
    if verbose:
        setup_logging(verbose=True)

