"""Colab from zero: colab/bridge_yolo.ipynb in an environment that has only what Colab ships, with only the token.

    bridge serve --tunnel cloudflared --relay <stand-in ntfy>     (stand-in cloudflared: support/fake_cloudflared.py)
      └─ public https://<words>.trycloudflare.com ─▶ QuickTunnelEdge (TLS, test CA) ─▶ the stand-in's forwarder
    Colab-like venv (tests/support/colab_runtime.py): torch, numpy, ipykernel… — no bridge, MLflow or Ultralytics
      └─ the notebook on a kernel of that venv: BRIDGE_TOKEN and BRIDGE_RELAY only; its first cell finds the public
         URL on the relay and `%pip install`s the wheel `bridge serve` serves; the rest from the package index

While the notebook trains, the cloudflared agent is killed: the keeper opens a new quick tunnel at a new URL and
publishes it; the client must follow through the relay. At the end everything is on the server exactly once, and
Chromium shows the chart view and a run page through the tunnel (copied to docs/images/ with
BRIDGE_SAVE_SCREENSHOTS=1).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import pytest
from mlflow import MlflowClient
from nbclient import NotebookClient

from bridge.rendezvous import Rendezvous
from bridge.serve.wheel import public_path
from tests.support.browser import UI_TIMEOUT_MS, launch_at
from tests.support.colab_runtime import EdgeCA, QuickTunnelEdge, colab_venv, install_quick_tunnel_dns, kernelspec
from tests.support.yolo import MODEL_FAMILIES

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "colab" / "bridge_yolo.ipynb"
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
EXPERIMENT = "colab-from-zero"
#: Enough epochs that the tunnel is replaced and followed while the models still train (about 2 s an epoch here,
#: 3 models; the client may poll the relay once before the new URL is there, then 20 s later).
EPOCHS = 8
#: Per-epoch metrics (the learning curves); `val/best/*` and timings are logged once at the end.
EPOCH_METRIC = re.compile(r"^(train|val)/(?!best/)")


def _wait_for(predicate, *, timeout_s: float, what: str, step_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)


class TunnelSwap(threading.Thread):
    """Once the first epoch is on the server, kill the cloudflared agent; then time the new URL's publication and
    the client's first connection to it (through the edge, so only the client's own requests count)."""

    def __init__(self, server, agent, edge: QuickTunnelEdge, first_url: str) -> None:
        super().__init__(name="tunnel-swap", daemon=True)
        self.server, self.agent, self.edge, self.first_url = server, agent, edge, first_url
        self.killed_at = self.published_at = self.followed_at = 0.0
        self.new_url = ""
        self.error: BaseException | None = None

    def _an_epoch_arrived(self) -> bool:
        client = MlflowClient(self.server.mlflow_url)
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return any(client.get_metric_history(r.info.run_id, "val/mAP50-95") for r in runs)

    def _published(self) -> str | None:
        state = self.server.state() or {}
        url = (state.get("tunnel") or {}).get("public_url")
        last = (state.get("relay") or {}).get("last") or {}
        return url if url and url != self.first_url and last.get("url") == url and last.get("ok") else None

    def run(self) -> None:
        try:
            _wait_for(self._an_epoch_arrived, timeout_s=400, what="the first epoch on the server", step_s=0.5)
            pids = self.agent.agent_pids()
            assert len(pids) == 1, pids
            self.killed_at = time.monotonic()
            os.kill(pids[0], signal.SIGKILL)
            self.new_url = _wait_for(self._published, timeout_s=90, what="the new URL on the relay", step_s=0.1)
            self.published_at = time.monotonic()
            host = urlsplit(self.new_url).hostname
            found = _wait_for(
                lambda: self.edge.first_connection(host, since=self.killed_at),
                timeout_s=120, what="the client at the new URL", step_s=0.1,
            )  # fmt: skip
            self.followed_at = found.at
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.fixture
def edge(fake_cloudflared, tmp_path):
    """HTTPS for the stand-in's quick tunnels, with a certificate from a throwaway CA (`edge.ca`)."""
    started = QuickTunnelEdge(fake_cloudflared.state_file, EdgeCA(tmp_path / "ca")).start()
    yield started
    started.stop()


