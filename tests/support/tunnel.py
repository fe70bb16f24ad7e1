"""Fixtures for the stand-in tunnel agents: ngrok (tests/support/fake_ngrok.py, launched by real pyngrok) and
cloudflared (tests/support/fake_cloudflared.py, launched by bridge/serve/tunnel_cloudflared.py).

`tunnel_agent` is parametrized over both, so one tunnel test suite runs against each; `fake_ngrok` and
`fake_cloudflared` are the single kinds.

`fake_ngrok` gives each test its own agent executable and state file and sets `BRIDGE_NGROK_PATH`,
`FAKE_NGROK_STATE` and `NGROK_AUTHTOKEN` in the environment, so a `Tunnel` opened in the test, or a
`bridge serve` subprocess started from it, runs the stand-in. Public URLs (`https://x.ngrok-free.app`) cannot
resolve here: `fake_ngrok.local_url(public_url)` gives the forwarder's real `http://127.0.0.1:<port>` address.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

FAKE_AGENT = Path(__file__).with_name("fake_ngrok.py")
FAKE_CLOUDFLARED = Path(__file__).with_name("fake_cloudflared.py")
#: The authtoken the stand-in accepts in tests; not a real ngrok token.
FAKE_AUTHTOKEN = "fake-ngrok-authtoken-0123456789abcdef"


def write_agent_executable(folder: Path, name: str = "ngrok", script: Path = FAKE_AGENT) -> Path:
    """An executable named `ngrok` (or `name`) that runs the stand-in with this interpreter (bridge execs it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@dataclass
class FakeNgrok:
    """One test's stand-in agent: its executable, its state file, and helpers to reach its forwarders."""

    path: Path
    state_file: Path
    session_lock: Path
    authtoken: str = FAKE_AUTHTOKEN
    env: dict[str, str] = field(default_factory=dict)
    kind = "ngrok"
    script = FAKE_AGENT
    state_env = "FAKE_NGROK_STATE"
    #: The public URLs this kind of tunnel hands out.
    url_pattern = r"^https://([0-9a-f]{12}\.ngrok-free\.app|[a-z0-9.-]+)$"

    def forwards(self) -> dict[str, str]:
        """The current {public_url: local forwarder URL} map written by every agent of this test."""
        try:
            return json.loads(self.state_file.read_text() or "{}")
        except FileNotFoundError:
            return {}

    def local_url(self, public_url: str, timeout: float = 5.0) -> str:
        """The 127.0.0.1 address that stands for `public_url` (its path, if any, is kept)."""
        parts = urlsplit(public_url)
        origin = f"{parts.scheme}://{parts.netloc}"
        deadline = time.monotonic() + timeout
        while True:
            found = self.forwards().get(origin)
            if found:
                return found + parts.path.rstrip("/")
            if time.monotonic() > deadline:
                raise AssertionError(f"the stand-in agent has no forwarder for {origin}; it has {self.forwards()}")
            time.sleep(0.05)

    def agent_pids(self) -> list[int]:
        """Pids of live stand-in agents started with this test's environment (from any process tree)."""
        marker = f"{self.state_env}={self.state_file}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "status").read_text()
            except OSError:
                continue
            if "State:\tZ" in status:
                continue
            if marker in environ.split(b"\0") and str(self.script).encode() in cmdline:
                pids.append(int(entry.name))
        return pids


@pytest.fixture
def fake_ngrok(tmp_path, monkeypatch) -> FakeNgrok:
    """A stand-in ngrok agent for this test, selected through the environment; all its agents die at teardown."""
    folder = tmp_path / "fake-ngrok"
    agent = FakeNgrok(
        path=write_agent_executable(folder),
        state_file=folder / "forwards.json",
        session_lock=folder / "session.lock",
    )
    agent.env = {
        "BRIDGE_NGROK_PATH": str(agent.path),
        "FAKE_NGROK_STATE": str(agent.state_file),
        "NGROK_AUTHTOKEN": agent.authtoken,
        "FAKE_NGROK_AUTHTOKEN": agent.authtoken,  # the agent refuses any other token (ERR_NGROK_105)
    }
    for key, value in agent.env.items():
        monkeypatch.setenv(key, value)
    yield agent
    from pyngrok import process

    process.kill_process(str(agent.path))
    for pid in agent.agent_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class FakeCloudflared(FakeNgrok):
    """One test's stand-in cloudflared: the same helpers as `FakeNgrok`; a quick tunnel needs no authtoken."""

    kind = "cloudflared"
    script = FAKE_CLOUDFLARED
    state_env = "FAKE_CLOUDFLARED_STATE"
    url_pattern = r"^https://[a-z]+(-[a-z]+){3}\.trycloudflare\.com$"


def make_fake_cloudflared(folder: Path) -> FakeCloudflared:
    agent = FakeCloudflared(
        path=write_agent_executable(folder, "cloudflared", FAKE_CLOUDFLARED),
        state_file=folder / "forwards.json",
        session_lock=folder / "unused.lock",
        authtoken="",
    )
    agent.env = {"BRIDGE_CLOUDFLARED_PATH": str(agent.path), "FAKE_CLOUDFLARED_STATE": str(agent.state_file)}
    return agent


@pytest.fixture
def fake_cloudflared(tmp_path, monkeypatch) -> FakeCloudflared:
    """A stand-in cloudflared for this test, selected through the environment; every copy dies at teardown."""
    agent = make_fake_cloudflared(tmp_path / "fake-cloudflared")
    for key, value in agent.env.items():
        monkeypatch.setenv(key, value)
    yield agent
    for pid in agent.agent_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(params=["ngrok", "cloudflared"])
def tunnel_agent(request) -> FakeNgrok:
    """Each stand-in agent in turn: the shared tunnel suite runs once per tunnel kind."""
    return request.getfixturevalue(f"fake_{request.param}")


def open_tunnel(agent: FakeNgrok, target_url: str, **overrides):
    """A tunnel of `agent`'s kind to `target_url`, configured from the environment the fixture set."""
    if agent.kind == "cloudflared":
        from bridge.serve.tunnel_cloudflared import CloudflaredConfig, CloudflaredTunnel

        return CloudflaredTunnel(target_url, CloudflaredConfig(str(agent.path), **overrides))
    from bridge.serve.tunnel import Tunnel, TunnelConfig

    config = (
        TunnelConfig(agent.authtoken, ngrok_path=str(agent.path), **overrides)
        if overrides
        else TunnelConfig.from_environment()
    )
    return Tunnel(target_url, config)
