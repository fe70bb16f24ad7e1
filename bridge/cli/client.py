"""Client commands: `bridge sync` (deliver a journal left behind) and `bridge queue` (what is waiting)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bridge.cli.output import console, err_console, handles_errors

JOURNAL_HELP = "The journal file. Default: BRIDGE_JOURNAL, else journal.sqlite in the bridge data folder."


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("sync")(sync_command)
    app.command("queue")(queue_command)


def _run_label(run: str, runs: dict) -> str:
    if run == "" or run == "experiments":
        return "(experiments)"
    record = runs.get(run)
    return f"{run[:12]} {record.name}" if record is not None and record.name else run[:12]


@handles_errors
def sync_command(
    journal: Annotated[Optional[Path], typer.Option(help=JOURNAL_HELP, envvar="BRIDGE_JOURNAL")] = None,
    url: Annotated[Optional[str], typer.Option(
        help="Server URL. Default: discovery (BRIDGE_URL, then the published record).")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """Deliver what an earlier process left in the journal; exit code 1 if anything remains."""
    from bridge.client.connect import queue, sync

    _, _, runs, path = queue(journal)
    with Progress(TextColumn("[bold]Delivering[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task("sync", total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        report = sync(journal, url, timeout=timeout, on_progress=on_progress)
    if report.repair:
        err_console.print(f"[yellow]Warning:[/] {report.repair}", highlight=False)
    console.print(f"Journal {report.journal} → {report.url}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("run", no_wrap=True)
    for column in ("delivered", "left", "dead letters"):
        table.add_column(column, justify="right", no_wrap=True)
    for run in sorted(set(report.before) | set(report.after) | set(report.dead)):
        before, after = report.before.get(run, 0), report.after.get(run, 0)
        table.add_row(_run_label(run, runs), str(max(0, before - after)), str(after), str(report.dead.get(run, 0)))
    console.print(table)
    if report.left:
        err_console.print(f"[bold red]{report.left} entries are still in the journal[/]"
                          + (f" (last error: {report.last_error})" if report.last_error else ""), highlight=False)
        raise typer.Exit(1)
    console.print(f"Delivered everything in {path}.")


@handles_errors
def queue_command(
    journal: Annotated[Optional[Path], typer.Option(help=JOURNAL_HELP, envvar="BRIDGE_JOURNAL")] = None,
) -> None:
    """Show what waits in the journal, and the dead letters the server refused, per run."""
    from bridge.client.connect import queue

    backlog, dead, runs, path = queue(journal)
    console.print(f"Journal {path}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("run", no_wrap=True)
    for column in ("waiting", "dead letters"):
        table.add_column(column, justify="right", no_wrap=True)
    for run in sorted(set(backlog.pending) | set(backlog.dead)):
        table.add_row(_run_label(run, runs), str(backlog.pending.get(run, 0)), str(backlog.dead.get(run, 0)))
    console.print(table)
    if dead:
        letters = Table(title="Dead letters (refused by the server; not retried)")
        letters.add_column("run", no_wrap=True)
        letters.add_column("kind", no_wrap=True)
        letters.add_column("key", overflow="fold")
        letters.add_column("server's message", overflow="fold")
        for op, error in dead:
            letters.add_row(_run_label(op.run, runs), op.kind, op.key or "", error or "")
        console.print(letters)
    if not backlog.pending and not dead:
        console.print("Nothing waiting.")
