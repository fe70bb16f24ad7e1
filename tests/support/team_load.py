"""The team load: many YOLO-like training clients logging at once, a browser-like reader, and what landed.

Used by tests/test_team_load.py (a short version in CI) and benchmarks/bench_team_load.py (the numbers):

    S3Server        moto's S3-compatible server (`moto_server`, from `moto[server]`; MinIO is not installable here)
    fresh_database  a PostgreSQL database of its own on 127.0.0.1:5432, dropped afterwards
    run_load()      `clients` client *processes* (python -m tests.support.team_load), each one run: params, one
                    log_batch per epoch (every metric of the epoch plus the heartbeat tag, as bridge's sender
                    does), artifacts uploaded through the server, FINISHED at the end; optionally one client that
                    goes silent mid-run (for the reaper); a reader thread polling the UI's runs/search meanwhile
    delivered()     counts read back from PostgreSQL and the S3 bucket, per run

Every request has a timeout and every wait a deadline; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

HEARTBEAT_TAG = "bridge.heartbeat"  # bridge.config.HEARTBEAT_TAG; kept literal so a client process imports nothing
METRIC_KEYS = (
    "train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss", "val/cls_loss", "val/dfl_loss",
    "val/precision", "val/recall", "val/mAP50", "val/mAP50-95", "lr_pg0", "lr_pg1", "lr_pg2", "epoch_time_s",
)  # fmt: skip
REQUEST_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Plan:
    """One client's training run."""

    epochs: int = 50
    epoch_s: float = 1.0  # seconds between epochs
    params: int = 40
    artifact_bytes: int = 2 * 1024 * 1024  # each weights upload
    upload_epochs: tuple[int, ...] = (25, 50)  # after these epochs: weights/last.pt (+ best.pt) and results.csv
    silent_after: int | None = None  # go silent (no more beats, never FINISHED) after this many epochs


@dataclass
class ClientResult:
    run_id: str = ""
    name: str = ""
    batch_latencies_s: list[float] = field(default_factory=list)
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    uploaded: dict[str, int] = field(default_factory=dict)
    finished: bool = False


# --- one client process ------------------------------------------------------------------------------------------


def client_main(
    base: str, token: str | None, experiment_id: str, name: str, plan: Plan, start_at: float
) -> ClientResult:
    """One training client: what bridge's sender sends for a YOLO run, straight over HTTP."""
    result = ClientResult(name=name)
    session = requests.Session()
    if token:
        session.auth = ("bridge", token)
    api = base + "/api/2.0/mlflow"

    def call(method: str, url: str, what: str, **kwargs) -> requests.Response | None:
        result.requests += 1
        try:
            resp = session.request(method, url, timeout=REQUEST_TIMEOUT_S, **kwargs)
        except requests.RequestException as exc:
            result.errors.append(f"{what}: {type(exc).__name__}: {exc}"[:300])
            return None
        if resp.status_code != 200:
            result.errors.append(f"{what}: HTTP {resp.status_code}: {resp.text[:200]}")
            return None
        return resp

    time.sleep(max(0.0, start_at - time.time()))
    now = time.time()
    created = call(
        "POST",
        api + "/runs/create",
        "create",
        json={
            "experiment_id": experiment_id,
            "run_name": name,
            "start_time": int(now * 1000),
            "tags": [
                {"key": HEARTBEAT_TAG, "value": f"{now:.3f}"},
                {"key": "bridge.run_key", "value": uuid.uuid4().hex},
            ],
        },
    )
    if created is None:
        return result
    run_id = created.json()["run"]["info"]["run_id"]
    result.run_id = run_id
    params = [{"key": f"train.arg{i:02d}", "value": f"value-{i}"} for i in range(plan.params)]
    call("POST", api + "/runs/log-batch", "params", json={"run_id": run_id, "params": params})
    started = time.monotonic()
    for epoch in range(1, plan.epochs + 1):
        time.sleep(max(0.0, started + epoch * plan.epoch_s - time.monotonic()))
        now = time.time()
        metrics = [
            {"key": key, "value": round(1.0 / (epoch + i), 6), "timestamp": int(now * 1000), "step": epoch}
            for i, key in enumerate(METRIC_KEYS)
        ]
        body = {"run_id": run_id, "metrics": metrics, "tags": [{"key": HEARTBEAT_TAG, "value": f"{now:.3f}"}]}
        sent = time.perf_counter()
        if call("POST", api + "/runs/log-batch", f"log_batch epoch {epoch}", json=body) is not None:
            result.batch_latencies_s.append(time.perf_counter() - sent)
        if epoch in plan.upload_epochs:
            weights = os.urandom(plan.artifact_bytes)
            csv = (
                "epoch,"
                + ",".join(METRIC_KEYS)
                + "\n"
                + "\n".join(f"{e}," + ",".join("0.5" for _ in METRIC_KEYS) for e in range(1, epoch + 1))
            ).encode()
            for path, data in (("weights/last.pt", weights), ("weights/best.pt", weights), ("results.csv", csv)):
                url = f"{base}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/{path}"
                if call("PUT", url, f"upload {path}", data=data) is not None:
                    result.uploaded[path] = len(data)
        if plan.silent_after is not None and epoch >= plan.silent_after:
            return result  # the Colab runtime vanished: no more beats, never FINISHED
    done = call(
        "POST",
        api + "/runs/update",
        "finish",
        json={"run_id": run_id, "status": "FINISHED", "end_time": int(time.time() * 1000)},
    )
    result.finished = done is not None
    return result


