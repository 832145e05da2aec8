"""How a command ends: its exit status and last line. routetune's own errors, and a path the user
gave that cannot be written, print one line and exit 2; Ctrl-C prints "aborted" and exits 130,
SIGTERM "terminated" and 143 (both unwind the same way); anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import signal
import sys

import typer

from routetune.errors import RoutetuneError

_STOPS = {signal.SIGINT: (130, "aborted"), signal.SIGTERM: (143, "terminated")}  # 128 + the signal's number
_stopped_by = [signal.SIGINT]  # the signal a stop came from (typer turns every KeyboardInterrupt into 130)


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (`kill`, a job scheduler's stop, a container's shutdown) unwinds like Ctrl-C: a
    sweep marks its running trial interrupted, so `--resume` retries it at once, and every
    `finally` runs (a process group is left, temporary files go); then exit 143."""
    _stopped_by[0] = signal.SIGTERM
    raise KeyboardInterrupt


def _stop() -> None:
    code, word = _STOPS[_stopped_by[0]]
    typer.echo(word, err=True)
    sys.exit(code)


def _usage_error(exc: BaseException) -> bool:
    """A command-line usage error (unknown command or option, bad or missing value). typer ships
    its own copy of click, whose exceptions are not click's, so they are recognised by shape."""
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


def _leave_process_group(finished: bool) -> None:
    """Under torchrun: leave the process group before exit (its threads must not outlive it). After
    a command that finished, first wait for every rank to finish too: a rank that tore down its
    connections while another still used them was seen aborting ("terminate called without an
    active exception", SIGABRT) after a completed run, about once in a few dozen 2-process runs.
    Not after a failure: the other ranks may never arrive."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def run_app(app: typer.Typer) -> None:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    finished = False
    try:
        result = _run(app)
        finished = not result  # returned normally, code 0 (an exit or exception leaves it False)
    finally:
        _leave_process_group(finished)
    if result == 130:  # typer turned Ctrl-C (or SIGTERM, above) into a return code
        _stop()
    if isinstance(result, int) and result:  # typer.Exit(code)
        sys.exit(result)


def _run(app: typer.Typer):
    try:
        return app(standalone_mode=False, prog_name="routetune")
    except RoutetuneError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        _stop()
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:  # a path the user gave or owns
        typer.echo(f"error: {exc.filename or ''}: {exc.strerror or exc}".replace("error: : ", "error: "), err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno == 30:  # EROFS: a read-only file system
            typer.echo(f"error: {exc.filename}: read-only file system", err=True)
            sys.exit(2)
        raise
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `routetune`: the help, as click shows it
            exc.show()
            sys.exit(2)
        if _usage_error(exc):
            command = getattr(getattr(exc, "ctx", None), "command_path", None) or "routetune"
            typer.echo(f"error: {exc.format_message()} (see: {command} --help)", err=True)
            sys.exit(2)
        raise
