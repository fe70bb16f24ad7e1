"""The file lane's orders, checked as named rules from what reached the entrance and when (arrivals.py).

Stock MLflow has no lanes, so the final states alone cannot show these; each rule reads the program (what was
logged, in which order, over which link), the entrance's records (each request's arrival and answer, each file
placed in MLflow) and the bridge world's trace (when each call returned, by the same clock):

  whole-once          every big file version is placed whole (its bytes are a version the program logged) or not
                      at all, at most once; one that must be sent (the newest of its path, or the last before an
                      end status of its run) is placed exactly once
  newest-wins         the server ends with the newest version of each path, and no older version is placed after
                      a newer one
  superseded-unsent   a version superseded while it still waited is never sent: no upload is created for it and
                      no byte of it is PATCHed (counted per version at the entrance). It waited when both it and
                      its successor were logged while the link was down, or when an earlier file of its run was
                      placed only after its successor was logged (the lane sends a run's files in order)
  end-after-everything
                      a run's end status reaches the server only after every point and every file to be sent that
                      the program logged to the run before that status
  points-not-held     points logged after a big file reach the server while it uploads: over a link throttled so
                      that the file takes at least HELD_MARGIN_S, with no other fault since the last flush, each
                      point logged after it (until the next fault) is answered before the file's last byte is in
  sha256-before-placed
                      a file whose upload was begun without its sha256 (a head start: the file lane sends the first
                      parts while log_artifact still copies it) is placed only after a PATCH of that upload announced
                      a sha256 (Bridge-Upload-Sha256), and every sha256 its PATCHes announced before it was placed is
                      the sha256 of the bytes placed; no PATCH of such an upload that could complete the file goes
                      without a sha256 (the head start never sends the last part; the entrance would refuse it)

A rule's failure is a difference like any other, named `rule <name>: …`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from tests.differential.arrivals import Arrival
from tests.differential.executor import Trace
from tests.differential.oracle import State
from tests.differential.programs import BASE_TS, BIG_FILE_OPS, FAULTS, STATUSES, Call, big_file_bytes

#: points-not-held applies to a file whose bytes take at least this long over the throttled link: the points
#: logged after it have that long (less the program's own milliseconds) to get through.
HELD_MARGIN_S = 1.5
RULES = (
    "whole-once",
    "newest-wins",
    "superseded-unsent",
    "end-after-everything",
    "points-not-held",
    "sha256-before-placed",
)


@dataclass
class Version:
    step: int
    r: int
    path: str
    size: int
    sha256: str
    must_send: bool = False  # the newest of its path, or the last before an end status of its run
    waited: str | None = None  # why it still waited when superseded (superseded-unsent applies), else None


def _num(value: float) -> object:
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value) or abs(value) >= 1.7976931348623157e308:  # MLflow keeps ±inf as ±the largest double
        return "inf" if value > 0 else "-inf"
    return value


def versions_of(program: list[Call]) -> list[Version]:
    out = []
    for step, call in enumerate(program):
        if call.op in BIG_FILE_OPS:
            a = call.args
            sha = hashlib.sha256(big_file_bytes(a["size"], a["seed"])).hexdigest()
            out.append(Version(step, a["r"], a["path"], a["size"], sha))
    return out


def run_events(program: list[Call]) -> dict[int, list[tuple[int, str]]]:
    """Per run, (step, 'end' | 'running') in program order; runs the executor ends after the program: at its end."""
    events: dict[int, list[tuple[int, str]]] = defaultdict(list)
    stack: list[int] = []
    for step, call in enumerate(program):
        a = call.args
        if call.op == "start_run":
            stack.append(a["r"])
        elif call.op == "resume_run":
            stack.append(a["r"])
            events[a["r"]].append((step, "running"))
        elif call.op == "end_run":
            if stack:
                stack.pop()
            events[a["r"]].append((step, "end"))
        elif call.op == "set_terminated":
            events[a["r"]].append((step, "end"))
    for r in reversed(stack):
        events[r].append((len(program), "end"))
    return events


def points_of(program: list[Call], errors: dict[int, str]) -> list[tuple[int, int, tuple]]:
    """(step, run, point) of every metric point the program logged; a point is (key, step, value, ts or None)."""
    out = []
    for step, call in enumerate(program):
        if step in errors:
            continue
        a = call.args
        if call.op == "log_metric":
            out.append((step, a["r"], (a["key"], a["step"], _num(a["value"]), a["ts"])))
        elif call.op == "log_metrics":
            for i in range(a["keys"]):
                out.append((step, a["r"], (f"m{i:04d}", a["step"], _num(a["base"] + i), a["ts"])))
        elif call.op == "log_batch":
            for key, value, s, ts in a["metrics"]:
                out.append((step, a["r"], (key, s, _num(value), ts)))
        elif call.op == "epoch":
            stamp, s = BASE_TS + 10 + a["step"], 10 + a["step"]
            out.append((step, a["r"], ("loss", s, _num(1.0 / (a["step"] + 1)), stamp)))
            out.append((step, a["r"], ("acc", s, _num(a["step"] / 10), stamp)))
    return out


class _Arrived:
    """The first answered (200) arrival of each point, by run."""

    def __init__(self, arrivals: list[Arrival], index_of: dict[str, int]) -> None:
        self.exact: dict[tuple, float] = {}
        self.loose: dict[tuple, float] = {}  # without the timestamp, for points the client stamped
        for a in arrivals:
            if a.kind != "points" or a.status != 200 or a.run not in index_of:
                continue
            r = index_of[a.run]
            for key, step, value, ts in a.points:
                for table, k in (
                    (self.exact, (r, key, step, _num(value), ts)),
                    (self.loose, (r, key, step, _num(value))),
                ):
                    if k not in table or a.answered < table[k]:
                        table[k] = a.answered

    def when(self, r: int, point: tuple) -> float | None:
        key, step, value, ts = point
        if ts is None:
            return self.loose.get((r, key, step, value))
        return self.exact.get((r, key, step, value, ts))


def check(
    program: list[Call], arrivals: list[Arrival], state: State, trace: Trace, tally: Counter | None = None
) -> list[str]:
    """Every broken order, one line each, named by its rule; `tally` counts how often each rule applied."""
    tally = Counter() if tally is None else tally
    out: list[str] = []
    index_of = {run_id: r for r, run_id in state.server_ids.items()}
    versions = versions_of(program)
    by_path: dict[tuple[int, str], list[Version]] = defaultdict(list)
    for v in versions:
        by_path[(v.r, v.path)].append(v)
    events = run_events(program)
    ends = {r: [s for s, kind in evs if kind == "end"] for r, evs in events.items()}
    for chain in by_path.values():
        for v, newer in zip(chain, [*chain[1:], None], strict=True):
            v.must_send = newer is None or any(v.step < s < newer.step for s in ends.get(v.r, []))
    placed: dict[str, list[Arrival]] = defaultdict(list)  # sha256 -> placements
    for a in arrivals:
        if a.kind == "placed" and a.sha256:
            placed[a.sha256].append(a)
    _mark_waiting(program, by_path, placed, trace)

    # whole-once
    known = {(v.r, v.path, v.sha256) for v in versions}
    for a in arrivals:
        where = (index_of.get(a.run or ""), a.path)
        if a.kind == "placed" and where in by_path and (*where, a.sha256) not in known:
            out.append(
                f"rule whole-once: run {where[0]} {a.path}: placed bytes (sha256 {str(a.sha256)[:12]}) "
                "that are no version the program logged there"
            )
    tally["whole-once"] += len(versions)
    tally["newest-wins"] += len(by_path)
    tally["superseded-unsent"] += sum(v.waited is not None for v in versions)
    for v in versions:
        n = len([a for a in placed.get(v.sha256, []) if a.run in index_of and index_of[a.run] == v.r])
        if n > 1:
            out.append(f"rule whole-once: step {v.step} {v.path} of run {v.r} was placed {n} times")
        if v.must_send and n == 0 and v.step not in trace.errors:
            out.append(f"rule whole-once: step {v.step} {v.path} of run {v.r} ({v.size} bytes) never arrived")

    # newest-wins
    for (r, path), chain in by_path.items():
        got = state.digests.get(r, {}).get(path)
        if r in state.digests and got != chain[-1].sha256:
            which = next((f"step {v.step}'s version" for v in chain if v.sha256 == got), "no version")
            out.append(
                f"rule newest-wins: run {r} {path} ends as {which}, not the newest (step {chain[-1].step})"
                if got
                else f"rule newest-wins: run {r} {path} is not on the server (newest: step {chain[-1].step})"
            )
        order = sorted(
            (a.started, i) for i, v in enumerate(chain) for a in placed.get(v.sha256, []) if index_of.get(a.run) == r
        )
        for (_, earlier), (_, later) in itertools.pairwise(order):
            if later < earlier:
                out.append(
                    f"rule newest-wins: run {r} {path}: step {chain[later].step}'s version placed after step "
                    f"{chain[earlier].step}'s"
                )

    # superseded-unsent
    uploads_of: dict[str, str] = {}  # upload id -> sha256
    for a in arrivals:
        if a.kind == "create" and a.upload and a.sha256:
            uploads_of[a.upload] = a.sha256
    for v in versions:
        if v.waited is None:
            continue
        created = [a for a in arrivals if a.kind == "create" and a.sha256 == v.sha256]
        patched = sum(a.received for a in arrivals if a.kind == "patch" and uploads_of.get(a.upload or "") == v.sha256)
        if created or patched or placed.get(v.sha256):
            out.append(
                f"rule superseded-unsent: step {v.step} {v.path} of run {v.r} was superseded while it waited "
                f"({v.waited}) but was sent: {len(created)} upload(s) created, {patched} bytes received in PATCHes, "
                f"placed {len(placed.get(v.sha256, []))} time(s)"
            )

    arrived = _Arrived(arrivals, index_of)
    points = points_of(program, trace.errors)
    out += _end_after_everything(
        tally=tally,
        r_events=events,
        versions=versions,
        placed=placed,
        points=points,
        arrived=arrived,
        arrivals=arrivals,
        state=state,
    )
    out += _points_not_held(program, versions, placed, points, arrived, trace, ends, tally)
    out += sha256_before_placed(arrivals, index_of, tally)
    return out


def head_starts(arrivals: list[Arrival]) -> tuple[int, int, int]:
    """(uploads the entrance created without a sha256 — head starts, uploads it created, bytes it kept of the head
    starts' PATCHes that named no sha256 — the parts sent while log_artifact still copied the file)."""
    created = [a for a in arrivals if a.kind == "create" and a.status == 201]
    early = {a.upload for a in created if a.sha256 is None}
    sent = sum(a.received for a in arrivals if a.kind == "patch" and a.upload in early and a.announced is None)
    return len(early), len(created), sent


def sha256_before_placed(arrivals: list[Arrival], index_of: dict[str, int], tally: Counter | None = None) -> list[str]:
    """sha256-before-placed: each file placed from an upload begun without its sha256 had a PATCH of that upload
    announce a sha256 before it was placed, and every sha256 announced before then is that of the bytes placed; no
    PATCH of such an upload that could complete the file (by its declared length) went without a sha256."""
    tally = Counter() if tally is None else tally
    creates = {a.upload: a for a in arrivals if a.kind == "create" and a.status == 201 and a.sha256 is None}
    out = []
    for a in arrivals:
        if a.kind == "patch" and a.upload in creates and a.announced is None and a.size > 0:
            create = creates[a.upload]
            if create.size and a.offset + a.size >= create.size:
                out.append(
                    f"rule sha256-before-placed: run {index_of.get(create.run or '', create.run)} {create.path} "
                    f"(upload {str(a.upload)[:8]}, begun without a sha256): a PATCH of bytes {a.offset}-"
                    f"{a.offset + a.size} of {create.size}, which could complete the file, announced no sha256 "
                    f"(answered {a.status})"
                )
    for p in arrivals:
        if p.kind != "placed" or p.upload not in creates:
            continue
        tally["sha256-before-placed"] += 1
        where = f"run {index_of.get(p.run or '', p.run)} {p.path} (upload {str(p.upload)[:8]}, begun without a sha256)"
        announced = [
            a.announced
            for a in sorted(arrivals, key=lambda a: a.started)
            if a.kind == "patch" and a.upload == p.upload and a.announced is not None and a.started < p.started
        ]
        if not announced:
            out.append(f"rule sha256-before-placed: {where} was placed with no PATCH announcing its sha256 before")
            continue
        wrong = sorted({sha for sha in announced if sha != p.sha256})
        if wrong:
            out.append(
                f"rule sha256-before-placed: {where} was placed with sha256 {str(p.sha256)[:12]}, but its PATCHes "
                f"announced {', '.join(sha[:12] for sha in wrong)}" + (" first" if announced[0] != p.sha256 else "")
            )
    return out


def _mark_waiting(
    program: list[Call], by_path: dict[tuple[int, str], list[Version]], placed: dict[str, list[Arrival]], trace: Trace
) -> None:
    """Set `waited` on each version superseded while it still waited (superseded-unsent's premise)."""
    down_until: dict[int, int] = {}  # step -> the step whose link_down window it lies in
    window: int | None = None
    for step, call in enumerate(program):
        if call.op == "link_down":
            window = step if window is None else window
        elif call.op in ("link_up", "heal", "flush"):
            window = None
        if window is not None:
            down_until[step] = window
    first_placed = {sha: min(a.started for a in found) for sha, found in placed.items()}
    runs_versions: dict[int, list[Version]] = defaultdict(list)
    for chain in by_path.values():
        for v in chain:
            runs_versions[v.r].append(v)
    for chain in by_path.values():
        for v, newer in itertools.pairwise(chain):
            if v.must_send:
                continue
            if v.step in down_until and down_until.get(newer.step) == down_until[v.step]:
                v.waited = f"both logged while the link was down from step {down_until[v.step]}"
                continue
            logged = trace.returned.get(newer.step)
            if logged is None:
                continue
            for earlier in runs_versions[v.r]:
                at = first_placed.get(earlier.sha256)
                if earlier.step < v.step and at is not None and at > logged:
                    v.waited = f"step {earlier.step}'s file of the run was placed only after step {newer.step}"
                    break


def _end_after_everything(
    *,
    tally: Counter,
    r_events: dict[int, list[tuple[int, str]]],
    versions: list[Version],
    placed: dict[str, list[Arrival]],
    points: list[tuple[int, int, tuple]],
    arrived: _Arrived,
    arrivals: list[Arrival],
    state: State,
) -> list[str]:
    out = []
    for r, evs in r_events.items():
        run_id = state.server_ids.get(r)
        if run_id is None:
            continue
        # The first end status of each stretch the run was RUNNING, in the program and at the entrance.
        groups, running = [], True
        for step, kind in evs:
            if kind == "running":
                running = True
            elif running:
                groups.append(step)
                running = False
        firsts, running = [], True
        for a in sorted(
            (a for a in arrivals if a.kind == "update" and a.run == run_id and a.status == 200), key=lambda a: a.started
        ):
            if a.run_status == "RUNNING":
                running = True
            elif a.run_status in STATUSES and running:
                firsts.append(a)
                running = False
        for k, end in zip(groups, firsts, strict=False):
            tally["end-after-everything"] += 1
            late = []
            for step, pr, point in points:
                if pr != r or step >= k:
                    continue
                when = arrived.when(r, point)
                if when is None or when > end.started:
                    late.append(f"step {step}'s point {point[0]}@{point[1]}" + (" (never)" if when is None else ""))
            for v in versions:
                if v.r != r or v.step >= k or not v.must_send:
                    continue
                at = min((a.answered for a in placed.get(v.sha256, [])), default=None)
                if at is None or at > end.started:
                    late.append(f"step {v.step}'s {v.path}" + (" (never)" if at is None else ""))
            if late:
                out.append(
                    f"rule end-after-everything: run {r}'s end status of step {k} reached the server before "
                    + ", ".join(late[:5])
                    + (f" and {len(late) - 5} more" if len(late) > 5 else "")
                )
    return out


def _points_not_held(
    program: list[Call],
    versions: list[Version],
    placed: dict[str, list[Arrival]],
    points: list[tuple[int, int, tuple]],
    arrived: _Arrived,
    trace: Trace,
    ends: dict[int, list[int]],
    tally: Counter,
) -> list[str]:
    out = []
    rate: float | None = None
    clean = True  # no fault but a throttle since the last flush, and the link does not flap
    flapping = False
    last_flush = -1
    steps_state = {}
    for step, call in enumerate(program):
        steps_state[step] = (rate, clean and not flapping, last_flush)
        if call.op == "throttle":
            rate = call.args["up_bytes_per_s"]
        elif call.op == "flush":
            last_flush, clean = step, True
        elif call.op in FAULTS:
            clean = False
            if call.op == "flap":
                flapping = call.args["up_s"] is not None
    for v in versions:
        rate, clean, last_flush = steps_state[v.step]
        if rate is None or not clean or v.size / rate < HELD_MARGIN_S or v.sha256 not in placed:
            continue
        done = min(a.started for a in placed[v.sha256])  # its last byte is in: the placing begins
        # The stretch of calls made in the program's own milliseconds after the file: up to a fault, a pause, or a
        # flush (which waits for the file).
        stop = next(
            (s for s in range(v.step + 1, len(program)) if program[s].op in FAULTS | {"pause", "flush"}),
            len(program),
        )
        changed = next((s for s in range(v.step + 1, len(program)) if program[s].op in FAULTS), None)
        if changed is not None and trace.returned.get(changed - 1, 0.0) < done:
            continue  # the link changed (a throttle lifted, a fault) before the file was in: no bound holds
        late = []
        tally["points-not-held"] += 1
        for step, r, point in points:
            if not v.step <= step < stop or any(last_flush < s < step for s in ends.get(r, [])):
                continue  # outside the stretch, or behind an end status of its run that waits for files
            if v.step == step and program[step].op != "epoch":
                continue
            when = arrived.when(r, point)
            if when is None or when > done:
                late.append(f"step {step}'s {point[0]}@{point[1]} of run {r}" + (" (never)" if when is None else ""))
        if late:
            out.append(
                f"rule points-not-held: step {v.step} {v.path} ({v.size} bytes at {rate:.0f} B/s) was in before "
                + ", ".join(late[:5])
                + (f" and {len(late) - 5} more" if len(late) > 5 else "")
            )
    return out
