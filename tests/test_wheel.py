"""The client wheel (bridge/serve/wheel.py): built once per version and source, served without the token by a real
Entrance at its one public path (GET/HEAD, throttled, ETag), with nothing secret inside; pip installs it by URL."""

from __future__ import annotations

import email.parser
import hashlib
import io
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import requests

import bridge
from bridge import config, secrets
from bridge.serve.entrance import AuthThrottle, Entrance
from bridge.serve.wheel import (
    ClientWheel,
    WheelError,
    build_requirements_met,
    public_path,
    repack_installed,
    source_checkout,
    wheel_name,
)
from tests.conftest import SHARED_WHEEL_CACHE
from tests.support.mlflow_server import free_port
from tests.support.serve import unique_client

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built() -> ClientWheel:
    """The suite's cached wheel of this checkout (built here if no `bridge serve` built it yet)."""
    wheel = ClientWheel(SHARED_WHEEL_CACHE)
    wheel.build()
    return wheel


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def _metadata(members: dict[str, bytes]):
    return email.parser.BytesParser().parsebytes(members[f"bridge-{bridge.__version__}.dist-info/METADATA"])


# --- the wheel itself ---------------------------------------------------------------------------------------------


def test_the_name_follows_pep_427_and_the_path_is_fixed():
    assert wheel_name("0.1.0") == "bridge-0.1.0-py3-none-any.whl"
    assert wheel_name("1.0.0-rc.1") == "bridge-1.0.0_rc.1-py3-none-any.whl"
    assert public_path("0.1.0") == "/bridge/client/bridge-0.1.0-py3-none-any.whl"
    assert source_checkout() == REPO


def test_the_wheel_is_this_bridge_with_its_client_dependencies(built):
    members = _members(built.data or b"")
    assert built.path is not None and built.path.read_bytes() == built.data
    assert built.path.name == wheel_name() and built.path.parent.name.startswith(bridge.__version__ + "-")
    assert {name.split("/")[0] for name in members} == {"bridge", f"bridge-{bridge.__version__}.dist-info"}
    assert members["bridge/__init__.py"] == (REPO / "bridge/__init__.py").read_bytes()
    assert "bridge/client/connect.py" in members and "bridge/yolo/callbacks.py" in members
    info = _metadata(members)
    assert info["Version"] == bridge.__version__
    requires = info.get_all("Requires-Dist")
    assert any(r.startswith("mlflow-skinny") for r in requires)  # the client: MLflow's client package only
    assert any(r.startswith("mlflow") and "extra == 'serve'" in r.replace('"', "'") for r in requires)
    assert (
        b"bridge.client.plugins.store:JournalStore"
        in members[f"bridge-{bridge.__version__}.dist-info/entry_points.txt"]
    )


