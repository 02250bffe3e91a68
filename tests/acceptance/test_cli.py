"""The real `outbox-relay` command, end to end, with the file sink as the broker."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay import enqueue
from outbox_relay.sqlfiles import SCHEMA_VERSION
from tests.support.cli import RelayProcess, read_jsonl, run_cli
from tests.support.configs import write_config
from tests.support.http import HttpReceiver, answer
from tests.support.waiting import wait_for


def test_schema_install_and_sql(empty_db: str) -> None:
    first = run_cli("schema", "install", env={"DATABASE_URL": empty_db})
    assert first.returncode == 0, first.stderr
    assert f"installed outbox schema 'outbox' at version {SCHEMA_VERSION}" in first.stdout
    again = run_cli("schema", "install", "--dsn", empty_db)
    assert again.returncode == 0 and f"already at version {SCHEMA_VERSION}" in again.stdout
    ddl = run_cli("schema", "sql", "--schema", "events", "--relay-role", "relay_role")
    assert ddl.returncode == 0
    assert 'CREATE TABLE "events".messages' in ddl.stdout
    assert 'GRANT SELECT, UPDATE, DELETE ON "events".messages TO "relay_role"' in ddl.stdout
    bad = run_cli("schema", "sql", "--schema", "Bad;Name")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid schema name" in bad.stderr


def test_run_relays_sql_and_python_messages_to_the_file_sink(db: str, tmp_path: Path) -> None:
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", None, sink=sink)
    relay = RelayProcess(config, env={"DATABASE_URL": db})
    try:
        relay.wait_started()
        with psycopg.connect(db) as conn:
            conn.execute("SELECT outbox.enqueue('orders.created', 'order-1', '{\"total\": 10}')")
            py_id = enqueue(conn, "orders.paid", {"total": 10}, key="order-1", headers={"trace": "t1"})
            conn.commit()
        wait_for(lambda: len(read_jsonl(sink)) == 2, 30)
        assert relay.terminate() == 0
    finally:
        relay.close()
    records = read_jsonl(sink)
    assert [r["topic"] for r in records] == ["orders.created", "orders.paid"]
    assert records[1]["message_id"] == str(py_id)
    assert records[1]["headers"] == {"trace": "t1"} and records[1]["payload"] == {"total": 10}
    logs = relay.logs()
    assert any(line["event"] == "relay_stopped" for line in logs)
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages WHERE dispatched_at IS NOT NULL").fetchone() == (2,)


def test_sigterm_finishes_the_in_flight_batch_and_exits_zero(db: str, tmp_path: Path) -> None:
    # A webhook receiver that answers slowly keeps a batch in flight when SIGTERM arrives.
    server = HttpReceiver(answer(200, delay=1.5))
    config = write_config(
        tmp_path / "relay.yaml", db, brokers={"hook": {"type": "webhook", "url": f"{server.url}/"}}, timing={}
    )  # the relay's own defaults
    relay = RelayProcess(config)
    try:
        relay.wait_started()
        with psycopg.connect(db) as conn:
            for i in range(5):
                enqueue(conn, "t", {"i": i})
            conn.commit()
        wait_for(lambda: len(server.requests) == 5, 30)
        assert relay.terminate() == 0
    finally:
        relay.close()
        server.close()
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages WHERE dispatched_at IS NOT NULL").fetchone() == (5,)


def test_check_status_and_dead_letters(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db, sink=tmp_path / "out.jsonl")
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "database  ok" in checked.stdout and "broker    ok  sink (file)" in checked.stdout

    with psycopg.connect(db) as conn:
        for i in range(3):
            enqueue(conn, "orders.created", {"i": i})
        enqueue(conn, "billing.failed", {"i": 9}, key="b")
        conn.execute(
            "UPDATE outbox.messages SET dead_lettered_at = now(), dead_letter_reason = 'too large' "
            "WHERE topic = 'billing.failed'"
        )
        conn.commit()
    status = run_cli("status", "--config", str(config), "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert (data["pending"], data["dead_lettered"], data["in_flight"]) == (3, 1, 0)
    assert data["oldest_pending_age_s"] >= 0
    assert {t["topic"]: t["pending"] for t in data["topics"]} == {"orders.created": 3, "billing.failed": 0}
    human = run_cli("status", "--config", str(config))
    assert "pending        3" in human.stdout and "orders.created" in human.stdout

    listed = run_cli("dead-letters", "list", "--config", str(config), "--json")
    dead = json.loads(listed.stdout)
    assert [(d["topic"], d["reason"]) for d in dead] == [("billing.failed", "too large")]
    requeued = run_cli("dead-letters", "requeue", "--config", str(config), "--id", dead[0]["message_id"])
    assert requeued.returncode == 0 and "requeued 1 message(s)" in requeued.stdout
    assert json.loads(run_cli("status", "--config", str(config), "--json").stdout)["dead_lettered"] == 0
    nothing = run_cli("dead-letters", "requeue", "--config", str(config))
    assert nothing.returncode == 2


def test_status_on_a_database_without_the_schema_says_what_to_do(empty_db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", empty_db)
    result = run_cli("status", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "run `outbox-relay schema install --schema outbox`" in result.stderr


def test_run_without_the_schema_says_so_first_and_opens_no_port(empty_db: str, tmp_path: Path) -> None:
    # http_listening came first: read as a relay that had started, before the error.
    config = write_config(tmp_path / "relay.yaml", empty_db)
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "error: outbox schema 'outbox' is not installed in this database:"
        " run `outbox-relay schema install --schema outbox`"
    ]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "database: {dsn: x}\nbrokers: {events: {type: kafak}}\nroutes: [{topic: '*', broker: events}]\n",
            "relay.yaml: brokers.events.type: unknown adapter 'kafak' (installed: ",
        ),
        (
            "database: {dsn: x}\nrelay: {pol_interval: 1s}\nbrokers: {a: {type: stdout}}\n"
            "routes: [{topic: '*', broker: a}]\n",
            "relay.yaml: relay.pol_interval: unknown key 'pol_interval' (did you mean 'poll_interval'?)",
        ),
        (
            "database:\n  dsn: ${NOT_SET_ANYWHERE}\nbrokers: {a: {type: stdout}}\nroutes: [{topic: '*', broker: a}]\n",
            "relay.yaml: database.dsn: environment variable NOT_SET_ANYWHERE is not set",
        ),
        ("database: {dsn: x\n", "relay.yaml: line "),
        (
            "database: {dsn: x}\nbrokers: {a: {type: file}}\nroutes: [{topic: '*', broker: a}]\n",
            "relay.yaml: brokers.a.path: required option is missing",
        ),
    ],
)
@pytest.mark.parametrize("command", ["run", "check"])
def test_bad_configuration_is_one_line_exit_2(tmp_path: Path, yaml_text: str, expected: str, command: str) -> None:
    config = tmp_path / "relay.yaml"
    config.write_text(yaml_text)
    result = run_cli(command, "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: " + expected), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(tmp_path / "nope.yaml"))
    hint = "no such config file (check the path)"
    assert (result.returncode, result.stderr) == (2, f"error: {tmp_path / 'nope.yaml'}: {hint}\n")


def test_passwords_never_reach_logs_or_check_output(db: str, tmp_path: Path) -> None:
    password = "pw-" + "x7Q9z" * 3
    role = "secret_" + str(random.randrange(10**8))
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
        )
    try:
        good = make_conninfo(db, user=role, password=password)
        unreachable = make_conninfo(db, user=role, password=password, port="1", connect_timeout="1")
        config = write_config(tmp_path / "relay.yaml", None, sink=tmp_path / "o.jsonl")
        outputs = []
        # What the relay logs once it got as far as it can with each DSN (the listener's
        # "listening" comes after relay_started: the running relay's lines are checked too).
        for dsn, reached in ((good, '"listening"'), (unreachable, "database_unreachable")):
            checked = run_cli("check", "--config", str(config), env={"DATABASE_URL": dsn})
            outputs += [checked.stdout, checked.stderr]
            relay = RelayProcess(config, env={"DATABASE_URL": dsn})
            try:
                # The positive signal: the relay used the DSN (and logged about it).
                wait_for(lambda r=relay, e=reached: e in r.log_path.read_text(), 30, reached)  # type: ignore[misc]
                assert relay.terminate() == 0
                outputs.append(relay.log_path.read_text())
            finally:
                relay.close()
        assert any("database_unreachable" in out for out in outputs), "the outage was not logged"
        assert any("database  FAIL" in out for out in outputs)
        for out in outputs:
            assert password not in out
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_logs_are_json_lines_naming_message_id_and_topic(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db)
    config.write_text(config.read_text().replace("topic: '*'", "topic: 'routed.*'"))
    relay = RelayProcess(config)
    try:
        relay.wait_started()
        with psycopg.connect(db) as conn:
            mid = enqueue(conn, "unrouted", {"a": 1})
            conn.commit()
        wait_for(lambda: "message_dead_lettered" in relay.log_path.read_text(), 30)
        relay.terminate()
    finally:
        relay.close()
    lines = relay.logs()  # every line parses as JSON
    dead = [line for line in lines if line["event"] == "message_dead_lettered"]
    assert dead[0]["message_id"] == str(mid) and dead[0]["topic"] == "unrouted"
    assert dead[0]["reason"] == "no route" and "timestamp" in dead[0]


def test_a_second_relay_on_a_taken_health_port_says_which_key_to_change(db: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a free port, for both relays
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first_config = write_config(tmp_path / "first.yaml", db)
    second_config = write_config(tmp_path / "second.yaml", db)
    for path in (first_config, second_config):
        text = path.read_text().replace("port: 0", f"port: {port}")
        assert f"port: {port}" in text
        path.write_text(text)
    first = RelayProcess(first_config)
    try:
        first.wait_started()
        second = run_cli("run", "--config", str(second_config), timeout=60)
        assert first.proc.poll() is None, "the first relay keeps running"
        assert first.terminate() == 0
    finally:
        first.close()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: http.port: cannot listen on 127.0.0.1:{port}"), lines[0]
    assert "Set http.port to a free port" in lines[0]
    assert "Traceback" not in second.stderr and "Unclosed" not in second.stderr


def test_a_database_not_in_utf8_is_refused_by_install_check_and_run(admin_dsn: str, tmp_path: Path) -> None:
    from tests.support.databases import dsn_for

    name = f"ascii_{random.randrange(1 << 30)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'").format(
                sql.Identifier(name)
            )
        )
    try:
        dsn = dsn_for(admin_dsn, name)
        expected = "the database's encoding is SQL_ASCII; outbox-relay needs a UTF8 database"
        install = run_cli("schema", "install", "--dsn", dsn)
        assert install.returncode == 1 and install.stderr.strip().splitlines() == [
            f"error: {expected} (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
        ], install.stderr
        config = write_config(tmp_path / "relay.yaml", dsn)
        check = run_cli("check", "--config", str(config))
        assert check.returncode == 1 and expected in check.stdout, check.stdout
        relay = run_cli("run", "--config", str(config))
        assert relay.returncode == 1, relay.stderr
        assert [line for line in relay.stderr.splitlines() if line.startswith("error:")] == [
            f"error: {expected} (CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
        ], relay.stderr
        assert "Traceback" not in relay.stderr
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_dead_letters_topic_glob_means_what_it_means_in_routes(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db, sink=tmp_path / "out.jsonl")
    with psycopg.connect(db) as conn:
        for topic in ("a.b1", "a.c2", "a.d3", "ab.b"):
            enqueue(conn, topic, {"t": topic})
        conn.execute("UPDATE outbox.messages SET dead_lettered_at = now(), dead_letter_reason = 'x'")
        conn.commit()

    def listed(glob: str) -> list[str]:
        out = run_cli("dead-letters", "list", "--config", str(config), "--json", "--topic", glob)
        assert out.returncode == 0, out.stderr
        return sorted(d["topic"] for d in json.loads(out.stdout))

    assert listed("a.[bc]*") == ["a.b1", "a.c2"]
    assert listed("a.[!bc]?") == ["a.d3"]
    assert listed("a?b*") == ["a.b1"]
    requeued = run_cli("dead-letters", "requeue", "--config", str(config), "--topic", "a.[bc]*")
    assert requeued.returncode == 0 and "requeued 2 message(s)" in requeued.stdout, requeued.stdout


def test_secrets_in_odd_places_never_reach_check_run_or_config_errors(tmp_path: Path) -> None:
    # sslpassword beside password; a DSN libpq cannot parse (its parse error quotes a piece
    # of it: here the second half of the password); a DSN given as a mapping; a webhook
    # URL with its token in the path.
    secrets = ["s3cret", "k3ypass", "hidden-half", "T0KENabc123"]
    unreachable = "host=127.0.0.1 port=1 user=u password=s3cret sslpassword=k3ypass dbname=x connect_timeout=1"
    cases = {
        "sslpassword": {"database": {"dsn": unreachable}},
        "unparseable": {"database": {"dsn": "host=127.0.0.1 password=s3cret hidden-half dbname=x"}},
        "mapping": {"database": {"dsn": {"host": "127.0.0.1", "password": "s3cret"}}},
        "webhook": {
            "database": {"dsn": unreachable},
            "brokers": {"hook": {"type": "webhook", "url": "ftp://127.0.0.1/hooks/T0KENabc123"}},
            "routes": [{"topic": "*", "broker": "hook"}],
        },
    }
    for name, tree in cases.items():
        full = {
            "brokers": {"sink": {"type": "file", "path": str(tmp_path / "o.jsonl")}},
            "routes": [{"topic": "*", "broker": "sink"}],
            **tree,
        }
        path = tmp_path / f"{name}.yaml"
        import yaml

        path.write_text(yaml.safe_dump(full))
        outputs = [
            run_cli("check", "--config", str(path), timeout=60),
            run_cli("run", "--config", str(path), timeout=5) if name != "sslpassword" else None,
        ]
        if name == "sslpassword":  # run retries an unreachable database: read its first log lines
            relay = RelayProcess(path)
            try:
                wait_for(
                    lambda r=relay: "database_unreachable" in r.log_path.read_text(),
                    20,  # type: ignore[misc]
                    "database_unreachable logged",
                )
                logs = relay.log_path.read_text()
            finally:
                relay.close()
            assert "database_unreachable" in logs and "sslpassword=***" in logs
            assert not [s for s in secrets if s in logs], logs
        for out in outputs:
            if out is None:
                continue
            text = out.stdout + out.stderr
            assert text.strip(), name
            assert not [s for s in secrets if s in text], f"{name}: {text}"


def test_schema_notify_gives_up_on_a_busy_table_instead_of_queueing_every_producer(db: str) -> None:
    # An open transaction that wrote to the outbox (a relay batch marking rows) holds a
    # lock the ALTER TABLE needs; waiting for it would queue every new enqueue behind the
    # ALTER. The command gives up after its lock timeout, changes nothing, says why.
    with psycopg.connect(db) as holder:
        holder.execute("UPDATE outbox.messages SET attempts = attempts WHERE false")  # the table lock only
        started = time.monotonic()
        busy = run_cli("schema", "notify", "off", "--dsn", db, timeout=60)
        took = time.monotonic() - started
        holder.rollback()
    assert busy.returncode == 1, busy.stdout + busy.stderr
    lines = busy.stderr.strip().splitlines()
    assert len(lines) == 1 and "outbox.messages stayed locked for 5s" in lines[0] and "nothing was changed" in lines[0]
    assert took < 30, took
    with psycopg.connect(db) as conn:
        state = conn.execute("SELECT tgenabled FROM pg_trigger WHERE tgname = 'messages_notify_relay'").fetchone()
    assert state == ("O",), "unchanged"
    done = run_cli("schema", "notify", "off", "--dsn", db)
    assert done.returncode == 0, done.stderr


def test_schema_upgrade_gives_up_on_a_busy_table_and_changes_nothing(empty_db: str) -> None:
    # The upgrade's ALTERs need the table lock that an open writing transaction holds:
    # waiting would queue every new enqueue behind the upgrade. It gives up after its lock
    # timeout, rolls back every step (the version stays), says why in one line.
    from outbox_relay import sqlfiles

    with psycopg.connect(empty_db) as conn:
        conn.execute(sqlfiles.migration("0001_initial.sql", "outbox"))
        conn.execute(sqlfiles.record_version("outbox", 1))
        conn.commit()
    with psycopg.connect(empty_db) as holder:
        holder.execute("UPDATE outbox.messages SET attempts = attempts WHERE false")  # the table lock only
        started = time.monotonic()
        busy = run_cli("schema", "install", "--dsn", empty_db, timeout=60)
        took = time.monotonic() - started
        holder.rollback()
    assert busy.returncode == 1, busy.stdout + busy.stderr
    lines = busy.stderr.strip().splitlines()
    assert len(lines) == 1 and "schema upgrade failed" in lines[0] and "stayed locked for 5s" in lines[0], lines
    assert took < 30, took
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT max(version) FROM outbox.schema_version").fetchone() == (1,), "unchanged"
    done = run_cli("schema", "install", "--dsn", empty_db)
    assert done.returncode == 0, done.stderr
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT max(version) FROM outbox.schema_version").fetchone() == (SCHEMA_VERSION,)


def test_dead_letters_purge_deletes_only_old_ones_and_asks_first(db: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db, sink=tmp_path / "out.jsonl")
    with psycopg.connect(db) as conn:
        for topic in ("a.old", "a.old", "b.old", "a.new"):
            enqueue(conn, topic, {"t": topic})
        conn.execute(
            "UPDATE outbox.messages SET dead_letter_reason = 'x', dead_lettered_at = CASE "
            "WHEN topic LIKE '%%.old' THEN now() - interval '10 days' ELSE now() END"
        )
        enqueue(conn, "a.pending", {"t": "pending"})
        conn.commit()
    asked = run_cli("dead-letters", "purge", "--config", str(config), "--older-than", "7d")
    assert asked.returncode == 2 and "3 dead letter(s) would be deleted; pass --yes" in asked.stderr, asked.stderr
    bad = run_cli("dead-letters", "purge", "--config", str(config), "--older-than", "soon", "--yes")
    assert bad.returncode == 2 and "--older-than" in bad.stderr
    only_a = run_cli("dead-letters", "purge", "--config", str(config), "--older-than", "7d", "--topic", "a.*", "--yes")
    assert only_a.returncode == 0 and "deleted 2 dead letter(s)" in only_a.stdout, only_a.stdout + only_a.stderr
    rest = run_cli("dead-letters", "purge", "--config", str(config), "--older-than", "7d", "--yes")
    assert "deleted 1 dead letter(s)" in rest.stdout
    with psycopg.connect(db) as conn:
        left = sorted(r[0] for r in conn.execute("SELECT topic FROM outbox.messages").fetchall())
    assert left == ["a.new", "a.pending"], "recent dead letters and pending messages stay"


def test_purging_a_held_keys_dead_letter_says_it_releases_the_messages_behind_it(db: str, tmp_path: Path) -> None:
    # Under dead_letter_policy: hold, a key's later messages wait behind its dead letter;
    # deleting the dead letter lets them go. The command says how many before it asks.
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink, dead_letter_policy="hold")
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders", {"n": 0}, key="acct-1")
        conn.execute(
            "UPDATE outbox.messages SET dead_letter_reason = 'x', dead_lettered_at = now() - interval '10 days'"
        )
        for n in (1, 2):
            enqueue(conn, "orders", {"n": n}, key="acct-1")
        enqueue(conn, "orders", {"n": 3}, key="acct-2")
        # acct-3: an old dead letter, a recent one the purge keeps, then a message that
        # stays held behind the recent one: not counted as released.
        for n, age in ((7, "10 days"), (8, "1 hour")):
            enqueue(conn, "orders", {"n": n}, key="acct-3")
            conn.execute(
                "UPDATE outbox.messages SET dead_letter_reason = 'x', dead_lettered_at = now() - %s::interval "
                "WHERE key = 'acct-3' AND dead_lettered_at IS NULL",
                (age,),
            )
        enqueue(conn, "orders", {"n": 9}, key="acct-3")
        conn.commit()
    asked = run_cli("dead-letters", "purge", "--config", str(config), "--older-than", "7d")
    assert asked.returncode == 2, asked.stderr
    assert (
        "2 dead letter(s) would be deleted (dead_letter_policy is hold: 2 message(s) held behind them will be "
        "published); pass --yes" in asked.stderr
    ), asked.stderr
    relay = RelayProcess(config)
    try:
        relay.wait_started()
        wait_for(lambda: len(read_jsonl(sink)) == 1, 30)  # acct-2 flows; acct-1 waits behind its dead letter
        purged = run_cli("dead-letters", "purge", "--config", str(config), "--older-than", "7d", "--yes")
        assert purged.returncode == 0 and "2 message(s) held behind them" in purged.stdout, purged.stdout
        wait_for(lambda: len(read_jsonl(sink)) == 3, 30)
    finally:
        relay.close()
    assert [line["payload"]["n"] for line in read_jsonl(sink)] == [3, 1, 2]
