"""Fixtures for the stand-in ngrok agent (tests/support/fake_ngrok.py) that real pyngrok launches.

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
#: The authtoken the stand-in accepts in tests; not a real ngrok token.
FAKE_AUTHTOKEN = "fake-ngrok-authtoken-0123456789abcdef"


def write_agent_executable(folder: Path) -> Path:
    """An executable named `ngrok` that runs the stand-in with this interpreter (pyngrok execs `ngrok_path`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ngrok"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_AGENT}" "$@"\n')
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
        marker = f"FAKE_NGROK_STATE={self.state_file}".encode()
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
            if marker in environ.split(b"\0") and str(FAKE_AGENT).encode() in cmdline:
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
