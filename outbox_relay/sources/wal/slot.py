"""The replication slot and the publication the WAL source streams, and where they stand.

A logical slot (plugin pgoutput) keeps every WAL segment from its restart position on,
until the relay confirms it: PostgreSQL's own record of how far the relay got, and the
known hazard of a WAL source (a stalled reader pins WAL until the disk fills, unless
max_slot_wal_keep_size lets PostgreSQL invalidate the slot instead). read_state says
how far behind it is.

create and drop take a connection in autocommit mode: a slot cannot be created in a
transaction that has written anything, and its creation waits for every transaction
running at that moment to end (the snapshot its decoding starts from).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg import sql

from outbox_relay.errors import first_line

# The naming rules live below the config, which checks relay.wal.slot with them; they
# stay importable from here (slot.name_for, slot.validate_name).
from outbox_relay.slot_names import NAME_PREFIX as NAME_PREFIX
from outbox_relay.slot_names import name_for as name_for
from outbox_relay.slot_names import validate_name as validate_name
from outbox_relay.sources.wal.errors import ReplicationError, SlotInUse
from outbox_relay.sources.wal.pgoutput import parse_lsn

_log = structlog.get_logger("outbox_relay.wal")

_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@functools.cache
def _texts() -> dict[str, str]:
    text = resources.files("outbox_relay.schema").joinpath("wal_queries.sql").read_text(encoding="utf-8")
    parts = _QUERY_HEADER.split(text)
    return {name: _without_comments(body) for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def _without_comments(body: str) -> str:
    # The walsender takes a command for a replication command only if it starts with
    # one: a leading comment sends START_REPLICATION to the SQL parser (a syntax error).
    return "\n".join(line for line in body.strip().splitlines() if not line.lstrip().startswith("--"))


def text(name: str) -> str:
    """The named query of schema/wal_queries.sql as written, for a caller that composes
    its own names in (parking.py: the outbox schema)."""
    return _texts()[name]


def query(name: str, *, slot: str = "", publication: str = "", start: str = "0/0") -> sql.Composed:
    """The named query of schema/wal_queries.sql with the names composed in (validated first)."""
    return sql.SQL(_texts()[name]).format(
        slot=sql.Literal(slot),
        slot_id=sql.Identifier(slot),
        publication=sql.Literal(publication),
        publication_id=sql.Identifier(publication),
        start=sql.SQL(start),  # formatted by pgoutput.format_lsn from an integer, never user text
    )


def outbox_query(name: str, schema: str) -> sql.Composed:
    """The named query of schema/wal_queries.sql's last sections, on the outbox `schema`."""
    return sql.SQL(_texts()[name]).format(schema=sql.Identifier(schema))


@dataclass(frozen=True)
class SlotState:
    """One moment of a slot, from pg_replication_slots. LSNs are integers; None where
    PostgreSQL has none (an invalidated slot has no restart position)."""

    active: bool  # a walsender streams it now
    active_pid: int | None
    wal_status: str | None  # reserved, extended, unreserved (about to be lost), lost (invalidated)
    safe_wal_size: int | None  # bytes of WAL before invalidation; None when max_slot_wal_keep_size is -1
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    current_lsn: int

    @property
    def lag_bytes(self) -> int | None:
        """WAL written since the last position the relay confirmed."""
        return None if self.confirmed_flush_lsn is None else max(self.current_lsn - self.confirmed_flush_lsn, 0)

    @property
    def retained_bytes(self) -> int | None:
        """WAL the slot keeps on disk (from its restart position)."""
        return None if self.restart_lsn is None else max(self.current_lsn - self.restart_lsn, 0)


def _state(row: tuple[Any, ...] | None) -> SlotState | None:
    if row is None:
        return None
    active, pid, wal_status, safe_size, restart, confirmed, current = row
    return SlotState(
        active=bool(active),
        active_pid=pid,
        wal_status=wal_status,
        safe_wal_size=None if safe_size is None else int(safe_size),
        restart_lsn=None if restart is None else parse_lsn(restart),
        confirmed_flush_lsn=None if confirmed is None else parse_lsn(confirmed),
        current_lsn=parse_lsn(current),
    )


def read_state(conn: psycopg.Connection[Any], slot: str) -> SlotState | None:
    """The slot as it stands, or None when it does not exist."""
    return _state(conn.execute(query("slot_state", slot=validate_name(slot))).fetchone())