def test_a_second_build_finds_the_cached_wheel(built, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached wheel")

    monkeypatch.setattr("bridge.serve.wheel.build_from_checkout", no_build)
    again = ClientWheel(SHARED_WHEEL_CACHE)
    assert again.build() == built.path
    assert again.etag == built.etag


@pytest.mark.integration  # runs `pip wheel`
def test_no_secret_and_no_local_path_goes_into_the_wheel(bridge_home, tmp_path):
    token = secrets.access_token(create=True)
    secrets.set_secret(secrets.NGROK_AUTHTOKEN, "2ngrokAuthtokenThatMustStayHome_0123456789")
    (bridge_home / "endpoint.json").write_text('{"signed": "record"}')
    wheel = ClientWheel(tmp_path / "cache")  # a build of its own, with the secrets in place
    wheel.start()
    assert wheel.wait(300) and wheel.error is None, wheel.error
    members = _members(wheel.data or b"")
    blob = b"\n".join([*(name.encode() for name in members), *members.values()])
    for needle in (
        token,
        "2ngrokAuthtokenThatMustStayHome_0123456789",
        str(bridge_home),
        str(config.paths().secrets_file),
        str(REPO),  # no build path of this machine
        str(Path.home()) + "/",
    ):
        assert needle.encode() not in blob, needle
    assert not [name for name in members if name.rsplit("/", 1)[-1] in ("secrets.json", "ngrok.yml", "endpoint.json")]
    assert not [name for name in members if name.endswith((".pyc", ".sqlite", ".db", ".log", ".json"))]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [wheel.path.parent.name]  # temp folders gone


def test_an_installed_bridge_is_repacked_into_the_same_wheel(built, tmp_path):
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(built.path) as archive:
        archive.extractall(site)  # what an installer does with a pure-Python wheel
    dist = metadata.PathDistribution(site / f"bridge-{bridge.__version__}.dist-info")
    repacked = _members(repack_installed(dist, tmp_path / wheel_name()).read_bytes())
    original = _members(built.data or b"")
    record = f"bridge-{bridge.__version__}.dist-info/RECORD"
    assert {k: v for k, v in repacked.items() if k != record} == {k: v for k, v in original.items() if k != record}
    assert sorted(repacked[record].decode().splitlines()) == sorted(original[record].decode().splitlines())


def test_pip_builds_without_the_index_only_when_the_build_backend_here_is_new_enough(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    for requires, met in (
        ('["setuptools>=1"]', True),
        ('["setuptools>=9999"]', False),  # e.g. a venv's old setuptools: pip fetches a new one, isolated
        ('["setuptools", "no-such-backend-xyz"]', False),
    ):
        pyproject.write_text(f"[build-system]\nrequires = {requires}\n")
        assert build_requirements_met(pyproject) is met, requires
    assert build_requirements_met(REPO / "pyproject.toml")  # the suite's own environment builds offline


@pytest.mark.integration  # runs `pip wheel`
def test_stopping_stops_a_running_build_and_leaves_no_wheel(tmp_path):
    import psutil

    wheel = ClientWheel(tmp_path / "cache")
    wheel.start()
    deadline = time.monotonic() + 60
    while wheel._build_process is None and not wheel.ready.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc = wheel._build_process
    assert proc is not None, "the build finished before it could be stopped"
    wheel.stop()
    assert wheel.ready.is_set() and wheel.data is None and proc.poll() is not None
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not list((tmp_path / "cache").rglob("*.whl"))


def test_a_failed_build_is_reported_not_raised(tmp_path, monkeypatch):
    def broken(root, out_dir, on_start=None):
        raise WheelError("pip wheel failed (1): no setuptools")

    monkeypatch.setattr("bridge.serve.wheel.build_from_checkout", broken)
    monkeypatch.setattr("bridge.serve.wheel.fingerprint", lambda root: "f" * 64)  # not in any cache
    wheel = ClientWheel(tmp_path / "cache")
    wheel.start()
    assert wheel.wait(30)
    assert wheel.data is None and wheel.error == "pip wheel failed (1): no setuptools"


# --- served by a real Entrance ------------------------------------------------------------------------------------


@pytest.fixture
def entrance_with(bridge_home):
    """A factory: an Entrance (MLflow's port dead: nothing is forwarded) serving the given wheel."""
    started: list[Entrance] = []

    def start(wheel: ClientWheel, **kwargs) -> Entrance:
        entrance = Entrance(free_port(), port=0, client_wheel=wheel, **kwargs)
        entrance.start()
        started.append(entrance)
        return entrance

    yield start
    for entrance in started:
        entrance.stop()


def test_the_wheel_and_its_index_are_served_without_the_token_and_nothing_else_is(built, entrance_with):
    entrance = entrance_with(built)
    url = entrance.url + public_path()
    client = unique_client()  # as through the tunnel: a client of its own
    resp = requests.get(url, headers=client, timeout=10)
    assert resp.status_code == 200
    assert resp.content == (built.path.read_bytes() if built.path else None)
    assert resp.headers["Content-Length"] == str(len(resp.content))
    assert resp.headers["ETag"] == built.etag and "Content-Encoding" not in resp.headers
    members = _members(resp.content)
    assert "bridge/__init__.py" in members and _metadata(members)["Version"] == bridge.__version__

    head = requests.head(url, headers=client, timeout=10)
    assert (head.status_code, head.content, head.headers["Content-Length"]) == (200, b"", str(len(resp.content)))
    again = requests.get(url, headers={**client, "If-None-Match": built.etag}, timeout=10)
    assert (again.status_code, again.content) == (304, b"")  # pip's cache revalidates: no second download

    for method in ("POST", "PUT", "DELETE", "PATCH"):
        refused = requests.request(method, url, data=b"x", headers=unique_client(), timeout=10)
        assert refused.status_code == 405 and refused.headers["Allow"] == "GET, HEAD", method
    other = requests.get(entrance.url + public_path("0.0.1"), headers=unique_client(), timeout=10)
    assert other.status_code == 404 and public_path() in other.text
    index = requests.get(entrance.url + "/bridge/client/", headers=unique_client(), timeout=10)
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/html")
    digest = hashlib.sha256(resp.content).hexdigest()
    assert f'<a href="{wheel_name()}#sha256={digest}">' in index.text  # a pip --find-links page, naming the wheel
    for path in (
        "/",
        "/health",
        "/api/2.0/mlflow/experiments/search",
        "/bridge/client",
        "/bridge/client/index.html",
        "/bridge/client/latest",
        "/bridge/client/../../api/2.0/mlflow/experiments/search.whl",
        "/bridge/client/x/" + wheel_name(),
        "/bridge/client/%2e%2e%2fsecrets.whl",
        "/bridge/clients/" + wheel_name(),
    ):
        locked = requests.get(entrance.url + path, headers=unique_client(), timeout=10)
        assert locked.status_code == 401, path
    assert entrance.wheel_downloads == 2  # the GET and the HEAD; the 304 sent nothing


def test_downloads_are_throttled_per_client(built, entrance_with):
    entrance = entrance_with(built, wheel_throttle=AuthThrottle(max_failures=3, window_s=60))
    url = entrance.url + public_path()
    greedy, other = unique_client(), unique_client()
    assert [requests.get(url, headers=greedy, timeout=10).status_code for _ in range(3)] == [200, 200, 200]
    throttled = requests.get(url, headers=greedy, timeout=10)
    assert throttled.status_code == 429 and 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert requests.head(url, headers=greedy, timeout=10).status_code == 429
    assert requests.get(url, headers=other, timeout=10).status_code == 200  # per client
    token = {"Authorization": f"Bearer {secrets.access_token()}", **greedy}
    assert requests.get(entrance.url + "/health", headers=token, timeout=10).status_code == 503  # logins unaffected
    assert requests.get(url, timeout=10).status_code == 200  # this machine itself is never throttled


def test_until_built_the_path_answers_503_with_retry_after_and_a_failure_500(tmp_path, entrance_with):
    building = ClientWheel(tmp_path / "cache")  # never started: still building
    entrance = entrance_with(building)
    resp = requests.get(entrance.url + public_path(), headers=unique_client(), timeout=10)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    building.error = "pip wheel failed (1): no setuptools"
    resp = requests.get(entrance.url + public_path(), headers=unique_client(), timeout=10)
    assert resp.status_code == 500 and "no setuptools" in resp.text


def test_bridge_serve_serves_its_wheel_and_pip_installs_it_by_url(bridge_serve, built, tmp_path):
    url = bridge_serve.entrance_url + public_path()
    for _ in range(600):  # the serve's build may still be running (503 until then)
        resp = requests.get(url, timeout=10)
        if resp.status_code != 503:
            break
        time.sleep(0.5)
    assert resp.status_code == 200 and resp.content == built.data
    target = tmp_path / "target"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(target),
         f"bridge[yolo] @ {url}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (target / "bridge/__init__.py").read_bytes() == (REPO / "bridge/__init__.py").read_bytes()
    direct_url = (target / f"bridge-{bridge.__version__}.dist-info/direct_url.json").read_text()
    assert url in direct_url