def _kernel_env(token: str, relay: str, ca: EdgeCA, home: Path, python: Path, data: Path, project: Path) -> dict:
    """What the kernel sees: a plain machine's basics, the token, the relay, the CA bundle standing in for the
    public PKI, the package index settings, and the tiny training's knobs. Nothing that names the workstation."""
    env = {
        "PATH": f"{python.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "BRIDGE_TOKEN": token,
        "BRIDGE_RELAY": relay,
        "SSL_CERT_FILE": str(ca.bundle),
        "REQUESTS_CA_BUNDLE": str(ca.bundle),
        "PIP_CERT": str(ca.bundle),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "YOLO_OFFLINE": "1",
        "YOLO_CONFIG_DIR": os.environ["YOLO_CONFIG_DIR"],  # fonts, so Ultralytics downloads none
        "BRIDGE_NOTEBOOK_DATA": str(data),
        "BRIDGE_NOTEBOOK_EPOCHS": str(EPOCHS),
        "BRIDGE_NOTEBOOK_IMGSZ": "64",
        "BRIDGE_NOTEBOOK_BATCH": "4",
        "BRIDGE_NOTEBOOK_EXPERIMENT": EXPERIMENT,
        "BRIDGE_NOTEBOOK_TRAIN_ARGS": json.dumps(
            {"nbs": 4, "workers": 0, "device": "cpu", "amp": False, "project": str(project)}
        ),
    }
    for name, value in os.environ.items():  # how this machine reaches the package index (CI: PyPI)
        if (name.startswith("PIP_") and name != "PIP_CERT") or name.lower() in ("http_proxy", "https_proxy"):
            env[name] = value
    if "https_proxy" in {n.lower() for n in env}:
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,.trycloudflare.com"
    return env


def _outputs(nb, index: int) -> str:
    return "\n".join(o.get("text", "") or json.dumps(o.get("data", {})) for o in nb.cells[index].get("outputs", []))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(600)