async def read_state_async(conn: psycopg.AsyncConnection[Any], slot: str) -> SlotState | None:
    """read_state on an async connection (a replication connection too)."""
    cursor = await conn.execute(query("slot_state", slot=validate_name(slot)))
    return _state(await cursor.fetchone())


def create(conn: psycopg.Connection[Any], slot: str, publication: str) -> bool:
    """Create the publication (with no table) and the pgoutput slot where missing;
    True if anything was created. ReplicationError when the server cannot do logical
    decoding, the role may not, or a slot of that name is not one this relay can use."""
    _require_autocommit(conn)
    validate_name(slot)
    validate_name(publication)
    try:
        _require_logical_wal(conn)
        _require_replication(conn, slot)
        created = _create_publication(conn, publication)
        return _create_slot(conn, slot) or created
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ReplicationError(
            f"not allowed to create the slot or publication: {first_line(exc)} (the role needs the REPLICATION "
            "attribute, and CREATE on the database for the publication)"
        ) from exc
    except psycopg.Error as exc:
        raise ReplicationError(
            f"cannot create the slot {slot!r} or publication {publication!r}: {first_line(exc)}"
        ) from exc


def _require_logical_wal(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(query("wal_level")).fetchone()
    level = None if row is None else row[0]
    if level != "logical":
        raise ReplicationError(
            f"wal_level is {level!r}: the WAL source needs wal_level = logical (postgresql.conf, then restart "
            "PostgreSQL)"
        )


def _require_replication(conn: psycopg.Connection[Any], slot_name: str) -> None:
    row = conn.execute(query("role_can_replicate")).fetchone()
    if row is not None and not row[1]:
        raise ReplicationError(
            f"not allowed to create the slot {slot_name!r}: the role needs the REPLICATION attribute, which "
            f"{row[0]!r} lacks (ALTER ROLE {row[0]} REPLICATION, as a superuser; on Amazon RDS or Aurora, GRANT "
            f"rds_replication TO {row[0]}); nothing was changed"
        )


def _create_publication(conn: psycopg.Connection[Any], publication: str) -> bool:
    row = conn.execute(query("publication_exists", publication=publication)).fetchone()
    if row is not None and row[0]:
        return False
    try:
        conn.execute(query("create_publication", publication=publication))
    except pg_errors.DuplicateObject:
        return False  # another install made it between the check and now
    return True


def _create_slot(conn: psycopg.Connection[Any], slot: str) -> bool:
    row = conn.execute(query("slot_identity", slot=slot)).fetchone()
    if row is not None:
        plugin, database, here = row
        if plugin != "pgoutput" or database != here:
            raise ReplicationError(
                f"a replication slot {slot!r} exists but is not this outbox's (plugin {plugin!r}, "
                f"database {database!r}): drop it or choose another schema"
            )
        return False
    try:
        conn.execute(query("create_slot", slot=slot))
    except pg_errors.DuplicateObject:
        return False
    return True


def drop(conn: psycopg.Connection[Any], slot: str, publication: str) -> None:
    """Drop the slot and the publication if they exist; SlotInUse while a walsender
    streams the slot (PostgreSQL refuses to drop an active slot)."""
    _require_autocommit(conn)
    drop_in_transaction(conn, slot, publication)


def drop_in_transaction(conn: psycopg.Connection[Any], slot: str, publication: str) -> None:
    """drop, in the caller's open transaction: the runner holds the outbox schema's lock
    there, so no switch back to wal can commit between its check of the source and the
    drop. The slot goes at once (a slot is not transactional), the publication at commit."""
    try:
        conn.execute(query("drop_slot", slot=validate_name(slot)))
        try:
            with conn.transaction():  # a savepoint: a refusal here keeps the slot's drop
                conn.execute(query("drop_publication", publication=validate_name(publication)))
        except pg_errors.InsufficientPrivilege as exc:
            # The publication is its creator's (`schema source wal`, run by an operator);
            # a least-privilege relay may not drop it. It holds nothing (no table): left.
            _log.warning(
                "wal_publication_left", publication=publication, reason=f"{first_line(exc)}: drop it as its owner"
            )
    except pg_errors.ObjectInUse as exc:
        raise SlotInUse(f"cannot drop the slot {slot!r}: {first_line(exc)}") from exc
    except psycopg.Error as exc:
        raise ReplicationError(
            f"cannot drop the slot {slot!r} or publication {publication!r}: {first_line(exc)}"
        ) from exc


def _require_autocommit(conn: psycopg.Connection[Any]) -> None:
    if not conn.autocommit:
        raise ValueError("slot.create and slot.drop need a connection in autocommit mode")
