"""Client commands: `bridge sync` (deliver a journal left behind) and `bridge queue` (what is waiting)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_waits(waits: dict, files: list, runs: dict) -> None:
    """Why each lane waits, and each file's progress: confirmed / total bytes, tries, its last error, next try."""
    now = time.time()
    for lane, wait in sorted(waits.items()):
        due = f", next try in {max(0.0, wait.next_try - now):.0f} s" if wait.next_try else ""
        line = f"[yellow]{lane.capitalize()} wait:[/] {wait.error} (attempt {wait.attempts}{due})"
        console.print(line, highlight=False)
    if not files:
        return
    table = Table(title="Files waiting")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("run", no_wrap=True)
    table.add_column("path", overflow="fold")
    table.add_column("confirmed", justify="right", no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    for f in files:
        share = f" {100 * f.confirmed / f.size:.0f}%" if f.size else ""
        table.add_row(
            str(f.op), _run_label(f.run, runs), f.path, f"{_size(f.confirmed)} / {_size(f.size)}{share}", str(f.tries)
        )
    console.print(table)
    for f in files:
        if f.error:
            due = f" (next try in {f.next_try - now:.0f} s)" if f.next_try and f.next_try > now else ""
            console.print(f"  {f.op}: {f.error}{due}", highlight=False)


@handles_errors
def sync_command(
    journal: Annotated[Path | None, typer.Option(help=JOURNAL_HELP, envvar="BRIDGE_JOURNAL")] = None,
    url: Annotated[
        str | None, typer.Option(help="Server URL. Default: discovery (BRIDGE_URL, then the published record).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """Deliver what an earlier process left in the journal; exit code 1 if anything remains."""
    from bridge.client.connect import queue, sync

    view = queue(journal)
    runs, path = view.runs, view.path
    with Progress(
        TextColumn("[bold]{task.description}[/]"),
        BarColumn(),
        TextColumn("{task.fields[amount]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("Delivering", total=None, amount="")
        file_bytes = sum(f.size for f in view.files)
        bytes_task = progress.add_task("Files     ", total=file_bytes, amount="") if file_bytes else None

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, amount=f"{done}/{total}")

        def on_bytes(done: int, total: int) -> None:
            if bytes_task is not None:
                progress.update(bytes_task, completed=done, total=total, amount=f"{_size(done)} / {_size(total)}")

        report = sync(journal, url, timeout=timeout, on_progress=on_progress, on_bytes=on_bytes)
    if report.repair:
        for line in report.repair.splitlines():
            err_console.print(f"[yellow]Warning:[/] {line}", highlight=False)
    console.print(f"Journal {report.journal} → {report.url}", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("run", no_wrap=True)
    for column in ("delivered", "left", "dead letters"):
        table.add_column(column, justify="right", no_wrap=True)
    for run in sorted(set(report.before) | set(report.after) | set(report.dead)):
        before, after = report.before.get(run, 0), report.after.get(run, 0)
        table.add_row(_run_label(run, runs), str(max(0, before - after)), str(after), str(report.dead.get(run, 0)))
    console.print(table)
    failed = False
    if report.dead_letters:
        err_console.print(f"[bold red]{report.dead_letters}[/]", highlight=False)
        failed = True
    if report.left:
        err_console.print(
            f"[bold red]{report.left} entries are still in the journal[/]"
            + (f" (last error: {report.last_error})" if report.last_error else ""),
            highlight=False,
        )
        _print_waits(report.waits, report.files, runs)
        failed = True
    if report.repair:
        err_console.print(
            "[bold red]The journal was damaged: what was set aside or lost above was not delivered.[/]",
            highlight=False,
        )
        failed = True
    if failed:
        raise typer.Exit(1)
    console.print(f"Delivered everything in {path}.")


@handles_errors
def queue_command(
    journal: Annotated[Path | None, typer.Option(help=JOURNAL_HELP, envvar="BRIDGE_JOURNAL")] = None,
    retry: Annotated[
        bool,
        typer.Option(
            "--retry",
            help="Send the dead letters again (all, or those named "
            "with --id) with the next `bridge sync` or bridge.connect().",
        ),
    ] = False,
    drop: Annotated[
        bool, typer.Option("--drop", help="Delete the dead letters (all, or those named with --id) for good.")
    ] = False,
    ids: Annotated[
        list[int] | None, typer.Option("--id", help="A dead letter's id (the first column); repeat for several.")
    ] = None,
    show_config: Annotated[
        bool,
        typer.Option("--config", help="Print the client's effective settings and where each came from, then exit."),
    ] = False,
) -> None:
    """Show what waits in the journal and the dead letters (with why), per run; retry or drop dead letters."""
    from bridge.client.connect import queue

    if show_config:
        _print_config(journal)
        return
    if retry and drop:
        err_console.print("[bold red]Error:[/] --retry and --drop exclude each other", highlight=False)
        raise typer.Exit(2)
    if ids and not (retry or drop):
        err_console.print("[bold red]Error:[/] --id goes with --retry or --drop", highlight=False)
        raise typer.Exit(2)
    chosen = list(ids) if ids else True
    before = {letter.op.id for letter in queue(journal).dead} if (retry or drop) else set()
    if ids and not set(ids) <= before:
        err_console.print(
            f"[bold red]Error:[/] no dead letter with id {sorted(set(ids) - before)} in this journal", highlight=False
        )
        raise typer.Exit(2)
    view = queue(journal, retry=chosen if retry else False, drop=chosen if drop else False)
    backlog, dead, runs, path = view.backlog, view.dead, view.runs, view.path
    console.print(f"Journal {path}", highlight=False, soft_wrap=True)
    for repair in view.repairs:
        err_console.print(f"[yellow]Warning:[/] {repair}", highlight=False)
    if retry or drop:
        done = len(chosen) if isinstance(chosen, list) else len(before)
        console.print(
            f"{done} dead letter(s) "
            + ("will be sent again by the next `bridge sync` or bridge.connect()." if retry else "deleted.")
        )
    table = Table()
    table.add_column("run", no_wrap=True)
    for column in ("waiting", "dead letters"):
        table.add_column(column, justify="right", no_wrap=True)
    for run in sorted(set(backlog.pending) | set(backlog.dead)):
        table.add_row(_run_label(run, runs), str(backlog.pending.get(run, 0)), str(backlog.dead.get(run, 0)))
    console.print(table)
    if backlog.pending:
        _print_waits(view.waits, view.files, runs)
    if dead:
        letters = Table(title="Dead letters (not delivered as they are; not retried)")
        letters.add_column("id", no_wrap=True, justify="right")
        letters.add_column("run", no_wrap=True)
        letters.add_column("kind", no_wrap=True)
        letters.add_column("key", overflow="fold")
        letters.add_column("reason", no_wrap=True)
        letters.add_column("message", overflow="fold")
        for op, error, reason in dead:
            letters.add_row(str(op.id), _run_label(op.run, runs), op.kind, op.key or "", reason or "", error or "")
        console.print(letters)
    if not backlog.pending and not dead:
        console.print("Nothing waiting.")
    elif dead:
        console.print("`bridge queue --retry` sends them again, `--drop` deletes them (add --id N for one).")


def _print_config(journal: Path | None) -> None:
    from bridge.client.options import ClientOptions

    options = ClientOptions.from_env(journal=journal)
    table = Table(title="Client settings (bridge.connect(), bridge sync)")
    for column in ("option", "value", "environment variable", "from"):
        table.add_column(column, no_wrap=column != "value", overflow="fold")
    for name, value, env, source in options.describe():
        table.add_row(name, value, env, source)
    console.print(table)
