"""`bridge demo`: the whole loop on one machine, offline and without accounts.

Starts `bridge serve --tunnel none` as a child process (its own BRIDGE_HOME and free ports), connects this
process through the authenticated entrance exactly as Colab would, trains a tiny YOLOv8n on a generated
dataset, and returns the local UI address of the run.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from bridge import config
from bridge.errors import ServeError

logger = logging.getLogger(__name__)

DEMO_EXPERIMENT = "bridge-demo"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DemoServer:
    """A `bridge serve --tunnel none` child process."""

    home: Path
    port: int
    entrance_port: int
    proc: subprocess.Popen | None = None

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def entrance_url(self) -> str:
        return f"http://127.0.0.1:{self.entrance_port}"

    @property
    def log_file(self) -> Path:
        return self.home / "demo-serve.log"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "BRIDGE_HOME": str(self.home), "MLFLOW_DISABLE_TELEMETRY": "true"}
        for name in ("MLFLOW_TRACKING_URI", "BRIDGE_URL", "BRIDGE_TOKEN", "BRIDGE_DISCOVERY"):
            env.pop(name, None)
        return env

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-c", "from bridge.cli import main; main()", *args]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                self._cli("serve", "--tunnel", "none", "--port", str(self.port),
                          "--entrance-port", str(self.entrance_port)),
                stdout=out, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeError(f"bridge serve exited with {self.proc.returncode}; see {self.log_file}")
            if _status(self.ui_url + "/health") == 200 and _status(self.entrance_url + "/health") in (200, 401):
                return
            time.sleep(0.3)
        self.stop()
        raise ServeError(f"bridge serve did not come up within {timeout_s:.0f} s; see {self.log_file}")

    def token(self) -> str:
        out = subprocess.run(self._cli("token"), env=self.env(), capture_output=True, text=True, timeout=60)
        if out.returncode != 0 or not out.stdout.strip():
            raise ServeError(f"could not read the demo server's access token: {out.stderr.strip()[-300:]}")
        return out.stdout.strip().splitlines()[-1].strip()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=1).status_code
    except requests.RequestException:
        return None


@dataclass
class DemoResult:
    """Where to look: the UI, the run's page, and the server (still running with `keep`)."""

    ui_url: str
    run_url: str
    run_id: str
    home: Path
    server: DemoServer


def demo_home() -> Path:
    """BRIDGE_HOME when set, else a `demo` folder in bridge's data folder (never the real server's files)."""
    home = config.bridge_home()
    return home if home is not None else config.paths().data_dir / "demo"


def run_demo(*, epochs: int = 3, imgsz: int = 64, keep: bool = False, home: Path | None = None,
             device: str = "cpu") -> DemoResult:
    """Serve, connect, train a tiny YOLOv8n and wait until the run is on the server; stop the server unless `keep`."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # a YAML model and a generated dataset need no download
    import mlflow

    import bridge
    import bridge.yolo
    from bridge.yolo.dataset import make_synthetic_dataset

    home = (home or demo_home()).resolve()
    port = free_port()
    entrance_port = free_port()
    while entrance_port == port:
        entrance_port = free_port()
    server = DemoServer(home=home, port=port, entrance_port=entrance_port)
    server.start()
    try:
        conn = bridge.connect(url=server.entrance_url, token=server.token(), journal=home / "demo-journal.sqlite")
        data = make_synthetic_dataset(home / "demo-data", n_train=32, n_val=8, imgsz=imgsz)
        tracker = bridge.yolo.train(
            "yolov8n.yaml", data=data, experiment=DEMO_EXPERIMENT, run_name="yolov8n-demo",
            tags={"bridge.demo": "true"}, epochs=epochs, imgsz=imgsz, batch=8, nbs=8, workers=0, device=device,
            project=str(home / "demo-runs"), name="yolov8n", exist_ok=True,
        )
        left = conn.flush(120)
        if left:
            raise ServeError(f"{left} journal entries were not delivered to the demo server")
        local_run_id = tracker.run_id
        client = mlflow.MlflowClient(tracking_uri=server.ui_url)
        exp = client.get_experiment_by_name(DEMO_EXPERIMENT)
        if exp is None:
            raise ServeError("the demo experiment did not reach the server")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ServeError("the demo run did not reach the server")
        run = runs[0]
        logger.debug("demo run: local %s, server %s", local_run_id, run.info.run_id)
        run_url = f"{server.ui_url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
        return DemoResult(ui_url=server.ui_url, run_url=run_url, run_id=run.info.run_id, home=home, server=server)
    finally:
        if not keep:
            server.stop()
