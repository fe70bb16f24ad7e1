"""The authenticated entrance: every MLflow route family locked, MLflow's own protections kept, brute force slowed."""

from __future__ import annotations

import base64
import gzip
import http.server
import importlib.util
import json
import os
import re
import threading
import time
import uuid
from typing import ClassVar

import brotli
import pytest
import requests

from bridge import secrets
from bridge.errors import ConfigError
from bridge.serve.compression import choose_encoding, is_compressible
from bridge.serve.entrance import CLIENT_HEADERS, AuthThrottle, Entrance, TokenSource, presented_token
from bridge.serve.usage import TunnelUsage, budget_warning
from tests.support.serve import unique_client

# --- pieces ----------------------------------------------------------------------------------------


def test_presented_token_reads_basic_password_and_bearer():
    basic = "Basic " + base64.b64encode(b"anyone:tok-123").decode()
    assert presented_token(basic) == b"tok-123"
    assert presented_token("Basic " + base64.b64encode(b"bridge:a:b").decode()) == b"a:b"
    assert presented_token("Bearer tok-123") == b"tok-123"
    assert presented_token("bearer   tok-123 ") == b"tok-123"
    for bad in (
        None,
        "",
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"nopassword").decode(),
        "Basic " + base64.b64encode(b"user:").decode(),
        "Bearer ",
        "Digest abc",
        "tok-123",
    ):
        assert presented_token(bad) is None, bad


