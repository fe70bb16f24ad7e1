"""The workstation commands: `bridge token`, `bridge login`, `bridge url`, `bridge status`, `bridge serve` errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bridge import config, secrets
from bridge.cli import app
from bridge.cli.serve import colab_snippet
from bridge.record import make_record
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
    for spec in (None, "gist:0123abcd", "https://ntfy.sh/topic?auth=tk_key"):
        snippet = colab_snippet("https://abc.trycloudflare.com", spec, wheel_url=wheel)
        assert snippet.splitlines()[0].startswith(f'%pip install -q "bridge[yolo] @ {wheel}"')
        compile(TransformerManager().transform_cell(snippet), "<colab>", "exec")  # `%pip` is IPython, as in Colab


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
