"""`outbox-relay inbox ...`: the real command in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import uuid

import psycopg
import pytest
from click.testing import CliRunner

from outbox_relay import inbox
from outbox_relay.cli import main
from tests.support.cli import run_cli


def test_schema_install_from_the_environment_is_idempotent(empty_db: str) -> None:
    first = run_cli("inbox", "schema", "install", env={"DATABASE_URL": empty_db})
    assert (first.returncode, first.stdout) == (0, "installed inbox schema 'inbox' at version 1\n"), first.stderr
    again = run_cli("inbox", "schema", "install", "--dsn", empty_db)
    assert (again.returncode, again.stdout) == (0, "inbox schema 'inbox' is already at version 1\n")
    custom = run_cli("inbox", "schema", "install", "--dsn", empty_db, "--schema", "billing_inbox")
    assert custom.stdout == "installed inbox schema 'billing_inbox' at version 1\n"
    with psycopg.connect(empty_db) as conn:
        assert inbox.first_time(conn, uuid.uuid4(), schema="billing_inbox")


def test_schema_sql_prints_ddl_and_grants_that_apply(empty_db: str) -> None:
    ddl = run_cli("inbox", "schema", "sql")
    assert ddl.returncode == 0
    assert 'CREATE TABLE "inbox".processed' in ddl.stdout
    assert 'INSERT INTO "inbox".inbox_version (version) VALUES (1);' in ddl.stdout
    assert "GRANT" not in ddl.stdout
    grants = run_cli("inbox", "schema", "sql", "--consumer-role", "billing", "--grants-only")
    assert grants.stdout.startswith("-- Least privilege for a consumer's role")
    assert "CREATE" not in grants.stdout
    assert 'GRANT EXECUTE ON FUNCTION "inbox".first_time(uuid, text) TO "billing";' in grants.stdout
    with psycopg.connect(empty_db) as conn:
        conn.execute(ddl.stdout)
        conn.commit()
        assert inbox.install(conn).previous_version == 1
    lone = run_cli("inbox", "schema", "sql", "--grants-only")
    assert (lone.returncode, lone.stderr.splitlines()[-1]) == (2, "error: --grants-only needs --consumer-role ROLE")


def test_prune_deletes_what_is_older_than_asked(consumer_db: str) -> None:
    with psycopg.connect(consumer_db) as conn:
        conn.execute(
            "INSERT INTO inbox.processed (message_id, processed_at) "
            "SELECT gen_random_uuid(), now() - interval '8 days' FROM generate_series(1, 7)"
        )
        conn.execute("INSERT INTO inbox.processed (message_id) SELECT gen_random_uuid() FROM generate_series(1, 3)")
        conn.commit()
    result = run_cli("inbox", "prune", "--older-than", "7d", "--batch-size", "2", env={"DATABASE_URL": consumer_db})
    assert (result.returncode, result.stdout) == (0, "deleted 7 record(s) of messages processed more than 7d ago\n")
    with psycopg.connect(consumer_db) as conn:
        assert conn.execute("SELECT count(*) FROM inbox.processed").fetchone() == (3,)


def test_errors_are_one_line_with_an_exit_code(empty_db: str) -> None:
    unreachable = "host=127.0.0.1 port=1 user=u password=s3cret dbname=x connect_timeout=1"
    cases = [
        (
            ["inbox", "schema", "install", "--dsn", empty_db, "--schema", "Bad-Name"],
            2,
            "error: invalid inbox schema name 'Bad-Name': use 1 to 50 lower-case letters, digits or _, "
            "not starting with a digit",
        ),
        (
            ["inbox", "prune", "--dsn", empty_db, "--older-than", "7d"],
            1,
            "error: inbox schema 'inbox' is not installed in this database: "
            "run `outbox-relay inbox schema install --schema inbox`",
        ),
        (["inbox", "schema", "install", "--dsn", unreachable], 1, "error: cannot connect to "),
    ]
    for args, code, line in cases:
        result = run_cli(*args)
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith(line), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "s3cret" not in result.stderr + result.stdout
    bad_duration = run_cli("inbox", "prune", "--dsn", empty_db, "--older-than", "a week")
    assert bad_duration.returncode == 2
    assert bad_duration.stderr.startswith("error: invalid value for '--older-than': invalid duration 'a week'")
    no_dsn = run_cli("inbox", "prune", "--older-than", "7d", env={"DATABASE_URL": ""})
    assert no_dsn.returncode == 2 and no_dsn.stderr.startswith("error: no database given: --dsn DSN"), no_dsn.stderr


@pytest.mark.parametrize(
    "command",
    [["inbox"], ["inbox", "schema"], ["inbox", "schema", "install"], ["inbox", "schema", "sql"], ["inbox", "prune"]],
    ids=" ".join,
)
def test_every_inbox_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: main " + " ".join(command))


def test_the_inbox_group_runs_on_its_own() -> None:
    # An application may embed the inbox's click group in its own CLI: it must work
    # without the outbox-relay group around it (in a fresh interpreter).
    code = (
        "import sys; from click.testing import CliRunner; from outbox_relay.cli.inbox import inbox_group; "
        "r = CliRunner().invoke(inbox_group, ['schema', 'install', '--dsn', 'x', '--schema', 'Bad']); "
        "print(r.exit_code, r.output.strip())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 error: invalid inbox schema name 'Bad'"), result.stdout
