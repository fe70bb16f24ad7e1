"""The workstation commands: `bridge token`, `bridge login`, `bridge url`, `bridge status`, `bridge serve` errors."""

from __future__ import annotations

import io
import json
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bridge import config, secrets, ui
from bridge.cli import app
from bridge.cli.serve import colab_snippet
from bridge.record import make_record
from bridge.serve.supervisor import ServeEvent
from bridge.serve.wheel import public_path

runner = CliRunner()


def test_token_prints_the_token_alone_and_keeps_it():
    first = runner.invoke(app, ["token"])
    assert first.exit_code == 0, first.output
    token = first.stdout.strip()
    assert first.stdout == token + "\n"  # one line, nothing else: `export BRIDGE_TOKEN=$(bridge token)` works
    assert len(token) >= 43  # 32 random bytes, url-safe base64
    assert token == secrets.access_token(create=False)
    assert runner.invoke(app, ["token"]).stdout.strip() == token


def test_token_rotate_replaces_it_and_marks_the_revision():
    old = runner.invoke(app, ["token"]).stdout.strip()
    rotated = runner.invoke(app, ["token", "--rotate"])
    assert rotated.exit_code == 0
    new = rotated.stdout.strip()
    assert new != old
    assert rotated.stdout == new + "\n"
    assert "old one is refused" in rotated.stderr
    assert secrets.access_token(create=False) == new
    assert config.paths().token_revision_file.exists()


def test_login_stores_the_ngrok_authtoken_and_never_echoes_it():
    result = runner.invoke(app, ["login", "2abcDEFngrokToken_0123456789"])
    assert result.exit_code == 0, result.output
    assert secrets.get_secret(secrets.NGROK_AUTHTOKEN) == "2abcDEFngrokToken_0123456789"
    assert "2abcDEFngrokToken_0123456789" not in result.output
    # Prompted (hidden) when omitted.
    prompted = runner.invoke(app, ["login"], input="second-token-value-123456\n")
    assert prompted.exit_code == 0, prompted.output
    assert secrets.get_secret(secrets.NGROK_AUTHTOKEN) == "second-token-value-123456"
    assert "second-token-value-123456" not in prompted.output
    assert "3456" not in result.output + prompted.output  # no masked tail either


def test_login_github_token_alone_or_prompted():
    result = runner.invoke(app, ["login", "--github-token", "ghp_exampleexampleexample"])
    assert result.exit_code == 0, result.output
    assert secrets.get_secret(secrets.GITHUB_TOKEN) == "ghp_exampleexampleexample"
    assert secrets.get_secret(secrets.NGROK_AUTHTOKEN) is None  # not asked for when only the GitHub token is given
    prompted = runner.invoke(app, ["login", "--github-token", "-"], input="ghp_prompted_value_123\n")
    assert prompted.exit_code == 0
    assert secrets.get_secret(secrets.GITHUB_TOKEN) == "ghp_prompted_value_123"
    bad = runner.invoke(app, ["login", "has space"])
    assert bad.exit_code == 1
    assert "whitespace" in bad.stderr


