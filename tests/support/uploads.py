"""Fixtures for resumable uploads: an entrance with small limits in front of the session's MLflow, a fresh run's
artifact folder, and helpers that journal a file and deliver it (tests/test_uploads.py and its regressions)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest
import requests

from bridge.client.delivery import files
from bridge.client.journal import Journal
from bridge.client.link import Link
from bridge.serve.entrance import Entrance, TokenSource

TOKEN = "upload-test-token"
MiB = 1024 * 1024


@pytest.fixture
def entrance(mlflow_server, tmp_path):
    """An entrance with a 1 MiB part limit in front of the session's stock MLflow."""
    staging = tmp_path / "staging"
    gate = Entrance(
        mlflow_server.port, port=0, tokens=TokenSource(load=lambda: TOKEN), staging=staging, max_part_bytes=MiB
    )
    gate.start()
    yield gate
    gate.stop()


@pytest.fixture
def run_path(server_client):
    """A fresh run's artifact folder as MLflow's artifact proxy names it (`<exp>/<run>/artifacts`)."""
    exp = server_client.create_experiment(f"uploads-{uuid.uuid4().hex[:8]}")
    run = server_client.create_run(exp)
    uri = run.info.artifact_uri  # mlflow-artifacts:/<exp>/<run>/artifacts
    return Link.artifact_path(uri)


def _payload(tmp_path: Path, size: int, name: str = "weights.pt") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _in_mlflow(mlflow_server, artifact_path: str) -> bytes | None:
    answer = requests.get(f"{mlflow_server.url}/api/2.0/mlflow-artifacts/artifacts/{artifact_path}", timeout=30)
    return answer.content if answer.status_code == 200 else None


def _journal_with_file(tmp_path: Path, source: Path) -> tuple[Journal, object, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    journal = Journal(tmp_path / "journal.sqlite")
    run = journal.add_run(experiment_id=journal.add_experiment("e", {}), user_id="u", start_time=1, name="r", tags={})
    body = journal.spool_artifact(run, source, source.name)
    (op,) = journal.queue.pending_ops(run, 10, files=True)
    return journal, op, body


def _deliver(link: Link, journal: Journal, op, body: dict, target: str, part_bytes: int = MiB) -> None:
    files.deliver_file(
        link,
        journal,
        op,
        body,
        journal.spool.path(body["spool"]),
        artifact_path=target,
        url="/api/2.0/mlflow-artifacts/artifacts/" + target,
        part_bytes=part_bytes,
    )
