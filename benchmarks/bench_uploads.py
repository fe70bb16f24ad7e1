"""Files through a Cloudflare quick tunnel: a flapping link, upload throughput, a training with big weights.

One `bridge serve --tunnel cloudflared` runs with the test suite's stand-in `cloudflared` on its PATH (its edge
refuses request bodies over 100 MB with 413, answers 524 after 100 s, 429 beyond 200 in flight: Cloudflare's
quick-tunnel limits; in the CI size it takes at most 40 MB, so the smaller files too must go in parts). Each
measured client is a process of its own calling `bridge.connect()`; where a scenario shapes the link, the test
suite's flaky proxy sits between that client and the edge. Everything is read back from the server: metric
points from MLflow's SQLite file, files as MLflow serves them (sha256), the progress of an upload from the
entrance's staging folder (`<BRIDGE_HOME>/uploads/<id>/info.json`, polled every 0.05-0.1 s).

Scenarios (`--scenario`, default all); sizes full / `--quick` / `--size ci` (the test suite's):

  flapping    a 1 GiB file (96 MiB, 64 MiB) logged with `mlflow.log_artifact`, the link throttled to 8 MiB/s
              upward and cut every 10 s for 1.5 s (quick: up 3 s / down 1.5 s; ci: 2 s / 1 s); meanwhile the
              same process logs one metric point every 0.2 s (its value: the time it was logged). Goals: the
              file arrives within 3x the time the flapping link needs for it (+15 s) and byte-identical; the
              bytes that went over the link (the proxy's count, all requests) / the file's size <= 1.25; every
              point logged while the file travels is on the server within 5 s of the link-up after it was
              logged (of its logging, when the link was up). Shown too: the client's own count of file bytes
              sent (it includes what sat in loopback socket buffers in front of the throttle at each cut), the
              seconds the link was up while no byte of the file came in, and the file lane's longest wait.
  throughput  a 500 MB file (128 MB, 64 MB): `mlflow.log_artifact` → placed on the server (the call and its
              spool copy, the parts through edge and entrance, the server's sha256 check and its placing in
              MLflow; the client idle meanwhile) vs one PUT of the same file straight to MLflow's artifact
              proxy (the anchor), rotated, `--repeat` tries each (2, quick 1). For information: the same upload
              to the entrance without the tunnel, and through the tunnel with the client waiting in
              `conn.flush()`; CPU seconds per process; the status of the whole file in one PUT through the edge
              (413). No throttle, no proxy. Every try starts settled: the earlier tries' files deleted, the
              disk synced (`_settle` says why). Goal: throughput ratio bridge / anchor >= 0.8.
  yolo        a YOLOv8n training (2 epochs, CPU, generated dataset, imgsz 64; quick/ci 32) whose checkpoints
              are padded to ~250 MB (~40 MB, ~16 MB) by a uint8 buffer on the EMA model, through the tunnel with
              the link throttled to 16 MiB/s (4 MiB/s); the client then waits in `conn.flush()`. Goals: every
              epoch's metrics on the server within 5 s of the epoch's end and before the weights finished
              uploading, with a weights upload still in flight once all were there; the run FINISHED with
              best.pt and last.pt byte-identical to the local files.

    python benchmarks/bench_uploads.py [--quick | --size ci] [--scenario flapping|throughput|yolo|all] [--repeat N]

Timings move with the machine's load: each table prints the load average at its start and end. The last line
is `RESULT {json}` with every figure and verdict; tests/test_bench_uploads.py runs the CI size in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from _common import (
    REPO,
    BridgeServe,
    StandInCloudflared,
    argument_parser,
    child_env,
    expect_line,
    file_tail,
    machine_summary,
    print_table,
    read_result,
    report_result,
    scratch_dir,
    tell_child,
    verdict,
)

MiB = 2**20
ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
SCENARIOS = ("flapping", "throughput", "yolo")

#: Per size: (file bytes, link up s, link down s) for `flapping`; file bytes for `throughput`; (padding bytes,
#: up bytes/s, image size) for `yolo`.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"flapping": (1024 * MiB, 10.0, 1.5), "throughput": 500 * 10**6, "yolo": (244 * 10**6, 16 * MiB, 64)},
    "quick": {"flapping": (96 * MiB, 3.0, 1.5), "throughput": 128 * 10**6, "yolo": (34 * 10**6, 4 * MiB, 32)},
    "ci": {"flapping": (64 * MiB, 2.0, 1.0), "throughput": 64 * 10**6, "yolo": (10 * 10**6, 4 * MiB, 32)},
}
#: The CI size's files are smaller than Cloudflare's 100 MB: its edge takes at most 40 MB, so they too must go in parts.
EDGE_LIMITS = {"ci": {"FAKE_CLOUDFLARED_MAX_BODY": str(40 * 10**6)}}
FLAP_UP_BYTES_PER_S = 8 * MiB
TICK_S = 0.2

GOAL_SENT_RATIO = 1.25
GOAL_LAG_S = 5.0
GOAL_THROUGHPUT_RATIO = 0.8
GOAL_EPOCH_LAG_S = 5.0


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def make_file(path: Path, size: int) -> str:
    """A file of `size` random bytes; its sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            block = os.urandom(min(left, 16 * MiB))
            fh.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ child side


def _connect(url: str, journal: str, experiment: str):
    import bridge

    return bridge.connect(url=url, token=os.environ["BENCH_TOKEN"], experiment=experiment, journal=journal)


