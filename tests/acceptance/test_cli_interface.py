"""One command line (issue 25, point 5): every command that touches the database takes
--dsn or --config and finds them the same way; the old option names still work; one
error style; one exit-code convention. The real command against real PostgreSQL."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import psycopg
import pytest

from outbox_relay import enqueue
from tests.support.cli import exe, run_cli, run_cli_at_terminal
from tests.support.configs import write_config
from tests.support.outbox import make_dead_letter
from tests.support.waiting import wait_for

# Neither variable from the test's own environment: each test says what it sets.
NO_ENV = {"DATABASE_URL": "", "OUTBOX_RELAY_CONFIG": ""}


def _is_dead(db: str, message_id: str) -> bool:
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT dead_lettered_at IS NOT NULL FROM outbox.messages WHERE message_id = %s", (message_id,)
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.parametrize("form", ["--dsn", "--config", "DATABASE_URL", "OUTBOX_RELAY_CONFIG", "./relay.yaml"])
def test_every_database_command_takes_dsn_or_config_in_each_form(db: str, tmp_path: Path, form: str) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    given, env, cwd = {
        "--dsn": (["--dsn", db], NO_ENV, elsewhere),
        "--config": (["--config", str(config)], NO_ENV, elsewhere),
        "DATABASE_URL": ([], {**NO_ENV, "DATABASE_URL": db}, elsewhere),
        "OUTBOX_RELAY_CONFIG": ([], {**NO_ENV, "OUTBOX_RELAY_CONFIG": str(config)}, elsewhere),
        "./relay.yaml": ([], NO_ENV, tmp_path),
    }[form]

    def cli(*args: str) -> str:
        out = run_cli(*args, *given, env=env, cwd=cwd)
        assert out.returncode == 0, (args, out.stdout + out.stderr)
        return out.stdout

    assert "already at version" in cli("schema", "install")
    assert "NOTIFY trigger on for schema 'outbox'" in cli("schema", "notify", "on")
    assert "already in table mode" in cli("schema", "source", "table")
    dead = make_dead_letter(db, "orders.created", {"n": 1}, key="k")
    assert "pending        0" in cli("status") and dead in cli("dead-letters", "list")
    assert f"dead letter {dead}" in cli("dead-letters", "show", dead)
    assert "requeued 1 message(s)" in cli("dead-letters", "requeue", "--message-id", dead)
    assert not _is_dead(db, dead)
    purged = make_dead_letter(db, "orders.created", {"n": 2})
    assert "deleted 1 dead letter(s)" in cli("dead-letters", "purge", "--message-id", purged, "--yes")


def test_a_config_wins_over_database_url_and_a_dsn_on_the_command_line_over_both(db: str, tmp_path: Path) -> None:
    installed = run_cli("schema", "install", "--dsn", db, "--schema", "events", env=NO_ENV)
    assert installed.returncode == 0, installed.stderr
    config = write_config(tmp_path / "relay.yaml", db, schema="events")
    env = {**NO_ENV, "DATABASE_URL": db, "OUTBOX_RELAY_CONFIG": str(config)}
    assert run_cli("status", env=env).stdout.startswith("schema events\n"), "the config, not DATABASE_URL alone"
    # --dsn given: no config it was not given (the default schema); with --config too: the config's schema.
    assert run_cli("status", "--dsn", db, env=env).stdout.startswith("schema outbox\n")
    both = run_cli("status", "--dsn", db, "--config", str(config), env=NO_ENV)
    assert both.returncode == 0 and both.stdout.startswith("schema events\n"), both.stderr
    contradicts = run_cli("status", "--config", str(config), "--schema", "outbox", env=NO_ENV)
    assert contradicts.returncode == 2 and contradicts.stdout == ""
    assert contradicts.stderr.splitlines() == [
        "error: --schema outbox differs from database.schema 'events' in the config: drop --schema, "
        "or give --dsn without a config to work on another schema"
    ]


def test_a_schema_install_job_without_the_images_config_uses_database_url(empty_db: str, tmp_path: Path) -> None:
    # The image sets OUTBOX_RELAY_CONFIG for every container; the schema-install Job mounts no config.
    env = {"OUTBOX_RELAY_CONFIG": str(tmp_path / "not-mounted.yaml"), "DATABASE_URL": empty_db}
    done = run_cli("schema", "install", "--schema", "outbox", env=env, cwd=tmp_path)
    assert done.returncode == 0 and "installed outbox schema 'outbox'" in done.stdout, done.stderr
    nothing = run_cli("status", env={**env, "DATABASE_URL": ""}, cwd=tmp_path)
    assert nothing.returncode == 2 and nothing.stderr.count("\n") == 1, nothing.stderr
    assert f"OUTBOX_RELAY_CONFIG names {tmp_path / 'not-mounted.yaml'}, which does not exist" in nothing.stderr


@pytest.mark.parametrize(
    ("command", "why"),
    [
        (["run"], "its brokers and routes"),
        (["check"], "it checks the config's brokers and routes"),
        (["replay", "--all", "--yes"], "its routes must take the copies' topics"),
        (["backfill", "--table", "t", "--topic", "t", "--yes"], "its routes must take the topic"),
        (["audit"], "it reads the config's brokers"),
        (["claim-check", "sweep", "--older-than", "1h"], "its claim_check stores and relay.retention"),
    ],
    ids=lambda c: " ".join(c) if isinstance(c, list) else "",
)
def test_a_command_that_needs_brokers_or_routes_says_so_in_one_line(
    db: str, tmp_path: Path, command: list[str], why: str
) -> None:
    out = run_cli(*command, "--dsn", db, env=NO_ENV, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        f"error: `outbox-relay {command[0] if command[0] != 'claim-check' else 'claim-check sweep'}` needs a config "
        f"({why}): give --config FILE (or set OUTBOX_RELAY_CONFIG; ./relay.yaml is read when present)"
    ]


def test_inbox_commands_read_a_relay_config_only_when_given_one(db: str, empty_db: str, tmp_path: Path) -> None:
    # A relay.yaml beside the command names the outbox's database, not the consumer's.
    write_config(tmp_path / "relay.yaml", db)
    done = run_cli("inbox", "schema", "install", env={**NO_ENV, "DATABASE_URL": empty_db}, cwd=tmp_path)
    assert done.returncode == 0 and "installed inbox schema 'inbox'" in done.stdout, done.stderr
    consumer = write_config(tmp_path / "consumer.yaml", empty_db, schema="events")
    again = run_cli("inbox", "schema", "install", "--config", str(consumer), env=NO_ENV, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == "inbox schema 'inbox' is already at version 1\n", again.stderr
    with psycopg.connect(db) as conn:
        found = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'inbox'").fetchone()
    assert found == (0,), "nothing installed in the relay's database"


def test_old_option_names_keep_working_or_say_what_to_use(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    dead = make_dead_letter(db, "orders.created", {"n": 1})
    by_id = run_cli("dead-letters", "requeue", "--config", str(config), "--id", dead)
    assert by_id.returncode == 0 and "requeued 1 message(s)" in by_id.stdout, by_id.stderr
    run_cli("inbox", "schema", "install", "--dsn", db)
    pruned = run_cli("inbox", "prune", "--dsn", db, "--older-than", "7d", "--batch-size", "2")
    assert pruned.returncode == 0 and pruned.stdout.startswith("deleted 0 record(s)"), pruned.stderr
    both = run_cli("inbox", "prune", "--dsn", db, "--older-than", "7d", "--batch-size", "2", "--chunk", "3")
    assert (both.returncode, both.stderr) == (2, "error: --batch-size is the old name of --chunk: give --chunk alone\n")
    # One value syntax for the same idea: messages per second as 500 or 500/s in both commands.
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders.created", {"n": 2})
        conn.execute("UPDATE outbox.messages SET dispatched_at = now()")
        conn.commit()
    for rate in ("500/s", "500"):
        dry = run_cli("replay", "--config", str(config), "--all", "--dry-run", "--rate", rate)
        assert dry.returncode == 0 and "message(s) to replay" in dry.stdout, dry.stderr
    bad = run_cli("replay", "--config", str(config), "--all", "--dry-run", "--rate", "fast")
    assert bad.returncode == 2 and "'--rate': 'fast': give messages per second, e.g. 500 or 500/s" in bad.stderr
    # schema sql --grants-only prints grants, so it needs a role (as inbox schema sql does).
    lone = run_cli("schema", "sql", "--grants-only")
    assert (lone.returncode, lone.stdout) == (2, "")
    assert lone.stderr == (
        "error: --grants-only needs a role: --relay-role, --producer-role, --outcomes-role or --console-role ROLE\n"
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["dead-letters", "requeue", "--topc", "x"], "error: no such option '--topc' (did you mean '--topic'?)"),
        (["dead-letters", "list", "--limit", "0"], "error: invalid value for '--limit': 0 is not in the range"),
        (["inbox", "prune", "--dsn", "x"], "error: missing option '--older-than'"),
        (["dead-letters", "lst"], "error: no such command 'lst'"),
        (["schema", "notify", "maybe"], "error: invalid value for '{on|off}': 'maybe' is not one of 'on', 'off'"),
        (["dead-letters", "show", "not-a-uuid"], "error: invalid value for 'MESSAGE_ID': 'not-a-uuid' is not a valid"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_option_and_where_help_is(args: list[str], says: str) -> None:
    out = run_cli(*args, env=NO_ENV)
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(says), out.stderr
    command = " ".join(args[:2]) if args[0] != "dead-letters" or args[1] != "lst" else args[0]
    assert lines[0].endswith(f"; see 'outbox-relay {command} --help'"), lines[0]


@pytest.mark.parametrize("group", [[], ["dead-letters"], ["inbox", "schema"]], ids=lambda g: " ".join(g) or "top")
def test_a_group_given_no_command_shows_its_help(group: list[str]) -> None:
    # Not an error line: the help, as click shows it (on stderr, exit 2).
    out = run_cli(*group, env=NO_ENV)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.startswith(f"Usage: outbox-relay {' '.join([*group, ''])}"), out.stderr
    assert "Commands:" in out.stderr and "error:" not in out.stderr


def test_a_question_answered_no_is_one_line_exit_1_and_changes_nothing(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    dead = make_dead_letter(db, "orders.created", {"n": 1})
    declined = run_cli_at_terminal("dead-letters", "purge", "--config", str(config), "--all", answer="n")
    assert declined.returncode == 1, declined.stdout + declined.stderr
    assert "Delete 1 dead letter(s) for good?" in declined.stdout
    assert declined.stderr.splitlines() == ["error: aborted; nothing was changed"]
    assert _is_dead(db, dead)


def test_exit_codes_follow_one_convention(db: str, tmp_path: Path) -> None:
    """0 done (a report, an empty list, a retention job that found nothing); 1 not there,
    a selection that took nothing, a failed check; 2 a bad command line or config."""
    config = write_config(tmp_path / "relay.yaml", db)
    c = ["--config", str(config)]
    missing = "00000000-0000-4000-8000-000000000000"
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE public.empty_table (id int PRIMARY KEY)")
        conn.commit()
    run_cli("inbox", "schema", "install", "--dsn", db)
    expected = [
        (["status", *c], 0),
        (["dead-letters", "list", *c], 0),
        (["inbox", "prune", "--dsn", db, "--older-than", "7d"], 0),
        (["status", *c, "--message-id", missing], 1),
        (["dead-letters", "show", missing, *c], 1),
        (["dead-letters", "requeue", *c, "--message-id", missing], 1),
        (["dead-letters", "requeue", *c, "--topic", "nothing.*"], 1),
        (["dead-letters", "requeue", *c, "--all"], 1),
        (["dead-letters", "purge", *c, "--topic", "nothing.*", "--yes"], 1),
        (["replay", *c, "--topic", "nothing.*", "--yes"], 1),
        (["backfill", *c, "--table", "empty_table", "--topic", "t", "--yes"], 1),
        (["replay", *c, "--resume", "99", "--yes"], 1),
        (["dead-letters", "requeue", *c], 2),
        (["dead-letters", "list", *c, "--since", "yesterday"], 2),
        (["status", "--config", str(tmp_path / "nope.yaml")], 2),
        # Refused before any connection: nothing listens on port 1.
        (["status", "--dsn", "host=127.0.0.1 port=1 connect_timeout=1", "--schema", "Bad;Name"], 2),
    ]
    got = [(args, run_cli(*args, env=NO_ENV, cwd=tmp_path)) for args, _ in expected]
    assert [(args[:2], out.returncode) for args, out in got] == [(args[:2], code) for args, code in expected], [
        (args, out.stderr) for args, out in got
    ]
    for args, out in got:
        assert "Traceback" not in out.stderr and "Usage:" not in out.stderr, (args, out.stderr)
        if out.returncode == 2:
            assert [line for line in out.stderr.splitlines() if line.startswith("error:")] == [out.stderr.strip()]


def test_json_leaves_stdout_to_the_document(db: str, tmp_path: Path) -> None:
    # What a command says to a reader goes to stderr under --json: stdout parses whole.
    config = write_config(tmp_path / "relay.yaml", db)
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders.created", {"n": 1})
        conn.execute("UPDATE outbox.messages SET dispatched_at = now()")
        conn.commit()
    out = run_cli("replay", "--config", str(config), "--all", "--yes", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["done"] is True and answer["copied"] == 1
    assert "1 message(s) to replay" in out.stderr


def _interrupt(command: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """Ctrl-C to a command under way, as a shell sends it; what it then said."""
    command.send_signal(signal.SIGINT)
    out, err = command.communicate(timeout=30)
    return subprocess.CompletedProcess(command.args, command.returncode, out, err)


def _sigint_default() -> None:
    """In the child, before exec: Ctrl-C handled as an interactive shell leaves it. A
    suite started in the background (nohup, `cmd &`, some CI runners) has SIGINT
    ignored, children inherit that, and Python then installs no KeyboardInterrupt
    handler at all: the command would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    import os

    return subprocess.Popen(
        [*exe(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=_sigint_default,
    )


def test_ctrl_c_while_a_command_works_is_interrupted_exit_130_not_a_question_declined() -> None:
    # A server that takes the connection and never answers: the command waits in connect.
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        port = server.getsockname()[1]
        command = _popen("status", "--dsn", f"host=127.0.0.1 port={port} connect_timeout=60", env=NO_ENV)
        try:
            accepted, _ = server.accept()  # the command is connecting now
            with accepted:
                out = _interrupt(command)
        finally:
            if command.poll() is None:
                command.kill()
                command.communicate()
    assert out.returncode == 130, out.stdout + out.stderr
    assert out.stderr.splitlines() == ["error: interrupted"], out.stderr


def test_ctrl_c_during_a_replay_says_how_to_finish_it(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, key, payload, dispatched_at) "
            "SELECT 'bulk.done', 'b' || (n % 50), '{}', now() FROM generate_series(1, 2000) AS n"
        )
        conn.commit()

    def copied() -> int:
        with psycopg.connect(db) as conn:
            row = conn.execute("SELECT coalesce(max(copied), 0) FROM outbox.replays").fetchone()
        return row[0] if row else 0

    command = _popen("replay", "--config", str(config), "--all", "--yes", "--chunk", "10", "--rate", "100")
    try:
        wait_for(lambda: copied() > 0, what="the replay under way")
        out = _interrupt(command)
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()
    assert out.returncode == 130, out.stdout + out.stderr
    assert out.stderr.splitlines()[-1] == "error: interrupted; replay #1 is not done: finish it with --resume 1"
    assert "Traceback" not in out.stderr
    assert 0 < copied() < 2000
    resumed = run_cli("replay", "--config", str(config), "--resume", "1", "--yes")
    assert resumed.returncode == 0 and "2000 message(s) copied" in resumed.stdout, resumed.stdout + resumed.stderr


def test_ctrl_c_ends_the_console_cleanly(db: str, tmp_path: Path) -> None:
    import httpx

    config = write_config(tmp_path / "relay.yaml", db)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = _popen("console", "--config", str(config), "--port", str(port))

    def ready() -> bool:
        assert command.poll() is None, command.communicate()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/console/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 30, "the console answered")
        out = _interrupt(command)
    finally:
        if command.poll() is None:
            command.kill()
            command.communicate()
    assert out.returncode == 0, out.stderr
    assert "error" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_dsn_that_does_not_parse_is_one_line_exit_2_without_its_password() -> None:
    out = run_cli("status", "--dsn", "postgresql://u:pw@[::1", env=NO_ENV)
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    assert out.stderr.splitlines() == [
        "error: invalid DSN: the DSN could not be parsed (its text is not shown: it may hold a password)"
    ]
    assert "pw" not in out.stderr
