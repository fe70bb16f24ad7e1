"""`bridge train`, `bridge compare`, `bridge demo`: YOLO sweeps, their comparison, and the offline demo."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.output import console, err_console, handles_errors

TRACKING_URI_HELP = (
    "Log straight to this MLflow tracking URI (e.g. sqlite:///mlflow.db) instead of going through bridge.connect()."
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("train")(train_command)
    app.command("compare")(compare_command)
    app.command("demo")(demo_command)


def _connect(tracking_uri: str | None):
    """MLflow pointed at `tracking_uri`, or at the bridge server found as `bridge.connect()` finds it."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        return None
    import bridge

    return bridge.connect()  # BRIDGE_URL / BRIDGE_DISCOVERY / BRIDGE_TOKEN / BRIDGE_JOURNAL / Colab secrets / keyring


def _server_reader(conn, tracking_uri: str | None):
    """(server URL, a client reading the server itself) — the server's own ids, for UI links; None without a UI."""
    from mlflow import MlflowClient

    if conn is not None:
        url = conn.url  # bridge's auth provider adds the token to requests for this URL
    elif tracking_uri and tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri
    else:
        return None
    return url, MlflowClient(tracking_uri=url)


def _print_ui_link(
    conn, tracking_uri: str | None, experiment: str, *, charts: bool = False, label: str = "MLflow UI"
) -> str | None:
    """Print (and return) the link to `experiment`'s runs in the MLflow UI's model-training view."""
    from bridge.ui import ui_link

    reader = _server_reader(conn, tracking_uri)
    if reader is None:
        return None
    url, client = reader
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as exc:  # the link is a convenience: never fail the command over it
        err_console.print(f"(no UI link: the server did not answer: {type(exc).__name__})")
        return None
    if charts and exp is not None:
        from bridge.yolo.callbacks import learning_view_link

        link = learning_view_link(url, exp)
    else:
        link = ui_link(url, exp.experiment_id if exp else None, charts=charts)
    console.print(f"{label}: {link}", soft_wrap=True, highlight=False)
    return link


def _deliver(conn, timeout_s: float = 120.0) -> None:
    """Wait for the journal to deliver before the process exits; what is left is kept for `bridge sync`."""
    if conn is None:
        return
    left = conn.flush(timeout_s)
    if left:
        err_console.print(
            f"{left} entries not delivered yet; they stay in the journal for the next connect or `bridge sync`."
        )


