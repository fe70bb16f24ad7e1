"""The stock MLflow UI in a real headless Chromium, opened through the tunnel: 401 until login, then the runs.

The browser believes it is at `https://<random>.ngrok-free.app`, as a user's would: Chromium resolves that
name to a small TLS relay here (self-signed certificate, accepted for this test only), which passes the bytes
to the stand-in agent's edge forwarder, which adds the public Host and `X-Forwarded-*` and reaches the
entrance, then MLflow. So the UI's own POSTs carry `Origin: https://<public host>`, exactly what MLflow ≥ 3.5
refuses (403 "Cross-origin request blocked") unless the entrance translates it.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient

from tests.support.browser import CHROMIUM_ARGS, UI_TIMEOUT_MS, launch_at
from tests.support.tls_edge import TlsEdge

pytestmark = pytest.mark.slow


def _self_signed(folder: Path, hostname: str) -> tuple[Path, Path]:
    """A throwaway certificate for `hostname` (the browser is told to accept it), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "edge-cert.pem", folder / "edge-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


class TlsRelay(TlsEdge):
    """The TLS half of ngrok's edge: terminate HTTPS on 127.0.0.1 and pass the bytes on to the forwarder."""

    def __init__(self, upstream: str, cert_file: Path, key_file: Path) -> None:
        super().__init__(cert_file, key_file, name="tls-relay")
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)

    def upstream(self, host: str) -> tuple[str, int]:
        return self._upstream


@pytest.fixture
def tunnelled_bridge(own_bridge_serve, fake_ngrok, tmp_path):
    """`bridge serve` with the stand-in tunnel, and an https relay standing in for the edge's TLS."""
    server = own_bridge_serve("--tunnel", "ngrok", env_extra=fake_ngrok.env)
    public_url = server.state()["tunnel"]["public_url"]
    assert public_url.startswith("https://") and public_url.endswith(".ngrok-free.app"), public_url
    host = urlsplit(public_url).hostname
    relay = TlsRelay(fake_ngrok.local_url(public_url), *_self_signed(tmp_path, host))
    relay.start()
    yield server, public_url, relay
    relay.stop()


@pytest.mark.timeout(300)  # `bridge serve` and the tunnel (up to 90 s), then Chromium's page loads (up to 60 s each)
def test_mlflow_ui_through_the_tunnel_needs_login_then_shows_the_runs(tunnelled_bridge, chromium_path, tmp_path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    server, public_url, relay = tunnelled_bridge
    token = server.token()
    client = MlflowClient(server.mlflow_url)  # the local port needs no login
    suffix = uuid.uuid4().hex[:8]
    # A model-training experiment (what bridge.yolo logs), so the UI opens it on its runs table.
    experiment_id = client.create_experiment(
        f"browser-{suffix}", tags={"mlflow.experimentKind": "custom_model_development"}
    )
    run_name = f"through-the-tunnel-{suffix}"
    run = client.create_run(experiment_id, run_name=run_name)
    client.log_metric(run.info.run_id, "loss", 0.25)
    client.set_terminated(run.info.run_id)

    host = urlsplit(public_url).hostname
    api_calls: list[tuple[str, str, int, str | None]] = []

    with sync_playwright() as pw:
        browser = launch_at(pw, chromium_path, public_url, relay.port)
        try:
            # No credentials: the entrance answers the page with 401 and a Basic challenge. Headless Chromium
            # cannot prompt, so it abandons the navigation (ERR_INVALID_AUTH_CREDENTIALS) after seeing the 401.
            anonymous = browser.new_context(ignore_https_errors=True)
            page = anonymous.new_page()
            seen: list = []
            page.on("response", lambda resp: seen.append((resp.url, resp.status, resp.headers)))
            try:
                page.goto(public_url + "/", timeout=UI_TIMEOUT_MS)
            except PlaywrightError as exc:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc), exc
            assert seen and seen[0][:2] == (public_url + "/", 401), seen
            assert all(status == 401 for _, status, _ in seen), seen  # nothing of the UI got out
            assert seen[0][2].get("www-authenticate", "").lower().startswith("basic")
            anonymous.close()

            # Wrong credentials: tried once by the browser, refused, and the 401 page is what it shows.
            wrong = browser.new_context(
                ignore_https_errors=True, http_credentials={"username": "bridge", "password": "wrong-" + token[:8]}
            )
            response = wrong.new_page().goto(public_url + "/", timeout=UI_TIMEOUT_MS)
            assert response is not None and response.status == 401
            wrong.close()

            context = browser.new_context(
                ignore_https_errors=True,
                http_credentials={"username": "bridge", "password": token},
                viewport={"width": 1400, "height": 900},
            )
            page = context.new_page()

            def record(resp) -> None:
                if "/ajax-api/" in resp.url or "/api/" in resp.url:
                    req = resp.request
                    api_calls.append((req.method, resp.url, resp.status, req.header_value("origin")))

            page.on("response", record)
            response = page.goto(f"{public_url}/#/experiments/{experiment_id}/runs", timeout=UI_TIMEOUT_MS)
            assert response is not None and response.status == 200
            # The run's name in the runs table: the UI's own runs/search POST went through and was answered.
            page.get_by_text(run_name).first.wait_for(timeout=UI_TIMEOUT_MS)
            shot = tmp_path / "mlflow-ui-through-tunnel.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("BRIDGE_BROWSER_SCREENSHOT"):  # a copy to look at after the run
                shutil.copy(shot, os.environ["BRIDGE_BROWSER_SCREENSHOT"])
            context.close()
        finally:
            browser.close()

    refused = [call for call in api_calls if call[2] in (401, 403)]
    assert refused == [], f"the UI's API calls were refused through the tunnel: {refused}"
    # The UI's own state-changing calls went out from the public origin and were accepted.
    posts = [call for call in api_calls if call[0] == "POST" and "/ajax-api/" in call[1]]
    assert any("runs/search" in url and status == 200 for _, url, status, _ in posts), api_calls
    assert {origin for *_, origin in posts} == {f"https://{host}"}, posts


