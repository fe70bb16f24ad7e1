"""Resume an interrupted training from `<project>/<name>/weights/last.pt` into the MLflow run it started.

The run is found again by a stable key, tagged on the run when it starts (`bridge.yolo.run_key`: the
caller's `run_key`, else the absolute save directory — on Colab a Google Drive folder, the same for every
runtime) and written next to the weights in `bridge_run.json`. The checkpoint says which epoch to continue
with; Ultralytics writes last.pt before bridge logs an epoch, so the epochs on the run and the checkpoint
agree and the epoch that was cut is trained, and logged, once by the resumed process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.errors import ConfigError
from bridge.yolo import metadata

logger = logging.getLogger(__name__)

RUN_KEY_TAG = "bridge.yolo.run_key"
RUN_FILE = "bridge_run.json"
CONSOLE_FILE = "console.log"
RESUME_COUNT_TAG = "bridge.resume.count"


@dataclass
class ResumePlan:
    """What the tracker needs to continue a run: which run, from which epoch, what to tag and prepend."""

    run_id: str | None  # None: no run found, the resumed training gets a new one
    save_dir: Path
    last: Path
    start_epoch: int  # the first epoch the resumed training runs, counted from 1
    epochs: int
    tags: dict[str, str] = field(default_factory=dict)
    console_prefix: str = ""


def save_dir_for(project: str | Path | None, name: str | None, task: str = "detect") -> Path:
    """Where Ultralytics writes a training called `name` in `project` (its own rule, without numbering)."""
    from types import SimpleNamespace

    from ultralytics.cfg import get_save_dir

    if not name:
        raise ConfigError("resume=True needs name= (and project=): it resumes <project>/<name>/weights/last.pt")
    return Path(
        get_save_dir(
            SimpleNamespace(
                project=str(project) if project else None,
                name=name,
                task=task,
                mode="train",
                exist_ok=True,
                save_dir=None,
            )
        )
    ).resolve()


def run_key_for(save_dir: Path, run_key: str | None) -> str:
    return run_key or str(Path(save_dir).resolve())


def write_run_file(save_dir: Path, run_id: str, run_key: str, experiment_id: str, experiment_name: str) -> None:
    """Note the run next to the weights, atomically (the folder may be on a Drive that syncs any moment)."""
    path = Path(save_dir) / RUN_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {"run_id": run_id, "run_key": run_key, "experiment_id": experiment_id, "experiment_name": experiment_name}
        )
    )
    os.replace(tmp, path)


def read_run_file(save_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((Path(save_dir) / RUN_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def find_run(
    run_key: str,
    *,
    run_id_hint: str | None = None,
    experiment: str | None = None,
    experiment_id_hint: str | None = None,
) -> Any | None:
    """The newest run tagged `run_key`: the id noted in the save dir first, else a search by the tag."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if run_id_hint:
        try:
            run = client.get_run(run_id_hint)
            if run.data.tags.get(RUN_KEY_TAG, run_key) == run_key:
                return run
        except Exception as exc:  # an id from another journal or server: look it up by its key instead
            logger.debug("run %s from %s not found: %s", run_id_hint, RUN_FILE, exc)
    experiment_ids = []
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            experiment_ids.append(exp.experiment_id)
    elif experiment_id_hint:
        experiment_ids.append(experiment_id_hint)
    if not experiment_ids:
        return None
    found = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{_quote(run_key)}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    # Offline the journal answers without applying the filter: apply it here as well.
    runs = [r for r in found if r.data.tags.get(RUN_KEY_TAG) == run_key]
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def plan(ckpt: dict, *, save_dir: Path, run_key: str, experiment: str | None) -> ResumePlan:
    """Everything about resuming `save_dir`'s last.pt (already loaded as `ckpt`), before training starts."""
    from datetime import datetime, timezone

    last = save_dir / "weights" / "last.pt"
    done = int(ckpt.get("epoch", -1)) + 1  # epochs completed and checkpointed
    epochs = int((ckpt.get("train_args") or {}).get("epochs") or 0)
    noted = read_run_file(save_dir)
    run = find_run(
        run_key,
        run_id_hint=noted.get("run_id"),
        experiment=experiment or noted.get("experiment_name"),
        experiment_id_hint=noted.get("experiment_id"),
    )
    checkpoint_at = datetime.fromtimestamp(last.stat().st_mtime, timezone.utc).replace(microsecond=0).isoformat()
    tags = {}
    if run is not None:
        n = int(run.data.tags.get(RESUME_COUNT_TAG, "0") or 0) + 1
        tags = {
            RESUME_COUNT_TAG: str(n),
            f"bridge.resume.{n}.at": metadata.utc_now(),
            f"bridge.resume.{n}.from_epoch": str(done + 1),
            f"bridge.resume.{n}.interrupted_after": checkpoint_at,  # the last checkpoint before it died
            # The epoch in flight when the runtime died is trained again from its start.
            f"bridge.resume.{n}.epochs_lost": "1" if done < epochs else "0",
            f"bridge.resume.{n}.previous_status": run.info.status,
        }
    console = ""
    local_console = save_dir / CONSOLE_FILE
    if local_console.is_file():
        console = local_console.read_text(errors="replace")
    if console and not console.endswith("\n"):
        console += "\n"
    console += (
        f"---- bridge: resumed {metadata.utc_now()} at epoch {done + 1} from {last} (checkpoint {checkpoint_at}) ----\n"
    )
    return ResumePlan(
        run_id=run.info.run_id if run is not None else None,
        save_dir=save_dir,
        last=last,
        start_epoch=done + 1,
        epochs=epochs,
        tags=tags,
        console_prefix=console,
    )


def is_resumable(ckpt: dict | None) -> bool:
    """Ultralytics' own test: an unfinished training's last.pt keeps its epoch and optimizer state."""
    if not ckpt:
        return False
    return int(ckpt.get("epoch", -1)) >= 0 and ckpt.get("optimizer") is not None
