"""Fixtures for the client side: a `connect()` that is undone after the test, and server-side checks."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator

import mlflow
import pytest
from mlflow import MlflowClient

#: Deliver quickly in tests; the production defaults coalesce for longer.
FAST_SENDER_ENV = {"BRIDGE_SEND_INTERVAL_S": "0.05", "BRIDGE_HTTP_TIMEOUT_S": "5"}


def _reset_mlflow() -> None:
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    while mlflow.active_run() is not None:
        mlflow.end_run()
    tracking_utils._tracking_uri = None
    registry_utils._registry_uri = None
    fluent._active_experiment_id = None
    tracking_utils._artifact_repos_cache.clear()


@pytest.fixture
def bridge_connect(monkeypatch, tmp_path) -> Iterator:
    """`bridge.connect` with a per-test journal (tmp_path/journal.sqlite by default); closed afterwards."""
    from bridge.client import connect as connect_module

    for name, value in FAST_SENDER_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_AUTH", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    # connect(journal=…, journal_limit=…) exports these for child processes: undo that after the test.
    exported = {name: os.environ.get(name) for name in ("BRIDGE_JOURNAL", "BRIDGE_JOURNAL_LIMIT")}
    made = []

    def make(url: str | None = None, token: str | None = "test-token", **kw):
        kw.setdefault("journal", tmp_path / "journal.sqlite")
        kw.setdefault("probe_timeout", 2.0)
        conn = connect_module.connect(url, token, **kw)
        made.append(conn)
        return conn

    yield make
    _reset_mlflow()
    for conn in made:
        conn.close()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, value in exported.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def server_client(mlflow_server) -> MlflowClient:
    """A plain MLflow client straight to the session's server, for checking what arrived."""
    return MlflowClient(mlflow_server.url)


def server_run(client: MlflowClient, experiment_name: str):
    """The one run of `experiment_name` on the server (asserting there is exactly one: no ghost runs)."""
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"experiment {experiment_name!r} not on the server"
    runs = client.search_runs([experiment.experiment_id], run_view_type=3)
    assert len(runs) == 1, f"expected exactly one run in {experiment_name!r}, found {len(runs)}"
    return runs[0]


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        status = self.server.status
        body = b'{"error_code": "UNAUTHENTICATED", "message": "bad token"}' if status >= 400 else b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def make_status_server() -> Iterator:
    """Start loopback HTTP servers answering every request with `.status`, recording (method, path, auth)."""
    servers = []

    def make(status: int = 401):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.status = status
        server.seen = []
        server.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fixed_status_server(make_status_server):
    """A loopback HTTP server answering every request with `.status` (401 by default), recording headers.

    A stand-in for an entrance that refuses the token, at the HTTP boundary.
    """
    return make_status_server(401)
