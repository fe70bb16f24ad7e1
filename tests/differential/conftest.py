"""Session servers for the differential harness: one oracle, one target behind a flaky proxy."""

from __future__ import annotations

import pytest

from tests.differential.harness import Harness
from tests.support.flaky_proxy import FlakyProxy
from tests.support.mlflow_server import PlainMlflowServer, free_port


def _server(root) -> PlainMlflowServer:
    server = PlainMlflowServer(root=root, port=free_port(), backend_store_uri=f"sqlite:///{root / 'mlflow.db'}")
    server.start()
    return server


@pytest.fixture(scope="session")
def differential_servers(tmp_path_factory):
    """(oracle, target, proxy to target): session-scoped; every program uses fresh experiments."""
    oracle = _server(tmp_path_factory.mktemp("dx-oracle"))
    target = _server(tmp_path_factory.mktemp("dx-target"))
    proxy = FlakyProxy("127.0.0.1", target.port, io_timeout=10.0)
    yield oracle, target, proxy
    proxy.close()
    target.stop()
    oracle.stop()


@pytest.fixture(scope="session")
def differential_entrance(differential_servers, tmp_path_factory):
    """Bridge's entrance in front of the target, and a flaky proxy in front of it (the file rules' way in)."""
    oracle, target, proxy = differential_servers
    gate = Harness(oracle, target, proxy, tmp_path_factory.mktemp("dx-unused"))
    gate.start_entrance(tmp_path_factory.mktemp("dx-staging"))
    yield gate.entrance, gate.entrance_proxy
    gate.stop_entrance()


@pytest.fixture
def harness(differential_servers, tmp_path) -> Harness:
    oracle, target, proxy = differential_servers
    proxy.set_mode("pass")
    return Harness(oracle, target, proxy, tmp_path / "programs")


@pytest.fixture
def file_harness(differential_servers, differential_entrance, tmp_path) -> Harness:
    """The harness with the file rules' way in: big files in parts through the entrance over a shaped link."""
    oracle, target, proxy = differential_servers
    entrance, entrance_proxy = differential_entrance
    entrance_proxy.set_mode("pass")
    return Harness(oracle, target, proxy, tmp_path / "programs", entrance=entrance, entrance_proxy=entrance_proxy)