def _client_entry() -> None:
    args = json.loads(sys.argv[1])
    plan = Plan(**{**args["plan"], "upload_epochs": tuple(args["plan"]["upload_epochs"])})
    result = client_main(args["base"], args["token"], args["experiment_id"], args["name"], plan, args["start_at"])
    print("RESULT " + json.dumps(asdict(result)), flush=True)


# --- the load ------------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    clients: list[ClientResult]
    wall_s: float
    reader_latencies_s: list[float]
    reader_errors: list[str]
    peak_rss_bytes: int
    client_exit_codes: list[int]

    @property
    def errors(self) -> list[str]:
        found = [e for c in self.clients for e in c.errors] + self.reader_errors
        found += [f"client process exited {code}" for code in self.client_exit_codes if code != 0]
        return found

    @property
    def batch_latencies_s(self) -> list[float]:
        return [x for c in self.clients for x in c.batch_latencies_s]

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self.clients) + len(self.reader_latencies_s)


def _reader(
    base: str,
    token: str | None,
    experiment_id: str,
    stop: threading.Event,
    latencies: list[float],
    errors: list[str],
    period_s: float = 1.0,
) -> None:
    """What an open MLflow UI does meanwhile: the runs table's search, every `period_s`."""
    session = requests.Session()
    if token:
        session.auth = ("bridge", token)
    body = {
        "experiment_ids": [experiment_id],
        "max_results": 100,
        "order_by": ["attributes.start_time DESC"],
        "run_view_type": "ACTIVE_ONLY",
    }
    while not stop.wait(period_s):
        sent = time.perf_counter()
        try:
            resp = session.post(
                base + "/ajax-api/2.0/mlflow/runs/search",
                json=body,
                timeout=REQUEST_TIMEOUT_S,
                headers={"Accept-Encoding": "gzip, br"},
            )
        except requests.RequestException as exc:
            errors.append(f"reader: {type(exc).__name__}")
            continue
        if resp.status_code != 200:
            errors.append(f"reader: HTTP {resp.status_code}: {resp.text[:200]}")
            continue
        latencies.append(time.perf_counter() - sent)


class RssSampler:
    """The peak summed RSS of some process trees while the load runs (sampled every 0.5 s)."""

    def __init__(self, root_pids: list[int], exclude: tuple[str, ...] = ()) -> None:
        self.root_pids = root_pids
        self.exclude = exclude
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        import psutil

        total = 0
        seen: set[int] = set()
        for pid in self.root_pids:
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                try:
                    if proc.pid in seen or any(word in " ".join(proc.cmdline()) for word in self.exclude):
                        continue
                    seen.add(proc.pid)
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> RssSampler:
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def run_load(
    base: str,
    token: str | None,
    experiment_id: str,
    clients: int,
    plan: Plan,
    *,
    silent: Plan | None = None,
    rss_pids: list[int] | None = None,
    rss_exclude: tuple[str, ...] = (),
    timeout_s: float = 600.0,
) -> LoadReport:
    """`clients` client processes at once (plus one `silent` one if given) and the reader; their results."""
    start_at = time.time() + 3.0 + 0.15 * clients  # every process started and waiting before the first request
    specs = [(f"client-{n:02d}", plan) for n in range(clients)]
    if silent is not None:
        specs.append(("client-silent", silent))
    procs = []
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name, p in specs:
        args = {
            "base": base,
            "token": token,
            "experiment_id": experiment_id,
            "name": name,
            "plan": asdict(p),
            "start_at": start_at,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.support.team_load", json.dumps(args)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=REPO,
            )
        )
    stop = threading.Event()
    latencies: list[float] = []
    reader_errors: list[str] = []
    reader = threading.Thread(
        target=_reader, args=(base, token, experiment_id, stop, latencies, reader_errors), daemon=True
    )
    results: list[ClientResult] = []
    codes: list[int] = []
    sampler = RssSampler(rss_pids or [], rss_exclude)
    with sampler:
        time.sleep(max(0.0, start_at - time.time()))
        began = time.perf_counter()
        reader.start()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            codes.append(proc.returncode)
            line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                results.append(ClientResult(errors=[f"client gave no result: {err.strip()[-300:]}"]))
            else:
                results.append(ClientResult(**json.loads(line[len("RESULT ") :])))
        wall = time.perf_counter() - began
        stop.set()
        reader.join(REQUEST_TIMEOUT_S)
    return LoadReport(results, wall, latencies, reader_errors, sampler.peak, codes)