def test_url_prints_the_verified_local_record():
    token = secrets.access_token()
    missing = runner.invoke(app, ["url"])
    assert missing.exit_code == 1
    assert "no endpoint record" in missing.stderr
    record = make_record("https://abc.ngrok-free.app", token=token, instance="i", mlflow_version="3", ttl_s=600)
    config.paths().record_file.write_text(record.to_json())
    result = runner.invoke(app, ["url"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "https://abc.ngrok-free.app\n"
    # A record altered after signing is refused, with the reason.
    data = json.loads(record.to_json())
    data["url"] = "https://evil.example"
    config.paths().record_file.write_text(json.dumps(data))
    tampered = runner.invoke(app, ["url"])
    assert tampered.exit_code == 1
    assert "signature does not match" in tampered.stderr


def test_status_without_a_serve_says_so():
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1
    assert "has not run here" in result.stdout


def test_status_of_a_running_serve_shows_parts_and_no_secret(bridge_serve):
    token = bridge_serve.token()
    result = bridge_serve.cli("status")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in (
        "running",
        "MLflow",
        "healthy",
        bridge_serve.mlflow_url,
        "Entrance",
        "up, locked",
        bridge_serve.entrance_url,
        "Tunnel (none)",
        "disabled",
        "Last publish",
        "ok",
        "Tunnel use",
        "requests of 20,000",
        "refused logins",
        "of 1.0 GB sent out",
        "Secrets",
        "0600 file",
    ):
        assert expected in out, expected
    assert token not in out + result.stderr
    state_text = (bridge_serve.home / "serve-state.json").read_text()
    assert token not in state_text
    assert token not in (bridge_serve.home / "endpoint.json").read_text()
    assert "Colab" in bridge_serve.output() and "bridge.connect()" in bridge_serve.output()
    # The first line of the Colab cell installs this workstation's own wheel from its entrance.
    assert f'%pip install -q "bridge[yolo] @ {bridge_serve.entrance_url}{public_path()}"' in bridge_serve.output()
    assert "Client wheel" in out and public_path() in out
    assert token not in bridge_serve.output()


def test_colab_snippet_names_where_to_look_never_a_secret():
    snippet = colab_snippet("https://abc.ngrok-free.app", None)
    assert 'os.environ["BRIDGE_URL"] = "https://abc.ngrok-free.app"' in snippet
    assert "BRIDGE_TOKEN" in snippet  # tells where the token comes from, without containing one
    assert "bridge.connect()" in snippet
    assert 'os.environ["BRIDGE_DISCOVERY"] = "gist:0123abcd"' in colab_snippet("https://x.ngrok.app", "gist:0123abcd")
    assert 'os.environ["BRIDGE_DISCOVERY"] = "file:/srv/rec.json"' in colab_snippet("http://h:1", "file:/srv/rec.json")
    for spec in (None, "gist:0123abcd", "file:/srv/rec.json"):
        compile(colab_snippet("https://abc.ngrok-free.app", spec), "<colab>", "exec")


def test_colab_snippet_installs_the_workstations_wheel_first_as_valid_ipython():
    from IPython.core.inputtransformer2 import TransformerManager

    wheel = "https://abc.trycloudflare.com" + public_path()
    for spec, relay in (
        (None, None),
        (None, "https://ntfy.sh"),
        ("gist:0123abcd", None),
        ("https://ntfy.sh/t?auth=k", None),
    ):
        snippet = colab_snippet("https://abc.trycloudflare.com", spec, relay, wheel_url=wheel)
        assert snippet.splitlines()[0].startswith(f'%pip install -q "bridge[yolo] @ {wheel}"')
        compile(TransformerManager().transform_cell(snippet), "<colab>", "exec")  # `%pip` is IPython, as in Colab


def test_colab_snippet_with_the_relay_needs_only_the_token():
    plain = colab_snippet("https://abc.trycloudflare.com", None, "https://ntfy.sh")
    assert "BRIDGE_URL" not in plain and "BRIDGE_RELAY" not in plain and "bridge.connect()" in plain
    own = colab_snippet("https://abc.trycloudflare.com", None, "https://ntfy.example.org")
    assert 'os.environ["BRIDGE_RELAY"] = "https://ntfy.example.org"' in own and "BRIDGE_URL" not in own
    # A --publish target is still named (the relay is the fallback); no relay: the URL, as before.
    assert "BRIDGE_DISCOVERY" in colab_snippet("https://abc.trycloudflare.com", "gist:0123abcd", "https://ntfy.sh")
    assert "BRIDGE_URL" in colab_snippet("https://abc.trycloudflare.com", None, None)
    for snippet in (plain, own):
        compile(snippet, "<colab>", "exec")


@pytest.mark.parametrize(
    "spec",
    [
        "https://ntfy.sh/bridge-topic?auth=tk_topickey0123456789",
        "https://u:tk_topickey0123456789@relay.example:8443/bridge-topic",
    ],
)
def test_colab_snippet_drops_the_publish_urls_query_and_user_info(spec):
    snippet = colab_snippet("https://abc.ngrok-free.app", spec)
    assert "tk_topickey0123456789" not in snippet and "auth=" not in snippet
    assert "BRIDGE_DISCOVERY" in snippet and '/bridge-topic"' in snippet
    assert "left out" in snippet  # says the key was dropped, so a failing fetch is not a mystery
    compile(snippet, "<colab>", "exec")


def test_login_reads_dash_from_stdin_prints_no_part_of_it_and_help_warns_of_history():
    secret = "2abcDEFngrokToken_stdin_987654321"
    result = runner.invoke(app, ["login", "-"], input=secret + "\n")
    assert result.exit_code == 0, result.output
    assert secrets.get_secret(secrets.NGROK_AUTHTOKEN) == secret
    assert "Stored the ngrok authtoken." in result.output
    assert secret[-4:] not in result.output  # not even a masked tail
    empty = runner.invoke(app, ["login", "-"], input="")
    assert empty.exit_code == 1 and "stdin" in empty.stderr
    helped = runner.invoke(app, ["login", "--help"], env={"COLUMNS": "200"})
    assert "shell history" in helped.output and "'-' reads it from stdin" in helped.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tunnel", "ssh"], "--tunnel"),
        (["--publish", "ftp://x"], "--publish"),
        (["--workers", "0"], "--workers"),
        (["--tunnel", "cloudflared", "--domain", "x.ngrok.app"], "--domain"),
        (["--tunnel-budget-gb", "-1"], "--tunnel-budget-gb"),
        (["--port", "5005", "--entrance-port", "5005"], "--entrance-port"),
        (["--relay", "http://ntfy.example.org"], "--relay"),
        (["--relay-republish", "5"], "--relay-republish"),
    ],
)
def test_serve_refuses_bad_options_with_a_clear_error(args, message):
    result = runner.invoke(app, ["serve", *args], env={"COLUMNS": "200"})
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_help_texts_describe_the_options():
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--port",
        "--entrance-port",
        "--host",
        "--tunnel",
        "--domain",
        "--edge-auth",
        "--publish",
        "--backend-store-uri",
        "--artifacts-destination",
        "--workers",
        "--heartbeat-timeout",
        "--tunnel-budget-gb",
        "--tunnel-budget-requests",
        "--tunnel-grace",
        "BRIDGE_TUNNEL_GRACE",
        "--relay",
        "--no-relay",
        "--relay-republish",
        "cloudflared",
        "auto",
        "BRIDGE_CLOUDFLARED_PATH",
    ):
        assert option in result.output


