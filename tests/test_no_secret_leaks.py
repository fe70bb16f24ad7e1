"""No secret in logs, state, records or output: a real `bridge serve` at DEBUG, and the session-wide scanner."""

from __future__ import annotations

import os
import random
import re
import sqlite3
import string

import pytest
import requests

from bridge import secrets
from bridge.client.link.discovery import fetch_record
from bridge.errors import ConfigError, DiscoveryError
from bridge.serve.publisher import GistPublisher
from tests.support.leak_scan import files_with_tokens, planted
from tests.support.serve import unique_client

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def _leaks(root, *needles: str) -> list[str]:
    """Files under `root` (the secret store aside) holding any needle; names only."""
    return files_with_tokens(root, set(needles))


def test_serve_at_debug_never_writes_a_token_anywhere(own_bridge_serve):
    server = own_bridge_serve(env_extra={"BRIDGE_LOG_LEVEL": "DEBUG"})
    url = server.entrance_url + SEARCH
    old = server.token()
    wrong = secrets.new_token()  # what a client holding another instance's token would send
    client = unique_client()
    assert requests.get(url, auth=("bridge", old), headers=client, timeout=10).status_code == 200
    assert requests.get(url, headers={"Authorization": f"Bearer {old}", **client}, timeout=10).status_code == 200
    assert requests.get(url, auth=("bridge", wrong), headers=client, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {wrong}", **client}, timeout=10).status_code == 401

    rotated = server.cli("token", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new and new != old
    client = unique_client()
    # The rotation is seen at once: the old token is refused, the new one accepted.
    assert requests.get(url, auth=("bridge", old), headers=client, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {new}", **client}, timeout=10).status_code == 200
    status = server.cli("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert server.stop() == 0

    output = server.output()
    assert "DEBUG" in output  # the process really logged at DEBUG, so the check below means something
    assert server.log_file.is_file() and server.log_file.parent == server.home
    assert _leaks(server.home, old, new, wrong) == []
    for token in (old, new, wrong):
        assert token not in output
        assert token not in status.stdout + status.stderr + rotated.stderr


def test_scanner_finds_a_token_in_text_and_sqlite_but_not_in_the_secret_store(tmp_path):
    token = secrets.new_token()
    (tmp_path / "secrets.json").write_text(f'{{"access-token": "{token}"}}')
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "clean.log").write_text("nothing to see\n" * 100)
    assert _leaks(tmp_path, token) == []

    # Planted on purpose: the session-wide scan (tests/support/leak_scan.py) is told to skip these files.
    planted(tmp_path / "logs" / "serve.log").write_text(f"INFO Authorization: Bearer{token}xyz\n")
    db = sqlite3.connect(planted(tmp_path / "journal.sqlite"))
    db.execute("create table t (v text)")
    db.execute("insert into t values (?)", ("k=" + token,))
    db.commit()
    db.close()
    (tmp_path / "other.log").write_text("password: not-the-token!" * 10)
    odd = "odd token with spaces & symbols!"  # tokens set by hand need not be url-safe
    planted(tmp_path / "odd.txt").write_text(f"[{odd}]")
    found = _leaks(tmp_path, token, odd)
    assert found == ["journal.sqlite", "logs/serve.log", "odd.txt"]
    assert all(token not in name for name in found)


def test_scanner_finds_tokens_of_any_length_at_any_offset_inside_long_runs(tmp_path):
    # The scanner looks up only every few positions of a run: a token must be found wherever it starts,
    # whatever its length (16 characters and up), and a near miss must not count.
    rng = random.Random(5)
    alphabet = string.ascii_letters + string.digits + "_-"

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    tokens = [text(16), text(23), text(43)]  # not new_token(): the session-wide scan would find these files
    for i, token in enumerate(tokens):
        for offset in range(20):  # every position modulo the lookup step, at the start of a run and inside one
            (tmp_path / f"hit-{i}-{offset}.bin").write_bytes(
                os.urandom(50) + b" " + (text(offset) + token + text(rng.randrange(3)) + " x" * 4000).encode()
            )
        near = token[:-1] + ("A" if token[-1] != "A" else "B")
        (tmp_path / f"near-{i}.bin").write_text(text(300) + near + text(300) + " " + token[1:] + " " + token[:-1])
    found = files_with_tokens(tmp_path, set(tokens))
    assert found == sorted(f"hit-{i}-{offset}.bin" for i in range(3) for offset in range(20))


def test_scanner_allows_the_ngrok_authtoken_only_in_ngrok_config(tmp_path):
    ngrok_token = "2abcNgrokAuthtoken_0123456789abcdef"
    (tmp_path / "ngrok.yml").write_text(f"version: 2\nauthtoken: {ngrok_token}\n")
    assert files_with_tokens(tmp_path, set(), {ngrok_token}) == []
    planted(tmp_path / "agent.log").write_text(f"t=1 lvl=dbug msg=start authtoken={ngrok_token}\n")
    assert files_with_tokens(tmp_path, set(), {ngrok_token}) == ["agent.log"]
    access = secrets.new_token()
    planted(tmp_path / "ngrok.yml").write_text(f"authtoken: {ngrok_token}\nbasic_auth: [bridge:{access}]\n")
    assert files_with_tokens(tmp_path, {access}, {ngrok_token}) == ["agent.log", "ngrok.yml"]


def test_github_token_is_never_sent_over_plain_http_to_a_remote_api(monkeypatch):
    github_token = "ghp_leak_check_0123456789abcdef"
    monkeypatch.setenv("GITHUB_TOKEN", github_token)
    monkeypatch.setenv("BRIDGE_GITHUB_API", "http://github-proxy.example")
    # Discovery refuses before any request; so does the publisher.
    with pytest.raises(DiscoveryError, match=r"BRIDGE_GITHUB_API.*plain http is allowed only") as info:
        fetch_record("gist:abc123", timeout=1)
    assert github_token not in str(info.value)
    with pytest.raises(ConfigError, match="plain http is allowed only"):
        _ = GistPublisher("abc123").api_url  # the property refuses the URL


def test_the_scanners_runs_are_exactly_the_long_url_safe_runs_a_regular_expression_finds():
    # The scanner finds runs through a byte mask (fast); the plain definition is a regular expression.
    from tests.support.leak_scan import _Matcher

    rng = random.Random(11)
    for shortest in (16, 23, 43):
        matcher = _Matcher({"t" * shortest})
        plain = re.compile(rb"[A-Za-z0-9_\-]{%d,}" % shortest)
        for _ in range(200):
            # Runs of every length around `shortest`, at the start, the end and inside, between unsafe bytes.
            pieces = [
                bytes(rng.choice(b"aZ9_-") for _ in range(rng.choice((0, shortest - 1, shortest, 2 * shortest))))
                + bytes(rng.choice(b" \x00/.=\xff") for _ in range(rng.randrange(1, 3)))
                for _ in range(rng.randrange(1, 6))
            ]
            data = b"".join(pieces)[: rng.randrange(1, 400)]
            assert list(matcher._runs_in(data)) == [m.group() for m in plain.finditer(data)], data
