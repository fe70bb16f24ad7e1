"""Shared test set-up: every test gets its own BRIDGE_HOME and a file-backed secret store.

Fixtures of each area live in tests/support/ and are loaded as plugins below.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from pathlib import Path

import psutil
import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
os.environ.setdefault("YOLO_OFFLINE", "1")
# No test reaches the public relay (https://ntfy.sh): tests of the relay point BRIDGE_RELAY at the stand-in
# (tests/support/ntfy_relay.py), and `bridge serve` children inherit this.
os.environ["BRIDGE_RELAY"] = "off"
# The CLI's rich consoles read COLUMNS when bridge.cli is imported and fix their width to it. pytest imports
# readline, and GNU readline writes terminfo's COLUMNS=80/LINES=24 into the C environment: invisible to this
# process's os.environ, but inherited by every child — xdist's workers included, whose consoles would then be
# fixed at 80 columns whatever COLUMNS a test passes. Without them, every process renders at rich's default
# (80 columns, as a user's piped output does) unless a test asks for a width.
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)
    os.unsetenv(_name)  # the C environment too: os.environ does not know readline's copy

pytest_plugins = [
    "tests.support.mlflow_server",
    "tests.support.client",
    "tests.support.flaky_proxy",
    "tests.support.byte_origin",
    "tests.support.tunnel",
    "tests.support.serve",
    "tests.support.yolo",
    "tests.support.uploads",
    "tests.support.ntfy_relay",
    "tests.support.browser",
    # Its autouse session fixture is set up before, so torn down after, the session's servers.
    "tests.support.leak_scan",
]


#: One cache of the client wheel for every `bridge serve` of the suite, session fixtures' included (so set here, not
#: per test), outside every BRIDGE_HOME: keyed by version and source hash and written whole or not at all, so each
#: serve finds it built instead of running `pip wheel` again. Per user and checkout: a cache drops the wheels of
#: other sources, and suites of two checkouts may run at once.
SHARED_WHEEL_CACHE = Path(tempfile.gettempdir()) / (
    f"bridge-test-client-wheel-{os.getuid()}-{hashlib.sha256(str(Path(__file__).resolve()).encode()).hexdigest()[:12]}"
)
os.environ["BRIDGE_CLIENT_WHEEL_DIR"] = str(SHARED_WHEEL_CACHE)


@pytest.fixture(autouse=True)
def mlflow_environment():
    """Every test starts and ends with the worker's MLFLOW_* environment as the session found it.

    `mlflow.set_tracking_uri` and `set_registry_uri` write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into
    os.environ, and `set_registry_uri("")` does not remove it (MLflow 3.17). A test that pointed the registry at
    its server left it there, and a later test's child process (started with `**os.environ`) sent its registry
    calls to that server instead of through bridge — MLflow's retries then hung it for minutes (CI, twice)."""
    before = {name: value for name, value in os.environ.items() if name.startswith("MLFLOW_")}
    yield
    for name in [n for n in os.environ if n.startswith("MLFLOW_") and n not in before]:
        del os.environ[name]
    os.environ.update(before)


