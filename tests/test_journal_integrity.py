"""The opening check works on a private copy: a stale or damaged WAL is set aside, never applied; a repair keeps
the intake offsets and the row counters; the repair is said by whichever open comes next (issue 18)."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import time
import uuid

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from typer.testing import CliRunner

from bridge.cli import app
from bridge.client.journal import Journal, ids, integrity
from bridge.client.journal import intake as _intake

runner = CliRunner()


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _params(journal: Journal, run: str, start: int, n: int) -> None:
    for i in range(start, start + n):
        journal.append_batch(run, params=[(f"p{i}", str(i))])


def _torn_stale_wal(tmp_path):
    """A journal folder whose database is newer than its WAL: the database holds p0..p199, the WAL p0..p99."""
    live = tmp_path / "live" / "j.sqlite"
    live.parent.mkdir()
    journal = Journal(live)
    _params(journal, "r", 0, 100)
    early_wal = integrity.wal_path(live).read_bytes()
    journal.database.checkpoint()
    _params(journal, "r", 100, 100)
    journal.database.checkpoint()  # the database file now holds every entry
    torn = tmp_path / "torn" / "j.sqlite"
    torn.parent.mkdir()
    shutil.copyfile(live, torn)
    integrity.wal_path(torn).write_bytes(early_wal)
    journal.close()
    return torn


def test_the_check_leaves_the_persons_files_byte_identical(tmp_path):
    torn = _torn_stale_wal(tmp_path)
    before = {p.name: _sha(p) for p in torn.parent.iterdir()}
    verdict = integrity.check(torn)
    verdict.cleanup()
    assert verdict.state == integrity.STALE_WAL, verdict
    assert {p.name: _sha(p) for p in torn.parent.iterdir()} == before


def test_a_wal_older_than_its_database_is_set_aside_not_applied(tmp_path):
    torn = _torn_stale_wal(tmp_path)
    wal_sha = _sha(integrity.wal_path(torn))
    journal = Journal(torn)
    report = journal.repair_report
    assert report is not None and report.wal_only
    assert report.damaged_file.exists() and _sha(report.damaged_file) == wal_sha, "kept byte for byte"
    keys = sorted(int(op.key[1:]) for op in journal.queue.pending_ops("r", 1000))
    assert keys == list(range(200)), "the database file's entries, none rolled back"
    assert "set aside" in str(report) and str(report.damaged_file) in str(report)
    journal.close()


def test_a_database_copied_before_its_wals_generation_is_not_taken_with_that_wal(tmp_path):
    """Soak finding (soak_torn_copies seeds 4050, 4057; once in test_torn_copies under load): Drive took the
    database, then the live journal checkpointed, restarted its WAL and wrote on; Drive took that WAL. The two
    make a view SQLite finds whole and whose counters are ahead, but the entries of the WAL generation in between
    are in neither file while its intake offset says they were moved: 310 of 610 points were lost, unsaid."""
    live = tmp_path / "live" / "j.sqlite"
    live.parent.mkdir()
    journal = Journal(live)
    experiment = journal.add_experiment("e", {})
    run = journal.add_run(experiment_id=experiment, user_id="u", start_time=1, name="r", tags={})
    step = 0

    def log(n: int) -> None:
        nonlocal step
        for _ in range(n):
            journal.append_batch(run, [("loss", float(step), 1_700_000_000_000 + step, step)])
            step += 1

    def checkpoint_whole() -> None:  # the next write starts the WAL over
        journal.database._connection().execute("pragma wal_checkpoint(TRUNCATE)")

    log(300)
    journal.sync()
    checkpoint_whole()
    torn = tmp_path / "torn" / "j.sqlite"
    torn.parent.mkdir()
    shutil.copyfile(live, torn)  # Drive takes the database now
    log(300)
    journal.sync()
    checkpoint_whole()
    log(10)
    journal.sync()
    shutil.copyfile(integrity.wal_path(live), integrity.wal_path(torn))  # ... and the new WAL now
    for intake in live.parent.glob("j.sqlite.intake-*"):
        shutil.copyfile(intake, torn.parent / intake.name)
    journal.close()
    verdict = integrity.check(torn)
    verdict.cleanup()
    assert verdict.state == integrity.DAMAGED_WAL and "does not fit" in verdict.problem, verdict
    restored = Journal(torn)
    assert restored.repair_report is not None and restored.repair_report.wal_only
    steps = sorted(op.step for op in restored.queue.pending_ops(run, 10_000) if op.kind == "metric")
    assert steps == list(range(610)), "the database alone and the whole intake file hold every point"
    restored.close()


def test_delivered_requeued_and_dropped_entries_keep_every_id_accounted_for(tmp_path):
    """The count the check above relies on: after deliveries, a requeue and dropped dead letters, no id is
    unaccounted for, in the database alone or with its WAL (no false alarm)."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    _params(journal, "r", 0, 50)
    ops = journal.queue.pending_ops("r", 1000)
    journal.queue.complete([op.id for op in ops[:20]])
    journal.queue.requeue(ops[20].id)
    _params(journal, "r", 50, 5)
    journal.queue.bury([ops[21].id], "refused", reason="server-refused")
    assert journal.queue.drop_dead() == 1
    verdict = integrity.check(path)  # with its WAL (nothing checkpointed by hand)
    verdict.cleanup()
    assert verdict.state == integrity.WHOLE, verdict
    journal.database.checkpoint()
    verdict = integrity.check(path)
    verdict.cleanup()
    assert verdict.state == integrity.WHOLE, verdict
    conn = journal.database._connection()
    (seq,) = conn.execute("select seq from sqlite_sequence where name='ops'").fetchone()
    (present,) = conn.execute("select count(*) from ops").fetchone()
    (deleted,) = conn.execute("select n from ops_deleted").fetchone()
    assert seq - present - deleted == 0 and deleted >= 21
    journal.close()