@handles_errors
def train_command(
    model: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            help="Model to train; repeat for a sweep. 'yolo11n' means yolo11n.pt (or yolo11n.yaml "
            "when offline with YOLO_OFFLINE=1); a .pt or .yaml path is used as given.",
        ),
    ],
    data: Annotated[Path, typer.Option(help="Dataset YAML (Ultralytics format).")],
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per model.")] = 10,
    imgsz: Annotated[int, typer.Option(min=32, help="Training image size.")] = 640,
    batch: Annotated[int, typer.Option(help="Batch size (-1: Ultralytics' AutoBatch on GPU).")] = 16,
    experiment: Annotated[
        str, typer.Option(help="MLflow experiment that gets one run per model.", envvar="MLFLOW_EXPERIMENT_NAME")
    ] = "yolo",
    device: Annotated[str | None, typer.Option(help="'cpu', '0', '0,1' … (default: Ultralytics picks).")] = None,
    workers: Annotated[int | None, typer.Option(help="Data loader workers.")] = None,
    project: Annotated[Path | None, typer.Option(help="Folder for Ultralytics' run outputs.")] = None,
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg", help="Any other Ultralytics training argument as KEY=VALUE (repeatable), e.g. --arg nbs=4."
        ),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="A tag for every run of the sweep as KEY=VALUE (repeatable).")
    ] = None,
    tracking_uri: Annotated[str | None, typer.Option(help=TRACKING_URI_HELP)] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue each model's interrupted training from "
            "<project>/<model>/weights/last.pt into its MLflow run (a model "
            "without last.pt starts afresh, a finished one is left alone).",
        ),
    ] = False,
) -> None:
    """Train one or more YOLO models one after another, each as a run of one MLflow experiment."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from bridge.errors import ConfigError
    from bridge.yolo.console import collapsed_output
    from bridge.yolo.sweep import resolve_model, sweep

    extra = _parse_args(arg or [])
    tags = {k: str(v) for k, v in _parse_args(tag or []).items()}
    if not data.is_file():  # checked before connecting: a typo should not cost a connection
        raise ConfigError(f"--data {str(data)!r}: no such file (expected a dataset YAML)")
    for name in model:
        resolve_model(name)
    conn = _connect(tracking_uri)
    overrides: dict = {**extra, "epochs": epochs, "imgsz": imgsz, "batch": batch}
    if device is not None:
        overrides["device"] = device
    if workers is not None:
        overrides["workers"] = workers
    if project is not None:
        overrides["project"] = str(project)
    # Rich's live display takes over stdout: Ultralytics' lines print above the bars, its own progress bars
    # collapse to their final frame, and rich's bars below show models, epochs and this epoch's batches.
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        redirect_stdout=True,
        redirect_stderr=True,
    )
    overall = progress.add_task("models", total=len(model))
    epoch_task = progress.add_task("epochs", total=epochs)
    batch_task = progress.add_task("batches", total=None)

    def on_model_start(name: str, index: int) -> None:
        progress.update(overall, completed=index, description=f"model {index + 1}/{len(model)}: {name}")
        progress.reset(epoch_task, total=epochs, description=f"{name} epochs")
        console.rule(f"[bold]{name}[/] ({index + 1}/{len(model)})")

    def on_epoch_end(name: str, epoch: int, total: int) -> None:
        progress.update(epoch_task, completed=epoch, total=total)

    def on_batch_end(name: str, batch: int, total: int) -> None:
        progress.update(batch_task, completed=batch, total=total, description=f"{name} batches")

    with progress, collapsed_output():
        results = sweep(
            model,
            data=data,
            experiment=experiment,
            tags=tags,
            on_model_start=on_model_start,
            on_epoch_end=on_epoch_end,
            on_batch_end=on_batch_end,
            resume=resume,
            **overrides,
        )
        progress.update(overall, completed=len(model))
    _deliver(conn)
    table = Table(title=f"Sweep into experiment '{experiment}'")
    for col in ("model", "run id", "mAP50-95", "mAP50", "result"):
        table.add_column(col)
    for r in results:
        m = r.final_metrics
        table.add_row(
            r.model,
            r.run_id or "-",
            _num(m.get("val/best/mAP50-95")),
            _num(m.get("val/best/mAP50")),
            "[green]ok[/]" if r.error is None else f"[red]{r.error}[/]",
        )
    console.print(table)
    _print_ui_link(conn, tracking_uri, experiment, label="Runs in the MLflow UI")
    console.print(f"Compare them: [bold]bridge compare {experiment}[/]")
    if any(r.error for r in results):
        raise typer.Exit(1)


def _parse_args(items: list[str]) -> dict:
    """KEY=VALUE pairs with YAML-typed values (4 → int, false → bool, [1, 2] → list)."""
    import yaml

    from bridge.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r}: expected KEY=VALUE, e.g. --arg nbs=4 or --tag team=vision")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


@handles_errors
def compare_command(
    experiment: Annotated[str, typer.Argument(help="MLflow experiment name (or id).")],
    out: Annotated[Path, typer.Option(help="Where to write the PNG of the curves.")] = Path("compare.png"),
    log: Annotated[
        bool, typer.Option("--log", help="Attach the PNG and a CSV of the table to a summary run in the experiment.")
    ] = False,
    tracking_uri: Annotated[str | None, typer.Option(help=TRACKING_URI_HELP)] = None,
    register: Annotated[
        str | None,
        typer.Option(
            help="Register the best run's best.pt as a version of this MLflow model (a pyfunc around Ultralytics' "
            "predictor); alias 'champion' moves to it only when it beats the current champion on --metric."
        ),
    ] = None,
    metric: Annotated[
        str, typer.Option(help="The metric that picks the best run and the champion (higher is better).")
    ] = "val/best/mAP50-95",
) -> None:
    """Table of each run's final metrics, training time and size (best first), and a PNG of their curves."""
    from bridge.yolo.compare import compare, log_comparison

    conn = _connect(tracking_uri)
    result = compare(experiment)
    if not result.rows:
        err_console.print(f"No bridge.yolo runs in experiment '{result.experiment}'.")
        raise typer.Exit(1)
    _print_comparison(result)
    png = result.plot(out)
    console.print(f"Curves written to [bold]{png}[/]")
    _print_ui_link(conn, tracking_uri, result.experiment, charts=True, label="Curves in the MLflow UI")
    if register:
        from bridge.yolo.champion import register_champion

        _deliver(conn)  # the runs' last entries (best.pt, final metrics) must be on the server first
        champion = register_champion(result.experiment, register, metric=metric, tracking_uri=tracking_uri)
        verdict = "[green]now the champion[/]" if champion.promoted else f"champion stays v{champion.champion_version}"
        console.print(
            f"Registered [bold]{champion.name}[/] v{champion.version} from run {champion.run_name} "
            f"({champion.metric} {champion.value:.4f}): {verdict} — {champion.reason}"
        )
        console.print(
            f'Load it with: mlflow.pyfunc.load_model("models:/{champion.name}@champion")', highlight=False, markup=False
        )
    if log:
        run_id = log_comparison(result, png)
        _deliver(conn)
        console.print(f"Comparison logged to run {run_id} in experiment '{result.experiment}'")