@pytest.fixture(autouse=True)
def bridge_home(tmp_path, monkeypatch):
    """Isolate bridge's data, config and secrets per test; the null keyring selects the 0600 file store."""
    home = tmp_path / "bridge-home"
    home.mkdir()
    monkeypatch.setenv("BRIDGE_HOME", str(home))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.null.Keyring")
    monkeypatch.setenv("BRIDGE_RELAY", "off")
    for name in (
        "BRIDGE_URL",
        "BRIDGE_TOKEN",
        "BRIDGE_DISCOVERY",
        "BRIDGE_JOURNAL",
        "NGROK_AUTHTOKEN",
        "GITHUB_TOKEN",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_EXPERIMENT_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


# ---------------------------------------------------------------------------------------------- tiers
#
#   pytest -m "not integration and not slow"   the fast tier: no server, no subprocess, no training
#   pytest                                     everything (what CI runs)
#
# `integration` is given here to every test that requests one of the fixtures below (directly or through
# another fixture): each starts a real server or process. Tests that start processes without such a
# fixture carry the mark themselves (`pytestmark` or `@pytest.mark.integration`).

#: Fixtures that start a real `mlflow server`, `bridge serve`, a proxy in front of one, or a stand-in agent.
INTEGRATION_FIXTURES = frozenset(
    {
        "mlflow_server",
        "own_mlflow_server",
        "server_client",
        "flaky_proxy",
        "make_flaky_proxy",
        "bridge_serve",
        "own_bridge_serve",
        "fake_ngrok",
        "fake_cloudflared",
        "tunnel_agent",
        "differential_servers",
        "bridge_sweep",
        "byte_origin",
    }
)
#: Fixtures of the slow tier: a YOLO dataset means a training; a browser.
SLOW_FIXTURES = frozenset({"yolo_dataset", "bridge_sweep", "chromium_path"})


# ------------------------------------------------------------------------------------- parallel runs
#
# pyproject.toml runs the suite on pytest-xdist workers (`-n auto --dist loadgroup`; `-n 0` runs it in one
# process). Each worker has its own session fixtures, so the tests of a session fixture too costly to build
# twice live in one module, and that module runs on one worker.

#: Session fixtures built once per run, not per worker -> the one module whose tests may use them.
SHARED_SESSION_FIXTURES = {
    "bridge_sweep": "tests/test_yolo_sweep.py",  # three trainings
    "differential_servers": "tests/differential/test_differential.py",  # two MLflow servers and a proxy
}


def _tier(item: pytest.Item) -> int:
    """0 for slow tests, 1 for other integration tests, 2 for the rest: the order workers take them in."""
    if item.get_closest_marker("slow"):
        return 0
    return 1 if item.get_closest_marker("integration") else 2


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & INTEGRATION_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.integration)
        module = item.nodeid.split("::", 1)[0]
        for name in used.intersection(SHARED_SESSION_FIXTURES):
            if module != SHARED_SESSION_FIXTURES[name]:
                raise pytest.UsageError(
                    f"{item.nodeid} uses {name}: its tests belong in {SHARED_SESSION_FIXTURES[name]}, which runs "
                    "on one xdist worker (elsewhere a parallel run would build it once per worker)"
                )
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Longest first: a training started last would run alone at the end while the other worker idles;
        # the many short tests fill in at the end instead. (Stable: file order within a tier.)
        items.sort(key=_tier)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one and a half workers per core (3 on the 2-core CI machine), PYTEST_XDIST_AUTO_NUM_WORKERS
    overriding. Much of the suite waits — server starts, deadlines, a throttled link, another process's
    training — so a worker per core left the cores idle about a third of the time (a full run: 988 CPU
    seconds in 1,432 s on 2 cores)."""
    given = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if given:
        return int(given)
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores + cores // 2)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own scheduler choice
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`, grouping by SHARED_SESSION_FIXTURES' modules.

    xdist's loadgroup reads `xdist_group` marks through the test ids, which pytest 9.2 no longer lets a plugin
    change (pytest-xdist issue 1386): it would spread the groups. Here a test's module decides its group.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    grouped = set(SHARED_SESSION_FIXTURES.values())

    class SharedFixtureScheduling(LoadGroupScheduling):
        # Groups first (most tests first), then single tests in the workers' collection order (slow first).
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in grouped else super()._split_scope(nodeid)

    return SharedFixtureScheduling(config, log)


# ------------------------------------------------------------------------------------------ PostgreSQL

POSTGRES_ADDRESS = ("127.0.0.1", 5432)
_postgres_answer: list[str | None] = []


def _postgres_unreachable() -> str | None:
    """None when something accepts connections on 127.0.0.1:5432, else why not (asked once per session)."""
    if not _postgres_answer:
        try:
            socket.create_connection(POSTGRES_ADDRESS, timeout=2).close()
            _postgres_answer.append(None)
        except OSError as exc:
            _postgres_answer.append(f"nothing answers on {POSTGRES_ADDRESS[0]}:{POSTGRES_ADDRESS[1]} ({exc})")
    return _postgres_answer[0]


def pytest_runtest_setup(item):
    """`postgres` tests skip without PostgreSQL on this machine, except under CI (CI=…), where they fail."""
    if item.get_closest_marker("postgres") is None:
        return
    why = _postgres_unreachable()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required under CI: {why}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {why} (under CI=true this fails instead)")
