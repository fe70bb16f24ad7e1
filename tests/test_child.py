"""The library's `bridge serve` launcher (used by `bridge demo`, the tests and the benchmarks)."""

from __future__ import annotations

import psutil
import pytest
import requests

from bridge.errors import ServeError
from bridge.serve.child import ServeChild


def _processes_under(home) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            if str(home) in " ".join(proc.info["cmdline"] or []) or (proc.info["environ"] or {}).get(
                "BRIDGE_HOME"
            ) == str(home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.integration  # starts a process of its own
def test_a_child_that_exits_at_once_is_reported_with_its_own_message(tmp_path):
    child = ServeChild(tmp_path / "home", args=["--tunnel", "carrier-pigeon"])
    with pytest.raises(ServeError, match="exited with 1") as caught:
        child.start(timeout_s=60)
    assert "--tunnel 'carrier-pigeon' is not one of" in str(caught.value)


@pytest.mark.integration  # starts a process of its own
def test_start_waits_for_the_entrance_and_stop_leaves_nothing_of_the_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGE_TOKEN", "never-passed-on")  # the caller's settings stay out of the child
    child = ServeChild(tmp_path / "home", args=["--tunnel", "none"])
    child.start()
    try:
        assert requests.get(child.mlflow_url + "/health", timeout=10).status_code == 200
        assert requests.get(child.entrance_url + "/health", timeout=10).status_code == 401
        token = child.token()
        assert token != "never-passed-on"
        assert requests.get(child.entrance_url + "/health", auth=("bridge", token), timeout=10).status_code == 200
        assert len(_processes_under(child.home)) >= 2, "bridge serve and its MLflow"
    finally:
        code = child.stop()
    assert code == 0
    _, alive = psutil.wait_procs(_processes_under(child.home), timeout=10)
    assert alive == []
