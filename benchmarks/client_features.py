"""Every client feature once, run by bench_client_install.py with the Python of a freshly installed client.

    BRIDGE_URL=… BRIDGE_TOKEN=… <venv>/bin/python benchmarks/client_features.py EXPERIMENT MODEL_NAME

Imports nothing from the repository (the venv's installed bridge only): connect, params/metrics/tags, artifacts,
`mlflow.pyfunc.log_model` with registration, and the YOLO callbacks when ultralytics is installed. Prints one
`RESULT {json}` line; the driver checks the server side.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    experiment, model_name = sys.argv[1], sys.argv[2]
    result: dict = {"python": sys.version.split()[0]}
    started = time.perf_counter()
    import mlflow

    import bridge

    result["import_s"] = round(time.perf_counter() - started, 2)
    result["bridge_file"] = bridge.__file__
    conn = bridge.connect(experiment=experiment)
    with mlflow.start_run() as run:
        mlflow.log_params({"lr": 0.01, "epochs": 3})
        mlflow.set_tags({"stage": "install-check"})
        for step in range(3):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_text("hello from a fresh client\n", "notes/hello.txt")
        with tempfile.TemporaryDirectory() as tmp:
            blob = Path(tmp) / "blob.bin"
            blob.write_bytes(bytes(range(256)) * 4096)
            mlflow.log_artifact(str(blob), "data")
        import mlflow.pyfunc

        class Double(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return [2 * x for x in model_input]

        mlflow.pyfunc.log_model(
            name="double", python_model=Double(), pip_requirements=[], registered_model_name=model_name
        )
    result["run_id"] = run.info.run_id
    result["left_after_flush"] = conn.flush(120)
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        result["yolo"] = "ultralytics not installed"
    else:
        from bridge.yolo import callbacks

        result["yolo"] = f"callbacks imported ({len([n for n in dir(callbacks) if not n.startswith('_')])} names)"
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if result["left_after_flush"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
