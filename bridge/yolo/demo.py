"""`bridge demo`: the whole loop on one machine, offline and without accounts.

Starts `bridge serve --tunnel none` as a child process (its own BRIDGE_HOME and free ports), connects this
process through the authenticated entrance exactly as Colab would, trains a tiny YOLOv8n on a generated
dataset, and returns the local UI address of the run. The data and schedule are tuned so the curves visibly
rise within a minute on 2 CPU cores: one class of large squares on 64 px images, batch 4 with an optimizer
step per batch (16 steps an epoch), no mosaic and no warm-up — mAP50 leaves 0 around the third epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge import config
from bridge.errors import ServeError
from bridge.serve.child import ServeChild

logger = logging.getLogger(__name__)

DEMO_EXPERIMENT = "bridge-demo"
#: The generated data and the training schedule that make learning visible within the demo's minute.
DEMO_DATA: dict[str, Any] = {"n_train": 64, "n_val": 16, "classes": ("square",), "seed": 1}
DEMO_TRAIN: dict[str, Any] = {
    "batch": 4,
    "nbs": 4,
    "mosaic": 0.0,
    "warmup_epochs": 0,
    "optimizer": "AdamW",
    "lr0": 0.004,
    "workers": 0,
    "plots": False,
}
DEFAULT_EPOCHS = 8


@dataclass
class DemoResult:
    """Where to look: the UI, the run's page, and the server (still running with `keep`)."""

    ui_url: str
    run_url: str
    run_id: str
    experiment_id: str
    home: Path
    server: ServeChild


def demo_home() -> Path:
    """BRIDGE_HOME when set, else a `demo` folder in bridge's data folder (never the real server's files)."""
    home = config.bridge_home()
    return home if home is not None else config.paths().data_dir / "demo"


def run_demo(
    *,
    epochs: int = DEFAULT_EPOCHS,
    imgsz: int = 64,
    keep: bool = False,
    home: Path | None = None,
    device: str = "cpu",
    on_experiment: Callable[[str], None] | None = None,
) -> DemoResult:
    """Serve, connect, train a tiny YOLOv8n and wait until the run is on the server; stop the server unless `keep`.

    `on_experiment(link)` gets the experiment's chart view as soon as it exists, before training starts.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")  # a YAML model and a generated dataset need no download
    import mlflow

    import bridge
    import bridge.yolo
    from bridge import ui
    from bridge.yolo.callbacks import learning_view_link, mark_training_experiment, training_experiment_tags
    from bridge.yolo.dataset import make_synthetic_dataset

    home = (home or demo_home()).resolve()
    # The demo's token is a secret like any other: it goes to the keyring, under the demo's own home.
    server = ServeChild(home=home, args=["--tunnel", "none"], keyring=True, log_name="demo-serve.log")
    server.start()
    try:
        conn = bridge.connect(url=server.entrance_url, token=server.token(), journal=home / "demo-journal.sqlite")
        client = mlflow.MlflowClient(tracking_uri=server.mlflow_url)  # the server's own ids, for the links
        exp = client.get_experiment_by_name(DEMO_EXPERIMENT)
        if exp is None:
            experiment_id = client.create_experiment(DEMO_EXPERIMENT, tags=training_experiment_tags())
        else:
            experiment_id = exp.experiment_id
            mark_training_experiment(client, experiment_id)  # one made by an earlier bridge gets the view
        if on_experiment is not None:
            on_experiment(learning_view_link(server.mlflow_url, client.get_experiment(experiment_id)))
        data = make_synthetic_dataset(home / "demo-data-v2", imgsz=imgsz, **DEMO_DATA)
        tracker = bridge.yolo.train(
            "yolov8n.yaml",
            data=data,
            experiment=DEMO_EXPERIMENT,
            run_name="yolov8n-demo",
            tags={"bridge.demo": "true"},
            epochs=epochs,
            imgsz=imgsz,
            device=device,
            system_metrics_every_s=10.0,
            project=str(home / "demo-runs"),
            name="yolov8n",
            exist_ok=True,
            **DEMO_TRAIN,
        )
        left = conn.flush(120)
        if left:
            raise ServeError(f"{left} journal entries were not delivered to the demo server")
        local_run_id = tracker.run_id
        runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            raise ServeError("the demo run did not reach the server")
        run = runs[0]
        logger.debug("demo run: local %s, server %s", local_run_id, run.info.run_id)
        return DemoResult(
            ui_url=server.mlflow_url,
            run_url=ui.ui_link(server.mlflow_url, experiment_id, run.info.run_id),
            run_id=run.info.run_id,
            experiment_id=experiment_id,
            home=home,
            server=server,
        )
    finally:
        if not keep:
            server.stop()