def _child_flapping(url: str, journal: str, experiment: str, file: str) -> dict:
    """Log the file, then one point every TICK_S (its value: the time it was logged) until told to stop."""
    import mlflow

    conn = _connect(url, journal, experiment)
    mlflow.start_run(run_name="flapping")
    conn.flush(120)  # the run exists on the server before the link starts to flap
    print("READY", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    mlflow.log_artifact(file)
    print(f"LOGGED {started} {time.monotonic()}", flush=True)
    step = 0
    attempts, longest = 0, 0.0
    while True:
        mlflow.log_metric("tick", time.monotonic(), step=step)
        step += 1
        wait = conn.journal.uploads.waits().get("files")  # what `bridge queue` shows: why the file lane waits
        if wait is not None:
            attempts = max(attempts, wait.attempts)
            if wait.next_try is not None:  # seen every TICK_S: the longest wait it had planned, near enough
                longest = max(longest, wait.next_try - time.time())
        if select.select([sys.stdin], [], [], TICK_S)[0]:
            word = sys.stdin.readline().strip()
            break
    mlflow.end_run()
    left = conn.flush(300 if word == "STOP" else 5)
    result = {
        "points": step,
        "left": left,
        "upload_bytes_sent": conn.link.upload_bytes_sent,
        "file_lane_attempts": attempts,
        "file_lane_wait_s": longest,
    }
    conn.close()
    return result


def _child_throughput(url: str, journal: str, experiment: str, file: str, wait: str) -> dict:
    """`log_artifact`, then wait: "idle" until the parent saw the file placed on the server and says STOP, or
    "flush" in `conn.flush()` until it returns 0 (as a script ending its run does)."""
    import mlflow

    conn = _connect(url, journal, experiment)
    mlflow.start_run(run_name="throughput")
    conn.flush(120)
    print("READY", flush=True)
    sys.stdin.readline()
    cpu = _cpu_s()
    rounds = conn.sender.rounds
    started = time.monotonic()
    mlflow.log_artifact(file)
    logged = time.monotonic()
    print(f"LOGGED {started} {logged}", flush=True)
    left = None
    if wait == "flush":
        left = conn.flush(900)
    else:
        sys.stdin.readline()
    done = time.monotonic()
    cpu = _cpu_s() - cpu
    rounds = conn.sender.rounds - rounds
    mlflow.end_run()
    end_left = conn.flush(120)
    result = {
        "started": started,
        "call_s": logged - started,
        "total_s": done - started,
        "left": end_left if left is None else left,
        "upload_bytes_sent": conn.link.upload_bytes_sent,
        "cpu_s": cpu,
        "record_rounds": rounds,
    }
    conn.close()
    return result


def _cpu_s() -> float:
    """CPU seconds of this whole process so far (every thread)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child_yolo(url: str, journal: str, experiment: str, work: str, pad_bytes: int, imgsz: int) -> dict:
    """Train 2 tiny epochs with bridge.yolo, the checkpoints padded by `pad_bytes`; wait for delivery."""
    import importlib

    importlib.import_module("tests.support.yolo")  # first: it sets an offline YOLO_CONFIG_DIR with the fonts
    import numpy as np
    import torch
    from ultralytics import YOLO

    import bridge.yolo
    from bridge.yolo.dataset import make_synthetic_dataset

    root = Path(work)
    data = make_synthetic_dataset(root / "data", n_train=16, n_val=8, imgsz=64)
    conn = _connect(url, journal, experiment)
    model = YOLO("yolov8n.yaml")
    printed: set[int] = set()

    def pad(trainer) -> None:
        # Checkpoints hold the EMA model (half precision); a uint8 buffer stays as it is and is saved with it.
        padding = torch.from_numpy(np.frombuffer(os.urandom(pad_bytes), dtype=np.uint8).copy())
        trainer.ema.ema.register_buffer("bench_padding", padding, persistent=True)

    def epoch_end(trainer) -> None:
        epoch = trainer.epoch + 1
        if epoch <= trainer.epochs and epoch not in printed:  # final_eval() calls it again, for best.pt
            printed.add(epoch)
            print(f"EPOCH {epoch} {time.monotonic()}", flush=True)

    model.add_callback("on_pretrain_routine_end", pad)
    model.add_callback("on_fit_epoch_end", epoch_end)
    started = time.monotonic()
    print(f"TRAIN {started}", flush=True)
    tracker = bridge.yolo.train(
        model,
        data=str(data),
        experiment=experiment,
        run_name="padded",
        epochs=2,
        imgsz=imgsz,
        batch=4,
        nbs=4,
        workers=0,
        device="cpu",
        project=str(root / "runs"),
        name="padded",
        exist_ok=True,
        plots=False,
        amp=False,
        verbose=False,
    )
    trained = time.monotonic()
    print(f"TRAINED {trained}", flush=True)
    left = conn.flush(900)
    weights = Path(tracker.save_dir) / "weights"
    result = {
        "train_s": trained - started,
        "left": left,
        "delivered_after_s": time.monotonic() - trained,
        "upload_bytes_sent": conn.link.upload_bytes_sent,
        "files": {
            name: {"size": (weights / name).stat().st_size, "sha256": sha256_of(weights / name)}
            for name in ("best.pt", "last.pt")
        },
    }
    conn.close()
    return result


# ------------------------------------------------------------------------------- the server, read back


@dataclass
class ServerView:
    """What the `bridge serve` child holds, read from its files and its MLflow port (never through bridge)."""

    serve: BridgeServe

    @property
    def db(self) -> Path:
        return self.serve.home / "mlflow.db"

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # no such table yet (MLflow still creating its schema)
            return []
        finally:
            conn.close()

    def run(self, experiment: str) -> tuple[str, str, str] | None:
        """(run id, status, artifact URI) of the experiment's (only) run."""
        rows = self._query(
            "select r.run_uuid, r.status, r.artifact_uri from runs r join experiments e "
            "on r.experiment_id = e.experiment_id where e.name = ? and r.lifecycle_stage = 'active'",
            (experiment,),
        )
        return rows[0] if rows else None

    def points(self, experiment: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of metric `key` in the experiment."""
        return self._query(
            "select m.step, m.value from metrics m join runs r on m.run_uuid = r.run_uuid "
            "join experiments e on r.experiment_id = e.experiment_id where e.name = ? and m.key = ?",
            (experiment, key),
        )

    def uploads(self) -> dict[str, dict]:
        """Every upload in the entrance's staging folder: {id: {path, length, state, received}}."""
        found = {}
        with contextlib.suppress(FileNotFoundError):
            for folder in (self.serve.home / "uploads").iterdir():
                try:
                    info = json.loads((folder / "info.json").read_text())
                except (OSError, ValueError):
                    continue
                try:
                    info["received"] = (folder / "data").stat().st_size
                except OSError:
                    info["received"] = info["length"] if info.get("state") in ("placing", "placed") else 0
                found[folder.name] = info
        return found

    def served_sha256(self, artifact_uri: str, path: str) -> str | None:
        """sha256 of the artifact as MLflow serves it (its artifact proxy on loopback), None when absent."""
        where = artifact_uri.split(":", 1)[1].lstrip("/") + "/" + path
        digest = hashlib.sha256()
        with requests.get(f"{self.serve.mlflow_url}{ARTIFACTS_API}/{where}", stream=True, timeout=60) as answer:
            if answer.status_code != 200:
                return None
            for chunk in answer.iter_content(4 * MiB):
                digest.update(chunk)
        return digest.hexdigest()

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the entrance (the `bridge serve` process), the edge and MLflow."""
        assert self.serve.proc is not None
        root = psutil.Process(self.serve.proc.pid)
        out = {"entrance": 0.0, "edge": 0.0, "mlflow": 0.0}
        for proc in [root, *root.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                what = "entrance" if proc.pid == root.pid else "mlflow"
                if "fake_cloudflared" in " ".join(proc.cmdline()):
                    what = "edge"
            except psutil.NoSuchProcess:
                continue
            out[what] += times.user + times.system
        return out

    def cut_parts(self) -> int:
        """Parts the entrance saw cut (its INFO log)."""
        return self.serve.output().count("part cut after")


@dataclass
class Watch:
    """A thread polling the server every `every_s`: first-seen times of metric steps, upload states over time."""

    view: ServerView
    experiment: str
    key: str
    every_s: float = 0.1
    seen: dict[int, tuple[float, float]] = field(default_factory=dict)  # step -> (first seen, value)
    upload_first: dict[str, float] = field(default_factory=dict)  # upload id -> first seen
    upload_states: dict[str, dict[str, float]] = field(default_factory=dict)  # id -> {state: first seen}
    uploads: dict[str, dict] = field(default_factory=dict)  # id -> latest info
    samples: list = field(default_factory=list)  # (time, {id: (state, bytes received)})

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.every_s)

    def poll(self) -> None:
        now = time.monotonic()
        for step, value in self.view.points(self.experiment, self.key):
            self.seen.setdefault(step, (now, value))
        current = self.view.uploads()
        for upload_id, info in current.items():
            self.upload_first.setdefault(upload_id, now)
            self.upload_states.setdefault(upload_id, {}).setdefault(info.get("state", "?"), now)
            self.uploads[upload_id] = info
        self.samples.append((now, {k: (v.get("state"), v["received"]) for k, v in current.items()}))

    def placed_at(self, path_end: str) -> float | None:
        """When an upload of a path ending in `path_end` was first seen placed."""
        times = [
            states["placed"]
            for upload_id, states in self.upload_states.items()
            if "placed" in states and self.uploads[upload_id]["path"].endswith(path_end)
        ]
        return min(times) if times else None

    def receiving(self, at: float, path_part: str = "") -> bool:
        """Whether, at the sample nearest after `at`, an upload of a path containing `path_part` was not placed."""
        for when, states in self.samples:
            if when >= at:
                return any(
                    state in ("receiving", "placing") and path_part in self.uploads[upload_id]["path"]
                    for upload_id, (state, _) in states.items()
                )
        return False


# ------------------------------------------------------------------------------------------ set-up


@dataclass
class Stand:
    """One `bridge serve --tunnel cloudflared` with the stand-in on its PATH: its token and the edge's address."""

    work: Path
    size: str = "full"
    serve: BridgeServe | None = None
    token: str = ""
    edge_url: str = ""

    def __enter__(self) -> Stand:
        cloudflared = StandInCloudflared(self.work / "cloudflared", limits=EDGE_LIMITS.get(self.size, {}))
        self.serve = BridgeServe(
            self.work / "home",
            args=["--tunnel", "cloudflared"],
            env_extra={**cloudflared.env, "BRIDGE_LOG_LEVEL": "INFO"},
        )
        self.token = self.serve.token()
        self.serve.launch()
        state = self.serve.wait_ready(
            lambda s: (st := s.published()) and (st.get("tunnel") or {}).get("public_url") and st
        )
        self.edge_url = cloudflared.local_url(state["tunnel"]["public_url"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.serve is not None:
            self.serve.stop()

    @property
    def view(self) -> ServerView:
        assert self.serve is not None
        return ServerView(self.serve)

    def child(self, role: str, url: str, name: str, *extra: str) -> tuple[list[str], dict[str, str], Path]:
        """The command, environment and stderr log of a measured client process."""
        home = self.work / f"client-{name}"
        home.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--child", role, "--url", url, "--journal", str(home / "journal.sqlite"),
               "--experiment", name, *extra]  # fmt: skip
        return cmd, child_env(home, BENCH_TOKEN=self.token), home / "stderr.log"


@contextlib.contextmanager
def measured_child(cmd: list[str], env: dict[str, str], stderr: Path):
    """A child with stdin/stdout pipes and its stderr in a file (a long run must never block on a full pipe)."""
    with open(stderr, "ab") as err:
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO
        )
    try:
        yield proc
    except Exception:
        print(f"--- child stderr ({stderr}):\n{file_tail(stderr, 40)}", file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------- scenarios


def lags_per_link_up(
    points: dict[int, tuple[float, float]], logged_until: float, flap_start: float, events: list
) -> list[dict]:
    """For each stretch of link-up, the worst delay of the points it owed the server.

    A point could reach the server from its logging when the link was up then, else from the next link-up; it
    belongs to the stretch of link-up that began at or before that moment. (Counted from the link-up before it
    was *seen*, a point held back over several link-ups would pass for one sent in the last.)"""
    changes = sorted([(flap_start, "up"), *[(t, what) for t, what in events if t >= flap_start]])
    ups = [t for t, what in changes if what == "up"]
    stretches: dict[float, dict] = {}
    for seen, logged in points.values():
        if logged > logged_until:
            continue
        state = "up"
        for when, what in changes:
            if when > logged:
                break
            state = what
        could = logged if state == "up" else min((u for u in ups if u > logged), default=logged)
        up = max((u for u in ups if u <= could), default=flap_start)
        entry = stretches.setdefault(up, {"link_up_s": up - flap_start, "points": 0, "worst_lag_s": 0.0})
        entry["points"] += 1
        entry["worst_lag_s"] = max(entry["worst_lag_s"], seen - could)
    return [stretches[u] for u in sorted(stretches)]


def run_flapping(stand: Stand, size_name: str) -> dict:
    from tests.support.flaky_proxy import FlakyProxy

    size, up_s, down_s = SIZES[size_name]["flapping"]
    ideal_s = size / FLAP_UP_BYTES_PER_S
    source = stand.work / "flapping.bin"
    sha = make_file(source, size)
    name = f"flapping-{time.time_ns()}"
    edge_port = int(stand.edge_url.rsplit(":", 1)[1])
    proxy = FlakyProxy("127.0.0.1", edge_port, up_bytes_per_s=FLAP_UP_BYTES_PER_S, io_timeout=60)
    view = stand.view
    load_before = load()
    cuts_before = view.cut_parts()
    try:
        cmd, env, stderr = stand.child("flapping", proxy.url, name, "--file", str(source))
        with measured_child(cmd, env, stderr) as proc, Watch(view, name, "tick") as watch:
            expect_line(proc, "READY")
            proxy.reset_counts()
            flap_start = time.monotonic()
            proxy.flap(up_s=up_s, down_s=down_s)
            tell_child(proc, "GO")
            _, started, logged = expect_line(proc, "LOGGED").split()
            deadline = float(started) + arrival_limit_s(size, up_s, down_s)
            while (arrived := watch.placed_at(source.name)) is None and time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError("the client ended before its file arrived")
                time.sleep(0.1)
            bytes_up = proxy.bytes_up
            # The points logged until the file arrived: once one logged after it is on the server, all are
            # (a run's points go in order); it may wait for the next link-up.
            logged_until = arrived or time.monotonic()
            wait_until = time.monotonic() + up_s + down_s + 30
            while not _last_tick_before(watch, logged_until) and time.monotonic() < wait_until:
                time.sleep(0.2)
            events = list(proxy.link_events)
            received = max((info["received"] for info in watch.uploads.values()), default=0)
            tell_child(proc, "STOP" if arrived else "ABANDON")  # a file still on its way is left in the journal
            proxy.stop_flapping()
            result = read_result(proc, "flapping")
            proc.wait(timeout=60)
    finally:
        proxy.close()
    run = view.run(name)
    assert run is not None, f"no run of {name} on the server"
    served = view.served_sha256(run[2], source.name) if arrived else None
    flapping_points = {s: (seen, v) for s, (seen, v) in watch.seen.items() if v <= logged_until}
    stretches = lags_per_link_up(flapping_points, logged_until, flap_start, events)
    worst = max((s["worst_lag_s"] for s in stretches), default=float("inf"))
    out = {
        "size": size,
        "up_s": up_s,
        "down_s": down_s,
        "rate": FLAP_UP_BYTES_PER_S,
        "arrived": arrived is not None,
        "identical": served == sha,
        "travel_s": None if arrived is None else arrived - float(started),
        "received": received,
        "call_s": float(logged) - float(started),
        "ideal_s": ideal_s,
        # Over what the server has of it: the overhead so far, also for a file still on its way.
        "client_sent_ratio": result["upload_bytes_sent"] / max(received, 1),
        "link_sent_ratio": bytes_up / max(received, 1),
        "cuts": sum(1 for _, what in events if what == "down"),
        "cut_at_s": [round(t - flap_start, 1) for t, what in events if what == "down"],
        "cut_parts_at_server": view.cut_parts() - cuts_before,
        "idle_up_s": idle_while_up(watch, events, flap_start, logged_until),
        "file_lane_attempts": result["file_lane_attempts"],
        "file_lane_wait_s": result["file_lane_wait_s"],
        "points_while_uploading": len(flapping_points),
        "stretches": stretches,
        "worst_lag_s": worst,
        "run_status": run[1],
        "left": result["left"],
        "load": f"{load_before} → {load()}",
    }
    out["goals"] = {
        f"arrives within {arrival_limit_s(size, up_s, down_s):.0f} s (3× the link's time + 15 s)": out["arrived"],
        "byte-identical": out["identical"],
        f"bytes over the link / size <= {GOAL_SENT_RATIO}": out["arrived"]
        and out["link_sent_ratio"] <= GOAL_SENT_RATIO,
        f"points on the server <= {GOAL_LAG_S:.0f} s after each link-up": worst <= GOAL_LAG_S
        and len(flapping_points) > 0,
    }
    return out


def arrival_limit_s(size: int, up_s: float, down_s: float) -> float:
    """How long the file may take: three times what the flapping link needs for it at its rate, plus 15 s."""
    return 3 * size / FLAP_UP_BYTES_PER_S * (up_s + down_s) / up_s + 15


def idle_while_up(watch: Watch, events: list, flap_start: float, until: float) -> float:
    """Seconds the link was up but no byte of the file reached the server (between polls, both ends up)."""
    changes = [(flap_start, "up"), *[(t, what) for t, what in events]]

    def up_at(moment: float) -> bool:
        state = "up"
        for when, what in changes:
            if when > moment:
                break
            state = what
        return state == "up"

    idle = 0.0
    previous = None
    for when, states in watch.samples:
        if when < flap_start or when > until:
            continue
        received = sum(r for _, r in states.values())
        still = previous is not None and received == previous[1]
        if still and up_at(previous[0]) and up_at(when) and not any(previous[0] < t < when for t, _ in events):
            idle += when - previous[0]  # up at both polls, no cut in between, not a byte more
        previous = (when, received)
    return idle


def _last_tick_before(watch: Watch, moment: float) -> bool:
    """Whether the server has a point logged after `moment` (so every point logged before it was sent)."""
    return any(v > moment for _, v in watch.seen.values())


def print_flapping(r: dict, caption: str) -> None:
    limit = arrival_limit_s(r["size"], r["up_s"], r["down_s"])
    travel = f"{r['travel_s']:.1f}" if r["arrived"] else f"not there after {limit:.0f}"
    link_s = r["ideal_s"] * (r["up_s"] + r["down_s"]) / r["up_s"]
    print_table(
        f"flapping: a {r['size'] / MiB:,.0f} MiB file at {r['rate'] / MiB:.0f} MiB/s up, link up {r['up_s']:.0f} s / "
        f"down {r['down_s']:.1f} s, one point per {TICK_S} s — {caption}; load {r['load']}",
        ["travel s", "the link's time s", "on the server", "cuts", "parts cut (server)", "link up, no byte in s",
         "file lane: most attempts, longest wait s", "client sent / received", "link up-bytes / received",
         "byte-identical", "points while uploading", "worst lag after a link-up s"],
        [(travel, f"{link_s:.0f}", f"{r['received'] / r['size']:.0%}", r["cuts"], r["cut_parts_at_server"],
          f"{r['idle_up_s']:.0f}", f"{r['file_lane_attempts']}, {r['file_lane_wait_s']:.1f}",
          f"{r['client_sent_ratio']:.3f}", f"{r['link_sent_ratio']:.3f}", "yes" if r["identical"] else "NO",
          r["points_while_uploading"], f"{r['worst_lag_s']:.2f}")],
    )  # fmt: skip
    lags = ", ".join(f"{s['link_up_s']:.0f}s:{s['worst_lag_s']:.1f}" for s in r["stretches"])
    print(f"worst lag per link-up (time of the link-up after the start: worst lag s): {lags}")
    print(f"link cut at (s after the start): {', '.join(f'{t:.1f}' for t in r['cut_at_s'])}")


def run_throughput(stand: Stand, size_name: str, repeat: int) -> dict:
    size = SIZES[size_name]["throughput"]
    source = stand.work / "throughput.bin"
    sha = make_file(source, size)
    view = stand.view
    assert stand.serve is not None
    load_before = load()
    # The CI size measures only what the goal needs; the others add two rows for information.
    order = ["anchor", "tunnel"] if size_name == "ci" else ["anchor", "tunnel", "entrance", "flush"]
    tries: dict[str, list[dict]] = {path: [] for path in order}
    for round_ in range(repeat):
        turn = round_ % len(order)
        for path in order[turn:] + order[:turn]:  # rotated, so no path always goes first
            name = f"throughput-{path}-{round_}-{time.time_ns()}"
            _settle(stand, source.name)
            if path == "anchor":
                tries[path].append(_anchor_put(view, source, sha, name))
            elif path == "entrance":
                tries[path].append(_bridge_upload(stand, stand.serve.entrance_url, source, sha, name))
            else:
                wait = "idle" if path == "tunnel" else "flush"
                tries[path].append(_bridge_upload(stand, stand.edge_url, source, sha, name, wait=wait))
    med = {path: statistics.median(t["total_s"] for t in got) for path, got in tries.items()}
    ratio = med["anchor"] / med["tunnel"]
    one_put = _one_put_through_edge(stand, source)
    out = {
        "size": size,
        "repeat": repeat,
        "tries": tries,
        "median_s": med,
        "ratio": ratio,
        "one_put_through_edge": one_put,
        "load": f"{load_before} → {load()}",
    }
    out["goals"] = {
        "byte-identical, every try": all(t["identical"] for got in tries.values() for t in got),
        f"throughput bridge / one PUT >= {GOAL_THROUGHPUT_RATIO}": ratio >= GOAL_THROUGHPUT_RATIO,
    }
    return out


def _settle(stand: Stand, name: str) -> None:
    """Leave the machine as the next try should find it: no earlier try's file kept, nothing waiting for the disk.

    Each try leaves a 500 MB file in MLflow's artifact folder (8 GB over a default run). Kept, they made later
    tries run up to twice as slow, whatever their path, and bridge's most. This machine is a Firecracker VM whose
    balloon reports free memory back to the host: a write into page-cache pages freed a moment ago costs a
    fraction of one into pages the host has to map again (500 MB: 0.12-0.2 s vs 0.46-0.53 s after 5 s idle; the
    entrance alone, taking 500 MB six times over in isolation: 0.9, 1.0, 0.9, 1.7, 2.4, 2.4 CPU s while the
    placed files were kept, 0.9-1.1 each when each was deleted). A try of bridge writes 1 GB of new pages (the
    spool copy, the staging file), the anchor 500 MB. And the anchor's 500 MB, unsynced in the page cache, would
    be written back ~30 s later (vm.dirty_expire) in the middle of whichever try ran then, while a bridge try
    fsyncs."""
    assert stand.serve is not None
    for found in stand.work.rglob(name):
        if found.is_file() and found != stand.work / name:
            found.unlink()
    os.sync()


def _one_put_through_edge(stand: Stand, source: Path) -> int | None:
    """The status of the whole file in one PUT through the tunnel to MLflow's artifact proxy (the edge: 413)."""
    where = f"bench-uploads/one-put-{time.time_ns()}/{source.name}"
    try:
        with open(source, "rb") as fh:
            answer = requests.put(
                f"{stand.edge_url}{ARTIFACTS_API}/{where}",
                data=fh,
                headers={"Authorization": f"Bearer {stand.token}"},
                timeout=300,
            )
        return answer.status_code
    except requests.RequestException:  # the edge closed the connection before the body was sent
        return None


def _anchor_put(view: ServerView, source: Path, sha: str, name: str) -> dict:
    where = f"bench-uploads/{name}-{time.time_ns()}/{source.name}"
    server_cpu = view.cpu_s()
    client_cpu = time.thread_time()
    started = time.monotonic()
    with open(source, "rb") as fh:
        answer = requests.put(f"{view.serve.mlflow_url}{ARTIFACTS_API}/{where}", data=fh, timeout=900)
    took = time.monotonic() - started
    cpu = {"client": time.thread_time() - client_cpu, **_minus(view.cpu_s(), server_cpu)}
    answer.raise_for_status()
    served = view.served_sha256("mlflow-artifacts:/" + where.rsplit("/", 1)[0], source.name)
    return {"total_s": took, "identical": served == sha, "load": load(), "cpu": cpu}


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def _bridge_upload(stand: Stand, url: str, source: Path, sha: str, name: str, wait: str = "idle") -> dict:
    """One bridge client process logging `source`; timed from the call until the server placed it."""
    view = stand.view
    cmd, env, stderr = stand.child("throughput", url, name, "--file", str(source), "--wait", wait)
    with measured_child(cmd, env, stderr) as proc, Watch(view, name, "-", every_s=0.05) as watch:
        expect_line(proc, "READY")
        server_cpu = view.cpu_s()
        tell_child(proc, "GO")
        expect_line(proc, "LOGGED")
        if wait == "idle":
            deadline = time.monotonic() + 900
            while watch.placed_at(source.name) is None:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{name}: the file never arrived; uploads seen: {watch.uploads}")
                time.sleep(0.02)
            tell_child(proc, "STOP")
        result = read_result(proc, "throughput")
        server_cpu = _minus(view.cpu_s(), server_cpu)
        proc.wait(timeout=120)
    run = view.run(name)
    assert run is not None and result["left"] == 0, (name, run, result)
    served = view.served_sha256(run[2], source.name)
    started = result["started"]
    mine = [i for i, info in watch.uploads.items() if info["path"].endswith(f"{run[0]}/artifacts/{source.name}")]
    states = watch.upload_states[mine[0]] if mine else {}
    placing, placed = states.get("placing"), states.get("placed")
    return {
        "total_s": (placed - started) if wait == "idle" and placed else result["total_s"],
        "call_s": result["call_s"],
        "bytes_in_s": (placing - started - result["call_s"]) if placing else None,
        "check_and_place_s": (placed - placing) if placing and placed else None,
        "sent_ratio": result["upload_bytes_sent"] / source.stat().st_size,
        "identical": served == sha,
        "load": load(),
        "cpu": {"client": result["cpu_s"], **server_cpu},
        "record_rounds": result["record_rounds"],
    }


THROUGHPUT_PATHS = {
    "anchor": "anchor: one PUT straight to MLflow's artifact proxy",
    "tunnel": "bridge: log_artifact → placed on the server, through edge + entrance",
    "entrance": "(info) the same, to the entrance without the tunnel",
    "flush": "(info) the same through the tunnel, the client waiting in conn.flush()",
}


def print_throughput(r: dict, caption: str) -> None:
    size = r["size"]
    rows = []
    for path in r["tries"]:
        got = r["tries"][path]
        med = r["median_s"][path]
        first = got[0]
        rows.append(
            (
                THROUGHPUT_PATHS[path],
                " ".join(f"{t['total_s']:.1f}" for t in got),
                f"{med:.1f}",
                f"{size / med / 1e6:.0f}",
                f"{r['median_s']['anchor'] / med:.2f}",
                "-" if path == "anchor" else f"{statistics.median(t['call_s'] for t in got):.1f}",
                "-"
                if path == "anchor" or first["bytes_in_s"] is None
                else f"{statistics.median(t['bytes_in_s'] for t in got if t['bytes_in_s'] is not None):.1f}",
                "-"
                if path == "anchor" or first["check_and_place_s"] is None
                else f"{statistics.median(t['check_and_place_s'] for t in got if t['check_and_place_s']):.1f}",
                "-" if path == "anchor" else f"{max(t['sent_ratio'] for t in got):.3f}",
                "yes" if all(t["identical"] for t in got) else "NO",
            )
        )
    print_table(
        f"throughput: a {size / 1e6:,.0f} MB file, {r['repeat']} tries per path, rotated — {caption}; load {r['load']}",
        ["path", "tries s", "median s", "MB/s", "vs anchor", "log_artifact call s", "bytes in s",
         "check + place s", "sent / size", "byte-identical"],
        rows,
    )  # fmt: skip
    print(f"the whole file in one PUT through the edge: HTTP {r['one_put_through_edge']}")
    print_table(
        "CPU seconds per try (median; client: the measuring process or the bridge client child, from the call to "
        "the file on the server; the rest from /proc for the whole try)",
        ["path", "client", "edge (stand-in cloudflared)", "entrance (bridge serve)", "MLflow", "all",
         "client record-lane rounds/s"],
        [
            (
                THROUGHPUT_PATHS[path].split(":")[0],
                *(f"{statistics.median(t['cpu'][k] for t in r['tries'][path]):.2f}"
                  for k in ("client", "edge", "entrance", "mlflow")),
                f"{statistics.median(sum(t['cpu'].values()) for t in r['tries'][path]):.2f}",
                "-" if path == "anchor"
                else f"{statistics.median(t['record_rounds'] / t['total_s'] for t in r['tries'][path]):,.0f}",
            )
            for path in r["tries"]
        ],
    )  # fmt: skip


def run_yolo(stand: Stand, size_name: str) -> dict:
    from tests.support.flaky_proxy import FlakyProxy

    pad, rate, imgsz = SIZES[size_name]["yolo"]
    name = f"yolo-{time.time_ns()}"
    edge_port = int(stand.edge_url.rsplit(":", 1)[1])
    proxy = FlakyProxy("127.0.0.1", edge_port, up_bytes_per_s=rate, io_timeout=60)
    view = stand.view
    load_before = load()
    epochs: dict[int, float] = {}
    work = stand.work / "yolo"
    try:
        cmd, env, stderr = stand.child("yolo", proxy.url, name, "--work", str(work), "--pad", str(pad),
                                       "--imgsz", str(imgsz))  # fmt: skip
        env["YOLO_OFFLINE"] = "1"
        with measured_child(cmd, env, stderr) as proc, Watch(view, name, "epoch_time_s") as watch:
            for line in proc.stdout:
                if line.startswith("TRAIN "):
                    train_started = float(line.split()[1])
                elif line.startswith("EPOCH "):
                    _, epoch, at = line.split()
                    epochs[int(epoch)] = float(at)
                elif line.startswith("TRAINED "):
                    trained = float(line.split()[1])
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
                    break
            else:
                raise RuntimeError("the training child ended without a result")
            proc.wait(timeout=120)
            time.sleep(0.3)  # one more poll of the server
    finally:
        proxy.close()
    run = view.run(name)
    assert run is not None, f"no run of {name} on the server"
    served = {n: view.served_sha256(run[2], f"weights/{n}") for n in result["files"]}
    weights_done = max((watch.placed_at(f"weights/{n}") or float("inf")) for n in result["files"])
    rows = []
    for epoch, logged in sorted(epochs.items()):
        seen = watch.seen.get(epoch, (None, None))[0]
        rows.append(
            {
                "epoch": epoch,
                "lag_s": None if seen is None else seen - logged,
                "weights_uploading_when_logged": watch.receiving(logged, "weights/"),
                "seen_before_weights_done": seen is not None and seen < weights_done,
            }
        )
    all_seen = max((watch.seen[e][0] for e in epochs if e in watch.seen), default=float("inf"))
    first_upload = min(
        (t for i, t in watch.upload_first.items() if "weights/" in watch.uploads[i]["path"]), default=float("inf")
    )
    timeline = [("training starts", 0.0)]
    timeline += [(f"epoch {e} ends", t - train_started) for e, t in epochs.items()]
    timeline += [(f"epoch {e} on the server", watch.seen[e][0] - train_started) for e in epochs if e in watch.seen]
    for upload_id, first in watch.upload_first.items():
        path = watch.uploads[upload_id]["path"]
        if "/weights/" in "/" + path and first >= train_started:
            what = path.rsplit("/", 1)[-1]
            timeline.append((f"{what} upload begins", first - train_started))
            if "placed" in watch.upload_states[upload_id]:
                timeline.append((f"{what} placed", watch.upload_states[upload_id]["placed"] - train_started))
    timeline.append(("training returns", trained - train_started))
    out = {
        "timeline": sorted(timeline, key=lambda item: item[1]),
        "pad": pad,
        "rate": rate,
        "imgsz": imgsz,
        "files": result["files"],
        "identical": all(served[n] == f["sha256"] for n, f in result["files"].items()),
        "status": run[1],
        "epochs": rows,
        "train_s": result["train_s"],
        "weights_upload_s": weights_done - first_upload,
        "delivered_after_training_s": result["delivered_after_s"],
        "all_epochs_seen_while_weights_uploading": watch.receiving(all_seen, "weights/"),
        "sent_bytes": result["upload_bytes_sent"],
        "weights_uploads": sum(1 for info in watch.uploads.values() if "/weights/" in "/" + info["path"]),
        "load": f"{load_before} → {load()}",
        "trained_at": trained,
    }
    out["goals"] = {
        f"every epoch on the server within {GOAL_EPOCH_LAG_S:.0f} s, while the weights upload": len(rows) == 2
        and all(r["lag_s"] is not None and r["lag_s"] <= GOAL_EPOCH_LAG_S for r in rows)
        and all(r["seen_before_weights_done"] for r in rows)
        and out["all_epochs_seen_while_weights_uploading"],
        "run FINISHED, best.pt and last.pt byte-identical": out["status"] == "FINISHED" and out["identical"],
    }
    return out


def print_yolo(r: dict, caption: str) -> None:
    sizes = ", ".join(f"{n} {f['size'] / 1e6:,.0f} MB" for n, f in r["files"].items())
    print_table(
        f"yolo: YOLOv8n, 2 epochs, imgsz {r['imgsz']}, CPU; {sizes}; link {r['rate'] / MiB:.0f} MiB/s up — "
        f"{caption}; load {r['load']}",
        ["epoch", "on the server after its end s", "a weights upload in flight at its end",
         "before the weights arrived"],
        [(e["epoch"], "never" if e["lag_s"] is None else f"{e['lag_s']:.2f}",
          "yes" if e["weights_uploading_when_logged"] else "no", "yes" if e["seen_before_weights_done"] else "NO")
         for e in r["epochs"]],
    )  # fmt: skip
    print(
        f"training {r['train_s']:.1f} s; weights uploading {r['weights_upload_s']:.1f} s; delivered "
        f"{r['delivered_after_training_s']:.1f} s after the training returned; every epoch on the server while a "
        f"weights upload was still in flight: {'yes' if r['all_epochs_seen_while_weights_uploading'] else 'NO'}; "
        f"run {r['status']}; best.pt and last.pt byte-identical: {'yes' if r['identical'] else 'NO'}; "
        f"{r['weights_uploads']} weights uploads (best.pt when it improved, then best.pt and last.pt at the end), "
        f"{r['sent_bytes'] / 1e6:,.0f} MB of files sent"
    )
    print("timeline (s after the training started): " + "; ".join(f"{t:.1f} {what}" for what, t in r["timeline"]))


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argument_parser(__doc__.splitlines()[0], "smaller files (96 MiB, 128 MB, ~40 MB checkpoints)")
    parser.add_argument("--size", choices=tuple(SIZES), help="full, quick (= --quick) or ci (the test suite's)")
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    parser.add_argument("--repeat", type=int, default=0, help="tries per path in `throughput` (default 2, quick 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("--experiment", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--pad", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--wait", default="idle", help=argparse.SUPPRESS)
    parser.add_argument("--imgsz", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "flapping":
        report_result(_child_flapping(args.url, args.journal, args.experiment, args.file))
        return 0
    if args.child == "throughput":
        report_result(_child_throughput(args.url, args.journal, args.experiment, args.file, args.wait))
        return 0
    if args.child == "yolo":
        report_result(_child_yolo(args.url, args.journal, args.experiment, args.work, args.pad, args.imgsz))
        return 0

    size_name = args.size or ("quick" if args.quick else "full")
    repeat = args.repeat or (2 if size_name == "full" else 1)
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    caption = f"bridge serve --tunnel cloudflared (stand-in) on 127.0.0.1 [{size_name}]"
    print(f"Machine: {machine_summary()}")
    results: dict[str, Any] = {"size": size_name}
    started = time.monotonic()
    with Stand(scratch_dir("uploads"), size_name) as stand:
        for scenario in scenarios:
            began = time.monotonic()
            if scenario == "flapping":
                results[scenario] = run_flapping(stand, size_name)
                print_flapping(results[scenario], caption)
            elif scenario == "throughput":
                results[scenario] = run_throughput(stand, size_name, repeat)
                print_throughput(results[scenario], caption)
            else:
                results[scenario] = run_yolo(stand, size_name)
                print_yolo(results[scenario], caption)
            results[scenario]["wall_s"] = time.monotonic() - began
    ok = True
    print()
    for scenario in scenarios:
        for goal, good in results[scenario]["goals"].items():
            ok &= good
            print(f"{scenario}: {goal}: {verdict(good)}")
    results["ok"] = ok
    results["wall_s"] = time.monotonic() - started
    print(f"wall time {results['wall_s']:.0f} s")
    report_result(results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
