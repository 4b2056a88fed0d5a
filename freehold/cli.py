"""The `freehold` command: parse arguments, call the library, print results. No logic lives here."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from freehold.errors import FreeholdError

app = typer.Typer(
    help="Freehold: own your AI. Keep verified open weights, serve them, adapt and measure them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


# ---- keep: the vault ------------------------------------------------------------------------


# ---- run: the engine ------------------------------------------------------------------------


# ---- serve ----------------------------------------------------------------------------------


# ---- measure --------------------------------------------------------------------------------


# ---- adapt ----------------------------------------------------------------------------------


def main() -> None:
    try:
        app()
    except FreeholdError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
