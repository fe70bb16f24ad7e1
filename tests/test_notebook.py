"""colab/bridge_yolo.ipynb runs top to bottom headless (nbclient) against a local `bridge serve`; its install cell
finds the workstation's wheel through the relay with the token alone (tests/test_notebook_from_zero.py runs it all
from an empty environment)."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nbformat
import pytest
from mlflow import MlflowClient
from nbclient import NotebookClient

from bridge.record import make_record
from bridge.rendezvous import Rendezvous
from bridge.serve.publisher import RelayPublisher
from bridge.serve.wheel import PATH_PREFIX, wheel_name
from tests.support.yolo import MODEL_FAMILIES, connect_env

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "bridge_yolo.ipynb"


@pytest.mark.slow
def test_notebook_trains_three_models_and_compares_them(bridge_serve, yolo_dataset, tmp_path, monkeypatch):
    for key, value in connect_env(bridge_serve, tmp_path / "journal.sqlite").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BRIDGE_NOTEBOOK_DATA", str(yolo_dataset))
    monkeypatch.setenv("BRIDGE_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("BRIDGE_NOTEBOOK_IMGSZ", "64")
    monkeypatch.setenv("BRIDGE_NOTEBOOK_BATCH", "4")
    monkeypatch.setenv("BRIDGE_NOTEBOOK_EXPERIMENT", "notebook")
    monkeypatch.setenv(
        "BRIDGE_NOTEBOOK_TRAIN_ARGS",
        json.dumps({"nbs": 4, "workers": 0, "device": "cpu", "amp": False, "project": str(tmp_path / "runs")}),
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = "\n".join(
        o.get("text", "") or json.dumps(o.get("data", {}))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert "not Colab: Colab-only cells are skipped" in outputs
    assert "all delivered" in outputs
    # The resume cell, run after a finished sweep, trains nothing and names each model's run.
    assert outputs.count("already finished; nothing to resume") == len(MODEL_FAMILIES), outputs[-3000:]
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The compare cell links to the learning curves on the server it logs to (the chart view bridge saved).
    assert f"Curves in the MLflow UI: {bridge_serve.entrance_url}/#/experiments/" in outputs
    assert "&compareRunsMode=CHART&viewStateShareKey=bridge-learning-curves" in outputs
    table = nb.cells[-1].outputs[-1]["data"]["text/plain"]
    for name in MODEL_FAMILIES:
        assert name in table

    client = MlflowClient(bridge_serve.mlflow_url)
    exp = client.get_experiment_by_name("notebook")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(MODEL_FAMILIES)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mAP50-95")] == [1]
        assert "val/best/mAP50-95" in run.data.metrics and run.data.tags["source.kind"] == "notebook"
        assert run.data.tags["mlflow.source.type"] == "NOTEBOOK" and run.data.tags["mlflow.source.name"]
        assert (
            run.data.tags["mlflow.source.name"] != "bridge" and "ipykernel" not in run.data.tags["mlflow.source.name"]
        )
        assert "bridge.resume.count" not in run.data.tags
        assert {"weights", "console.log", "data", "plots"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


# ------------------------------------------------------------------------------------------- the install cell

TOKEN = "notebook-install-token-" + "n" * 32


def install_cell() -> str:
    """The notebook's first code cell as IPython runs it (`%pip` becomes a `get_ipython()` call)."""
    from IPython.core.inputtransformer2 import TransformerManager

    nb = nbformat.read(NOTEBOOK, as_version=4)
    return TransformerManager().transform_cell(next(c for c in nb.cells if c.cell_type == "code").source)


class _Shell:
    """`get_ipython()` for the cell: records the `%pip` line instead of running pip."""

    def __init__(self) -> None:
        self.magics: list[tuple[str, str]] = []

    def run_line_magic(self, name: str, line: str, _stack_depth: int = 1) -> None:
        self.magics.append((name, line))


class _WheelPage(BaseHTTPRequestHandler):
    """The entrance's find-links page at /bridge/client/ (bridge/serve/entrance.py), naming this bridge's wheel."""

    def do_GET(self) -> None:
        body = f'<!DOCTYPE html>\n<a href="{wheel_name()}#sha256={"0" * 64}">{wheel_name()}</a>\n'.encode()
        self.send_response(200 if self.path == PATH_PREFIX else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def workstation():
    """A server answering the wheel page, standing for the workstation's public URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WheelPage)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _run_install_cell(monkeypatch, *, bridge_installed: bool) -> tuple[dict, _Shell]:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bridge" and not bridge_installed else real_find_spec(name, *a),
    )
    shell = _Shell()
    namespace: dict = {"get_ipython": lambda: shell}
    exec(compile(install_cell(), "<install cell>", "exec"), namespace)
    return namespace, shell


def test_install_cell_finds_the_wheel_through_the_relay_with_the_token_alone(ntfy_relay, workstation, monkeypatch):
    """Regression: the first cell needed BRIDGE_WHEEL_URL, and installed nothing outside Colab, so a fresh runtime
    with only BRIDGE_TOKEN could not install bridge. Now it opens the relay's record as bridge.rendezvous seals it."""
    for name in ("BRIDGE_WHEEL_URL", "BRIDGE_URL", "BRIDGE_DISCOVERY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BRIDGE_TOKEN", TOKEN)
    publisher = RelayPublisher(ntfy_relay.url, lambda: TOKEN)
    record = make_record(workstation, token=TOKEN, instance="serve-1", mlflow_version="3", ttl_s=3600)
    older = make_record(
        "https://old-url.trycloudflare.com", token=TOKEN, instance="serve-1", mlflow_version="3", ttl_s=3600,
        now=record.issued_at - 60,
    )  # fmt: skip
    publisher.publish(record)
    publisher.publish(older)  # re-posted last: issue time decides, not the relay's order
    topic = Rendezvous.for_token(ntfy_relay.url, TOKEN).topic
    import requests

    requests.post(f"{ntfy_relay.url}/{topic}", data=b"b1.junk-anyone-may-post", timeout=5)

    namespace, shell = _run_install_cell(monkeypatch, bridge_installed=False)

    assert namespace["BRIDGE_WHEEL_URL"] == workstation + PATH_PREFIX + wheel_name()
    assert shell.magics == [("pip", 'install -q "bridge[yolo] @ $BRIDGE_WHEEL_URL"')]


def test_install_cell_with_a_wrong_token_or_no_record_says_so(ntfy_relay, workstation, monkeypatch):
    monkeypatch.delenv("BRIDGE_WHEEL_URL", raising=False)
    RelayPublisher(ntfy_relay.url, lambda: TOKEN).publish(
        make_record(workstation, token=TOKEN, instance="serve-1", mlflow_version="3", ttl_s=3600)
    )
    monkeypatch.setenv("BRIDGE_TOKEN", "another-token-" + "o" * 32)
    with pytest.raises(RuntimeError, match="holds no current record for this token"):
        _run_install_cell(monkeypatch, bridge_installed=False)


def test_install_cell_leaves_an_installed_bridge_alone_outside_colab(ntfy_relay, monkeypatch):
    monkeypatch.delenv("BRIDGE_WHEEL_URL", raising=False)
    monkeypatch.setenv("BRIDGE_TOKEN", TOKEN)
    namespace, shell = _run_install_cell(monkeypatch, bridge_installed=True)
    assert shell.magics == [] and namespace["BRIDGE_WHEEL_URL"] is None
    assert ntfy_relay.log == []  # nothing was asked of the relay
