"""`bridge sync` and `bridge queue` through typer's CliRunner."""

from __future__ import annotations

import time
import uuid

from mlflow import MlflowClient
from typer.testing import CliRunner

from bridge.cli import app
from bridge.client.journal import Journal
from tests.support.client import server_run
from tests.support.mlflow_server import closed_url

runner = CliRunner()


def _left_behind(path, name: str, points: int = 300) -> str:
    """A journal as an earlier process leaves it: an experiment, a run, metrics, a refused entry."""
    journal = Journal(path)
    experiment = journal.add_experiment(name, {})
    run = journal.add_run(
        experiment_id=experiment, user_id="u", start_time=int(time.time() * 1000), name="left", tags={}
    )
    journal.append_batch(run, [("loss", float(s), 1_700_000_000_000 + s, s) for s in range(points)])
    journal.update_run(run, status="FINISHED", end_time=int(time.time() * 1000), name=None)
    journal.close()
    return run


def test_queue_shows_backlog_and_dead_letters(tmp_path):
    path = tmp_path / "j.sqlite"
    run = _left_behind(path, "q")
    journal = Journal(path)
    (op,) = journal.queue.pending_ops(run, 1)[:1]
    journal.queue.bury([op.id], "the run was never created: nope", reason="run-not-created")
    journal.close()
    result = runner.invoke(app, ["queue", "--journal", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert run[:12] in result.output and "left" in result.output
    assert "301" in result.output  # 300 points + the status update (the creation is the dead letter)
    assert "the run was never created: nope" in result.output and "create_run" in result.output
    assert "run-not-created" in result.output


def test_sync_with_the_server_down_fails_and_keeps_everything(tmp_path):
    path = tmp_path / "j.sqlite"
    _left_behind(path, "down")
    result = runner.invoke(
        app,
        ["sync", "--journal", str(path), "--url", closed_url(), "--timeout", "1.5"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 1
    assert "still in the journal" in result.output
    assert Journal(path).queue.backlog().total == 303


def test_sync_delivers_a_left_journal_with_counts_per_run(tmp_path, mlflow_server):
    path = tmp_path / "j.sqlite"
    name = f"sync-{uuid.uuid4().hex[:6]}"
    run = _left_behind(path, name)
    result = runner.invoke(app, ["sync", "--journal", str(path), "--url", mlflow_server.url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert run[:12] in result.output and "302" in result.output and "Delivered everything" in result.output
    client = MlflowClient(mlflow_server.url)
    remote = server_run(client, name)
    assert remote.info.status == "FINISHED"
    assert len(client.get_metric_history(remote.info.run_id, "loss")) == 300
    again = runner.invoke(app, ["queue", "--journal", str(path)])
    assert "Nothing waiting" in again.output


def test_sync_without_any_endpoint_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["sync", "--journal", str(tmp_path / "j.sqlite")])
    assert result.exit_code == 1
    assert "Error" in result.output and "BRIDGE_URL" in result.output


def test_queue_retry_and_drop_act_on_dead_letters_by_id(tmp_path):
    path = tmp_path / "j.sqlite"
    run = _left_behind(path, "retry")
    journal = Journal(path)
    first, second = journal.queue.pending_ops(run, 2)
    journal.queue.bury([first.id], "the run was never created", reason="run-not-created")
    journal.queue.bury([second.id], "HTTP 500: boom", reason="server-fails-on-it")
    journal.close()
    result = runner.invoke(
        app, ["queue", "--journal", str(path), "--retry", "--id", str(second.id)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "1 dead letter(s) will be sent again" in result.output
    journal = Journal(path)
    assert [letter.op.id for letter in journal.queue.dead_letters()] == [first.id]
    (again,) = [op for op in journal.queue.pending_ops(run, 1000) if op.id == second.id]
    assert again.attempts == 0
    journal.close()
    result = runner.invoke(app, ["queue", "--journal", str(path), "--drop"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "1 dead letter(s) deleted" in result.output
    journal = Journal(path)
    # The experiment, 300 points (one of them the retried letter) and the status update; the dropped create is gone.
    assert journal.queue.dead_letters() == [] and journal.queue.backlog().total == 302
    journal.close()
    result = runner.invoke(app, ["queue", "--journal", str(path), "--drop", "--id", "999999"])
    assert result.exit_code == 2 and "no dead letter with id [999999]" in result.output


def test_queue_config_prints_each_setting_with_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_HEARTBEAT_S", "42")
    result = runner.invoke(app, ["queue", "--config", "--journal", str(tmp_path / "j.sqlite")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if "heartbeat_s" in row)
    assert "42.0" in line and "BRIDGE_HEARTBEAT_S" in line and "environment" in line
    assert "BRIDGE_EXIT_FLUSH_S" in result.output and "BRIDGE_POISON_ATTEMPTS" in result.output


def test_a_bad_client_setting_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_EXIT_FLUSH_S", "-1")
    result = runner.invoke(app, ["queue", "--config", "--journal", str(tmp_path / "j.sqlite")])
    assert result.exit_code == 1
    assert "exit_flush_s (BRIDGE_EXIT_FLUSH_S) must be 0 or more seconds" in result.output
