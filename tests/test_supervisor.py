"""`bridge serve` as a whole, as a real subprocess: faults, token rotation, clean stop, the tunnel reopened."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from urllib.parse import urlsplit

import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient

from bridge import config, secrets
from bridge.errors import CloudflaredBinaryError, ConfigError, RecordSignatureError
from bridge.record import verify_record
from bridge.serve.entrance import Entrance
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

    state = _wait_for(
        lambda: (s := server.state()) and s["mlflow"]["restarts"] == 1 and s["mlflow"]["healthy"] and s,
        what="MLflow restart in the state file",
    )
    assert state["mlflow"]["pid"] != first["pid"]
    assert any("exited with code -9" in e["event"] for e in state["events"])
    resp = requests.post(
        server.entrance_url + "/api/2.0/mlflow/experiments/create",
        json={"name": "after-restart"},
        headers=auth,
        timeout=10,
    )
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
    assert not any("uvicorn" in line and str(server.port) in line for line in map(_command_line, psutil.process_iter()))
    state = server.state()
    assert state["stopped_at"] is not None
    assert state["mlflow"]["healthy"] is False

    # Neither token was ever written anywhere but the secret store: logs, state, record, MLflow's files.
    assert (server.home / "logs" / "mlflow.log").stat().st_size > 0
    for token in (old, new):
        assert _files_containing(server.home, token) == []
        assert token not in server.output()
        assert token not in status.stdout


def _command_line(proc: psutil.Process) -> str:
    """A process's command line; "" for one that ended or is a zombie meanwhile (any other process on the
    machine may be: seen in CI) or that is not ours to read."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_tunnel_agent_killed_is_reopened_and_new_url_published(own_bridge_serve, tunnel_agent):
    """The same faults for each tunnel kind: the agent dies, a new URL is republished, verified and throttled."""
    server = own_bridge_serve("--tunnel", tunnel_agent.kind, env_extra=tunnel_agent.env)
    token = server.token()
    state = server.state()
    first_url = state["tunnel"]["public_url"]
    assert re.match(tunnel_agent.url_pattern, first_url)
    assert state["tunnel"]["status"] == "open" and state["tunnel"]["mode"] == tunnel_agent.kind
    record = verify_record((server.home / "endpoint.json").read_text(), token)
    assert record.url == first_url
    mlflow_pid = state["mlflow"]["pid"]

    # Through the stand-in edge (public Host header, forwarded headers): locked without the token, open with it.
    public = tunnel_agent.local_url(first_url)
    assert requests.get(public + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).status_code == 401
    ok = requests.get(public + "/api/2.0/mlflow/experiments/search?max_results=1", auth=("u", token), timeout=10)
    assert ok.status_code == 200, ok.text

    for pid in tunnel_agent.agent_pids():
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
    new_public = tunnel_agent.local_url(new_url)
    resp = requests.get(new_public + "/api/2.0/mlflow/experiments/search?max_results=1", auth=("u", token), timeout=10)
    assert resp.status_code == 200

    # Guessing through the tunnel is throttled per client, as the edge names it (X-Forwarded-For's last entry for
    # ngrok, Cf-Connecting-Ip for Cloudflare; the stand-ins take the address they "saw" from X-Stand-In-Peer).
    guesser = {"X-Stand-In-Peer": "198.51.100.66"}
    codes = [
        requests.get(new_public + "/health", auth=("u", f"guess-{n}"), headers=guesser, timeout=10).status_code
        for n in range(12)
    ]
    assert codes == [401] * 10 + [429] * 2
    other = requests.get(
        new_public + "/health", auth=("u", token), headers={"X-Stand-In-Peer": "198.51.100.77"}, timeout=10
    )
    # Cloudflare names each client apart; every ngrok client here connects from 127.0.0.1, so it shares the bucket.
    assert other.status_code == (200 if tunnel_agent.kind == "cloudflared" else 429)

    # What went out through the tunnel is counted for the month (saved every few seconds).
    usage = _wait_for(
        lambda: (server.state().get("usage") or {}).get("requests", 0) >= 16 and server.state()["usage"],
        timeout=30,
        what="tunnel usage counted",
    )
    assert usage["bytes_out"] > 16 * 100
    status = server.cli("status")
    assert "Tunnel use" in status.stdout, status.stdout
    if tunnel_agent.kind == "ngrok":  # the free plan's monthly caps
        assert "requests of 20,000" in status.stdout, status.stdout
    else:  # a quick tunnel has none: its limits are per moment and per request
        assert "no monthly cap" in status.stdout and "200 requests in flight" in status.stdout, status.stdout
        assert "of 20,000" not in status.stdout
    # The new URL reached the terminal, on a line of its own, with the Colab cell that names it.
    output = server.output()
    assert any(line.strip() == new_url for line in output.splitlines()), output
    assert f'os.environ["BRIDGE_URL"] = "{new_url}"' in output

    assert server.stop() == 0
    _wait_for(lambda: tunnel_agent.agent_pids() == [], timeout=30, what="no agent left")
    assert _files_containing(server.home, token) == []
    saved = json.loads((server.home / "tunnel-usage.json").read_text())
    assert saved["requests"] >= usage["requests"]
    if tunnel_agent.kind == "ngrok":
        assert _files_containing(server.home, tunnel_agent.authtoken) == [
            str(p) for p in server.home.rglob("ngrok.yml")
        ]


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