# --- what landed ----------------------------------------------------------------------------------------------------


def delivered(database_uri: str, s3: S3Server, prefix: str, report: LoadReport) -> dict[str, dict]:
    """Per run id: metric points, params and status in PostgreSQL, artifact bytes in the bucket under `prefix`."""
    import psycopg2

    ids = [c.run_id for c in report.clients if c.run_id]
    with contextlib.closing(psycopg2.connect(database_uri, connect_timeout=10)) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_uuid, count(*) FROM metrics WHERE run_uuid = ANY(%s) GROUP BY run_uuid", (ids,))
        points = dict(cur.fetchall())
        cur.execute("SELECT run_uuid, count(*) FROM params WHERE run_uuid = ANY(%s) GROUP BY run_uuid", (ids,))
        params = dict(cur.fetchall())
        cur.execute("SELECT run_uuid, status FROM runs WHERE run_uuid = ANY(%s)", (ids,))
        status = dict(cur.fetchall())
    objects = s3.sizes(prefix)
    found = {}
    for run_id in ids:
        arts = {
            key.split(f"/{run_id}/artifacts/", 1)[1]: size
            for key, size in objects.items()
            if f"/{run_id}/artifacts/" in key
        }
        found[run_id] = {
            "points": points.get(run_id, 0),
            "params": params.get(run_id, 0),
            "status": status.get(run_id),
            "artifacts": arts,
        }
    return found


def expected_points(plan: Plan) -> int:
    epochs = plan.epochs if plan.silent_after is None else min(plan.epochs, plan.silent_after)
    return epochs * len(METRIC_KEYS)


def summary(report: LoadReport) -> dict[str, float]:
    lat = sorted(report.batch_latencies_s)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))] * 1000 if lat else float("nan")

    return {
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "max_ms": pct(100),
        "reader_p50_ms": statistics.median(report.reader_latencies_s) * 1000 if report.reader_latencies_s else 0,
        "req_per_s": report.requests / report.wall_s,
        "wall_s": report.wall_s,
    }


# --- the services ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """moto's S3-compatible server on 127.0.0.1 (in-memory), and the environment MLflow's S3 client needs."""

    ACCESS_KEY = "bridge-load-test"
    SECRET_KEY = "bridge-load-test-secret"

    def __init__(self, log_file: Path) -> None:
        self.port = _free_port()
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout_s: float = 60.0) -> None:
        moto = Path(sys.executable).with_name("moto_server")
        command = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self.proc.returncode}: {self.log_file.read_text()[-500:]}"
                )
            try:
                requests.get(self.url, timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError(f"moto_server did not answer on {self.url} within {timeout_s:.0f} s")

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def sizes(self, prefix: str) -> dict[str, int]:
        """{key: size} of every object under `s3://bucket/path` prefix."""
        bucket, _, path = prefix.removeprefix("s3://").partition("/")
        found: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=path):
            for item in page.get("Contents", []):
                found[item["Key"]] = item["Size"]
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def fresh_database(prefix: str = "bridge_load") -> Iterator[str]:
    """A PostgreSQL database of its own on 127.0.0.1:5432 (trust auth), dropped afterwards."""
    import psycopg2

    errors = []
    for user in ("postgres", "root"):
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=5432, user=user, dbname="test", connect_timeout=5)
            break
        except psycopg2.OperationalError as exc:
            errors.append(f"{user}: {exc}")
    else:
        raise RuntimeError(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {errors}")
    conn.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def prime_database(uri: str, timeout_s: float = 600.0) -> None:
    """Create MLflow's schema in `uri` once, in a process of its own, before a server is timed against it.

    A fresh database takes MLflow's whole migration chain at the first server start: on a loaded 2-core
    machine that alone can outlast a server's start deadline, and it is not what a load test measures.
    """
    code = (
        "import sys, tempfile; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; "
        "SqlAlchemyStore(sys.argv[1], tempfile.gettempdir())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, uri],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"could not create MLflow's schema in {uri}: {done.stderr[-800:]}")


if __name__ == "__main__":
    _client_entry()