def test_colab_from_zero_installs_from_the_workstation_follows_a_new_tunnel_and_delivers_everything(
    own_bridge_serve, fake_cloudflared, ntfy_relay, edge, yolo_dataset, chromium_path, tmp_path, monkeypatch, capsys
):
    started = time.monotonic()
    server = own_bridge_serve(
        "--tunnel", "cloudflared", "--relay", ntfy_relay.url,
        env_extra={**fake_cloudflared.env, "BRIDGE_TUNNEL_CHECK_S": "1"},
    )  # fmt: skip
    token = server.token()
    first_url = server.state()["tunnel"]["public_url"]
    topic = Rendezvous.for_token(ntfy_relay.url, token).topic
    _wait_for(lambda: ntfy_relay.on_topic(topic), timeout_s=60, what="the record on the relay")

    python = colab_venv(tmp_path / "colab-venv")
    install_quick_tunnel_dns(python, fake_cloudflared.state_file, edge.port)
    home, project = tmp_path / "colab-home", tmp_path / "runs"
    home.mkdir()
    env = _kernel_env(token, ntfy_relay.url, edge.ca, home, python, yolo_dataset, project)

    # The runtime before the notebook: Colab's packages, none of bridge's; the public name answers over TLS.
    probe = (
        "import importlib.util, json, urllib.request, sys\n"
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[2:]}))\n"
        "print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())\n"
    )
    mods = ["bridge", "mlflow", "ultralytics", "torch", "cv2", "ipykernel", "cryptography"]
    seen = subprocess.run(
        [str(python), "-c", probe, first_url + "/bridge/client/", *mods],
        env=env, cwd=home, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert seen.returncode == 0, seen.stderr[-3000:]
    found, page = seen.stdout.split("\n", 1)
    assert json.loads(found) == {**dict.fromkeys(mods[:3], False), **dict.fromkeys(mods[3:], True)}
    assert public_path().rsplit("/", 1)[1] in page

    monkeypatch.setenv("JUPYTER_PATH", str(kernelspec(tmp_path / "jupyter", python)))
    swap = TunnelSwap(server, fake_cloudflared, edge, first_url)
    times: dict[int, list[float]] = {}

    def cell_started(cell, cell_index: int) -> None:
        times[cell_index] = [time.monotonic()]
        if not swap.is_alive() and swap.ident is None:  # watch once the kernel runs (importing beside nbclient's
            swap.start()  # start-up raced: two threads importing IPython at once, KeyError 'IPython')

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="colab-like", resources={"metadata": {"path": str(tmp_path)}},
        on_cell_start=cell_started,
        on_cell_executed=lambda cell, cell_index, execute_reply: times[cell_index].append(time.monotonic()),
    )  # fmt: skip
    try:
        client.execute(env=env, cwd=str(tmp_path))
    finally:
        if swap.ident is not None:
            swap.join(timeout=5)
        nbformat.write(nb, tmp_path / "executed.ipynb")  # to read after a failure
    training = next(i for i, c in enumerate(nb.cells) if "bridge.yolo.sweep(" in c.source and "resume" not in c.source)

    # The first cell found the public URL on the relay with the token and installed the served wheel.
    install = _outputs(nb, 1)
    assert f"{first_url}{public_path()}" in install, install[-3000:]
    install_s = times[1][1] - times[1][0]

    timeline = {
        "cells": {i: [round(t - started, 1) for t in ts] for i, ts in times.items()},
        "killed": round(swap.killed_at - started, 1),
        "published": round(swap.published_at - started, 1),
        "followed": round(swap.followed_at - started, 1),
    }
    print("timeline (s from the start):", timeline)
    # The tunnel was replaced mid-training; the client reached the new URL through the relay, before training ended.
    assert swap.error is None, swap.error
    assert swap.new_url != first_url and re.match(fake_cloudflared.url_pattern, swap.new_url)
    assert swap.followed_at < times[training][1], f"the client reached the new URL only after training: {timeline}"
    follow_s = swap.followed_at - swap.published_at
    # …and said so where the notebook shows it (the run links printed before the move name the old URL).
    assert f"bridge: the server moved to {swap.new_url} (relay " in _outputs(nb, training), _outputs(nb, training)[
        -3000:
    ]

    outputs = "\n".join(_outputs(nb, i) for i in range(len(nb.cells)) if nb.cells[i].cell_type == "code")
    assert "not Colab: Colab-only cells are skipped" in outputs and "all delivered" in outputs

    # Everything delivered: each run finished, each epoch's metrics once, the weights byte for byte, nothing waiting.
    reader = MlflowClient(server.mlflow_url)
    exp = reader.get_experiment_by_name(EXPERIMENT)
    runs = reader.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(MODEL_FAMILIES)
    for run in runs:
        assert run.info.status == "FINISHED", run.info
        curves = [key for key in run.data.metrics if EPOCH_METRIC.match(key)]
        assert "val/mAP50-95" in curves and "train/box_loss" in curves, curves
        for key in curves:
            steps = [m.step for m in reader.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(1, EPOCHS + 1)), (run.info.run_name, key, steps)
        for name in ("best.pt", "last.pt"):
            local = project / run.info.run_name / "weights" / name
            served = reader.download_artifacts(
                run.info.run_id, f"weights/{name}", str(tmp_path / "dl" / run.info.run_id)
            )
            assert _sha256(Path(served)) == _sha256(local), (run.info.run_name, name)
    left = "from bridge.client.connect import queue; q = queue(); print(q.backlog.total, len(q.dead), len(q.files))"
    waiting = subprocess.run(
        [str(python), "-c", left],
        env=env, cwd=home, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert waiting.returncode == 0 and waiting.stdout.split() == ["0", "0", "0"], waiting.stdout + waiting.stderr

    # Through the tunnel, as the user's browser: the chart view the printed link opens, and a run page.
    chart_link = re.search(r"Curves in the MLflow UI: (\S+)", outputs).group(1)
    run_links = re.findall(r"^  (https://\S+/#/experiments/\S+/runs/\S+)$", outputs, re.M)
    assert run_links, outputs[-3000:]
    shots = _screenshots(chromium_path, swap.new_url, edge.port, token, chart_link, run_links[0], tmp_path)
    total_s = time.monotonic() - started

    with capsys.disabled():
        print(
            f"\ncolab from zero: install cell {install_s:.1f} s; client at the new URL {follow_s:.1f} s after it was "
            f"published ({swap.followed_at - swap.killed_at:.1f} s after the agent was killed); total {total_s:.1f} s;"
            f" load {os.getloadavg()[0]:.1f}; screenshots {', '.join(str(s) for s in shots)}"
        )


def _on(url: str, public_url: str) -> str:
    """A printed link on the tunnel's current public URL (links printed before the move name the old one)."""
    parts = urlsplit(url)
    return public_url.rstrip("/") + parts.path + ("?" + parts.query if parts.query else "") + "#" + parts.fragment


def _screenshots(chromium: str, public_url: str, edge_port: int, token: str, chart_link: str, run_link: str, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = []
    with sync_playwright() as pw:
        browser = launch_at(pw, chromium, public_url, edge_port)
        try:
            context = browser.new_context(
                ignore_https_errors=True,
                viewport={"width": 1600, "height": 1000},
                http_credentials={"username": "bridge", "password": token},
            )
            page = context.new_page()
            page.goto(_on(chart_link, public_url), timeout=UI_TIMEOUT_MS)
            page.get_by_text("Learning curves", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
            for name in MODEL_FAMILIES:
                page.get_by_text(f"{name} (val/mAP50-95)", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
            page.wait_for_timeout(2000)  # the charts settle
            shots.append(_keep(page, tmp_path, "notebook-learning-curves.png"))
            page.goto(_on(run_link, public_url), timeout=UI_TIMEOUT_MS)
            page.get_by_text("Datasets", exact=True).first.wait_for(timeout=UI_TIMEOUT_MS)
            page.wait_for_timeout(2000)
            shots.append(_keep(page, tmp_path, "notebook-run-page.png"))
            context.close()
        finally:
            browser.close()
    return shots


def _keep(page, tmp_path: Path, name: str) -> Path:
    """A screenshot in the test's folder; with BRIDGE_SAVE_SCREENSHOTS=1 a copy in docs/images/ too."""
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    if os.environ.get("BRIDGE_SAVE_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, DOCS_IMAGES / name)
        return DOCS_IMAGES / name
    return shot


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-n", "0", "-s"]))