@pytest.mark.integration  # starts a process of its own
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


@pytest.mark.integration  # starts a process of its own
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
            recorded = s["last_reap"] and (
                silent in s["last_reap"]["killed"] or any(silent in e["event"] for e in s["events"])
            )
            return s if recorded else None

        _wait_for(reap_recorded, what="the reap in the state file")

        # Republished when due (normally at half the record's TTL), with a fresh expiry.
        first = verify_record(config.paths().record_file.read_text(), token)
        supervisor._next_publish_at = 0
        second = _wait_for(
            lambda: (
                (r := verify_record(config.paths().record_file.read_text(), token)).issued_at > first.issued_at and r
            ),
            what="a republished record",
        )
        assert second.expires_at > first.expires_at
        assert second.instance == first.instance
    finally:
        supervisor.request_stop()
        waiter.join(10)
        supervisor.stop()
    assert json.loads(config.paths().state_file.read_text())["stopped_at"] is not None


@pytest.mark.integration  # starts a process of its own
def test_a_wildcard_host_publishes_this_machines_address_not_0_0_0_0(bridge_home):
    # relay=None: this address is not loopback, and no test may reach the public relay.
    options = ServeOptions(host="0.0.0.0", port=free_port(), entrance_port=free_port(), tunnel="none", relay=None)
    supervisor = Supervisor(options)
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


def test_tunnel_auto_prefers_ngrok_then_cloudflared_then_none(bridge_home, monkeypatch, tmp_path, fake_cloudflared):
    def chosen(**kwargs):
        supervisor = Supervisor(ServeOptions(port=free_port(), tunnel=kwargs.pop("tunnel", "auto"), **kwargs))
        supervisor.entrance = Entrance(supervisor.options.port, port=free_port())  # named, never started
        factory = supervisor._choose_tunnel()
        return supervisor.tunnel_mode, factory, " ".join(supervisor.notes)

    # A cloudflared binary and no authtoken: the quick tunnel, with a note saying why.
    mode, factory, notes = chosen()
    assert mode == "cloudflared" and factory is not None and "quick tunnel" in notes and "bridge login" in notes
    # An authtoken makes it ngrok, and so do ngrok-only options.
    monkeypatch.setenv("NGROK_AUTHTOKEN", "some-authtoken-0123456789")
    assert chosen()[0] == "ngrok"
    monkeypatch.delenv("NGROK_AUTHTOKEN")
    mode, factory, notes = chosen(domain="lab.ngrok.app")
    assert (mode, factory) == ("none", None) and "ngrok authtoken" in notes
    # Neither: the entrance alone, and the note names both ways to a public URL.
    monkeypatch.delenv("BRIDGE_CLOUDFLARED_PATH")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    mode, factory, notes = chosen()
    assert (mode, factory) == ("none", None)
    assert "install cloudflared" in notes and "bridge login" in notes
    # Asked for by name, a missing cloudflared is an error at once (before MLflow starts), naming the fix.
    with pytest.raises(CloudflaredBinaryError, match="BRIDGE_CLOUDFLARED_PATH"):
        chosen(tunnel="cloudflared")
    monkeypatch.setenv("BRIDGE_CLOUDFLARED_PATH", str(tmp_path / "not-there"))
    with pytest.raises(CloudflaredBinaryError, match="not an executable file"):
        chosen(tunnel="cloudflared")
    with pytest.raises(ConfigError, match="--domain"):
        ServeOptions(tunnel="cloudflared", domain="lab.ngrok.app")


