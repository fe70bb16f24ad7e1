"""A journal folder copied the way Google Drive uploads it — each file at its own moment, some missing, some
cut — is delivered by `bridge sync` without a crash, a duplicate or anything foreign; what its whole parts hold
reaches the server, and whatever could not be is said, with exit status 1 (issue 18)."""

from __future__ import annotations

import random
import uuid

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from bridge.cli import app
from bridge.client.journal import Journal
from tests.support.torn import holdings, log_offline, server_holdings, sha_map, write_copy

runner = CliRunner()

SEEDS = range(30)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_a_torn_copy_delivers_what_it_holds_and_says_what_it_could_not(seed, tmp_path, mlflow_server):
    rng = random.Random(seed)
    name = f"torn-{seed}-{uuid.uuid4().hex[:6]}"
    (tmp_path / "live").mkdir()
    copy = log_offline(tmp_path / "live", name, 1.0, rng)
    path = write_copy(copy, tmp_path / "copy")
    before = sha_map(path.parent)
    expected = holdings(path)
    result = runner.invoke(
        app, ["sync", "--journal", str(path), "--url", mlflow_server.url, "--timeout", "120"], env={"COLUMNS": "200"}
    )
    assert result.exit_code in (0, 1) and (result.exception is None or isinstance(result.exception, SystemExit)), (
        result.output
    )
    held, names, repeats = server_holdings(MlflowClient(mlflow_server.url), name)
    assert sorted(names) == sorted(set(names)) and set(names) <= {"run0", "run1"}, f"a twin or a foreign run: {names}"
    assert repeats == 0, "no point twice"
    assert all(value == step + int(run[3:]) / 10 for run, step, value in held.points), "nothing foreign"
    missing = expected.missing_from(held)
    assert missing.size() == 0, f"{copy.kinds}: not delivered {missing}\n{result.output}"
    # Nothing was written to a file before it was set aside: it is kept byte for byte.
    after = sha_map(path.parent)
    for rel, sha in after.items():
        for marker in (".set-aside-", ".damaged-"):
            if marker in rel:
                origin = "j.sqlite-wal" if rel.endswith("-wal") or "set-aside" in rel else "j.sqlite"
                assert sha == before.get(origin), f"{rel} differs from the copy's {origin}"
    journal = Journal(path)
    dead = journal.queue.dead_letters()
    journal.close()
    set_aside = [rel for rel in after if ".set-aside-" in rel or ".damaged-" in rel]
    if dead or set_aside:
        assert result.exit_code == 1, f"a loss must fail the sync: {copy.kinds}\n{result.output}"
        assert "dead letters" in result.output or "damaged" in result.output
