"""Register an experiment's best YOLO run as a version of a registered model; alias `champion` moves only
when the new best beats the current champion.

The best run's best.pt becomes an MLflow pyfunc model (`bridge/yolo/pyfunc_model.py`: Ultralytics' predictor,
best.pt inside, signature, input example, Ultralytics pinned), stored in the run's artifacts under
`champion_model/` and registered. Each version carries the comparison as tags (`bridge.champion.*`: both
values, both runs, the decision and why). The model registry is not journaled: this talks to the server
directly (through the same URL and token as `bridge.connect()`), so the server must answer.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import ConfigError
from bridge.yolo.callbacks import legacy_name, metric_value
from bridge.yolo.compare import compare

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
DEFAULT_METRIC = "val/best/mAP50-95"
MODEL_ARTIFACT_PATH = "champion_model"
BRIDGE_TRACKING_PREFIX = "bridge+"  # bridge.connect()'s tracking URIs: bridge+https://host → https://host
TAG = "bridge.champion."


@dataclass
class ChampionResult:
    """What `register_champion` did: the new version, and whether it became the champion and why."""

    name: str
    version: str
    run_id: str
    run_name: str
    metric: str
    value: float
    champion_version: str  # the version the alias points at afterwards
    promoted: bool
    reason: str


def server_uri(tracking_uri: str | None = None) -> str:
    """The server's own URI: MLflow's current tracking URI with bridge's journal scheme taken off."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    return uri[len(BRIDGE_TRACKING_PREFIX) :] if uri.startswith(BRIDGE_TRACKING_PREFIX) else uri


def _example_image(imgsz: int) -> str:
    """A small grey PNG with a bright square, base64: the model's input example."""
    import numpy as np
    from PIL import Image

    size = max(32, min(int(imgsz), 128))
    img = np.full((size, size, 3), 114, dtype=np.uint8)
    img[size // 4 : size // 2, size // 4 : size // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def build_model(best_pt: Path, out_dir: Path, *, imgsz: int) -> Path:
    """Save best.pt as a pyfunc model in `out_dir` (signature and example from a real prediction)."""
    import mlflow
    import pandas as pd
    import ultralytics
    from mlflow.models import infer_signature

    from bridge.yolo import pyfunc_model

    example = pd.DataFrame({"image": [_example_image(imgsz)]})
    detector = pyfunc_model.YoloDetector()
    from ultralytics import YOLO

    detector.model = YOLO(str(best_pt))
    params = {"conf": 0.25, "imgsz": int(imgsz)}
    output = detector.predict(None, example, params)
    signature = infer_signature(example, output, params=params)
    path = out_dir / MODEL_ARTIFACT_PATH
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=pyfunc_model.__file__,
        artifacts={pyfunc_model.WEIGHTS: str(best_pt)},
        signature=signature,
        input_example=example,
        pip_requirements=[f"ultralytics=={ultralytics.__version__}", f"mlflow=={mlflow.__version__}", "pandas"],
    )
    return path


def register_champion(
    experiment: str,
    name: str,
    *,
    metric: str = DEFAULT_METRIC,
    greater_is_better: bool = True,
    tracking_uri: str | None = None,
) -> ChampionResult:
    """Register `experiment`'s best run by `metric` as a version of `name`; move `champion` if it is better."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not name.strip():
        raise ConfigError("--register needs a model name")
    uri = server_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    comparison = compare(experiment, tracking_uri=uri)  # the server's own run ids, not the journal's
    scored = []
    for row in comparison.rows:
        if row.status != "FINISHED":
            continue
        value = metric_value(client.get_run(row.run_id).data.metrics, metric)  # or its earlier name
        if value is not None and not math.isnan(value):
            scored.append((value, row))
    if not scored:
        raise ConfigError(
            f"no finished run in experiment {comparison.experiment!r} has metric {metric!r} (e.g. {DEFAULT_METRIC})"
        )
    value, best = (max if greater_is_better else min)(scored, key=lambda vr: vr[0])
    run = client.get_run(best.run_id)

    with tempfile.TemporaryDirectory(prefix="bridge-champion-") as tmp:
        weights = Path(client.download_artifacts(best.run_id, "weights/best.pt", dst_path=tmp))
        imgsz = int(float(run.data.params.get("imgsz", 640)))
        model_dir = build_model(weights, Path(tmp) / "model", imgsz=imgsz)
        client.log_artifacts(best.run_id, str(model_dir), MODEL_ARTIFACT_PATH)
    try:
        client.create_registered_model(name, description="YOLO detector registered by bridge compare --register")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    version = client.create_model_version(name, source, run_id=best.run_id).version

    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        current = None
    previous_value = None
    if current is not None:
        raw = (current.tags or {}).get(TAG + "value")
        previous_value = float(raw) if raw is not None else None
    if current is None:
        promoted, reason = True, f"first champion of {name}"
    elif current.tags.get(TAG + "metric") not in (metric, legacy_name(metric)) or previous_value is None:
        promoted, reason = True, f"the champion (v{current.version}) was not scored on {metric}"
    else:
        better = value > previous_value if greater_is_better else value < previous_value
        sign = (">" if better else "<=") if greater_is_better else ("<" if better else ">=")
        promoted = better
        reason = f"{metric} {value:.4f} {sign} {previous_value:.4f} of v{current.version} (run {current.run_id})"
    tags = {
        TAG + "metric": metric,
        TAG + "value": repr(float(value)),
        TAG + "run_id": best.run_id,
        TAG + "run_name": best.name,
        TAG + "experiment": comparison.experiment,
        TAG + "decision": "promoted" if promoted or current is None else f"kept v{current.version}",
        TAG + "reason": reason,
    }
    if current is not None:
        tags.update(
            {
                TAG + "previous_version": str(current.version),
                TAG + "previous_run_id": current.run_id or "",
                TAG + "previous_value": "" if previous_value is None else repr(previous_value),
            }
        )
    for key, val in tags.items():
        client.set_model_version_tag(name, version, key, val)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    champion_version = str(version) if promoted or current is None else str(current.version)
    logger.info("registered %s v%s (%s); champion: v%s", name, version, reason, champion_version)
    return ChampionResult(
        name=name,
        version=str(version),
        run_id=best.run_id,
        run_name=best.name,
        metric=metric,
        value=float(value),
        champion_version=champion_version,
        promoted=promoted,
        reason=reason,
    )
