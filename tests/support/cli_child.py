"""Command-line children of the tests: `python -m routetune.cli ARGS`, forked from a process that
has the heavy modules imported (forkserver.py), with a fixed hash seed and an optional fault point."""

from __future__ import annotations

import os

from support import forkserver


def cli_env(fault: str | None = None, **extra: str) -> dict:
    """The environment of a command-line child in the tests: this process's, a fixed hash seed,
    and a fault point (training/faults.py) only where one is asked for."""
    env = {**os.environ, "PYTHONHASHSEED": "0", **extra}
    env.pop("ROUTETUNE_FAULT", None)
    if fault:
        env["ROUTETUNE_FAULT"] = fault
    return env


def run_cli(*args, fault=None, check=True, env_extra=None):
    """`python -m routetune.cli ARGS` in a child process (optionally killed at a fault point),
    forked from one that has the heavy modules imported (forkserver.py)."""
    proc = forkserver.run("routetune.cli", [str(a) for a in args], cli_env(fault, **(env_extra or {})), timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc
