"""The WAL source's slot and publication (outbox_relay/sources/wal/slot.py) against a real
PostgreSQL: created once, read, refused when not ours, dropped."""

from __future__ import annotations

import re
import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.sources.wal import slot
from outbox_relay.sources.wal.errors import ReplicationError, SlotInUse
from tests.support.wal import WalSlot, commit_messages, require_logical_wal


def test_create_makes_an_empty_publication_and_a_pgoutput_slot_once(empty_db: str) -> None:
    require_logical_wal(empty_db)
    name = slot.name_for("outbox")
    with psycopg.connect(empty_db, autocommit=True) as conn:
        assert slot.create(conn, name, name) is True
        try:
            assert slot.create(conn, name, name) is False  # already there: nothing to do

            assert conn.execute(
                "SELECT puballtables, (SELECT count(*) FROM pg_publication_tables t WHERE t.pubname = p.pubname) "
                "FROM pg_publication p WHERE pubname = %s",
                (name,),
            ).fetchone() == (False, 0)
            assert conn.execute(
                "SELECT slot_type, plugin, database = current_database() FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (name,),
            ).fetchone() == ("logical", "pgoutput", True)
        finally:
            slot.drop(conn, name, name)
        assert slot.read_state(conn, name) is None
        assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", (name,)).fetchone() == (0,)
        slot.drop(conn, name, name)  # dropping what is gone is no error


async def test_the_state_says_how_far_behind_the_slot_is(wal: WalSlot) -> None:
    with psycopg.connect(wal.dsn, autocommit=True) as conn:
        before = slot.read_state(conn, wal.name)
        commit_messages(wal.dsn, b"x" * 10_000)
        after = slot.read_state(conn, wal.name)
    async with await psycopg.AsyncConnection.connect(wal.dsn, autocommit=True) as aconn:
        same = await slot.read_state_async(aconn, wal.name)

    assert before is not None and after is not None and same is not None
    assert (before.active, before.wal_status, before.safe_wal_size) == (False, "reserved", None)
    assert before.confirmed_flush_lsn is not None and before.restart_lsn is not None
    assert before.restart_lsn <= before.confirmed_flush_lsn <= before.current_lsn
    assert after.confirmed_flush_lsn == before.confirmed_flush_lsn  # nothing confirmed yet
    assert after.lag_bytes is not None and after.lag_bytes > 10_000  # the message is behind the slot
    assert after.retained_bytes is not None and after.retained_bytes >= after.lag_bytes
    assert same.confirmed_flush_lsn == after.confirmed_flush_lsn

    async with wal.stream():
        with psycopg.connect(wal.dsn, autocommit=True) as conn:
            streaming = slot.read_state(conn, wal.name)
    assert streaming is not None and streaming.active and streaming.active_pid is not None


def test_a_slot_of_that_name_that_is_not_ours_is_refused(empty_db: str) -> None:
    require_logical_wal(empty_db)
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("SELECT pg_create_physical_replication_slot(%s)", (name,))
        try:
            with pytest.raises(ReplicationError, match=f"a replication slot '{name}' exists but is not this outbox's"):
                slot.create(conn, name, name)
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


async def test_a_streamed_slot_cannot_be_dropped(wal: WalSlot) -> None:
    async with wal.stream():
        with psycopg.connect(wal.dsn, autocommit=True) as conn, pytest.raises(SlotInUse, match="is active for PID"):
            slot.drop(conn, wal.name, wal.name)


def test_a_role_without_the_privileges_is_told_which_it_needs(empty_db: str) -> None:
    role = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with (
            psycopg.connect(make_conninfo(empty_db, user=role), autocommit=True) as conn,
            pytest.raises(ReplicationError, match="the role needs the REPLICATION attribute"),
        ):
            slot.create(conn, "t_not_allowed", "t_not_allowed")
    finally:
        with psycopg.connect(empty_db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_on_amazon_rds_membership_in_rds_replication_stands_for_the_attribute(empty_db: str) -> None:
    # RDS and Aurora let no role have REPLICATION; a member of their rds_replication
    # role may create and stream logical slots there. A role of that name stands in for
    # it: the check lets its member through, and this server (no RDS) then refuses the
    # slot in its own words.
    role = f"r_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute("CREATE ROLE rds_replication NOLOGIN")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE rds_replication").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(sql.Identifier(conn.info.dbname), sql.Identifier(role))
        )
    try:
        with (
            psycopg.connect(make_conninfo(empty_db, user=role), autocommit=True) as conn,
            pytest.raises(ReplicationError) as refused,
        ):
            slot.create(conn, "t_rds_member", "t_rds_member")
        said = str(refused.value)
        assert f"which {role!r} lacks" not in said, "refused by the check, not by the server"
        # PostgreSQL's own words (15: "must be superuser or replication role to use ...",
        # 16 on: "permission denied to use ...").
        assert re.search(r"(must be superuser or replication role|permission denied) to use replication slots", said)
    finally:
        with psycopg.connect(empty_db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
            conn.execute("DROP ROLE rds_replication")


def test_create_and_drop_need_autocommit(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn, pytest.raises(ValueError, match="autocommit"):
        slot.create(conn, "t_x", "t_x")


def test_names() -> None:
    assert slot.name_for("outbox") == "outbox_relay_outbox"
    assert len(slot.name_for("s" * 50)) == 63  # the longest schema name still fits
    for bad in ("", "Upper", "with-dash", "x" * 64):
        with pytest.raises(ValueError, match="invalid slot or publication name"):
            slot.validate_name(bad)