@handles_errors
def demo_command(
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs of the demo model.")] = 8,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve/--no-serve",
            help="Keep serving the UI after the training, until Ctrl-C (--no-serve: stop the server and exit).",
        ),
    ] = True,
) -> None:
    """Serve, connect and train a tiny YOLOv8n on a generated dataset, all on this machine, offline."""
    from bridge.yolo.compare import compare
    from bridge.yolo.demo import run_demo

    console.print("Starting [bold]bridge serve --tunnel none[/] and training a tiny YOLOv8n …")
    result = run_demo(
        epochs=epochs,
        keep=True,
        on_experiment=lambda link: console.print(f"Watch the curves live: {link}", soft_wrap=True, highlight=False),
    )
    try:
        console.print(f"[green]Done.[/] The run in the MLflow UI: {result.run_url}", soft_wrap=True, highlight=False)
        _print_comparison(compare(str(result.experiment_id), tracking_uri=result.ui_url))
        if not serve:
            console.print(f"The demo server was stopped; its data stays in {result.home}.")
            return
        console.print(
            f"bridge serve keeps running so these links work (UI at {result.ui_url}); "
            "press [bold]Ctrl-C[/] to stop it.",
            soft_wrap=True,
            highlight=False,
        )
        # Ctrl-C must work even when started with SIGINT ignored (a background job); SIGTERM stops it the same way.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            if result.server.proc is not None:  # always, once demo() has returned
                result.server.proc.wait()
            err_console.print("The demo server exited by itself.")
            raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("Stopping the demo server …")
    finally:
        result.server.stop()


def _print_comparison(result) -> None:
    """The comparison as a table, best first."""
    from rich.table import Table

    rows = [{k: v for k, v in row.items() if k not in ("run id", "status")} for row in result.table()]
    table = Table(title=f"{result.experiment}: {len(rows)} runs, best mAP50-95 first")
    for col in rows[0] if rows else ():
        table.add_column(col, justify="left" if col in ("run", "model") else "right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
