"""Installing the outbox schema into a database that already has application tables."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from outbox_relay import enqueue, schema_version, sqlfiles
from outbox_relay.errors import SchemaError
from outbox_relay.operations import schema_manager
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.databases import role_with_grants
from tests.support.outbox import count
from tests.support.relay import running_relay
from tests.support.waiting import wait_until

APP_DDL = """
CREATE TABLE public.accounts (id int PRIMARY KEY, balance numeric NOT NULL);
CREATE TABLE public.messages (id int PRIMARY KEY, body text);  -- same name as ours, other schema
INSERT INTO public.accounts VALUES (1, 100), (2, 50);
INSERT INTO public.messages VALUES (1, 'application data');
"""

CATALOG = """
SELECT n.nspname, c.relname, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
ORDER BY 1, 2
"""


def _objects(conn: psycopg.Connection[Any], schema: str) -> set[tuple[str, str, str]]:
    return {r for r in conn.execute(CATALOG).fetchall() if r[0] == schema}


def test_install_leaves_application_tables_untouched(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        conn.execute(APP_DDL)
        conn.commit()
        public_before = _objects(conn, "public")
        result = schema_manager.install(conn, "outbox")
        assert result.previous_version is None and result.version == sqlfiles.SCHEMA_VERSION
        assert _objects(conn, "public") == public_before
        assert conn.execute("SELECT * FROM public.accounts ORDER BY id").fetchall() == [(1, 100), (2, 50)]
        assert conn.execute("SELECT body FROM public.messages").fetchall() == [("application data",)]
        names = {r[1] for r in _objects(conn, "outbox")}
        assert {"messages", "relays", "schema_version"} <= names


def test_install_is_idempotent_and_records_its_version(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        schema_manager.install(conn, "outbox")
        again = schema_manager.install(conn, "outbox")
        assert again.previous_version == again.version == sqlfiles.SCHEMA_VERSION
        assert not again.changed
        versions = conn.execute("SELECT version FROM outbox.schema_version").fetchall()
    assert versions == [(sqlfiles.SCHEMA_VERSION,)]


def test_racing_installs_are_serialized_by_the_advisory_lock(empty_db: str) -> None:
    results: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def install() -> None:
        try:
            with psycopg.connect(empty_db) as conn:
                barrier.wait()
                results.append(schema_manager.install(conn, "outbox"))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert sum(1 for r in results if r.previous_version is None) == 1
    with psycopg.connect(empty_db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.schema_version").fetchone() == (1,)


def test_install_refuses_a_schema_holding_foreign_objects(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        conn.execute("CREATE SCHEMA outbox; CREATE TABLE outbox.mine (id int)")
        conn.commit()
        with pytest.raises(SchemaError, match="not outbox-relay's"):
            schema_manager.install(conn, "outbox")
        assert conn.execute("SELECT to_regclass('outbox.messages')").fetchone() == (None,)


def test_install_under_a_custom_schema_name(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        schema_manager.install(conn, "events_outbox")
        mid = enqueue(conn, "t", {"a": 1}, schema="events_outbox")
        conn.commit()
        assert conn.execute("SELECT message_id FROM events_outbox.messages").fetchone() == (mid,)


def test_a_newer_schema_than_the_code_is_refused(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("INSERT INTO outbox.schema_version (version) VALUES (%s)", (sqlfiles.SCHEMA_VERSION + 1,))
        conn.commit()
        with pytest.raises(SchemaError, match="upgrade outbox-relay"):
            schema_manager.install(conn, "outbox")


def test_schema_sql_output_builds_a_working_schema(empty_db: str) -> None:
    ddl = sqlfiles.ddl("outbox").as_string()
    with psycopg.connect(empty_db) as conn:
        conn.execute(ddl)  # type: ignore[call-overload]  # trusted text from our own files
        conn.execute("INSERT INTO outbox.schema_version (version) VALUES (%s)", (sqlfiles.SCHEMA_VERSION,))
        conn.commit()
        assert schema_version.version(conn, "outbox") == sqlfiles.SCHEMA_VERSION
        assert not schema_manager.install(conn, "outbox").changed


def test_invalid_schema_names_never_reach_sql() -> None:
    from outbox_relay.errors import ConfigError

    for bad in ["Outbox", "out-box", "x; DROP TABLE accounts", "1abc", "", "a" * 64]:
        with pytest.raises(ConfigError):
            sqlfiles.ddl(bad)


async def test_relay_works_under_the_least_privilege_role(db: str, admin_dsn: str) -> None:
    role = "relay_" + db.split("dbname=")[-1].split()[0][-8:]
    password = "s3cret-relay-pw"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
        conn.execute("CREATE TABLE public.accounts (id int PRIMARY KEY)")
        conn.execute(sqlfiles.grants("relay", "outbox", role))
        with conn.transaction():
            enqueue(conn, "t", {"a": 1})
    from psycopg.conninfo import make_conninfo

    relay_dsn = make_conninfo(db, user=role, password=password)
    try:
        with psycopg.connect(relay_dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM public.accounts")
        fake = FakeAdapter()
        async with running_relay(make_config(relay_dsn, retention="1s"), {"main": fake}, heartbeat_every=0.2):
            await wait_until(lambda: len(fake.delivered) == 1)
            # retention deletes under the role too
            await wait_until(lambda: count(db) == 0, timeout=15)
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_producer_role_can_enqueue_and_nothing_else(db: str) -> None:
    role = "app_" + db.split("dbname=")[-1].split()[0][-8:]
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
        conn.execute(sqlfiles.grants("producer", "outbox", role))
    from psycopg.conninfo import make_conninfo

    try:
        with psycopg.connect(make_conninfo(db, user=role, password="pw")) as conn:
            enqueue(conn, "t", {"a": 1})
            conn.execute("SELECT outbox.enqueue('t', 'k', '{}')")
            conn.commit()
            # A plain INSERT of the enqueue's own columns is allowed (the documented
            # alternative to the functions for SQL-only producers).
            conn.execute("INSERT INTO outbox.messages (topic, key, payload) VALUES ('t', 'k', '\\x00')")
            conn.commit()
            forgeries = {
                "read other rows": "SELECT * FROM outbox.messages",
                "choose the id": "INSERT INTO outbox.messages (id, topic, payload) OVERRIDING SYSTEM VALUE "
                "VALUES (9223372036854775000, 't', '\\x00')",
                "block a key forever": "INSERT INTO outbox.messages (topic, key, payload, next_attempt_at) "
                "VALUES ('t', 'k', '\\x00', 'infinity')",
                "forge a delivery": "INSERT INTO outbox.messages (topic, payload, dispatched_at) "
                "VALUES ('t', '\\x00', now())",
                "forge a dead letter": "INSERT INTO outbox.messages (topic, payload, dead_lettered_at, "
                "dead_letter_reason) VALUES ('t', '\\x00', now(), 'x')",
                "spend attempts": "INSERT INTO outbox.messages (topic, payload, attempts) VALUES ('t', '\\x00', 99)",
                "backdate": "INSERT INTO outbox.messages (topic, payload, created_at) "
                "VALUES ('t', '\\x00', '2000-01-01')",
                "choose the message id": "INSERT INTO outbox.messages (topic, payload, message_id) "
                "VALUES ('t', '\\x00', gen_random_uuid())",
                "mark a row dispatched": "UPDATE outbox.messages SET dispatched_at = now()",
                "delete rows": "DELETE FROM outbox.messages",
            }
            for what, statement in forgeries.items():
                try:
                    conn.execute(statement)  # type: ignore[arg-type]
                except psycopg.errors.InsufficientPrivilege:
                    conn.rollback()
                else:
                    pytest.fail(f"the producer role could {what}")
        assert count(db) == 3
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize(("kind", "table"), [("relay", "backfills"), ("relay", "replays"), ("producer", "backfills")])
def test_a_role_records_backfills_and_replays_as_itself_and_cannot_rewrite_one(db: str, kind: str, table: str) -> None:
    # A resume acts on what a record says, with the resuming role's privileges: the
    # record must name its creator truly, and no other role may change what it copies.
    what = {"backfills": "source", "replays": "selection"}[table]
    record = {
        "backfills": "INSERT INTO outbox.backfills (requested_by, source, total) VALUES ('x', '{}', 1)",
        "replays": "INSERT INTO outbox.replays (requested_by, selection, max_source_id, as_of, total) "
        "VALUES ('x', '{}', 0, now(), 1)",
    }[table]
    with role_with_grants(db, kind, kind) as dsn, psycopg.connect(dsn) as conn:
        role = conn.execute("SELECT current_user").fetchone()
        conn.execute(record)  # type: ignore[arg-type]
        assert conn.execute(f"SELECT created_by FROM outbox.{table}").fetchone() == role  # type: ignore[arg-type]
        conn.commit()
        forgeries = {
            "name another creator": record.replace("(requested_by,", "(created_by, requested_by,").replace(
                "VALUES (", "VALUES (current_user, "
            ),
            "change the creator": f"UPDATE outbox.{table} SET created_by = 'postgres'",
            f"change the {what}": f"UPDATE outbox.{table} SET {what} = '{{}}'",
            "change who asked": f"UPDATE outbox.{table} SET requested_by = 'ops'",
            "change the total": f"UPDATE outbox.{table} SET total = 2",
        }
        for forgery, statement in forgeries.items():
            try:
                conn.execute(statement)  # type: ignore[arg-type]
            except psycopg.errors.InsufficientPrivilege:
                conn.rollback()
            else:
                pytest.fail(f"the {kind} role could {forgery} of a row of {table}")
        # Progress is the role's to move: it runs replays and backfills.
        progress = {"backfills": "cursor_key = '{1}'", "replays": "cursor_id = 1, skipped = 1"}[table]
        moved = conn.execute(f"UPDATE outbox.{table} SET copied = 1, {progress}, finished_at = now()")  # type: ignore[arg-type]
        assert moved.rowcount == 1


def test_a_record_names_the_role_set_and_keeps_what_it_selects_even_for_the_owner(db: str) -> None:
    # current_user, not session_user: after SET ROLE the record names the role whose
    # privileges the statement ran with, the one a resume compares with. The guard
    # holds for every role, the tables' owner included (it may only lift it).
    q = sqlfiles.Queries("outbox")
    with role_with_grants(db, "relay", "relay") as dsn, psycopg.connect(db) as conn:
        role = str(conninfo_to_dict(dsn)["user"])
        login = conn.execute("SELECT session_user").fetchone()
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        row = conn.execute(q["backfill_begin"], {"requested_by": "ops", "source": "{}", "total": 1}).fetchone()
        assert row is not None
        assert conn.execute(q["backfill_get"], {"backfill_id": row[0]}).fetchone()[6:8] == (role, True)  # type: ignore[index]
        conn.execute("RESET ROLE")
        assert conn.execute(q["backfill_get"], {"backfill_id": row[0]}).fetchone()[6:8] == (role, False)  # type: ignore[index]
        conn.execute(
            "INSERT INTO outbox.replays (requested_by, selection, max_source_id, as_of, total, created_by) "
            "VALUES ('ops', '{}', 0, now(), 1, 'someone')"
        )
        assert conn.execute("SELECT created_by FROM outbox.replays").fetchone() == login
        conn.commit()
        for table, column in (("backfills", "source"), ("replays", "selection"), ("replays", "created_by")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"{column} of outbox.{table} cannot change"):
                conn.execute(
                    sql.SQL("UPDATE outbox.{} SET {} = NULL").format(sql.Identifier(table), sql.Identifier(column))
                )
            conn.rollback()
        moved = conn.execute("UPDATE outbox.replays SET copied = 1, cursor_id = 1, skipped = 1, finished_at = now()")
        assert moved.rowcount == 1


def test_notify_trigger_can_be_turned_off_and_on(db: str) -> None:
    with psycopg.connect(db) as conn:
        schema_manager.set_notify(conn, "outbox", False)
        state = conn.execute("SELECT tgenabled FROM pg_trigger WHERE tgname = 'messages_notify_relay'").fetchone()
        assert state == ("D",)
        schema_manager.set_notify(conn, "outbox", True)
        state = conn.execute("SELECT tgenabled FROM pg_trigger WHERE tgname = 'messages_notify_relay'").fetchone()
        assert state == ("O",)


def test_a_transaction_sends_at_most_one_notification(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as listener, psycopg.connect(db) as writer:
        listener.execute('LISTEN "outbox_relay.outbox"')
        for i in range(50):
            enqueue(writer, "t", {"i": i})
        writer.execute("SELECT outbox.enqueue('t', NULL, '{}')")
        writer.commit()
        received = list(listener.notifies(timeout=1.0))
    assert len(received) == 1


def test_every_schema_name_length_either_notifies_or_is_refused_up_front(empty_db: str) -> None:
    # The NOTIFY channel is "outbox_relay." + the name and PostgreSQL refuses channels
    # over 63 bytes at COMMIT: a name that does not leave room is refused before
    # anything is installed; every shorter one installs, enqueues and wakes a LISTEN.
    from outbox_relay.errors import ConfigError

    installed = refused = 0
    with psycopg.connect(empty_db, autocommit=True) as listener, psycopg.connect(empty_db) as conn:
        for length in range(1, 64):
            name = ("s" + "x" * 62)[:length]
            if length > sqlfiles.MAX_SCHEMA_NAME:
                with pytest.raises(ConfigError, match="NOTIFY channel"):
                    schema_manager.install(conn, name)
                refused += 1
                continue
            schema_manager.install(conn, name)
            listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(sqlfiles.notify_channel(name))))
            enqueue(conn, "t", {"n": length}, schema=name)
            conn.commit()  # the NOTIFY is sent here; a channel too long would fail here
            got = [n.channel for n in listener.notifies(timeout=10, stop_after=1)]
            assert got == [sqlfiles.notify_channel(name)], length
            installed += 1
        found = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 's%'").fetchone()
    assert (installed, refused) == (50, 13)
    assert found == (50,), "nothing was created for a refused name"


async def test_roles_work_in_a_database_that_revoked_everything_from_public(empty_db: str) -> None:
    # A hardened database: no CONNECT, no use of schema public and no EXECUTE on new
    # functions for PUBLIC. The grant files alone (plus the CONNECT a DBA gives each
    # login) must let the producer enqueue every way docs/reference/python-api.md shows, headers included,
    # and the relay deliver.
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    suffix = str(conninfo_to_dict(empty_db)["dbname"])[-8:]
    producer, relay = f"app_{suffix}", f"relay_{suffix}"
    database = sql.Identifier(str(conninfo_to_dict(empty_db)["dbname"]))
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC")
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database))
        schema_manager.install(conn, "outbox")
        for role, kind in ((producer, "producer"), (relay, "relay")):
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, sql.Identifier(role)))
            conn.execute(sqlfiles.grants(kind, "outbox", role))
        public_execute = conn.execute(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'outbox'::regnamespace "
            "AND has_function_privilege('public', oid, 'EXECUTE')"
        ).fetchone()
        assert public_execute == (0,), "the revocation took: PUBLIC may execute none of the schema's functions"
    try:
        with psycopg.connect(make_conninfo(empty_db, user=producer, password="pw")) as conn:
            enqueue(conn, "t", {"n": 1}, key="k", headers={"trace": "a"})
            conn.execute("SELECT outbox.enqueue('t', 'k', '{\"n\": 2}', '{\"trace\": \"b\"}')")
            conn.execute(
                "INSERT INTO outbox.messages (topic, key, payload, headers) "
                "VALUES ('t', 'k', '{\"n\": 3}', '{\"trace\": \"c\"}')"
            )
            conn.commit()
        fake = FakeAdapter()
        relay_dsn = make_conninfo(empty_db, user=relay, password="pw")
        async with running_relay(make_config(relay_dsn), {"main": fake}):
            await wait_until(lambda: len(fake.delivered) == 3)
        assert [dict(out.message.headers)["trace"] for out in fake.delivered] == ["a", "b", "c"]
        # `replay` runs with the relay's config, so under the relay's role too.
        from outbox_relay.operations import replay

        with psycopg.connect(relay_dsn) as conn:
            chosen = replay.plan(conn, "outbox", replay.Selection(key="k"))
            assert replay.copy(conn, "outbox", replay.begin(conn, "outbox", chosen)) == 3
    finally:
        with psycopg.connect(empty_db, autocommit=True) as conn:
            for role in (producer, relay):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
