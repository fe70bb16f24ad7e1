"""The `bridge` command: thin commands over the library, errors caught only here."""

from __future__ import annotations

import logging
import os

import typer

from bridge.cli import client as _client
from bridge.cli import serve as _serve
from bridge.cli import yolo as _yolo

app = typer.Typer(
    name="bridge",
    help="Track Ultralytics/MLflow runs from Colab into your workstation's MLflow, through an authenticated tunnel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold the access token
)

_serve.register(app)
_client.register(app)
_yolo.register(app)


def main() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.basicConfig(
        level=os.environ.get("BRIDGE_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app()
