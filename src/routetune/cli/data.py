"""`routetune data`: list the public data sets the examples use and fetch them into the data root."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from routetune.data.catalog import CATALOG, data_root, fetch, problems

data_app = typer.Typer(no_args_is_help=True, help="List and fetch the public data sets the examples read.")


@data_app.command("list")
def list_cmd(root: Optional[Path] = typer.Option(None, "--root", help="Data root (default: $ROUTETUNE_DATA, "
                                                 "else ~/.cache/routetune/data)")) -> None:
    """One line per data set: name, state under the data root, licence, what it is."""
    root = root or data_root()
    typer.echo(f"data root: {root}")
    for ds in CATALOG.values():
        folder = root / ds.name
        state = ("missing" if not folder.exists() else "ok" if not problems(ds, folder) else "differs")
        typer.echo(f"{ds.name:<18} {state:<8} {ds.licence:<20} {ds.what}")


@data_app.command("fetch")
def fetch_cmd(
    names: list[str] = typer.Argument(..., metavar="NAMES", help=f"Data sets to fetch ({', '.join(CATALOG)}), or all"),
    root: Optional[Path] = typer.Option(None, "--root", help="Data root (default: $ROUTETUNE_DATA, else "
                                        "~/.cache/routetune/data)"),
    source: Optional[Path] = typer.Option(None, "--from", help="Take the files from this folder (a copy made "
                                          "elsewhere, or a data root holding the set) instead of downloading"),
) -> None:
    """Download data sets from their public upstreams (pinned commits), check every file's SHA-256,
    and move them into the data root. A set already there is verified and left as it is."""
    wanted = list(CATALOG) if names == ["all"] else names
    for name in wanted:
        folder, state = fetch(name, root, source.expanduser() if source else None)
        typer.echo(f"{name}: {state} ({folder})")