def test_a_tunnel_refused_at_start_leaves_serve_answering_locally_then_publishes_it_whole_at_80_columns(
    own_bridge_serve, fake_cloudflared, tmp_path
):
    """Cloudflare's rate limit (429, error 1015) at start: MLflow and the entrance serve locally, the tunnel is retried
    with backoff, and once it opens its URL is published and printed whole on a line of its own in an 80-column
    terminal, with the Colab cell that names it."""
    limited = tmp_path / "rate-limited"
    limited.touch()
    env = {**fake_cloudflared.env, "FAKE_CLOUDFLARED_RATE_LIMITED": str(limited), "COLUMNS": "80"}
    server = own_bridge_serve("--tunnel", "cloudflared", env_extra=env)
    token = server.token()
    state = server.state()
    assert state["tunnel"]["status"] == "down" and state["tunnel"]["public_url"] is None
    assert "429 Too Many Requests" in state["tunnel"]["error"]
    # Serving locally meanwhile: the record names the entrance, which answers with the token and refuses without.
    assert verify_record((server.home / "endpoint.json").read_text(), token).url == server.entrance_url
    search = server.entrance_url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    assert requests.get(search, auth=("bridge", "a-wrong-token"), timeout=10).status_code == 401
    # At least one retry fails while the limit holds, and says so on the terminal.
    _wait_for(lambda: server.state()["tunnel"]["failures"] >= 2, timeout=30, what="a failed retry")

    limited.unlink()  # the limit lifts

    def published():
        s = server.state()
        url = s["tunnel"]["public_url"]
        return s if url and s["tunnel"]["status"] == "open" and s["last_publish"]["url"] == url else None

    state = _wait_for(published, timeout=60, what="the tunnel opened and published")
    url = state["tunnel"]["public_url"]
    assert re.match(fake_cloudflared.url_pattern, url)
    assert verify_record((server.home / "endpoint.json").read_text(), token).url == url
    public = fake_cloudflared.local_url(url)
    assert requests.get(public + "/health", auth=("u", token), timeout=10).status_code == 200
    # A wrong token through the tunnel is a refused login that `bridge status` counts (this machine's own are not).
    stranger = {"X-Stand-In-Peer": "198.51.100.23"}
    assert requests.get(public + "/health", auth=("u", "guess"), headers=stranger, timeout=10).status_code == 401

    output = server.output()
    lines = output.splitlines()
    assert "Public URL (cloudflared): not open yet" in output
    assert any("opening the tunnel failed (try 2:" in line and "next try in" in line for line in lines), output
    assert any(line.endswith(f"tunnel open at {url}") for line in lines), output
    assert any(line.strip() == url for line in lines), output  # the link on a line of its own
    assert f'os.environ["BRIDGE_URL"] = "{url}"' in output  # the updated Colab cell
    # No link is ever cut: every line naming a trycloudflare host names it whole, and the start-up links are whole.
    for line in lines:
        if "trycloudflare.com" in line and "api.trycloudflare.com" not in line:
            assert url in line, line
    assert any(line.strip().startswith(server.mlflow_url) for line in lines), output
    assert any(line.strip() == server.entrance_url for line in lines), output
    assert "no monthly cap" in output
    assert "once the tunnel opens" in output  # the first Colab cell said the public URL was still to come

    status = server.cli("status")  # in 80 columns too: it runs with the server's environment
    assert "refused logins" in status.stdout, status.stdout
    assert _wait_for(lambda: server.state()["entrance"]["refused_logins"] == 1, timeout=10, what="the refusal counted")
    assert "no monthly cap" in status.stdout
    assert any(line.strip() == url for line in status.stdout.splitlines()), status.stdout


def test_serve_keeps_its_url_through_an_edge_drop_and_replaces_an_agent_past_its_grace(
    own_bridge_serve, fake_cloudflared
):
    """Through `bridge serve` itself: a 4 s drop of the quick tunnel's edge connection (checks every second here,
    so it is seen) is ridden out on the same URL, said on the terminal; a drop that does not end is replaced after
    the grace (10 s here) by a new agent whose URL is published and printed."""
    env = {**fake_cloudflared.env, "FAKE_CLOUDFLARED_DROP_S": "4", "BRIDGE_TUNNEL_CHECK_S": "1"}
    server = own_bridge_serve("--tunnel", "cloudflared", "--tunnel-grace", "10", env_extra=env)
    token = server.token()
    first = server.state()["tunnel"]["public_url"]
    [agent] = fake_cloudflared.agent_pids()

    os.kill(agent, signal.SIGUSR1)
    _wait_for(lambda: server.state()["tunnel"]["status"] == "reconnecting", timeout=10, what="the drop seen")
    _wait_for(lambda: server.state()["tunnel"]["status"] == "open", timeout=20, what="the agent back")
    state = server.state()
    assert state["tunnel"]["public_url"] == first and fake_cloudflared.agent_pids() == [agent]
    assert verify_record((server.home / "endpoint.json").read_text(), token).url == first
    output = server.output()
    assert f"tunnel {first} lost its edge connection; the agent is reconnecting" in output, output
    assert f"tunnel {first} is back after" in output
    assert "New URL" not in output

    os.kill(agent, signal.SIGUSR2)  # this drop never ends

    def replaced():
        s = server.state()
        url = s["tunnel"]["public_url"]
        return (
            s if url and url != first and s["tunnel"]["status"] == "open" and s["last_publish"]["url"] == url else None
        )

    state = _wait_for(replaced, timeout=60, what="the agent replaced after its grace")
    second = state["tunnel"]["public_url"]
    assert agent not in fake_cloudflared.agent_pids()
    assert verify_record((server.home / "endpoint.json").read_text(), token).url == second
    public = fake_cloudflared.local_url(second)
    assert requests.get(public + "/health", auth=("u", token), timeout=10).status_code == 200
    output = server.output()
    assert f"tunnel {first} not back after 10 s; replacing the agent" in output, output
    assert any(line.strip() == second for line in output.splitlines())
    assert f'os.environ["BRIDGE_URL"] = "{second}"' in output
