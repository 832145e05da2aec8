"""Command line: one module per group of subcommands, each function one subcommand.

    app.py      the typer app, root options, options shared by commands
    run.py      train, validate, resume, continual
    use.py      eval, predict, generate, export, serve
    reports.py  report, compare
    sweep.py    sweep (optuna and torch load only when it runs)
    data.py     data list / fetch
    lines.py    the line-per-item files of predict and generate
    exit.py     how a command ends: exit 2 with one line for a user's mistake, Ctrl-C, SIGTERM

Nothing heavy is imported at the top of these modules: torch and transformers load inside a
command, after its arguments, config and paths have been checked."""

from __future__ import annotations

from routetune.cli import run  # noqa: F401  (each registers its commands; this order is the help's)
from routetune.cli import use  # noqa: F401
from routetune.cli import reports  # noqa: F401
from routetune.cli.app import app
from routetune.cli.data import data_app
from routetune.cli.exit import run_app
from routetune.cli.sweep import sweep_cmd
from routetune.logs import setup_logging

app.command("sweep")(sweep_cmd)  # listed after the run commands
app.add_typer(data_app, name="data")


def main() -> None:
    setup_logging()
    run_app(app)
