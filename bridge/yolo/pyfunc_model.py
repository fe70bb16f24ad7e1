"""An Ultralytics YOLO detector as an MLflow pyfunc model (MLflow "models from code": this file is the model).

It imports nothing from bridge, so `mlflow.pyfunc.load_model("models:/NAME@champion")` works wherever
Ultralytics is installed. Input: a DataFrame with an `image` column of base64-encoded image files (PNG, JPEG…).
Output: one row per detection: `image` (row index of the input), `class_id`, `class_name`, `confidence`,
`x1`, `y1`, `x2`, `y2` (pixels). Params: `conf` (minimum confidence, 0.25) and `imgsz` (the training size).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

WEIGHTS = "weights"  # the artifact key of best.pt
OUTPUT_COLUMNS = ("image", "class_id", "class_name", "confidence", "x1", "y1", "x2", "y2")


def decode_image(value):
    """A base64 string (or raw bytes) of an image file as an RGB numpy array."""
    import numpy as np
    from PIL import Image

    data = value if isinstance(value, (bytes, bytearray)) else base64.b64decode(value)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[:, :, ::-1]  # Ultralytics takes BGR arrays


class YoloDetector(PythonModel):
    """best.pt behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from ultralytics import YOLO

        # Any: Ultralytics annotates predict() with every shape it can return (a stream, tensors); here it
        # always returns a list of Results.
        self.model: Any = YOLO(context.artifacts[WEIGHTS])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        params = params or {}
        images = [decode_image(v) for v in model_input["image"]]
        rows = []
        if images:
            results = self.model.predict(
                images, conf=float(params.get("conf", 0.25)), imgsz=int(params.get("imgsz", 640)), verbose=False
            )
            for i, result in enumerate(results):
                names = result.names
                for box in result.boxes:
                    cls = int(box.cls.item())
                    x1, y1, x2, y2 = (float(v) for v in box.xyxy[0].tolist())
                    rows.append((i, cls, str(names[cls]), float(box.conf.item()), x1, y1, x2, y2))
        frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
        return frame.astype(
            {
                "image": "int64",
                "class_id": "int64",
                "confidence": "float64",
                "x1": "float64",
                "y1": "float64",
                "x2": "float64",
                "y2": "float64",
            }
        )


mlflow.models.set_model(YoloDetector())