def test_throttle_refuses_after_max_failures_and_recovers_after_the_window():
    now = [1000.0]
    throttle = AuthThrottle(max_failures=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after_s("a") is None
        throttle.failed("a")
    assert throttle.retry_after_s("a") == pytest.approx(60)
    assert throttle.retry_after_s("b") is None  # per client
    now[0] += 30
    assert throttle.retry_after_s("a") == pytest.approx(30)
    now[0] += 31
    assert throttle.retry_after_s("a") is None
    throttle.failed("c")
    throttle.succeeded("c")  # a success forgives earlier typos
    assert throttle._failures.get("c") is None
    with pytest.raises(ConfigError):
        AuthThrottle(max_failures=0)


def test_throttle_memory_is_bounded():
    throttle = AuthThrottle(max_failures=2, window_s=60, max_clients=50)
    for n in range(500):
        throttle.failed(f"10.0.{n // 250}.{n % 250}")
    assert len(throttle._failures) <= 50


def test_token_source_reloads_when_the_token_rotates(bridge_home):
    tokens = TokenSource()
    old = secrets.access_token()
    assert tokens.matches(old.encode())
    new = secrets.rotate_access_token()
    assert not tokens.matches(old.encode())
    assert tokens.matches(new.encode())
    assert tokens.revision == 1
    assert not tokens.matches(None)
    assert not tokens.matches(b"")


# --- every route family through a real `bridge serve` ------------------------------------------------


@pytest.fixture(scope="module")
def served(bridge_serve):
    """The session's `bridge serve`, its token, and one experiment + run with an artifact uploaded through it."""
    token = bridge_serve.token()
    auth = {"Authorization": f"Bearer {token}", **unique_client()}
    base = bridge_serve.entrance_url
    exp = requests.post(
        base + "/api/2.0/mlflow/experiments/create", json={"name": f"sec-{uuid.uuid4().hex}"}, headers=auth, timeout=10
    )
    assert exp.status_code == 200, exp.text
    exp_id = exp.json()["experiment_id"]
    run = requests.post(base + "/api/2.0/mlflow/runs/create", json={"experiment_id": exp_id}, headers=auth, timeout=10)
    run_id = run.json()["run"]["info"]["run_id"]
    payload = os.urandom(3 * 1024 * 1024 + 17)  # above the entrance's buffer limit: streamed both ways
    put = requests.put(
        f"{base}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/blob.bin",
        data=payload,
        headers=auth,
        timeout=30,
    )
    assert put.status_code == 200, put.text
    return {"server": bridge_serve, "token": token, "exp_id": exp_id, "run_id": run_id, "payload": payload}


def _routes(served) -> dict[str, tuple[str, str, dict]]:
    e, r = served["exp_id"], served["run_id"]
    return {
        "rest": ("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={e}", {}),
        "rest-post": ("POST", "/api/2.0/mlflow/runs/search", {"json": {"experiment_ids": [e]}}),
        "ajax": ("GET", f"/ajax-api/2.0/mlflow/runs/get?run_id={r}", {}),
        "artifact-download": ("GET", f"/api/2.0/mlflow-artifacts/artifacts/{e}/{r}/artifacts/blob.bin", {}),
        "artifact-upload": (
            "PUT",
            f"/api/2.0/mlflow-artifacts/artifacts/{e}/{r}/artifacts/up.txt",
            {"data": b"uploaded through the entrance"},
        ),
        "get-artifact": ("GET", f"/get-artifact?path=blob.bin&run_uuid={r}", {}),
        "graphql": (
            "POST",
            "/graphql",
            {
                "json": {
                    "query": f'{{ mlflowGetExperiment(input: {{experimentId: "{e}"}}) '
                    "{ experiment { experimentId } } }"
                }
            },
        ),
        "ui": ("GET", "/", {}),
        "health": ("GET", "/health", {}),
    }


def _check_ok(family: str, resp: requests.Response, served) -> None:
    assert resp.status_code == 200, (family, resp.status_code, resp.text[:300])
    if family == "rest":
        assert resp.json()["experiment"]["experiment_id"] == served["exp_id"]
    elif family == "rest-post":
        assert [run["info"]["run_id"] for run in resp.json()["runs"]] == [served["run_id"]]
    elif family == "ajax":
        assert resp.json()["run"]["info"]["run_id"] == served["run_id"]
    elif family in ("artifact-download", "get-artifact"):
        assert resp.content == served["payload"]
    elif family == "graphql":
        assert resp.json()["data"]["mlflowGetExperiment"]["experiment"]["experimentId"] == served["exp_id"]
    elif family == "ui":
        assert "text/html" in resp.headers["Content-Type"]
        assert "<script" in resp.text
    elif family == "health":
        assert resp.text.strip() == "OK"


FAMILIES = [
    "rest",
    "rest-post",
    "ajax",
    "artifact-download",
    "artifact-upload",
    "get-artifact",
    "graphql",
    "ui",
    "health",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_route_family_needs_the_token(served, family):
    method, path, kwargs = _routes(served)[family]
    url = served["server"].entrance_url + path
    client = unique_client()
    token = served["token"]

    missing = requests.request(method, url, headers=client, timeout=30, **kwargs)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith('Basic realm="bridge"')
    assert token not in missing.text

    wrong_basic = requests.request(method, url, headers=client, auth=("bridge", token[:-1] + "x"), timeout=30, **kwargs)
    assert wrong_basic.status_code == 401
    wrong_bearer = requests.request(
        method, url, headers={**client, "Authorization": "Bearer nope"}, timeout=30, **kwargs
    )
    assert wrong_bearer.status_code == 401

    basic = requests.request(method, url, headers=client, auth=("any-user", token), timeout=30, **kwargs)
    _check_ok(family, basic, served)
    bearer = requests.request(method, url, headers={**client, "Authorization": f"Bearer {token}"}, timeout=30, **kwargs)
    _check_ok(family, bearer, served)


@pytest.mark.parametrize("family", FAMILIES)
def test_local_mlflow_port_needs_no_login(served, family):
    method, path, kwargs = _routes(served)[family]
    resp = requests.request(method, served["server"].mlflow_url + path, timeout=30, **kwargs)
    _check_ok(family, resp, served)


def test_ui_static_asset_through_the_entrance(served):
    base = served["server"].entrance_url
    auth = ("u", served["token"])
    index = requests.get(base + "/", auth=auth, timeout=10).text
    asset = re.search(r'(?:src|href)="\.?/?(static-files/[^"]+\.(?:js|css))"', index)
    assert asset, index[:500]
    no_login = requests.get(f"{base}/{asset.group(1)}", headers=unique_client(), timeout=10)
    assert no_login.status_code == 401
    resp = requests.get(f"{base}/{asset.group(1)}", auth=auth, timeout=10)
    assert resp.status_code == 200
    assert len(resp.content) > 100
    assert resp.content == requests.get(f"{served['server'].mlflow_url}/{asset.group(1)}", timeout=10).content


def test_upload_through_the_entrance_lands_byte_for_byte(served):
    base = served["server"].entrance_url
    auth = {"Authorization": f"Bearer {served['token']}"}
    path = f"/api/2.0/mlflow-artifacts/artifacts/{served['exp_id']}/{served['run_id']}/artifacts/chunked.bin"
    payload = os.urandom(2 * 1024 * 1024)
    # A generator body goes out with chunked transfer encoding: no Content-Length for the entrance to trust.
    put = requests.put(
        base + path, data=(payload[i : i + 65536] for i in range(0, len(payload), 65536)), headers=auth, timeout=30
    )
    assert put.status_code == 200, put.text
    assert requests.get(served["server"].mlflow_url + path, timeout=30).content == payload
    head = requests.head(base + path, headers=auth, timeout=10)
    assert head.status_code == 200


# --- MLflow's Host and CORS protection, through the tunnel's headers -----------------------------------


def _tunnelled(served, origin: str | None = None) -> dict[str, str]:
    headers = {"Host": "abc123.ngrok-free.app", "X-Forwarded-Proto": "https", **unique_client()}
    if origin:
        headers["Origin"] = origin
    return headers


def test_tunnelled_host_is_accepted_through_the_entrance_only(served):
    server = served["server"]
    auth = ("u", served["token"])
    ui = requests.get(server.entrance_url + "/", headers=_tunnelled(served), auth=auth, timeout=10)
    assert ui.status_code == 200
    api = requests.get(
        server.entrance_url + f"/ajax-api/2.0/mlflow/experiments/get?experiment_id={served['exp_id']}",
        headers=_tunnelled(served),
        auth=auth,
        timeout=10,
    )
    assert api.status_code == 200
    # MLflow's own protection is still on: the same Host sent straight to it is refused.
    direct = requests.get(
        server.mlflow_url + "/ajax-api/2.0/mlflow/experiments/search",
        headers={"Host": "abc123.ngrok-free.app"},
        timeout=10,
    )
    assert direct.status_code == 403
    assert "Invalid Host header" in direct.text


def test_same_origin_ui_post_works_and_foreign_origins_stay_blocked(served):
    server = served["server"]
    auth = ("u", served["token"])
    url = server.entrance_url + "/ajax-api/2.0/mlflow/experiments/create"

    same = requests.post(
        url,
        json={"name": f"ui-{uuid.uuid4().hex}"},
        auth=auth,
        headers=_tunnelled(served, "https://abc123.ngrok-free.app"),
        timeout=10,
    )
    assert same.status_code == 200, same.text
    assert (
        requests.get(
            server.mlflow_url + "/api/2.0/mlflow/experiments/get",
            params={"experiment_id": same.json()["experiment_id"]},
            timeout=10,
        ).status_code
        == 200
    )

    for origin in (
        "https://evil.example",
        "http://abc123.ngrok-free.app",
        "http://localhost:3000",
        "http://127.0.0.1:9999",
    ):
        foreign = requests.post(
            url, json={"name": f"x-{uuid.uuid4().hex}"}, auth=auth, headers=_tunnelled(served, origin), timeout=10
        )
        assert foreign.status_code == 403, origin
        assert "Cross-origin request blocked" in foreign.text

    # Opened locally (no tunnel), the entrance's own origin is same-origin too.
    local = requests.post(
        url,
        json={"name": f"local-{uuid.uuid4().hex}"},
        auth=auth,
        headers={"Origin": server.entrance_url, **unique_client()},
        timeout=10,
    )
    assert local.status_code == 200, local.text


# --- brute force ------------------------------------------------------------------------------------


def test_brute_force_from_one_client_gets_429_others_unaffected(served):
    server = served["server"]
    attacker = unique_client()
    codes = []
    for n in range(30):
        resp = requests.get(server.entrance_url + "/health", auth=("admin", f"guess-{n}"), headers=attacker, timeout=10)
        codes.append(resp.status_code)
        if resp.status_code == 429:
            assert int(resp.headers["Retry-After"]) >= 1
    assert codes[:10] == [401] * 10
    assert codes[10:] == [429] * 20
    # While throttled even a right guess is not checked: that is what makes the throttle hold.
    assert (
        requests.get(
            server.entrance_url + "/health", auth=("u", served["token"]), headers=attacker, timeout=10
        ).status_code
        == 429
    )
    # Another client, with the token, is not affected.
    ok = requests.get(server.entrance_url + "/health", auth=("u", served["token"]), headers=unique_client(), timeout=10)
    assert ok.status_code == 200


def test_local_processes_are_not_throttled(served):
    """A process on this machine can reach MLflow's own port without login, so typos there never lock it out."""
    server = served["server"]
    codes = {
        requests.get(server.entrance_url + "/health", auth=("u", f"typo-{n}"), timeout=10).status_code
        for n in range(15)
    }
    assert codes == {401}
    assert requests.get(server.entrance_url + "/health", auth=("u", served["token"]), timeout=10).status_code == 200


# --- in-process entrance details ---------------------------------------------------------------------


def test_entrance_answers_503_while_mlflow_is_down_and_binds_its_port(bridge_home):
    from tests.support.mlflow_server import free_port

    dead_port = free_port()
    entrance = Entrance(dead_port, port=0)
    entrance.start()
    try:
        token = secrets.access_token()
        resp = requests.get(entrance.url + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "2"
        # The port is taken now: a second entrance on it fails with a clear error.
        with pytest.raises(Exception, match="could not listen"):
            Entrance(dead_port, port=entrance.port).start()
    finally:
        entrance.stop()


# --- the hot path: one kept-alive upstream connection, hop-by-hop headers dropped, the fast loop ------


class _RecordingUpstream(http.server.BaseHTTPRequestHandler):
    """Answers every request with a small JSON body over HTTP/1.1 keep-alive; records peers and headers."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[tuple[int, dict[str, str]]]] = []  # shared by every handler of the test's server

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).seen.append((self.client_address[1], dict(self.headers.items())))
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def test_entrance_reuses_one_upstream_connection_and_drops_hop_by_hop_headers(bridge_home):
    _RecordingUpstream.seen = []
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingUpstream)
    threading.Thread(target=upstream.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    entrance = Entrance(upstream.server_address[1], port=0)
    entrance.start()
    try:
        if importlib.util.find_spec("uvloop") is not None:
            assert type(entrance._loop).__module__.startswith("uvloop")
        auth = {"Authorization": f"Bearer {secrets.access_token()}"}
        for _ in range(3):  # three clients, one after another, each with its own connection
            with requests.Session() as session:
                for n in range(10):
                    resp = session.post(
                        entrance.url + "/api/2.0/mlflow/runs/log-metric", json={"n": n}, headers=auth, timeout=10
                    )
                    assert resp.status_code == 200 and resp.json() == {"ok": True}
        resp = requests.get(
            entrance.url + "/health",
            timeout=10,
            headers={**auth, "Connection": "keep-alive, X-Hop", "X-Hop": "1", "X-End": "2"},
        )
        assert resp.status_code == 200
    finally:
        entrance.stop()
        upstream.shutdown()
        upstream.server_close()
    peers = {peer for peer, _ in _RecordingUpstream.seen}
    assert len(_RecordingUpstream.seen) == 31
    assert len(peers) == 1, peers  # kept alive and reused, not a new connection per request
    last = {k.lower(): v for k, v in _RecordingUpstream.seen[-1][1].items()}
    assert last["host"] == f"127.0.0.1:{upstream.server_address[1]}"
    assert last["x-end"] == "2"
    assert "x-hop" not in last and "authorization" not in last


def _stub_request(peer: str, listening_on: str, forwarded_for: str = ""):
    from types import SimpleNamespace

    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return SimpleNamespace(
        remote=peer, headers=headers, transport=SimpleNamespace(get_extra_info=lambda key: (listening_on, 5001))
    )


def test_an_agent_on_this_machine_behind_a_lan_address_still_names_each_client(bridge_home):
    # With `--host <LAN address>` the ngrok agent connects from that address, not loopback: its
    # X-Forwarded-For must still decide who the client is, or one attacker would throttle everyone.
    entrance = Entrance(1, host="127.0.0.1", port=0)
    assert entrance.client_of(_stub_request("192.0.2.2", "192.0.2.2", "203.0.113.5")) == "203.0.113.5"
    assert entrance.client_of(_stub_request("192.0.2.2", "192.0.2.2")) is None  # a local tool, no agent
    # A stranger on the LAN cannot pick its own bucket with a forged header.
    assert entrance.client_of(_stub_request("198.51.100.7", "192.0.2.2", "203.0.113.5")) == "198.51.100.7"


def test_an_absolute_form_request_target_gets_400_not_500(served):
    import socket

    server = served["server"]
    host, port = server.entrance_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"GET http://elsewhere.example/x HTTP/1.1\r\nHost: elsewhere.example\r\n"
            b"Authorization: Bearer " + served["token"].encode() + b"\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]


# --- compression and the month's tunnel usage ----------------------------------------------------------------


@pytest.fixture
def local_entrance(served):
    """An in-process entrance in front of the session's MLflow, so a test can look at its cache and counters."""
    entrance = Entrance(served["server"].port, port=0, tokens=TokenSource(load=lambda: served["token"]))
    entrance.start()
    yield entrance
    entrance.stop()


def _raw(url: str, **kwargs) -> tuple[requests.Response, bytes]:
    """A response and its body exactly as sent (requests would otherwise decode it)."""
    resp = requests.get(url, stream=True, timeout=30, **kwargs)
    return resp, resp.raw.read(decode_content=False)


def _largest_script(served) -> str:
    index = requests.get(served["server"].mlflow_url + "/", timeout=10).text
    scripts = re.findall(r'(?:src|href)="\.?/?(static-files/[^"]+\.js)"', index)
    assert scripts, index[:500]
    sizes = {s: len(requests.get(f"{served['server'].mlflow_url}/{s}", timeout=30).content) for s in scripts}
    return max(sizes, key=sizes.get)


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_ui_files_are_compressed_once_cached_and_keep_mlflows_cache_headers(served, local_entrance, coding):
    auth = ("u", served["token"])
    script = _largest_script(served)
    original = requests.get(
        f"{served['server'].mlflow_url}/{script}", headers={"Accept-Encoding": "identity"}, timeout=30
    )
    resp, sent = _raw(f"{local_entrance.url}/{script}", auth=auth, headers={"Accept-Encoding": f"{coding}, deflate"})
    assert resp.status_code == 200
    assert resp.headers["Content-Encoding"] == coding
    assert "Accept-Encoding" in resp.headers["Vary"]
    decoded = gzip.decompress(sent) if coding == "gzip" else brotli.decompress(sent)
    assert decoded == original.content
    assert len(sent) <= 0.30 * len(original.content), (len(sent), len(original.content))
    for header in ("Cache-Control", "Last-Modified", "Content-Type"):
        assert resp.headers.get(header) == original.headers.get(header), header
    if original.headers.get("ETag"):
        assert resp.headers["ETag"] == "W/" + original.headers["ETag"].removeprefix("W/")
        # The browser's revalidation with the weak validator still gets MLflow's 304.
        again = requests.get(
            f"{local_entrance.url}/{script}",
            auth=auth,
            timeout=30,
            headers={"Accept-Encoding": coding, "If-None-Match": resp.headers["ETag"]},
        )
        assert again.status_code == 304
    assert local_entrance.static_cache.misses == 1 and local_entrance.static_cache.hits == 0
    _resp2, sent2 = _raw(f"{local_entrance.url}/{script}", auth=auth, headers={"Accept-Encoding": coding})
    assert sent2 == sent and local_entrance.static_cache.hits == 1  # compressed once, then served from memory


def test_json_is_compressed_on_the_fly_and_other_bodies_pass_unchanged(served, local_entrance):
    auth = {"Authorization": f"Bearer {served['token']}"}
    base, mlflow = local_entrance.url, served["server"].mlflow_url
    run_id = served["run_id"]
    params = [{"key": f"p{i:03d}", "value": f"value-{i}-" + "x" * 20} for i in range(100)]
    logged = requests.post(
        f"{mlflow}/api/2.0/mlflow/runs/log-batch", json={"run_id": run_id, "params": params}, timeout=10
    )
    assert logged.status_code == 200 or "already logged" in logged.text
    path = f"/api/2.0/mlflow/runs/get?run_id={run_id}"
    plain = requests.get(mlflow + path, headers={"Accept-Encoding": "identity"}, timeout=10).content
    assert len(plain) > 4000
    resp, sent = _raw(base + path, headers={**auth, "Accept-Encoding": "gzip"})
    assert resp.headers["Content-Encoding"] == "gzip" and gzip.decompress(sent) == plain
    assert len(sent) < len(plain) / 3
    # No Accept-Encoding: MLflow's bytes as they are.
    resp, sent = _raw(base + path, headers={**auth, "Accept-Encoding": "identity"})
    assert "Content-Encoding" not in resp.headers and sent == plain
    # Already-compressed and opaque types, and tiny bodies, are never compressed.
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(5000)
    put = requests.put(
        f"{base}/api/2.0/mlflow-artifacts/artifacts/{served['exp_id']}/{run_id}/artifacts/plot.png",
        data=png,
        headers=auth,
        timeout=10,
    )
    assert put.status_code == 200
    for path, body in (
        (f"/get-artifact?path=plot.png&run_uuid={run_id}", png),
        (f"/get-artifact?path=blob.bin&run_uuid={run_id}", served["payload"]),
        ("/health", b"OK"),
    ):
        resp, sent = _raw(base + path, headers={**auth, "Accept-Encoding": "gzip, br"})
        assert resp.status_code == 200 and "Content-Encoding" not in resp.headers, path
        assert sent == body, path


def test_requests_through_the_tunnel_are_counted_for_the_month(served, local_entrance, tmp_path):
    auth = {"Authorization": f"Bearer {served['token']}", "Accept-Encoding": "gzip"}
    local_entrance.usage = TunnelUsage(tmp_path / "usage.json")
    base = local_entrance.url
    # A process on this machine talking to the entrance directly is not tunnel traffic.
    requests.get(base + "/health", headers=auth, timeout=10)
    assert local_entrance.usage.snapshot()["requests"] == 0
    # The tunnel's agent names the client (X-Forwarded-For here): each answer counts, refused ones too.
    tunnel = {"X-Forwarded-For": "203.0.113.50"}
    sizes = []
    for _ in range(3):
        _resp, sent = _raw(base + f"/api/2.0/mlflow/runs/get?run_id={served['run_id']}", headers={**auth, **tunnel})
        sizes.append(len(sent))
    refused = requests.get(base + "/health", headers={**tunnel, "Accept-Encoding": "gzip"}, timeout=10)
    assert refused.status_code == 401
    usage = local_entrance.usage.snapshot()
    assert usage["requests"] == 4
    assert sum(sizes) + len(refused.content) < usage["bytes_out"] < sum(sizes) + len(refused.content) + 4 * 600
    local_entrance.usage.save()
    saved = json.loads((tmp_path / "usage.json").read_text())
    assert saved == {"month": time.strftime("%Y-%m"), "requests": 4, "bytes_out": usage["bytes_out"]}
    again = TunnelUsage.load(tmp_path / "usage.json")
    assert again.snapshot() == saved  # carried over a restart within the month


def test_usage_starts_again_in_a_new_month_and_warns_near_the_budget(tmp_path):
    now = [time.mktime((2026, 11, 30, 23, 0, 0, 0, 0, -1))]
    usage = TunnelUsage(tmp_path / "u.json", clock=lambda: now[0])
    usage.add(850_000_000, requests=100)
    assert usage.snapshot()["month"] == "2026-11"
    warning = budget_warning(usage.snapshot(), bytes_budget=1e9, requests_budget=20_000)
    assert warning and "85%" in warning and "1.0 GB" in warning
    assert budget_warning(usage.snapshot(), bytes_budget=2e9, requests_budget=20_000) is None
    # ngrok's caps are not a quick tunnel's: it has no monthly cap, so no warning quotes them.
    assert budget_warning(usage.snapshot(), bytes_budget=1e9, requests_budget=20_000, tunnel="cloudflared") is None
    assert "ngrok's free plan" in budget_warning(usage.snapshot(), 1e9, 20_000, tunnel="ngrok")
    usage.save()
    now[0] += 2 * 3600  # December
    assert usage.snapshot() == {"month": "2026-12", "requests": 0, "bytes_out": 0}
    assert TunnelUsage.load(tmp_path / "u.json", clock=lambda: now[0]).snapshot()["requests"] == 0
    usage.add(10)
    assert usage.snapshot() == {"month": "2026-12", "requests": 1, "bytes_out": 10}


def test_accept_encoding_negotiation():
    assert choose_encoding("gzip, deflate, br") == "br"
    assert choose_encoding("gzip;q=1.0, br;q=0") == "gzip"
    assert choose_encoding("identity") is None and choose_encoding(None) is None
    assert choose_encoding("*") == "br"
    assert choose_encoding("br;q=0, gzip;q=0, *;q=1") is None
    assert is_compressible("application/json; charset=utf-8") and is_compressible("text/html")
    assert not is_compressible("image/png") and not is_compressible("application/octet-stream")
    assert not is_compressible("font/woff2") and not is_compressible(None)


def test_the_throttle_reads_the_client_from_the_tunnel_in_use(bridge_home):
    # Cloudflare names the client in Cf-Connecting-Ip; a forged X-Forwarded-For entry changes nothing then.
    entrance = Entrance(1, host="127.0.0.1", port=0, client_header=CLIENT_HEADERS["cloudflared"])
    stub = _stub_request("127.0.0.1", "127.0.0.1", "203.0.113.5")
    stub.headers["Cf-Connecting-Ip"] = "198.51.100.23"
    assert entrance.client_of(stub) == "198.51.100.23"
    assert entrance.client_of(_stub_request("127.0.0.1", "127.0.0.1", "203.0.113.5")) is None  # a local tool
    ngrok = Entrance(1, host="127.0.0.1", port=0)
    assert ngrok.client_of(stub) == "203.0.113.5"


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_a_large_text_body_streams_through_compressed(served, local_entrance, coding):
    auth = {"Authorization": f"Bearer {served['token']}"}
    text = "".join(
        f"epoch {i}: box_loss 0.{i % 97:02d} cls_loss 0.{i % 89:02d} mAP50-95 0.{i % 83:02d}\n" for i in range(12_000)
    ).encode()
    assert len(text) > 512 * 1024  # above the entrance's buffer limit: streamed, not read whole
    base, run_id = local_entrance.url, served["run_id"]
    put = requests.put(
        f"{base}/api/2.0/mlflow-artifacts/artifacts/{served['exp_id']}/{run_id}/artifacts/console.txt",
        data=text,
        headers=auth,
        timeout=30,
    )
    assert put.status_code == 200
    resp, sent = _raw(
        f"{base}/get-artifact?path=console.txt&run_uuid={run_id}", headers={**auth, "Accept-Encoding": coding}
    )
    assert resp.status_code == 200 and resp.headers["Content-Encoding"] == coding
    assert (gzip.decompress(sent) if coding == "gzip" else brotli.decompress(sent)) == text
    assert len(sent) < len(text) / 4
