"""`outbox-relay check` against the real database and brokers: it names a mistyped
schema's installed neighbour (issue 17, item 10)."""

from __future__ import annotations

from pathlib import Path

import psycopg

from outbox_relay.operations import schema_manager
from tests.support.cli import run_cli
from tests.support.configs import write_config


def test_a_mistyped_schema_is_answered_with_the_installed_one(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db, schema="outbx")
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    line = next(line for line in checked.stdout.splitlines() if line.startswith("database"))
    assert "FAIL" in line and "did you mean 'outbox'?" in line, line
    assert "schema install" not in line, "a typo is not a reason to install a second outbox"
    status = run_cli("status", "--config", str(config))
    assert status.returncode == 1 and status.stderr.count("\n") == 1, status.stderr
    assert "did you mean 'outbox'?" in status.stderr


def test_a_schema_unlike_any_installed_one_lists_them_and_says_how_to_install(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db) as conn:
        schema_manager.install(conn, "billing_events")
    config = write_config(tmp_path / "relay.yaml", db, schema="zz")
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    line = next(line for line in checked.stdout.splitlines() if line.startswith("database"))
    assert "did you mean" not in line and "billing_events, outbox" in line, line
    assert "run `outbox-relay schema install --schema zz`" in line