@pytest.mark.integration  # starts a process of its own
def test_serve_start_failure_shows_mlflow_log_lines_and_exits_1():
    from bridge.serve.child import free_ports

    port, entrance = free_ports(2)  # the entrance's default (port + 1) may be someone else's: seen in CI
    result = runner.invoke(
        app,
        [
            "serve",
            "--tunnel",
            "none",
            "--port",
            str(port),
            "--entrance-port",
            str(entrance),
            "--backend-store-uri",
            "bogus:///nowhere",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 1, result.output
    assert "mlflow server exited with code 1" in result.stderr
    assert "unsupported URI" in result.stderr  # MLflow's own last log lines
    assert "Traceback (most recent call last)" not in result.stdout


def test_serve_refuses_a_taken_entrance_port_or_a_foreign_host_before_starting_mlflow():
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = runner.invoke(
            app, ["serve", "--tunnel", "none", "--port", "5999", "--entrance-port", str(port)], env={"COLUMNS": "200"}
        )
    assert result.exit_code == 1
    assert f"entrance port {port} on 127.0.0.1 is already in use" in result.stderr
    foreign = runner.invoke(app, ["serve", "--tunnel", "none", "--host", "192.0.2.55"], env={"COLUMNS": "200"})
    assert foreign.exit_code == 1
    assert "cannot listen on 192.0.2.55" in foreign.stderr
    assert not config.paths().mlflow_db.exists()  # MLflow was never started


def test_serve_without_cloudflared_fails_at_once_naming_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.delenv("BRIDGE_CLOUDFLARED_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    started = time.monotonic()
    result = runner.invoke(app, ["serve", "--tunnel", "cloudflared", "--port", "5999"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert time.monotonic() - started < 10  # not after MLflow's start-up
    assert "needs the cloudflared binary" in result.stderr
    assert "github.com/cloudflare/cloudflared/releases" in result.stderr and "BRIDGE_CLOUDFLARED_PATH" in result.stderr
    assert "Traceback" not in result.output
    assert not config.paths().mlflow_db.exists()  # MLflow was never started


@pytest.mark.parametrize("mode", ["cloudflared", "ngrok", "none"])
def test_start_up_output_shows_every_link_whole_at_80_columns_and_the_limits_of_the_tunnel(monkeypatch, mode):
    from bridge.cli import serve as serve_cli
    from bridge.serve.supervisor import ServeInfo

    out = io.StringIO()
    monkeypatch.setattr(serve_cli, "console", Console(file=out, width=80, color_system=None))
    public = {
        "cloudflared": "https://granite-velvet-umbrella-victorian.trycloudflare.com",
        "ngrok": "https://a-rather-long-reserved-domain-name-for-the-lab.ngrok-free.app",
        "none": None,
    }[mode]
    entrance = "http://127.0.0.1:50001"
    info = ServeInfo(
        mlflow_url="http://127.0.0.1:50000", entrance_url=entrance, public_url=public,
        record_url=public or entrance, published_to="file:/home/someone/.local/share/bridge/endpoint.json",
        publish_error=None, tunnel_mode=mode, tunnel_status="open" if public else "disabled",
    )  # fmt: skip
    serve_cli._print_ready(info, None)
    lines = out.getvalue().splitlines()
    mlflow_link = ui.ui_link(info.mlflow_url)
    for link in filter(None, (mlflow_link, entrance, public)):
        assert any(line.strip() == link for line in lines), (link, lines)
    text = out.getvalue()
    if mode == "cloudflared":
        assert "no monthly cap" in text and "20,000" not in text
    elif mode == "ngrok":
        assert "20,000 requests" in text
    else:
        assert "Tunnel limits" not in text

    # A change while serving: one line, then the new URL on its own line, then the updated cell.
    out.truncate(0)
    out.seek(0)
    new = "https://zenith-harbor-quartz-saddle.trycloudflare.com"
    serve_cli._print_event(ServeEvent(time.time(), f"tunnel reopened at a new URL {new} (the agent exited)", new), None)
    lines = out.getvalue().splitlines()
    assert new in lines[0] and lines[0].endswith("(the agent exited)")
    assert any(line.strip() == new for line in lines[1:])
    assert f'os.environ["BRIDGE_URL"] = "{new}"' in out.getvalue()
    compile("\n".join(lines[lines.index(next(x for x in lines if x.startswith("import os"))) :]), "<colab>", "exec")


def test_status_says_why_the_tunnel_is_not_open_and_what_comes_next():
    from bridge.cli.serve import _entrance_detail, _tunnel_detail

    reconnecting = {"status": "reconnecting", "public_url": "https://a-b-c-d.trycloudflare.com", "unready_s": 12.4}
    detail = _tunnel_detail({**reconnecting, "grace_s": 90.0})
    assert "https://a-b-c-d.trycloudflare.com" in detail and "reconnecting for 12 s (replaced after 90 s)" in detail
    down = {"status": "down", "public_url": None, "error": "429 Too Many Requests", "failures": 2}
    detail = _tunnel_detail({**down, "next_try_at": time.time() + 30})
    assert "no public URL" in detail and "429 Too Many Requests" in detail and "try 3 in 3" in detail
    entrance = {"url": "http://127.0.0.1:5001", "refused_logins": 12, "throttled": 2, "last_refused_at": time.time()}
    assert "refused logins 12 (then throttled 2), last 0m 0" in _entrance_detail(entrance)
