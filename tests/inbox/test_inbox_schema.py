"""Installing the inbox, its version, its grants and retention, on a real PostgreSQL."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox_relay import inbox, sqlfiles
from outbox_relay.errors import SchemaError
from outbox_relay.inbox import schema_manager as inbox_schema


def objects(dsn: str, schema: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
            "UNION ALL SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = %s",
            (schema, schema),
        ).fetchall()
    return {r[0] for r in rows}


def test_install_is_idempotent_and_records_its_version(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        conn.execute("CREATE TABLE app_table (id int)")
        conn.commit()
        first = inbox.install(conn)
        second = inbox.install(conn)
        assert (first.previous_version, first.version, first.changed) == (None, 1, True)
        assert (second.previous_version, second.version, second.changed) == (1, 1, False)
        assert conn.execute("SELECT version FROM inbox.inbox_version").fetchall() == [(1,)]
        assert inbox_schema.version(conn) == 1
    assert objects(empty_db, "inbox") == {
        "inbox_version",
        "inbox_version_pkey",
        "processed",
        "processed_pkey",
        "processed_processed_at",
        "first_time",
        "prune",
    }
    assert objects(empty_db, "public") == {"app_table"}, "the application's tables are untouched"


def test_install_under_a_custom_schema_name_beside_the_outbox(db: str) -> None:
    with psycopg.connect(db) as conn:
        inbox.install(conn, "billing_inbox")
        assert inbox.first_time(conn, uuid.uuid4(), schema="billing_inbox")
        conn.commit()
        assert inbox_schema.version(conn, "inbox") is None


def test_racing_installs_are_serialized(empty_db: str) -> None:
    results: list[object] = []
    barrier = threading.Barrier(4)

    def install() -> None:
        with psycopg.connect(empty_db) as conn:
            barrier.wait()
            results.append(inbox.install(conn).previous_version)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results, key=str) == [1, 1, 1, None]


def test_install_refuses_a_schema_holding_other_objects(db: str) -> None:
    with psycopg.connect(db) as conn, pytest.raises(SchemaError) as info:
        inbox.install(conn, "outbox")
    assert str(info.value) == (
        "schema 'outbox' already exists and holds objects that are not the inbox's; choose another name with --schema"
    )
    with psycopg.connect(db) as conn:
        conn.execute("CREATE SCHEMA mine")
        conn.execute("CREATE FUNCTION mine.f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        conn.commit()
        with pytest.raises(SchemaError, match=r"holds objects that are not the inbox's"):
            inbox.install(conn, "mine")


def test_an_empty_schema_of_that_name_is_fine(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        conn.execute("CREATE SCHEMA inbox")
        conn.commit()
        assert inbox.install(conn).previous_version is None


def test_a_newer_inbox_than_the_code_is_refused(consumer_db: str) -> None:
    with psycopg.connect(consumer_db) as conn:
        conn.execute("INSERT INTO inbox.inbox_version (version) VALUES (2)")
        conn.commit()
        with pytest.raises(SchemaError) as info:
            inbox.install(conn)
        assert str(info.value) == (
            "inbox schema 'inbox' is at version 2, newer than this outbox-relay knows (1): upgrade outbox-relay"
        )
        with pytest.raises(SchemaError, match=r"newer than this outbox-relay knows"):
            inbox_schema.check(conn)


def test_printed_sql_builds_the_same_inbox(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        conn.execute(sqlfiles.inbox_ddl("inbox"))
        conn.execute(sqlfiles.record_inbox_version("inbox"))
        conn.commit()
        assert inbox.install(conn).previous_version == 1
        inbox_schema.check(conn)


def test_prune_deletes_only_old_records_in_batches(consumer_db: str) -> None:
    with psycopg.connect(consumer_db) as conn:
        conn.execute(
            "INSERT INTO inbox.processed (consumer, message_id, processed_at) "
            "SELECT 'default', gen_random_uuid(), now() - interval '8 days' FROM generate_series(1, 25)"
        )
        conn.execute(
            "INSERT INTO inbox.processed (consumer, message_id, processed_at) "
            "SELECT 'other', gen_random_uuid(), now() - interval '6 days' FROM generate_series(1, 5)"
        )
        conn.commit()
        assert inbox.prune(conn, 7 * 86400, batch_size=10) == 25
        assert conn.execute("SELECT consumer, count(*) FROM inbox.processed GROUP BY 1").fetchall() == [("other", 5)]
        conn.commit()
        # From SQL, one batch per call: other languages loop until it returns 0.
        assert conn.execute("SELECT inbox.prune(interval '1 day', 3)").fetchone() == (3,)
        assert conn.execute("SELECT inbox.prune(interval '1 day', 3)").fetchone() == (2,)
        assert conn.execute("SELECT inbox.prune(interval '1 day', 3)").fetchone() == (0,)
        conn.rollback()
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"^inbox: older_than must be"):
            conn.execute("SELECT inbox.prune(interval '-1 day')")


def test_prune_commits_each_batch_and_refuses_to_run_inside_a_transaction(consumer_db: str) -> None:
    with psycopg.connect(consumer_db) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(inbox.InboxUsageError, match=r"prune commits each batch: call it outside a transaction"):
            inbox.prune(conn, 0)
        conn.rollback()
        with pytest.raises(inbox.InboxUsageError, match=r"older_than must be 0 or more seconds"):
            inbox.prune(conn, -1)


def test_a_pruned_message_is_a_first_time_again(consumer_db: str) -> None:
    # Why retention must exceed the longest redelivery window (docs/how-to/inbox.md, "Retention").
    mid = uuid.uuid4()
    with psycopg.connect(consumer_db) as conn:
        assert inbox.first_time(conn, mid)
        conn.commit()
        assert inbox.prune(conn, 0) == 1
        assert inbox.first_time(conn, mid)


def _role(db: str, prefix: str) -> str:
    return prefix + conninfo_to_dict(db)["dbname"][-8:]  # type: ignore[index]


def test_consumer_role_records_messages_and_can_do_nothing_else(consumer_db: str) -> None:
    role = _role(consumer_db, "consumer_")
    with psycopg.connect(consumer_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
        # A database that revoked everything from PUBLIC: only what the grants name works.
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA inbox FROM PUBLIC")
        conn.execute(sql.SQL("GRANT ALL ON accounts TO {}").format(sql.Identifier(role)))
        conn.execute(sqlfiles.inbox_grants("inbox", role))
        conn.execute(sqlfiles.inbox_grants("inbox", role))  # idempotent
    try:
        mid = uuid.uuid4()
        with psycopg.connect(make_conninfo(consumer_db, user=role, password="pw")) as conn:
            assert inbox.first_time(conn, mid, consumer="billing")
            assert not inbox.first_time(conn, mid, consumer="billing")
            conn.commit()
            for what, statement in [
                ("read the records", "SELECT * FROM inbox.processed"),
                ("delete a record", "DELETE FROM inbox.processed"),
                ("change a record", "UPDATE inbox.processed SET consumer = 'x'"),
                (
                    "backdate a record",
                    "INSERT INTO inbox.processed (consumer, message_id, processed_at) "
                    "VALUES ('x', gen_random_uuid(), now() - interval '1 year')",
                ),
                ("prune", "SELECT inbox.prune(interval '0')"),
                ("empty the table", "TRUNCATE inbox.processed"),
            ]:
                try:
                    conn.execute(statement)
                except psycopg.errors.InsufficientPrivilege:
                    conn.rollback()
                else:
                    pytest.fail(f"the consumer role could {what}")
    finally:
        with psycopg.connect(consumer_db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