def test_a_damaged_wal_beside_a_whole_database_is_set_aside(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    _params(journal, "r", 0, 50)
    journal.database.checkpoint()
    _params(journal, "r", 50, 50)
    folder = tmp_path / "copy"
    folder.mkdir()
    copy = folder / "j.sqlite"
    shutil.copyfile(path, copy)
    wal = bytearray(integrity.wal_path(path).read_bytes())
    journal.close()
    verdict = integrity.check(copy)  # no WAL beside it: whole
    verdict.cleanup()
    assert verdict.state == integrity.WHOLE
    # A WAL whose frames are valid but whose pages are garbage: SQLite applies it, and the b-tree breaks.
    page = 4096
    for frame in range(len(wal) // (page + 24)):
        start = 32 + frame * (page + 24) + 24
        wal[start + 100 : start + 200] = b"\x07" * 100
    _refresh_wal_checksums(wal, page)
    integrity.wal_path(copy).write_bytes(bytes(wal))
    verdict = integrity.check(copy)
    verdict.cleanup()
    assert verdict.state == integrity.DAMAGED_WAL, verdict


def _refresh_wal_checksums(wal: bytearray, page: int) -> None:
    """Recompute a WAL's cumulative checksums (SQLite's format: pairs of 32-bit words)."""
    import struct

    magic = struct.unpack(">I", wal[:4])[0]
    order = "<" if magic & 1 == 0 else ">"

    def checksum(data: bytes, s1: int, s2: int) -> tuple[int, int]:
        words = struct.unpack(f"{order}{len(data) // 4}I", data)
        for i in range(0, len(words), 2):
            s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
            s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
        return s1, s2

    s1, s2 = checksum(bytes(wal[:24]), 0, 0)
    wal[24:32] = struct.pack(">II", s1, s2)
    pos = 32
    while pos + 24 + page <= len(wal):
        s1, s2 = checksum(bytes(wal[pos : pos + 8]), s1, s2)
        s1, s2 = checksum(bytes(wal[pos + 24 : pos + 24 + page]), s1, s2)
        wal[pos + 16 : pos + 24] = struct.pack(">II", s1, s2)
        pos += 24 + page


def test_a_repair_keeps_intake_offsets_and_row_counters(tmp_path):
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    for chunk in range(10):
        journal.append_batch("r", [("loss", float(i), i, i) for i in range(chunk * 500, chunk * 500 + 500)])
    journal.move_intake()
    intake_name = journal._intake.name
    intake_file = journal._intake.path
    delivered = [op.id for op in journal.queue.pending_ops("r", 100_000)][-10:]
    with journal.database.db() as conn:  # the newest rows were delivered: the counter stands above the rest
        conn.execute(f"delete from ops where id in ({','.join('?' * len(delivered))})", delivered)
    top = max(delivered)
    # The process "dies": its intake file stays, fully moved.
    kept_intake = intake_file.read_bytes()
    journal.database.checkpoint()
    journal.database.close()
    journal._intake.close()  # its lock goes with the process
    intake_file.write_bytes(kept_intake)
    with sqlite3.connect(path) as conn:
        conn.execute("pragma wal_checkpoint(TRUNCATE)")
    raw = bytearray(path.read_bytes())
    page = 4096
    middle = len(raw) // page // 2
    raw[middle * page : (middle + 2) * page] = b"\xff" * (2 * page)
    path.write_bytes(bytes(raw))
    repaired = Journal(path)
    assert repaired.repair_report is not None and not repaired.repair_report.wal_only
    with repaired.database.db(write=False) as conn:
        assert conn.execute("select moved from intake where name=?", (intake_name,)).fetchone() is None
        ops = conn.execute("select count(*), count(distinct ts) from ops where kind='metric'").fetchone()
    assert ops[0] == ops[1] < 5_000, "no point of the moved intake journaled twice"
    repaired.append_batch("r", params=[("after", "1")])
    (after,) = [op for op in repaired.queue.pending_ops("r", 100_000) if op.key == "after"]
    assert after.id > top, "a row id is never reused after a repair"
    repaired.close()


def test_a_repair_is_said_by_the_next_open_that_reports(tmp_path):
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    first = Journal(path)  # e.g. `bridge queue`: repairs, says nothing
    assert first.repair_report is not None
    first.close()
    second = Journal(path)
    assert second.repair_report is None
    (said,) = second.database.repairs(take=True)
    assert "journal was damaged" in said
    assert second.database.repairs() == []
    second.close()


def test_sync_says_a_repair_an_earlier_open_made_and_fails(tmp_path, mlflow_server):
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    Journal(path).close()  # repaired by an earlier open
    journal = Journal(path)
    experiment = journal.add_experiment(f"rep-{uuid.uuid4().hex[:6]}", {})
    journal.add_run(experiment_id=experiment, user_id="u", start_time=int(time.time() * 1000), name="x", tags={})
    journal.close()
    result = runner.invoke(app, ["sync", "--journal", str(path), "--url", mlflow_server.url], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "journal was damaged" in result.output
    again = runner.invoke(app, ["sync", "--journal", str(path), "--url", mlflow_server.url], env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "Delivered everything" in again.output, again.output


def test_intake_moved_offsets_are_a_journal_table(tmp_path):
    """The table the repair must carry over (guards the name the salvage list uses)."""
    journal = Journal(tmp_path / "j.sqlite")
    journal.append_batch("r", [("m", 1.0, 1, 0)])
    journal.move_intake()
    with journal.database.db(write=False) as conn:
        (moved,) = conn.execute("select moved from intake").fetchone()
    assert moved == len(_intake.encode("r", "m", 1.0, 1, 0))
    journal.close()


def test_local_run_ids_are_told_from_server_ids(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    local = journal.add_run(experiment_id="0", user_id="u", start_time=1, name="x", tags={})
    server = uuid.uuid4().hex  # how MLflow's servers make run ids
    assert ids.is_local_run_id(local) and not ids.is_local_run_id(server)
    assert journal.ids.server_run(server) == (server, None), "a run not created here is the server's own"
    with journal.database.db() as conn:
        conn.execute("delete from runs where local_id=?", (local,))
    assert journal.ids.server_run(local) == (None, None) and journal.ids.row_lost(local)
    journal.close()


def test_a_run_whose_row_was_lost_becomes_dead_letters_never_sent_by_its_local_id(tmp_path, mlflow_server):
    path = tmp_path / "j.sqlite"
    name = f"lost-{uuid.uuid4().hex[:6]}"
    journal = Journal(path)
    experiment = journal.add_experiment(name, {})
    kept = journal.add_run(experiment_id=experiment, user_id="u", start_time=1, name="kept", tags={})
    lost = journal.add_run(experiment_id=experiment, user_id="u", start_time=1, name="lost", tags={})
    for run in (kept, lost):
        journal.append_batch(run, [("loss", float(s), 1_700_000_000_000 + s, s) for s in range(20)])
        journal.append_batch(run, params=[("lr", "0.1")])
    journal.move_intake()
    with journal.database.db() as conn:  # what a torn copy looks like: the run's row and creation are gone
        conn.execute("delete from runs where local_id=?", (lost,))
        conn.execute("delete from ops where run=? and kind='create_run'", (lost,))
    journal.close()
    result = runner.invoke(app, ["sync", "--journal", str(path), "--url", mlflow_server.url], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert "run-row-lost" in result.output and "could not be delivered" in result.output
    client = MlflowClient(mlflow_server.url)
    (experiment_id,) = [e.experiment_id for e in client.search_experiments(filter_string=f"name = '{name}'")]
    runs = client.search_runs([experiment_id])
    assert [r.info.run_name for r in runs] == ["kept"]
    assert len(client.get_metric_history(runs[0].info.run_id, "loss")) == 20
    with pytest.raises(MlflowException):
        client.get_run(lost)
    journal = Journal(path)
    letters = journal.queue.dead_letters()
    assert len(letters) == 21 and {d.reason for d in letters} == {"run-row-lost"}
    assert all(d.op.run == lost for d in letters)
    journal.close()


def test_connect_says_a_repair_an_earlier_open_made_and_the_dead_letters(bridge_connect, tmp_path, capsys):
    from tests.support.mlflow_server import closed_url

    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    journal = Journal(path)  # an earlier open (`bridge queue`) repairs it and says nothing
    journal.append_batch("r", params=[("a", "1")])
    (op,) = journal.queue.pending_ops("r", 10)
    journal.queue.bury([op.id], "gone", reason="run-row-lost")
    journal.close()
    bridge_connect(closed_url(), journal=path)
    err = capsys.readouterr().err
    assert "journal was damaged" in err
    assert "1 entries that could not be delivered (dead letters: 1 run-row-lost)" in err


def test_every_entry_the_journal_writes_carries_a_checksum_that_matches(tmp_path):
    """A repair drops rows whose checksum does not match: no write path may leave one that a repair would drop."""
    from bridge.client.journal.database import _whole_entry

    source = tmp_path / "a.bin"
    source.write_bytes(b"x" * 100)
    journal = Journal(tmp_path / "j.sqlite")
    experiment = journal.add_experiment("e", {"k": "v"})
    run = journal.add_run(experiment_id=experiment, user_id="u", start_time=1, name="n", tags={"t": "1"})
    journal.append_batch(run, [("loss", 0.5, 1, 0), ("nan", float("nan"), 2, 1), ("inf", float("inf"), 3, 2)])
    journal.append_batch(run, [("one", 7.0, 4, 3)])
    journal.append_batch(run, params=[("p", "1")], tags=[("t", "ü")])
    journal.spool_artifact(run, source, "a/a.bin")
    journal.add_entity("LOGGED_MODEL", "m-1", {"name": "m"}, op=(run, "create_logged_model", {"name": "m"}))
    journal.update_run(run, status="FINISHED", end_time=5, name=None)
    journal.move_intake()
    (artifact,) = [op for op in journal.queue.pending_ops(run, 100) if op.kind == "artifact"]
    journal.queue.update_body(artifact.id, {"spool": "x", "path": "a/a.bin", "step": 3})
    with journal.database.db(write=False) as conn:
        columns = [r[1] for r in conn.execute("pragma table_info(ops)")]
        rows = conn.execute(f"select {','.join(columns)} from ops").fetchall()
    journal.close()
    whole = _whole_entry(columns)
    assert len(rows) == 11 and all(row[columns.index("crc")] is not None for row in rows)
    assert [row for row in rows if not whole(row)] == []


def test_a_row_a_torn_page_garbled_is_dropped_by_the_repair_never_delivered(tmp_path):
    """Torn-copies soak, seed 5175 (and CI's seed 17): a copy of the database taken while SQLite wrote it held a
    page whose cell read back as a valid-looking point — a known run, `loss`, value 2.0 at step 0 — that was
    never logged; the repair copied it and `bridge sync` delivered it. Here a point's value is garbled in the
    file itself (the page stays well-formed) and the file is damaged elsewhere, so the repair runs."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    journal.append_batch("r", [("loss", i + 0.25, 1_700_000_000_000 + i, i) for i in range(2_000)])
    journal.move_intake()
    journal.database.checkpoint()
    journal.database.close()
    journal._intake.close()
    for suffix in ("-wal", "-shm"):
        integrity.wal_path(path).with_name(path.name + suffix).unlink(missing_ok=True)
    raw = bytearray(path.read_bytes())
    import struct

    garbled = struct.pack(">d", 1234.25)
    at = raw.find(struct.pack(">d", 1000.25))
    assert at > 0
    raw[at : at + 8] = garbled  # the cell still decodes: a point of run r, step 1000, value 1234.25
    page = 4096
    damaged = len(raw) // page // 2
    if damaged == at // page:
        damaged += 1
    raw[damaged * page : (damaged + 1) * page] = b"\xff" * page  # and the file is damaged: the next open repairs
    path.write_bytes(bytes(raw))
    repaired = Journal(path)
    report = repaired.repair_report
    with repaired.database.db(write=False) as conn:
        points = conn.execute("select step, value from ops where kind='metric'").fetchall()
    repaired.close()
    assert report is not None and report.rows_recovered > 0
    assert all(value == step + 0.25 for step, value in points), "nothing foreign survives a repair"
    assert 1000 not in {step for step, _ in points}
    assert report.rows_lost is None or report.rows_lost >= 1


class _DamagedReads:
    """A read-only view of a real journal whose reads in a range of row ids hit damage, and whose max(rowid) a
    damaged page made huge (torn-copies soak in CI, seed 16: the repair stepped one row id at a time towards it
    and `bridge sync` ran past its 300 s timeout)."""

    def __init__(self, conn: sqlite3.Connection, damaged: range, top: int, backwards: range = range(0)) -> None:
        self.conn, self.damaged, self.top, self.backwards, self.reads = conn, damaged, top, backwards, 0

    def execute(self, sql: str, params=()):
        self.reads += 1
        if params and "limit 256" in sql and params[0] in self.backwards:
            return self.conn.execute(sql, (params[0] - 300,))  # a page pointing back: rows already walked
        if "max(rowid)" in sql:
            return self.conn.execute("select ?", (self.top,))
        if "sqlite_sequence" in sql:
            raise sqlite3.DatabaseError("database disk image is malformed")
        if params and "rowid" in sql and (params[0] in self.damaged or params[0] + 1 in self.damaged):
            raise sqlite3.DatabaseError("database disk image is malformed")
        return self.conn.execute(sql, params)


def _salvage_pair(tmp_path, rows: int) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """(a journal file whose `intake` table — a plain rowid table: no counter bounds its top — holds `rows` rows,
    an empty journal file to salvage them into)."""
    from bridge.client.journal.database import _SCHEMA

    source = sqlite3.connect(tmp_path / "old.sqlite", isolation_level=None)
    fresh = sqlite3.connect(tmp_path / "new.sqlite", isolation_level=None)
    for conn in (source, fresh):
        for statement in _SCHEMA:
            conn.execute(statement)
    with source:
        source.execute("begin")
        source.executemany("insert into intake(name, moved) values(?,?)", [(f"i{n}", n) for n in range(1, rows + 1)])
    return source, fresh


def test_a_repair_strides_over_damage_and_a_made_up_top_row_id_in_bounded_reads(tmp_path):
    from bridge.client.journal.database import _salvage_table

    source, fresh = _salvage_pair(tmp_path, 20_000)
    # Damage from row 5,000 to the end: every read past it fails, up to the made-up top.
    old = _DamagedReads(source, damaged=range(5_000, 2**63), top=2**62)
    copied, lost, exact = _salvage_table(old, fresh, "intake")  # type: ignore[arg-type]
    assert old.reads < 20_000, "bounded: strides, not one read per made-up row id"
    assert not exact and lost > 4_000
    names = {name for (name,) in fresh.execute("select name from intake")}
    assert {f"i{n}" for n in range(1, 5_000)} <= names, "what came before the damage is kept"
    assert copied == len(names) >= 4_999


def test_a_repair_walks_on_when_a_damaged_tree_answers_rows_it_already_walked(tmp_path):
    """CI seed 5 (after the fix above): a damaged tree answered `rowid > X` with rows at or before X, the walk
    took the last one's id and went round in a circle until the 300 s timeout."""
    from bridge.client.journal.database import _salvage_table

    source, fresh = _salvage_pair(tmp_path, 3_000)
    old = _DamagedReads(source, damaged=range(0), top=3_000, backwards=range(1_000, 1_300))
    copied, _lost, _exact = _salvage_table(old, fresh, "intake")  # type: ignore[arg-type]
    assert old.reads < 1_000
    assert copied == 3_000 and fresh.execute("select count(*) from intake").fetchone() == (3_000,)


def test_a_wal_whose_tree_reaches_none_of_the_rows_since_the_database_file_is_set_aside_losing_no_point(tmp_path):
    """test_torn_copies[14] under load 30 ('wal newer than db'): 668 points held, "Delivered everything", exit 0.
    The database file from moment A, its WAL from B (after a checkpoint the file missed and the WAL's restart),
    the intake from C. SQLite applies that WAL without a complaint, but the inner page of the entries' tree
    reads as it was at A, so the rows written between A and B are on no page the view reaches, while the
    intake offset (from the WAL) says their points were moved. The WAL view counts entries that are neither
    there nor deleted (ops_deleted): it is set aside, the database file alone is taken, and every intake
    point past its own offset is journaled once; the params written between A and B are said lost."""
    live = tmp_path / "live" / "j.sqlite"
    live.parent.mkdir()
    journal = Journal(live)
    runs = [journal.add_run(experiment_id="e", user_id="u", start_time=1, name=f"run{r}", tags={}) for r in (0, 1)]

    def tick(first: int, params: int = 0) -> None:  # what the client logs between two journal syncs, then the sync
        for run in runs:
            journal.append_batch(run, params=[(f"p{first}-{i}", "x") for i in range(params)])
        for step in range(first, first + 20):
            for r, run in enumerate(runs):
                journal.append_batch(run, [("loss", step + r / 10, 1_700_000_000_000 + step, step)])
        journal.sync()  # intake into SQLite, then a checkpoint: the next write starts the WAL again

    tick(0)
    at_a = live.read_bytes()  # moment A: the database file, steps 0..19
    for first in range(20, 220, 20):  # new pages for the entries, the intake offset moves on
        tick(first, params=1 if first == 100 else 0)  # a param of each run among them
    # Moment B: the WAL holds only what the last tick wrote (its rows fit on the page the tick before began): the
    # intake offset, the counters and that page, not the inner page of the entries' tree that points to it. A view
    # with it reads that inner page as it was at A: the rows of steps 20..219 are on no page it reaches.
    at_b = integrity.wal_path(live).read_bytes()
    tick(220)
    intake_name = journal._intake.name
    at_c = journal._intake.path.read_bytes()[:-30]  # moment C: the intake, its last record cut
    journal.database.close()
    journal._intake.close()
    torn = tmp_path / "torn" / "j.sqlite"
    torn.parent.mkdir()
    torn.write_bytes(at_a)
    integrity.wal_path(torn).write_bytes(at_b)
    torn.with_name(intake_name).write_bytes(at_c)
    logged = {(run, step, value) for run, _key, value, _ts, step in _intake.scan(at_c)[0]}
    assert len(logged) == 479

    verdict = integrity.check(torn)
    try:
        assert verdict.state == integrity.DAMAGED_WAL, verdict
        assert "copied before the WAL began" in verdict.problem
    finally:
        verdict.cleanup()
    reopened = Journal(torn)
    with reopened.database.db(write=False) as conn:
        journaled = conn.execute("select run, step, value from ops where kind='metric'").fetchall()
        params = conn.execute("select count(*) from ops where kind='param'").fetchone()[0]
    assert not logged - set(journaled), f"{len(logged - set(journaled))} points of the intake are in no entry"
    assert len(journaled) == len(logged), "each point once"
    assert params == 0  # the two params were written between A and B: in neither file
    (said,) = reopened.database.repairs()
    assert "WAL" in said, said
    assert any(p.name.startswith("j.sqlite-wal.set-aside-") for p in torn.parent.iterdir()), "kept, not applied"
    reopened.close()