def _public(link: str, public_url: str) -> str:
    """A printed link opened through the tunnel: the same route and view, on the public address."""
    parts = urlsplit(link)
    return public_url.rstrip("/") + parts.path.rstrip("/") + "/#" + parts.fragment


def _shot(page, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot kept with the test's files (and copied to BRIDGE_SCREENSHOTS when set)."""
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    if os.environ.get("BRIDGE_SCREENSHOTS"):
        Path(os.environ["BRIDGE_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["BRIDGE_SCREENSHOTS"]) / name)
    return shot


def _see(page, tmp_path: Path, name: str, texts: list) -> None:
    """Wait until each text (or locator) is visible; on timeout keep a screenshot of what the page showed instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        for text in texts:
            locator = page.get_by_text(text, exact=True) if isinstance(text, str) else text
            locator.first.wait_for(timeout=UI_TIMEOUT_MS)
    except PlaywrightTimeout:
        _shot(page, tmp_path, f"FAILED-{name}")
        raise


@pytest.mark.timeout(600)
def test_printed_links_open_the_model_training_view_of_a_sweep(tunnelled_bridge, chromium_path, yolo_dataset, tmp_path):
    """`bridge train`, `bridge compare` and `bridge url` print links; through the tunnel they show the runs
    table and the mAP50-95 curves of a 3-model sweep, not MLflow 3's GenAI view."""
    import re

    from playwright.sync_api import sync_playwright

    from tests.support.yolo import MODEL_FAMILIES, bridge_cli, connect_env, run_bridge_train

    server, public_url, relay = tunnelled_bridge
    token = server.token()
    experiment = f"ui-sweep-{uuid.uuid4().hex[:6]}"
    env = connect_env(server, tmp_path / "journal.sqlite")
    trained = run_bridge_train(list(MODEL_FAMILIES), yolo_dataset, tmp_path / "runs", experiment, env=env, epochs=3)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    compared = subprocess.run(
        [*bridge_cli(), "compare", experiment, "--out", str(tmp_path / "compare.png")],
        env={**os.environ, "COLUMNS": "300", **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert compared.returncode == 0, compared.stdout[-3000:] + compared.stderr[-3000:]
    served_url = server.cli("url")
    assert served_url.returncode == 0, served_url.stderr

    exp = MlflowClient(server.mlflow_url).get_experiment_by_name(experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    links = dict(
        re.findall(r"^(Runs in the MLflow UI|Curves in the MLflow UI): (\S+)$", trained.stdout + compared.stdout, re.M)
    )
    assert links["Runs in the MLflow UI"] == (
        f"{server.entrance_url}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    )
    assert links["Curves in the MLflow UI"] == (
        links["Runs in the MLflow UI"] + "&compareRunsMode=CHART&viewStateShareKey=bridge-learning-curves"
    )
    home = re.search(r"MLflow UI \(any user name, the token as password\): (\S+)", served_url.stderr).group(1)
    assert home == f"{public_url}/#/experiments?workflowType=machine_learning"
    connect_line = re.search(r"MLflow UI: (\S+)", trained.stderr)
    assert (
        connect_line and connect_line.group(1) == f"{server.entrance_url}/#/experiments?workflowType=machine_learning"
    )

    run_names = list(MODEL_FAMILIES)
    with sync_playwright() as pw:
        browser = launch_at(pw, chromium_path, public_url, relay.port)
        try:
            context = browser.new_context(
                ignore_https_errors=True,
                viewport={"width": 1600, "height": 1000},
                http_credentials={"username": "bridge", "password": token},
            )
            page = context.new_page()
            # `bridge url`'s link: the experiments list in the model-training view. (MLflow 3.17's list links
            # drop `workflowType`, so a click there falls back to the browser's last view: bridge prints direct
            # experiment and run links wherever it knows them.)
            page.goto(home, timeout=UI_TIMEOUT_MS)
            _see(page, tmp_path, "ui-0-home.png", [experiment])
            _shot(page, tmp_path, "ui-0-home.png")

            # The link `bridge train` printed, opened through the tunnel: the same runs table.
            page.goto(_public(links["Runs in the MLflow UI"], public_url), timeout=UI_TIMEOUT_MS)
            _see(page, tmp_path, "ui-2-runs-table.png", run_names)
            _shot(page, tmp_path, "ui-2-runs-table.png")

            # `bridge compare`'s link: the chart view, with the mAP50-95 curves of all three runs.
            page.goto(_public(links["Curves in the MLflow UI"], public_url), timeout=UI_TIMEOUT_MS)
            search = page.get_by_placeholder("Search metric charts")
            _see(page, tmp_path, "ui-3-charts.png", [search, *run_names, "Learning curves"])
            _see(page, tmp_path, "ui-3-charts.png", [f"{name} (val/mAP50-95)" for name in run_names])
            _shot(page, tmp_path, "ui-3-charts-first-view.png")  # the saved view: mAP and losses first
            search.first.fill("val/mAP50-95")
            _see(page, tmp_path, "ui-3-charts.png", ["val/mAP50-95"])
            # Each run's curve is in the chart's legend, as '<run> (val/mAP50-95)'.
            _see(page, tmp_path, "ui-3-charts.png", [f"{name} (val/mAP50-95)" for name in run_names])
            _shot(page, tmp_path, "ui-3-charts.png")
            context.close()
        finally:
            browser.close()


def _yolo_like_run(client: MlflowClient, experiment_id: str, name: str, epochs: int, offset: float) -> str:
    """A run with bridge.yolo's metric names and dataset inputs (no training: the UI's layout is under test)."""
    import json
    import time

    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric

    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for epoch in range(1, epochs + 1):
        values = {f"{split}/{loss}": 3 / (epoch + offset) for split in ("train", "val") for loss in LOSSES}
        values |= {"val/mAP50": 0.9 - 0.5 / epoch - offset / 10, "val/mAP50-95": 0.6 - 0.4 / epoch - offset / 10}
        values |= {"val/precision": 0.5, "val/recall": 0.4, "epoch_time_s": 2.0, "lr_pg0": 0.01 / epoch}
        metrics += [Metric(k, v, now, epoch) for k, v in values.items()]
    best = {"val/best/mAP50-95": 0.5, "val/best/mAP50": 0.8, "val/best/epoch": float(epochs), "train_time_s": 9.0}
    metrics += [Metric(k, v, now, epochs) for k, v in best.items()]
    client.log_batch(run_id, metrics=metrics)
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                Dataset(f"data/{split}", "0123456789ab", "local", json.dumps({"uri": f"/content/data/images/{split}"})),
                tags=[InputTag("mlflow.data.context", context)],
            )
            for split, context in (("train", "training"), ("val", "validation"))
        ],
    )
    client.set_terminated(run_id)
    return run_id


LOSSES = ("box_loss", "cls_loss", "dfl_loss")


@pytest.mark.timeout(300)
def test_the_chart_link_opens_on_the_learning_curves_and_the_run_page_charts_them_before_the_summary(
    mlflow_server, chromium_path, tmp_path
):
    """The chart view bridge links to shows val/mAP50-95, val/mAP50 and the losses first, in the first screen;
    a run's "Model metrics" tab charts train and val before val/best; the runs table and run page name the
    datasets."""
    import re

    from playwright.sync_api import sync_playwright

    from bridge import ui
    from bridge.yolo.callbacks import learning_view_link, training_experiment_tags

    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"charts-{uuid.uuid4().hex[:6]}", tags=training_experiment_tags())
    run_ids = [_yolo_like_run(client, experiment_id, name, 6, i) for i, name in enumerate(("yolov8n", "yolo11n"))]
    link = learning_view_link(mlflow_server.url, client.get_experiment(experiment_id))
    assert link.endswith("&compareRunsMode=CHART&viewStateShareKey=bridge-learning-curves")
    learning = ["val/mAP50-95", "val/mAP50", *(f"{s}/{loss}" for s in ("train", "val") for loss in LOSSES)]

    def charted(page) -> list[str]:
        """The metrics charted for yolov8n, in reading order (legend rows '<run> (<metric>)')."""
        rows = page.get_by_text(re.compile(r"^yolov8n \(.+\)$"))
        boxes = []
        for i in range(rows.count()):
            row = rows.nth(i)
            box = row.bounding_box() if row.is_visible() else None
            if box is not None:
                boxes.append((round(box["y"] / 50), box["x"], row.inner_text()[len("yolov8n (") : -1], box["y"]))
        return [(metric, y) for _, _, metric, y in sorted(boxes)]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            page.goto(link, timeout=UI_TIMEOUT_MS)
            _see(page, tmp_path, "charts-first-view.png", ["Learning curves", "yolov8n (val/mAP50-95)"])
            page.wait_for_timeout(2000)  # the charts settle
            _shot(page, tmp_path, "charts-first-view.png")
            first = charted(page)
            assert [m for m, _ in first[:2]] == ["val/mAP50-95", "val/mAP50"], first
            assert [m for m, _ in first[: len(learning)]] == learning[: len(first)], first
            # The mAP charts whole in the first screen (their legends are below the curves); no val/best chart there.
            assert all(y < 1000 for m, y in first if m in ("val/mAP50-95", "val/mAP50")), first
            assert not any(m.startswith("val/best/") for m, y in first if y < 1000), first

            # A run's "Model metrics" tab (no saved view there): the sections sorted by name, val/best after val.
            run_link = ui.ui_link(mlflow_server.url, experiment_id, run_ids[0]).replace("?", "/model-metrics?", 1)
            page = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
            page.goto(run_link, timeout=UI_TIMEOUT_MS)
            _see(page, tmp_path, "run-model-metrics.png", ["yolov8n (train/box_loss)"])
            page.wait_for_timeout(2000)
            _shot(page, tmp_path, "run-model-metrics.png")
            sections = [t.strip() for t in page.get_by_text(re.compile(r"^(train|val|val/best|lr)$")).all_inner_texts()]
            assert sections[:2] == ["train", "val"], sections
            assert "lr" not in sections and not any(m.startswith("val/best/") for m, y in charted(page) if y < 1000)

            # The runs table: the Dataset column names the training data.
            page.goto(ui.ui_link(mlflow_server.url, experiment_id), timeout=UI_TIMEOUT_MS)
            _see(page, tmp_path, "runs-datasets.png", ["yolo11n", page.get_by_text("data/train (0123456789ab)")])
            _shot(page, tmp_path, "runs-datasets.png")
            # The run page's overview: its Datasets name the training split, and one more (no longer "None").
            page.goto(ui.ui_link(mlflow_server.url, experiment_id, run_ids[0]), timeout=UI_TIMEOUT_MS)
            _see(page, tmp_path, "run-overview.png", ["Datasets", page.get_by_text("data/train (0123456789ab)")])
            _shot(page, tmp_path, "run-overview.png")
        finally:
            browser.close()
