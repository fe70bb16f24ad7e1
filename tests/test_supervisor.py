"""`bridge serve` as a whole, as a real subprocess: faults, token rotation, clean stop, the tunnel reopened."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from urllib.parse import urlsplit

import psutil
import pytest
import requests

from mlflow.tracking import MlflowClient

from bridge import config, secrets
from bridge.errors import ConfigError, RecordSignatureError
from bridge.record import verify_record
from bridge.serve.supervisor import ServeOptions, Supervisor, primary_address
from tests.support.mlflow_server import free_port


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _files_containing(root, needle: str) -> list[str]:
    """Every file under `root` whose bytes contain `needle`, except the 0600 secret store that must hold it."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and path.name != "secrets.json" and needle.encode() in path.read_bytes():
            found.append(str(path))
    return found


def test_killed_mlflow_is_restarted_and_requests_succeed_again(own_bridge_serve):
    server = own_bridge_serve()
    token = server.token()
    auth = {"Authorization": f"Bearer {token}"}
    first = server.state()["mlflow"]
    old_tree = [psutil.Process(first["pid"]), *psutil.Process(first["pid"]).children(recursive=True)]

    os.kill(first["pid"], signal.SIGKILL)

    state = _wait_for(lambda: (s := server.state()) and s["mlflow"]["restarts"] == 1 and s["mlflow"]["healthy"] and s,
                      what="MLflow restart in the state file")
    assert state["mlflow"]["pid"] != first["pid"]
    assert any("exited with code -9" in e["event"] for e in state["events"])
    resp = requests.post(server.entrance_url + "/api/2.0/mlflow/experiments/create", json={"name": "after-restart"},
                         headers=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    # The whole old group is gone (its uvicorn too), and the entrance never restarted: same process, same URL.
    _, alive = psutil.wait_procs(old_tree, timeout=5)
    assert alive == []
    assert state["pid"] == server.proc.pid
    assert state["entrance"]["url"] == server.entrance_url


def test_token_rotation_works_at_once_republishes_then_sigterm_leaves_nothing(own_bridge_serve):
    server = own_bridge_serve()
    url = server.entrance_url + "/api/2.0/mlflow/experiments/search?max_results=1"
    old = server.token()
    assert requests.get(url, auth=("bridge", old), timeout=10).status_code == 200
    record_file = server.home / "endpoint.json"
    verify_record(record_file.read_text(), old)

    rotated = server.cli("token", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new != old and new == server.token()

    # The record is re-signed under the new token's key, even before any request comes in.
    def resigned():
        try:
            return verify_record(record_file.read_text(), new)
        except RecordSignatureError:
            return None

    record = _wait_for(resigned, timeout=60, what="the record re-signed with the new token")
    assert record.url == server.entrance_url
    with pytest.raises(RecordSignatureError):
        verify_record(record_file.read_text(), old)
    # No grace period for the old token: refused, and the new one works.
    assert requests.get(url, auth=("bridge", old), timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {new}"}, timeout=10).status_code == 200

    status = server.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "healthy" in status.stdout

    children = server.descendants()
    assert len(children) == 1  # MLflow: its uvicorn, exec'd in place of the mlflow CLI
    assert server.stop() == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], [p.cmdline() for p in alive]
    assert not any("uvicorn" in " ".join(p.cmdline()) and str(server.port) in " ".join(p.cmdline())
                   for p in psutil.process_iter() if _safe_running(p))
    state = server.state()
    assert state["stopped_at"] is not None
    assert state["mlflow"]["healthy"] is False

    # Neither token was ever written anywhere but the secret store: logs, state, record, MLflow's files.
    assert (server.home / "logs" / "mlflow.log").stat().st_size > 0
    for token in (old, new):
        assert _files_containing(server.home, token) == []
        assert token not in server.output()
        assert token not in status.stdout


def _safe_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running()
    except psutil.Error:
        return False


def test_tunnel_agent_killed_is_reopened_and_new_url_published(own_bridge_serve, fake_ngrok):
    server = own_bridge_serve("--tunnel", "ngrok", env_extra=fake_ngrok.env)
    token = server.token()
    state = server.state()
    first_url = state["tunnel"]["public_url"]
    assert first_url.startswith("https://") and first_url.endswith(".ngrok-free.app")
    assert state["tunnel"]["status"] == "open"
    record = verify_record((server.home / "endpoint.json").read_text(), token)
    assert record.url == first_url
    mlflow_pid = state["mlflow"]["pid"]

    # Through the stand-in edge (public Host header, X-Forwarded-*): locked without the token, open with it.
    public = fake_ngrok.local_url(first_url)
    assert requests.get(public + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).status_code == 401
    ok = requests.get(public + "/api/2.0/mlflow/experiments/search?max_results=1", auth=("u", token), timeout=10)
    assert ok.status_code == 200, ok.text

    for pid in fake_ngrok.agent_pids():
        os.kill(pid, signal.SIGKILL)

    def republished():
        s = server.state()
        url = s and s["tunnel"]["public_url"]
        if url and url != first_url and s["tunnel"]["status"] == "open" and s["last_publish"]["url"] == url:
            return s
        return None

    state = _wait_for(republished, timeout=60, what="tunnel reopened and republished")
    new_url = state["tunnel"]["public_url"]
    record = verify_record((server.home / "endpoint.json").read_text(), token)
    assert record.url == new_url
    assert state["mlflow"]["pid"] == mlflow_pid and state["mlflow"]["restarts"] == 0  # MLflow untouched
    resp = requests.get(fake_ngrok.local_url(new_url) + "/api/2.0/mlflow/experiments/search?max_results=1",
                        auth=("u", token), timeout=10)
    assert resp.status_code == 200

    # Guessing through the tunnel (the agent names the client in X-Forwarded-For) is throttled.
    codes = [requests.get(fake_ngrok.local_url(new_url) + "/health", auth=("u", f"guess-{n}"), timeout=10).status_code
             for n in range(12)]
    assert codes == [401] * 10 + [429] * 2

    assert server.stop() == 0
    _wait_for(lambda: fake_ngrok.agent_pids() == [], timeout=30, what="no agent left")
    assert _files_containing(server.home, token) == []
    assert _files_containing(server.home, fake_ngrok.authtoken) == [str(p) for p in server.home.rglob("ngrok.yml")]


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_hangup_or_quit_stops_everything_like_sigterm(own_bridge_serve, signum):
    # Closing the terminal sends SIGHUP; MLflow runs in its own session and would keep the port if bridge just died.
    server = own_bridge_serve()
    children = server.descendants()
    assert children, "MLflow should be running under bridge serve"
    server.proc.send_signal(signum)
    assert server.proc.wait(timeout=60) == 0
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], [p.cmdline() for p in alive]
    assert server.state()["stopped_at"] is not None


def test_sigkill_of_bridge_serve_still_takes_mlflow_down(own_bridge_serve):
    # No handler runs on SIGKILL: MLflow (in its own session) must notice its parent died and stop by itself.
    server = own_bridge_serve()
    children = server.descendants()
    assert children, "MLflow should be running under bridge serve"
    server.proc.kill()
    server.proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=20)
    assert alive == [], [p.cmdline() for p in alive]


