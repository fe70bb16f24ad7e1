"""Bytes sent out through the tunnel by a cold load of the MLflow UI: entrance compression off vs on.

    python benchmarks/bench_ui_bytes.py [--quick]

ngrok's free plan caps what the workstation sends out (1 GB a month), and every response through the tunnel is
outbound. One stock `mlflow server` (SQLite, a few runs) behind bridge's entrance (in this process, so its own
counters give the exact bytes it sent) and the stand-in cloudflared edge (tests/support/fake_cloudflared.py).
Headless Chromium (Debian's) loads the experiment page cold (a new browser context each time, so nothing is
cached), logged in with the token, and waits until the network is idle. Three ways, interleaved in rounds:
  off    compression disabled: today's main, the anchor
  gzip   compression on, the browser told to offer only gzip/deflate (a browser without brotli)
  br     compression on, what Chromium offers over https by itself (gzip, deflate, br, zstd)
Every load goes to the public https name through a TLS relay in front of the stand-in edge (the real edge is https;
the page's own origin must be the tunnel's, or MLflow refuses its POSTs as cross-origin).
Reported: responses and bytes out per cold load (entrance's count, what ngrok would bill), time to network idle,
and the entrance process's CPU per request. Goal: compressed bytes <= 30 % of the anchor's.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from _common import MlflowServer, argument_parser, machine_summary, percentile, print_table, scratch_dir, verdict
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

REPO = Path(__file__).resolve().parents[1]
GOAL_BYTES_RATIO = 0.30
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def seed(mlflow_url: str) -> str:
    """An experiment with a few runs, params and metric histories, so the page issues its real API calls."""
    client = MlflowClient(mlflow_url)
    exp = client.create_experiment("ui-bytes", tags={"mlflow.experimentKind": "custom_model_development"})
    for r in range(5):
        run = client.create_run(exp, run_name=f"yolo-run-{r}")
        params = [Param(f"train.arg{i}", str(i * r)) for i in range(40)]
        metrics = [
            Metric(k, 1.0 / (e + 1 + r), int(time.time() * 1000), e)
            for e in range(50)
            for k in ("val/mAP50-95", "train/box_loss", "lr_pg0")
        ]
        client.log_batch(run.info.run_id, params=params, metrics=metrics)
        client.set_terminated(run.info.run_id)
    return exp


def cold_load(browser, url: str, token: str, accept_encoding: str | None = None) -> tuple[int, float, set[str]]:
    """Load `url` in a fresh context until the network is idle; (responses, seconds, content codings seen)."""
    extra = {"Accept-Encoding": accept_encoding} if accept_encoding else None
    context = browser.new_context(
        http_credentials={"username": "bridge", "password": token},
        ignore_https_errors=True,
        viewport={"width": 1400, "height": 900},
        extra_http_headers=extra,
    )
    page = context.new_page()
    seen: list[tuple[int, str]] = []
    codings: set[str] = set()

    def record(resp) -> None:
        seen.append((resp.status, resp.url))
        codings.add(resp.headers.get("content-encoding", "identity"))

    page.on("response", record)
    started = time.perf_counter()
    page.goto(url, wait_until="load", timeout=120_000)
    try:
        page.get_by_text("yolo-run-0").first.wait_for(timeout=120_000)  # the runs table rendered
    except Exception:
        page.screenshot(path="/tmp/ui-bytes-failed.png")
        raise RuntimeError(f"the runs table did not render; responses: {seen}") from None
    # Then until 2 s pass without a new response (the page keeps polling now and then; 20 s at most).
    quiet_since, count, give_up = time.perf_counter(), len(seen), time.perf_counter() + 20
    while time.perf_counter() - quiet_since < 2 and time.perf_counter() < give_up:
        page.wait_for_timeout(200)
        if len(seen) != count:
            quiet_since, count = time.perf_counter(), len(seen)
    elapsed = quiet_since - started
    context.close()
    # The UI probes a few optional endpoints that answer 404 on a plain server; refusals and errors must not occur.
    failed = [(status, url) for status, url in seen if status >= 400 and status != 404]
    if failed:
        raise RuntimeError(f"the UI load had failed responses: {failed}")
    return len(seen), elapsed, codings


def main() -> int:
    args = argument_parser(__doc__.splitlines()[0]).parse_args()
    rounds = 1 if args.quick else 3
    sys.path.insert(0, str(REPO))
    from playwright.sync_api import sync_playwright

    from bridge.serve.entrance import CLIENT_HEADERS, Entrance, TokenSource
    from bridge.serve.tunnel_cloudflared import CloudflaredConfig, CloudflaredTunnel
    from bridge.serve.usage import TunnelUsage
    from tests.support.tunnel import make_fake_cloudflared
    from tests.test_browser import TlsRelay, _self_signed

    work = scratch_dir("ui-bytes")
    server = MlflowServer(work / "mlflow", args=["--workers", "1"])
    server.start()
    server.wait_healthy()
    experiment = seed(server.url)
    token = "bench-token-" + "0123456789abcdef" * 2
    entrance = Entrance(
        server.port,
        port=0,
        tokens=TokenSource(load=lambda: token, revision_file=work / "rev"),
        client_header=CLIENT_HEADERS["cloudflared"],
    )
    entrance.start()
    agent = make_fake_cloudflared(work / "cloudflared")
    os.environ["FAKE_CLOUDFLARED_STATE"] = str(agent.state_file)
    tunnel = CloudflaredTunnel(f"http://127.0.0.1:{entrance.port}", CloudflaredConfig(str(agent.path)))
    public = tunnel.open()
    edge = agent.local_url(public)
    host = urlsplit(public).hostname
    relay = TlsRelay(edge, *_self_signed(work, host))
    relay.start()
    resolver = f"--host-resolver-rules=MAP {host} 127.0.0.1:{relay.port}, EXCLUDE 127.0.0.1"
    page_path = f"/#/experiments/{experiment}/runs"
    results: dict[str, list[tuple[int, int, float, float]]] = {"off": [], "gzip": [], "br": []}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, resolver])
            # One unmeasured load: MLflow's and Chromium's own first-time costs stay out of the numbers.
            cold_load(browser, public + page_path, token)
            for _ in range(rounds):
                for way in ("off", "gzip", "br"):
                    entrance.compress = way != "off"
                    entrance.static_cache = type(entrance.static_cache)()  # a cold cache each time: the worst case
                    entrance.usage = TunnelUsage(None)
                    cpu = time.process_time()
                    responses, seconds, codings = cold_load(
                        browser, public + page_path, token, "gzip, deflate" if way == "gzip" else None
                    )
                    print(f"{way}: {responses} responses, codings {sorted(codings)}", flush=True)
                    cpu = time.process_time() - cpu
                    usage = entrance.usage.snapshot()
                    results[way].append((usage["requests"], usage["bytes_out"], seconds, cpu))
            # Warm cache (the usual case after the first visitor): compressed once, served from memory.
            entrance.compress = True
            entrance.usage = TunnelUsage(None)
            cpu = time.process_time()
            _, warm_seconds, _ = cold_load(browser, public + page_path, token)
            warm_cpu = time.process_time() - cpu
            warm = entrance.usage.snapshot()
            browser.close()
    finally:
        relay.stop()
        tunnel.close()
        entrance.stop()
        server.stop()

    anchor_bytes = percentile([r[1] for r in results["off"]], 50)
    rows = []
    for way, samples in results.items():
        reqs = percentile([r[0] for r in samples], 50)
        sent = percentile([r[1] for r in samples], 50)
        secs = percentile([r[2] for r in samples], 50)
        cpu_ms = percentile([r[3] * 1000 / max(1, r[0]) for r in samples], 50)
        rows.append(
            (
                way,
                f"{reqs:.0f}",
                f"{sent / 1e6:.2f} MB",
                f"{sent / anchor_bytes:.0%}",
                f"{secs:.1f} s",
                f"{cpu_ms:.1f} ms",
                f"{1e9 / sent:,.0f}",
            )
        )
    rows.append(
        (
            "br, warm cache",
            str(warm["requests"]),
            f"{warm['bytes_out'] / 1e6:.2f} MB",
            f"{warm['bytes_out'] / anchor_bytes:.0%}",
            f"{warm_seconds:.1f} s",
            f"{warm_cpu * 1000 / max(1, warm['requests']):.1f} ms",
            f"{1e9 / warm['bytes_out']:,.0f}",
        )
    )
    print(f"\n{machine_summary()}; {rounds} round(s), median of each")
    print_table(
        "Cold load of the MLflow UI's experiment page through the entrance and the stand-in tunnel",
        ["way", "responses", "bytes out", "vs off", "to idle", "CPU/request (bench process)", "loads per 1 GB"],
        rows,
    )
    best = min(percentile([r[1] for r in results[w]], 50) for w in ("gzip", "br"))
    ok = (
        best <= GOAL_BYTES_RATIO * anchor_bytes
        and percentile([r[1] for r in results["gzip"]], 50) <= GOAL_BYTES_RATIO * anchor_bytes
    )
    print(f"\ngoal: compressed bytes <= {GOAL_BYTES_RATIO:.0%} of uncompressed (gzip and br): {verdict(ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
