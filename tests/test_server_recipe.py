"""server/: the team recipe's files agree with each other and with the README (ports, database, bucket, flags).

Docker is not available on the test machines, so the containers themselves are not started here; the same
`bridge serve` command line runs under load against PostgreSQL and an S3-compatible server in test_team_load.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from typer.testing import CliRunner

from bridge.cli import app

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "server"


def _team_command(text: str) -> list[str]:
    """The `bridge serve … --workers 4` command in a text (line continuations joined)."""
    joined = text.replace("\\\n", " ")
    match = re.search(r"bridge serve (--backend-store-uri [^\n]*--workers 4)", joined)
    assert match, "no team `bridge serve` command found"
    return shlex.split(match.group(1))


def test_compose_services_listen_on_loopback_and_need_the_env_files_variables():
    compose = yaml.safe_load((SERVER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "create-bucket"} <= set(services)
    for name in ("postgres", "minio"):
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"]), name
    required = set(re.findall(r"\$\{(\w+)(?::\?[^}]*)?\}", (SERVER / "compose.yaml").read_text()))
    example = dict(
        line.split("=", 1)
        for line in (SERVER / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example), required - set(example)
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"
    assert "local/mlflow" in services["create-bucket"]["entrypoint"]


def test_readme_server_readme_and_unit_give_the_same_team_command_and_it_parses():
    commands = [
        _team_command((REPO / "README.md").read_text()),
        _team_command((SERVER / "README.md").read_text()),
        _team_command((SERVER / "bridge.service").read_text()),
    ]
    assert commands[0] == commands[1] == commands[2]
    options = dict(zip(commands[0][::2], commands[0][1::2], strict=False))
    assert options["--backend-store-uri"] == "postgresql://bridge@127.0.0.1:5433/mlflow"  # compose's port and db
    compose = yaml.safe_load((SERVER / "compose.yaml").read_text())
    assert "127.0.0.1:5433:5432" in compose["services"]["postgres"]["ports"]
    assert options["--artifacts-destination"].startswith("s3://mlflow/")  # the bucket create-bucket makes
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in options:
        assert flag in help_text
    assert "'.[serve,team]'" in (REPO / "README.md").read_text()
    assert "'.[serve,team]'" in (SERVER / "README.md").read_text()


def test_the_team_extra_brings_the_drivers_mlflow_needs():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    team = " ".join(extras["team"])
    assert "boto3" in team and "psycopg" in team
    assert any("team" in item for item in extras["test"] if item.startswith("bridge["))
