"""Compare the YOLO runs of one experiment: a table of final metrics and a PNG of their curves."""

from __future__ import annotations

import csv
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bridge.errors import ConfigError
from bridge.yolo.callbacks import TRAIN_TIME, metric_value

#: Final metrics shown, in column order: (MLflow key, column title); runs logged with the earlier final/* names too.
FINAL_COLUMNS = (
    ("val/best/mAP50-95", "mAP50-95"),
    ("val/best/mAP50", "mAP50"),
    ("val/best/precision", "precision"),
    ("val/best/recall", "recall"),
)
SUMMARY_KIND_TAG = "bridge.kind"
SUMMARY_KIND = "comparison"


@dataclass
class RunRow:
    """One run's line in the comparison."""

    run_id: str
    name: str
    model: str
    status: str
    final: dict[str, float | None]
    train_time_s: float | None
    weights_bytes: int | None
    parameters: int | None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Comparison:
    """The runs of an experiment, best mAP50-95 first."""

    experiment: str
    experiment_id: str
    rows: list[RunRow]

    def table(self) -> list[dict[str, str]]:
        """The rows as display strings, in column order."""
        out = []
        for r in self.rows:
            row = {"run": r.name, "model": r.model, "status": r.status}
            for key, title in FINAL_COLUMNS:
                v = r.final.get(key)
                row[title] = "" if v is None else f"{v:.4f}"
            row["train time (s)"] = "" if r.train_time_s is None else f"{r.train_time_s:.1f}"
            row["best.pt (MB)"] = "" if r.weights_bytes is None else f"{r.weights_bytes / 1e6:.2f}"
            row["parameters"] = "" if r.parameters is None else str(r.parameters)
            row["run id"] = r.run_id
            out.append(row)
        return out

    def to_csv(self) -> str:
        rows = self.table()
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return buf.getvalue()

    def plot(self, out: str | Path) -> Path:
        """Write a PNG: mAP50-95 per epoch, then each training loss per epoch, one line per run."""
        # A bare Figure (no pyplot) renders with Agg and leaves the caller's backend, e.g. a notebook's, alone.
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D

        keys = ["val/mAP50-95", *sorted({k for r in self.rows for k in r.curves if k.startswith("train/")})]
        ncols = min(len(keys), 3)
        nrows = -(-len(keys) // ncols)
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(5 * ncols, 3.6 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        colours = {r.run_id: f"C{i % 10}" for i, r in enumerate(self.rows)}  # one colour per run in every panel
        for ax, key in zip(axes.flat, keys, strict=False):  # a grid has spare panels
            for r in self.rows:
                pts = r.curves.get(key)
                if pts:
                    ax.plot(
                        [s for s, _ in pts],
                        [v for _, v in pts],
                        marker="o",
                        markersize=3,
                        label=r.name,
                        color=colours[r.run_id],
                    )
            ax.set_title(key)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        handles = [Line2D([], [], color=colours[r.run_id], marker="o", label=r.name) for r in self.rows]
        fig.legend(handles=handles, loc="upper right", fontsize=8)
        fig.suptitle(f"{self.experiment}: {len(self.rows)} runs")
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        return out


def _weights_bytes(client, run_id: str) -> int | None:
    try:
        for info in client.list_artifacts(run_id, "weights"):
            if info.path.endswith("best.pt"):
                return info.file_size
    except Exception:
        return None
    return None


def compare(experiment: str, *, tracking_uri: str | None = None) -> Comparison:
    """Read every YOLO run of `experiment` (name or id) through MLflow's API, best mAP50-95 first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        try:
            exp = client.get_experiment(experiment)
        except Exception:
            exp = None
    if exp is None:
        raise ConfigError(f"no MLflow experiment named {experiment!r}")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`bridge.tracker` = 'bridge.yolo'",
        max_results=1000,
    )
    rows = []
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        curves = {}
        for key in metrics:
            if key == "val/mAP50-95" or key.startswith("train/"):
                history = client.get_metric_history(run.info.run_id, key)
                curves[key] = sorted((m.step, m.value) for m in history)
        train_time = metric_value(metrics, TRAIN_TIME)
        if train_time is None and run.info.end_time and run.info.start_time:
            train_time = (run.info.end_time - run.info.start_time) / 1000
        params_n = params.get("model.parameters")
        rows.append(
            RunRow(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id[:8],
                model=Path(params.get("model", "")).name,
                status=run.info.status,
                final={key: metric_value(metrics, key) for key, _ in FINAL_COLUMNS},
                train_time_s=train_time,
                weights_bytes=_weights_bytes(client, run.info.run_id),
                parameters=int(params_n) if params_n and params_n.isdigit() else None,
                curves=curves,
            )
        )
    best = FINAL_COLUMNS[0][0]
    rows.sort(key=lambda r: (r.final.get(best) is None, -(r.final.get(best) or 0.0), r.name))
    return Comparison(experiment=exp.name, experiment_id=exp.experiment_id, rows=rows)


def log_comparison(comparison: Comparison, png: str | Path) -> str:
    """Attach the PNG and the table as CSV to a summary run in the experiment; returns its run id."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.create_run(
        comparison.experiment_id,
        run_name="comparison",
        tags={SUMMARY_KIND_TAG: SUMMARY_KIND, "comparison.runs": ",".join(r.run_id for r in comparison.rows)},
    )
    run_id = run.info.run_id
    try:
        client.log_artifact(run_id, str(png))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "comparison.csv"
            path.write_text(comparison.to_csv())
            client.log_artifact(run_id, str(path))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
