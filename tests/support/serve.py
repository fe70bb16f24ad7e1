"""A real `bridge serve` subprocess for tests: its own BRIDGE_HOME, free ports, `--tunnel none` unless told.

`bridge_serve` is shared by the whole session (tests that only send requests); `own_bridge_serve` starts
one per test for tests that kill, rotate or stop things.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from bridge.serve.child import ServeChild, free_ports

_client_ids = itertools.count(1)


def unique_client() -> dict[str, str]:
    """An X-Forwarded-For header naming a client of its own, so one test's failed logins never throttle another's."""
    n = next(_client_ids)
    return {"X-Forwarded-For": f"198.51.100.{n % 250 + 1}, 203.0.{n // 250 % 250}.{n % 250 + 1}"}


class BridgeServe(ServeChild):
    """The library's `bridge serve` child, logging at INFO (tests read its milestones)."""

    def env(self) -> dict[str, str]:
        return {"BRIDGE_LOG_LEVEL": "INFO", "COLUMNS": "200", **super().env()}


def new_bridge_serve(root: Path, *args: str, env_extra: dict[str, str] | None = None) -> BridgeServe:
    port, entrance = free_ports(2)
    return BridgeServe(
        home=root, port=port, entrance_port=entrance, args=["--tunnel", "none", *args], env_extra=env_extra or {}
    )


@pytest.fixture(scope="session")
def bridge_serve(tmp_path_factory) -> BridgeServe:
    """One `bridge serve --tunnel none` for the session; tests must not kill or rotate anything in it."""
    server = new_bridge_serve(tmp_path_factory.mktemp("bridge-serve") / "home")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_bridge_serve(tmp_path):
    """A factory for per-test `bridge serve` processes (stopped at the end of the test)."""
    started: list[BridgeServe] = []

    def start(*args: str, env_extra: dict[str, str] | None = None, name: str = "serve") -> BridgeServe:
        server = new_bridge_serve(tmp_path / f"{name}-{len(started)}", *args, env_extra=env_extra)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()
