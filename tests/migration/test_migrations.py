"""Replaying every migration must build exactly the database that schema.sql builds."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from outbox_relay import schema_version, sqlfiles
from outbox_relay.operations import schema_manager
from tests.support.databases import install_at, role_with_grants

CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type, is_nullable, column_default,
               is_identity, identity_generation
        FROM information_schema.columns WHERE table_schema = %(s)s ORDER BY 1, 3""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = %(s)s::regnamespace ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = %(s)s ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
        FROM pg_proc p WHERE p.pronamespace = %(s)s::regnamespace ORDER BY 1, 2""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, tgenabled, pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE %(s)s || '.%%'
        ORDER BY 1, 2""",
    "reloptions": """
        SELECT c.relname, c.reloptions FROM pg_class c
        WHERE c.relnamespace = %(s)s::regnamespace ORDER BY 1""",
}


def catalog(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[Any, ...]]]:
    return {
        name: [
            tuple(str(v).replace(schema, "<schema>") for v in row)
            for row in conn.execute(query, {"s": schema}).fetchall()
        ]  # type: ignore[arg-type]
        for name, query in CATALOG_QUERIES.items()
    }


def test_migrations_replayed_equal_schema_sql(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        conn.execute(sqlfiles.ddl("from_ddl"))
        for _version, name in sqlfiles.migrations():
            conn.execute(sqlfiles.migration(name, "from_migrations"))
        conn.commit()
        from_ddl = catalog(conn, "from_ddl")
        from_migrations = catalog(conn, "from_migrations")
    assert from_ddl["columns"], "catalog query found nothing: the comparison would be empty"
    for part in CATALOG_QUERIES:
        assert from_migrations[part] == from_ddl[part], f"{part} differ"


def test_migrations_are_numbered_without_gaps_up_to_the_code_version() -> None:
    versions = [v for v, _ in sqlfiles.migrations()]
    assert versions == list(range(1, sqlfiles.SCHEMA_VERSION + 1))


def test_an_upgrade_to_version_6_keeps_rows_with_keys_the_new_limit_refuses(empty_db: str) -> None:
    # Before version 6 a key was 1 to 1,024 characters: a pending row may hold up to
    # 2,684 bytes (what the key index took), a row inserted already dispatched up to
    # 4,096. The upgrade must not fail on them, and they stay workable; only new rows
    # with such keys are refused.
    pending_key = "".join(chr(0x4E00 + i * 7919 % 20_000) for i in range(866))  # 2,598 bytes
    dispatched_key = "".join(chr(0x4E00 + i * 7907 % 20_000) for i in range(1024))  # 3,072 bytes
    with psycopg.connect(empty_db) as conn:
        for version, name in sqlfiles.migrations():
            if version <= 5:
                conn.execute(sqlfiles.migration(name, "outbox"))
                conn.execute(sqlfiles.record_version("outbox", version))
        conn.execute("INSERT INTO outbox.messages (topic, key, payload) VALUES ('t', %s, 'x')", (pending_key,))
        conn.execute(
            "INSERT INTO outbox.messages (topic, key, payload, dispatched_at) VALUES ('t', %s, 'x', now())",
            (dispatched_key,),
        )
        conn.commit()
        result = schema_manager.install(conn, "outbox")
    assert (result.previous_version, result.version) == (5, sqlfiles.SCHEMA_VERSION)
    with psycopg.connect(empty_db) as conn:
        # What the relay and the CLI do to a row: dead-letter, requeue, dispatch.
        for change in (
            "dead_lettered_at = now(), dead_letter_reason = 'x'",
            "dead_lettered_at = NULL, dead_letter_reason = NULL",
            "dispatched_at = now()",
        ):
            updated = conn.execute(f"UPDATE outbox.messages SET {change} WHERE key = %s", (pending_key,))  # type: ignore[arg-type]
            assert updated.rowcount == 1
        conn.commit()
        for key in (pending_key, dispatched_key):
            with pytest.raises(psycopg.errors.CheckViolation, match="messages_key_valid"), conn.transaction():
                conn.execute("INSERT INTO outbox.messages (topic, key, payload) VALUES ('t', %s, 'x')", (key,))
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (2,)


RECORDS = {
    "backfills": "INSERT INTO outbox.backfills (requested_by, source, total{creator}) "
    'VALUES (\'ops@host\', \'{{"table": "public.payroll", "topic": "t"}}\', 1{named})',
    "replays": "INSERT INTO outbox.replays (requested_by, selection, max_source_id, as_of, total{creator}) "
    "VALUES ('ops@host', '{{\"topic\": \"payroll.*\"}}', 0, now(), 1{named})",
}
SELECTS = {"backfills": "source", "replays": "selection"}


@pytest.mark.parametrize(("kind", "tables"), [("relay", ("backfills", "replays")), ("producer", ("backfills",))])
def test_an_upgrade_to_version_7_records_the_true_creator_whatever_grants_the_roles_kept(
    empty_db: str, kind: str, tables: tuple[str, ...]
) -> None:
    # An upgrade keeps the roles' GRANTs of the previous release (the chart's hook runs
    # only `schema install`): table-wide INSERT on backfills, INSERT and UPDATE on
    # replays. The record must still name its creator truly, and no role may rewrite
    # what a record copies: the operator's `--resume` acts on it with the operator's
    # privileges, asking first only about another role's record.
    with psycopg.connect(empty_db) as conn:
        install_at(conn, "outbox", 6)
        conn.commit()
    with role_with_grants(empty_db, kind, kind, before_version_7=True) as role_dsn:
        with psycopg.connect(empty_db) as conn:
            result = schema_manager.install(conn, "outbox")
            assert (result.previous_version, result.version) == (6, sqlfiles.SCHEMA_VERSION)
            operator = conn.execute("SELECT current_user").fetchone()
            assert operator is not None
            for table in tables:  # the operator's own record, id 1
                conn.execute(RECORDS[table].format(creator="", named=""))  # type: ignore[arg-type]
            conn.commit()
        with psycopg.connect(role_dsn) as conn:
            role = conn.execute("SELECT current_user").fetchone()
            for table in tables:  # id 2: the role names the operator as its creator
                conn.execute(RECORDS[table].format(creator=", created_by", named=", %s"), operator)  # type: ignore[arg-type]
            conn.commit()
            for table in tables:
                creators = conn.execute(f"SELECT created_by FROM outbox.{table} ORDER BY 1").fetchall()  # type: ignore[arg-type]
                assert sorted(creators) == sorted([operator, role]), f"{table}: the role named another creator"
                forgeries = {
                    "change the creator": f"UPDATE outbox.{table} SET created_by = %s",
                    f"change the {SELECTS[table]}": f"UPDATE outbox.{table} SET {SELECTS[table]} = '{{}}'",
                    "change who asked": f"UPDATE outbox.{table} SET requested_by = 'ops'",
                    "change the total": f"UPDATE outbox.{table} SET total = 2",
                }
                for forgery, statement in forgeries.items():
                    with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                        conn.execute(statement, operator if "%s" in statement else None)  # type: ignore[arg-type]
                        pytest.fail(f"the {kind} role could {forgery} of a row of {table}")
            # Progress is the role's to move (it runs replays and backfills).
            progress = {"backfills": "cursor_key = '{1}'", "replays": "cursor_id = 1"}
            for table in tables:
                moved = conn.execute(f"UPDATE outbox.{table} SET copied = 1, {progress[table]}, finished_at = now()")  # type: ignore[arg-type]
                assert moved.rowcount == 2
            conn.commit()
    with psycopg.connect(empty_db) as conn:
        # What the operator's `backfill --resume 2` reads: another role's record, asked about.
        recorded = conn.execute(sqlfiles.Queries("outbox")["backfill_get"], {"backfill_id": 2}).fetchone()
        assert recorded is not None and (recorded[6], recorded[7]) == (role[0] if role else None, False)


def test_an_upgrade_to_version_9_keeps_an_outbox_in_wal_mode_writing_to_the_wal_with_the_fence(
    empty_db: str,
) -> None:
    # Migration 0009 replaces enqueue_binary with the table's body (and its fence); an
    # outbox that writes into the WAL must get the WAL body back, fenced, in the same
    # upgrade, never the table's.
    unfenced_wal_body = re.sub(
        r"    -- The fence of a switch.*?END IF;\n",
        "",
        sqlfiles.source_statement("use_wal_source", "outbox", "outbox-relay:outbox").as_string(None),
        flags=re.S,
    )
    assert "advisory" not in unfenced_wal_body
    with psycopg.connect(empty_db) as conn:
        install_at(conn, "outbox", 8)
        conn.execute(unfenced_wal_body)  # what `schema source wal` left at version 8
        conn.execute("UPDATE outbox.settings SET source = 'wal'")
        conn.commit()
        schema_manager.install(conn, "outbox")
        conn.commit()
        row = conn.execute("SELECT pg_get_functiondef('outbox.enqueue_binary'::regproc)").fetchone()
        assert row is not None
        assert "pg_logical_emit_message" in row[0] and "INSERT INTO" not in row[0]
        assert "pg_try_advisory_xact_lock_shared" in row[0]
        assert schema_manager.read_source(conn, "outbox").source == "wal"


def test_an_upgrade_to_version_15_refuses_an_invalid_index_left_by_a_failed_concurrent_build(
    empty_db: str,
) -> None:
    # The upgrade notes offer to build the dead letters' message-id index beforehand with
    # CREATE INDEX CONCURRENTLY; one that failed leaves an invalid index of that name,
    # which IF NOT EXISTS would take as built. The upgrade stops and says what to do,
    # touching nothing; once it is dropped, the upgrade builds it.
    from outbox_relay.errors import DatabaseError

    with psycopg.connect(empty_db) as conn:
        install_at(conn, "outbox", 14)
        conn.execute(
            "CREATE INDEX messages_dead_letters_message_id_idx ON outbox.messages USING hash (message_id)"
            " WHERE dead_lettered_at IS NOT NULL"
        )
        # What a failed CREATE INDEX CONCURRENTLY leaves (the test's role is a superuser).
        conn.execute(
            "UPDATE pg_index SET indisvalid = false"
            " WHERE indexrelid = 'outbox.messages_dead_letters_message_id_idx'::regclass"
        )
        conn.commit()
        with pytest.raises(
            DatabaseError, match=r"messages_dead_letters_message_id_idx is invalid.*drop it and upgrade again"
        ):
            schema_manager.install(conn, "outbox")
        conn.rollback()
        assert schema_version.version(conn, "outbox") == 14
        conn.execute("DROP INDEX outbox.messages_dead_letters_message_id_idx")
        conn.commit()
        assert schema_manager.install(conn, "outbox").version == sqlfiles.SCHEMA_VERSION
        valid = conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'outbox.messages_dead_letters_message_id_idx'::regclass"
        ).fetchone()
    assert valid == (True,)
