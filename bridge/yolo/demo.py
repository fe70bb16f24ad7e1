"""`bridge demo`: the whole loop on one machine, offline and without accounts.

Starts `bridge serve --tunnel none` as a child process (its own BRIDGE_HOME and free ports), connects this
process through the authenticated entrance exactly as Colab would, trains a tiny YOLOv8n on a generated
dataset, and returns the local UI address of the run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from bridge import config
from bridge.errors import ServeError
from bridge.serve.child import ServeChild

logger = logging.getLogger(__name__)

DEMO_EXPERIMENT = "bridge-demo"


@dataclass
class DemoResult:
    """Where to look: the UI, the run's page, and the server (still running with `keep`)."""

    ui_url: str
    run_url: str
    run_id: str
    home: Path
    server: ServeChild


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
    # The demo's token is a secret like any other: it goes to the keyring, under the demo's own home.
    server = ServeChild(home=home, args=["--tunnel", "none"], keyring=True, log_name="demo-serve.log")
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
        client = mlflow.MlflowClient(tracking_uri=server.mlflow_url)
        exp = client.get_experiment_by_name(DEMO_EXPERIMENT)
        if exp is None:
            raise ServeError("the demo experiment did not reach the server")
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ServeError("the demo run did not reach the server")
        run = runs[0]
        logger.debug("demo run: local %s, server %s", local_run_id, run.info.run_id)
        run_url = f"{server.mlflow_url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
        return DemoResult(ui_url=server.mlflow_url, run_url=run_url, run_id=run.info.run_id, home=home, server=server)
    finally:
        if not keep:
            server.stop()