def test_sigterm_during_start_up_stops_cleanly(tmp_path):
    from tests.support.serve import new_bridge_serve

    server = new_bridge_serve(tmp_path / "early")
    server.launch()
    try:
        # As soon as MLflow has been spawned, and long before it is healthy.
        children = _wait_for(server.descendants, timeout=30, what="MLflow spawned")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tunnel": "ssh"}, "--tunnel"),
        ({"port": 5000, "entrance_port": 5000}, "--entrance-port"),
        ({"heartbeat_timeout_s": 0}, "--heartbeat-timeout"),
        ({"tunnel": "none", "domain": "x.ngrok.app"}, "--domain"),
    ],
)
def test_bad_serve_options_are_refused_before_anything_starts(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ServeOptions(**kwargs)


def test_supervisor_reaps_silent_runs_and_republishes_when_due(bridge_home):
    port = free_port()
    supervisor = Supervisor(ServeOptions(port=port, entrance_port=free_port(), tunnel="none", heartbeat_timeout_s=2))
    info = supervisor.start()
    assert info.public_url is None and info.record_url == info.entrance_url
    waiter = threading.Thread(target=supervisor.wait, daemon=True)
    waiter.start()
    try:
        token = secrets.access_token(create=False)
        client = MlflowClient(tracking_uri=info.mlflow_url)
        exp_id = client.create_experiment("silent-client")
        silent = client.create_run(exp_id, tags={config.HEARTBEAT_TAG: str(time.time() - 60)}).info.run_id
        untagged = client.create_run(exp_id).info.run_id
        # Reaped within one round (every min(timeout/4, 30) s = 0.5 s here).
        _wait_for(lambda: client.get_run(silent).info.status == "KILLED", timeout=60, what="the silent run reaped")
        assert client.get_run(untagged).info.status == "RUNNING"

        # The reaper marks the run KILLED on the server first, and records that in the state file afterwards.
        def reap_recorded() -> dict | None:
            s = json.loads(config.paths().state_file.read_text())
            recorded = s["last_reap"] and (silent in s["last_reap"]["killed"]
                                           or any(silent in e["event"] for e in s["events"]))
            return s if recorded else None

        _wait_for(reap_recorded, what="the reap in the state file")

        # Republished when due (normally at half the record's TTL), with a fresh expiry.
        first = verify_record(config.paths().record_file.read_text(), token)
        supervisor._next_publish_at = 0
        second = _wait_for(
            lambda: (r := verify_record(config.paths().record_file.read_text(), token)).issued_at > first.issued_at
            and r, what="a republished record")
        assert second.expires_at > first.expires_at
        assert second.instance == first.instance
    finally:
        supervisor.request_stop()
        waiter.join(10)
        supervisor.stop()
    assert json.loads(config.paths().state_file.read_text())["stopped_at"] is not None


def test_a_wildcard_host_publishes_this_machines_address_not_0_0_0_0(bridge_home):
    supervisor = Supervisor(ServeOptions(host="0.0.0.0", port=free_port(), entrance_port=free_port(), tunnel="none"))
    info = supervisor.start()
    try:
        token = secrets.access_token(create=False)
        published = verify_record(config.paths().record_file.read_text(), token)
        assert published.url == info.record_url
        host = urlsplit(published.url).hostname
        assert host == (primary_address() or "127.0.0.1") and host != "0.0.0.0"
        assert any("binds every address" in note for note in info.notes)
        # The published address really reaches the entrance, which still wants the token.
        assert requests.get(published.url + "/health", timeout=10).status_code == 401
        assert requests.get(published.url + "/health", auth=("bridge", token), timeout=10).status_code == 200
    finally:
        supervisor.stop()
