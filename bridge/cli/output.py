"""Console output for the CLI, and the one place domain errors become exit codes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from bridge.errors import BridgeError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)


def handles_errors(fn: F) -> F:
    """Print a `BridgeError` as one red line and exit 1, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BridgeError as exc:
            err_console.print(f"[bold red]Error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
