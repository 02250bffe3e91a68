"""Installs and upgrades the outbox schema in an existing database, and switches its
source. Whether a schema is usable as it is (there, at this version, UTF8) is
``outbox_relay/schema_version.py``'s question: the relay asks it too. The source as
recorded, and the schema's lock that a switch takes, are ``outbox_relay/outbox_source.py``'s:
the WAL source reads and takes them too.

Install is idempotent and safe when two installs race: both take the same
transaction-level advisory lock, so the second waits and then finds the work done.
It creates objects only inside its own schema, and refuses a schema that already
holds objects that are not outbox-relay's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay import schema_version, sqlfiles
from outbox_relay.errors import DatabaseError, SchemaError, first_line

# Importable from here as before they moved below the sources (outbox_source.py).
from outbox_relay.outbox_source import SOURCES as SOURCES
from outbox_relay.outbox_source import SourceSetting as SourceSetting
from outbox_relay.outbox_source import lock_schema as lock_schema
from outbox_relay.outbox_source import read_source as read_source
from outbox_relay.sources.wal import framing, slot

# enqueue_binary's own fence (schema/sources.sql, take_source_fence), keyed by the channel.
_SHARED_SOURCE_FENCE = "SELECT pg_advisory_xact_lock_shared(hashtext(%s || '.source'))"
# The version whose migration replaced enqueue_binary's body (0009: the source fence).
FENCED_BODIES_SINCE = 9
# How long a switch of source waits for transactions that enqueued to end.
SWITCH_WAIT_S = 10.0
_SCHEMA_OBJECTS = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s
"""


_log = logging.getLogger(__name__)

# DDL on outbox.messages waits for every open transaction on it (a relay batch, an
# application's transaction), and while it waits every new enqueue queues behind it:
# give up after this long instead, and change nothing.
LOCK_TIMEOUT = "5s"
_LOCK_TIMEOUT = sql.SQL("SELECT set_config('lock_timeout', {}, true)").format(sql.Literal(LOCK_TIMEOUT))


def _busy(exc: psycopg.errors.LockNotAvailable, what: str) -> DatabaseError:
    return DatabaseError(
        f"{what}: outbox.messages stayed locked for {LOCK_TIMEOUT} (an open transaction on it: a relay batch "
        "or an application's), nothing was changed; try again, or when the writers are quiet"
    )


@dataclass(frozen=True)
class InstallResult:
    schema: str
    previous_version: int | None
    version: int

    @property
    def changed(self) -> bool:
        return self.previous_version != self.version


def install(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> InstallResult:
    """Create or upgrade `schema` to the current version, in one transaction.

    Outside a transaction it commits; inside the caller's open transaction it joins it
    (as a savepoint) and the caller's commit makes it visible.
    """
    sqlfiles.validate_schema_name(schema)
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(schema_version.ENCODING)
            problem = schema_version.encoding_problem((cur.fetchone() or (None,))[0])
            if problem:
                raise SchemaError(problem)
            lock_schema(cur, schema)
            previous = schema_version.version_of(cur, schema)
            if previous is None:
                cur.execute(_SCHEMA_OBJECTS, (schema,))
                row = cur.fetchone()
                if row and row[0]:
                    raise SchemaError(
                        f"schema {schema!r} already exists and holds objects that are not "
                        "outbox-relay's; choose another name with --schema"
                    )
                cur.execute(sqlfiles.ddl(schema))
                _record_version(cur, schema, sqlfiles.SCHEMA_VERSION)
            elif previous > sqlfiles.SCHEMA_VERSION:
                raise SchemaError(
                    f"schema {schema!r} is at version {previous}, newer than this "
                    f"outbox-relay knows ({sqlfiles.SCHEMA_VERSION}): upgrade outbox-relay"
                )
            else:
                cur.execute(_LOCK_TIMEOUT)
                for version, name in sqlfiles.migrations():
                    if version > previous:
                        cur.execute(sqlfiles.migration(name, schema))
                        _record_version(cur, schema, version)
                if previous < FENCED_BODIES_SINCE and read_source(conn, schema).source == "wal":
                    # The migration put the table's body (with the fence) in; this outbox
                    # writes into the WAL: its body again, with the fence, in this transaction.
                    cur.execute(_source_statement("use_wal_source", schema))
    except psycopg.errors.LockNotAvailable as exc:
        raise _busy(exc, "schema upgrade failed") from None
    except psycopg.Error as exc:
        raise DatabaseError(f"schema install failed: {exc}") from exc
    return InstallResult(schema, previous, sqlfiles.SCHEMA_VERSION)


def _record_version(cur: psycopg.Cursor[tuple[object, ...]], schema: str, version: int) -> None:
    cur.execute(sqlfiles.record_version(schema, version))


def set_notify(conn: psycopg.Connection[tuple[object, ...]], schema: str, enabled: bool) -> None:
    """Enable or disable the NOTIFY trigger (the relay's poll works either way)."""
    action = sql.SQL("ENABLE") if enabled else sql.SQL("DISABLE")
    try:
        with conn.transaction():
            conn.execute(_LOCK_TIMEOUT)
            conn.execute(
                sql.SQL("ALTER TABLE {}.messages {} TRIGGER messages_notify_relay").format(
                    sql.Identifier(sqlfiles.validate_schema_name(schema)), action
                )
            )
    except psycopg.errors.LockNotAvailable as exc:
        raise _busy(exc, f"schema notify {'on' if enabled else 'off'} failed") from None


# -- the source: where enqueue writes (outbox_source.py: SOURCES, read_source) ---------


def hold_enqueue_source(conn: psycopg.Connection[Any], schema: str) -> str:
    """Where enqueue writes (`table` or `wal`), kept so until the caller's transaction
    ends: the schema's lock, shared (set_source and install take it alone, so a switch
    waits for this transaction), then the source read from enqueue_binary's installed
    body (queries.sql, enqueue_source: any role may read it, a producer may not read
    settings). For a writer that does not go through enqueue and must write where it
    does (a backfill chunk). The read is a statement of its own: a statement's snapshot
    is taken before it waits for the lock, and would not see a switch committed meanwhile."""
    lock_schema(conn, schema, shared=True)
    # The source fence too, as enqueue_binary takes it: a switch waits for the chunk.
    conn.execute(_SHARED_SOURCE_FENCE, (sqlfiles.notify_channel(schema),))
    row = conn.execute(sqlfiles.Queries(schema)["enqueue_source"], {"schema": schema}).fetchone()
    if row is None:
        raise SchemaError(f"{schema}.enqueue_binary is missing: run `outbox-relay schema install --schema {schema}`")
    return str(row[0])


def wal_level(conn: psycopg.Connection[Any]) -> str:
    """The server's wal_level: a function of its own so a test can stand in a server
    that is not set for logical decoding (the shared test cluster cannot restart)."""
    row = conn.execute(slot.query("wal_level")).fetchone()
    return str(row[0]) if row else ""


def _source_statement(name: str, schema: str) -> sql.Composed:
    return sqlfiles.source_statement(name, schema, framing.PREFIX_FOR(schema))


def set_source(
    conn: psycopg.Connection[Any],
    schema: str,
    source: str,
    warn: Callable[[str], None] | None = None,
    *,
    slot_name: str | None = None,
    wait: float = SWITCH_WAIT_S,
) -> bool:
    """Make every enqueue into `schema` write to `source` from its next call on: `table`
    (a row in messages) or `wal` (a logical decoding message); True if it changed.

    Replaces enqueue_binary's body (schema/sources.sql says why: an enqueue pays nothing
    to find its source) and records the switch, with its time and role, in one
    transaction: outside a transaction it commits; inside the caller's it joins it (a
    savepoint), as install does. `wal` is refused, changing nothing, unless the server
    runs wal_level = logical and the outbox's own slot (`slot_name`, default
    ``outbox_relay_<schema>``: the one its relay streams) exists in this database, of
    pgoutput and not invalidated: a message emitted before it exists is decoded by no
    slot the relay reads, so it would be lost. The check runs under the schema's lock,
    which the relay also takes to drop a drained slot: the two cannot interleave.
    Switching moves no message: what is pending in the old source is the relay's to
    drain, keeping each key's order (migrations/0009_switch_order.sql): the switch takes
    the source fence alone, so it waits for every transaction that enqueued to end (at
    most `wait` seconds, then it is refused, changing nothing: an enqueue that comes
    meanwhile waits for it), and no transaction goes on with the old body after it;
    `table` sets the drain gate (the claim takes no keyed row enqueued after the switch
    until a relay drained the slot), so `wal` is refused while that drain is pending.

    `wal` also takes pg_logical_emit_message from PUBLIC (lock_down_emit_message), so
    no role but enqueue's owner can write into the relay's stream; when this role
    cannot, the switch still happens and `warn` (default: the log) gets one line with
    the statements a superuser must run. `table` gives nothing back to PUBLIC: its
    EXECUTE was a default nobody chose, the table body does not need it, and a role
    that does can be granted it by name.
    """
    sqlfiles.validate_schema_name(schema)
    if source not in SOURCES:
        raise SchemaError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    wanted = slot.validate_name(slot_name) if slot_name else slot.name_for(schema)
    try:
        with conn.transaction():
            with conn.cursor() as cur:
                lock_schema(cur, schema)
                if source == "wal":
                    _require_wal_ready(conn, schema, wanted)
                problem = schema_version.missing_or_old(schema_version.version_of(cur, schema), schema)
            if problem:
                raise SchemaError(problem)
            if source == "wal" and conn.execute(_source_statement("drain_pending", schema)).fetchone() == (True,):
                raise SchemaError(
                    f"the outbox {schema!r} is still draining its slot after the switch to table (keyed rows "
                    "enqueued since wait for it): start a relay with this schema and let it finish "
                    "(wal_slot_dropped in its log; `outbox-relay status` shows the drain), then switch"
                )
            _take_source_fence(conn, schema, wait)
            conn.execute(_source_statement(f"use_{source}_source", schema))
            changed = conn.execute(_source_statement("record_source", schema), {"source": source}).rowcount
            if changed and source == "table":
                messages = sql.Identifier(schema, "messages").as_string(conn)
                conn.execute(_source_statement("open_drain_gate", schema), {"messages": messages})
            elif changed:
                conn.execute(_source_statement("record_wal_slot", schema), {"slot": wanted})
            problem = lock_down_emit_message(conn, schema) if source == "wal" else None
    except psycopg.Error as exc:
        raise DatabaseError(f"schema source {source} failed: {first_line(exc)}") from exc
    if problem:
        (warn or _log.warning)(problem)
    return changed == 1


def _take_source_fence(conn: psycopg.Connection[Any], schema: str, wait: float) -> None:
    """The source fence, alone (schema/sources.sql, take_source_fence), waiting at most
    `wait` seconds: LockNotAvailable past it. The caller's lock_timeout is restored."""
    previous = conn.execute("SELECT current_setting('lock_timeout')").fetchone()
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(1, int(wait * 1000))}ms",))
    try:
        conn.execute(_source_statement("take_source_fence", schema))
    except psycopg.errors.LockNotAvailable:
        raise SchemaError(
            f"schema source: transactions that enqueued into {schema!r} stayed open for {wait:g}s (see "
            "pg_stat_activity: 'idle in transaction'); a switch waits for them to end so none goes on writing to "
            "the old source after it. Nothing changed: switch again once they have ended, or with a longer --wait"
        ) from None
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (previous[0] if previous else "0",))


# Every argument list of pg_logical_emit_message: PostgreSQL 17 adds the flush
# argument; a server without a variant has nothing to revoke for it.
EMIT_MESSAGE_VARIANTS = (
    "boolean, text, text",
    "boolean, text, bytea",
    "boolean, text, text, boolean",
    "boolean, text, bytea, boolean",
)


def _emit_access(conn: psycopg.Connection[Any], schema: str) -> list[tuple[Any, ...]]:
    params = {"variants": list(EMIT_MESSAGE_VARIANTS), "schema": schema}
    return conn.execute(_source_statement("emit_message_access", schema), params).fetchall()


def _emit_grants(args: str, owner: str | None, revoke: bool) -> list[sql.Composed]:
    # `args` is one of EMIT_MESSAGE_VARIANTS (the query echoes the list it is given).
    if args not in EMIT_MESSAGE_VARIANTS:
        raise SchemaError(f"unexpected pg_logical_emit_message variant {args!r}")
    function = sql.SQL("pg_catalog.pg_logical_emit_message({})").format(sql.SQL(args))
    statements = []
    if revoke:
        statements.append(sql.SQL("REVOKE EXECUTE ON FUNCTION {} FROM PUBLIC").format(function))
    if owner is not None:
        statements.append(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(function, sql.Identifier(owner)))
    return statements


def lock_down_emit_message(conn: psycopg.Connection[Any], schema: str) -> str | None:
    """Revoke EXECUTE on every pg_logical_emit_message from PUBLIC and grant it to the
    owner of `schema`.enqueue_binary (whose WAL body runs with its rights) unless that
    owner is a superuser; None when done (or nothing was left to do), else the warning
    line: this role cannot revoke (only a superuser or the functions' owner can), with
    the statements a superuser must run. Runs in the caller's transaction."""
    needed: list[sql.Composed] = []
    allowed = True
    for args, public_executes, can_revoke, owner, owner_executes in _emit_access(conn, schema):
        statements = _emit_grants(args, None if owner_executes else owner, public_executes)
        needed += statements
        allowed = allowed and (can_revoke or not statements)
    if not needed:
        return None
    if allowed:
        for statement in needed:
            conn.execute(statement)
        return None
    shown = "; ".join(statement.as_string(conn) for statement in needed)
    return (
        "warning: every role that can connect to this database can still emit logical messages into the relay's "
        f"stream (pg_logical_emit_message is executable by PUBLIC) and {conn.info.user!r} cannot revoke that; "
        f"a superuser must run: {shown};"
    )


async def emit_message_public(conn: psycopg.AsyncConnection[Any], schema: str) -> bool:
    """True when PUBLIC may still execute some pg_logical_emit_message (`check`)."""
    params = {"variants": list(EMIT_MESSAGE_VARIANTS), "schema": schema}
    cur = await conn.execute(_source_statement("emit_message_access", schema), params)
    return any(row[1] for row in await cur.fetchall())


def _require_wal_ready(conn: psycopg.Connection[Any], schema: str, slot_name: str) -> None:
    level = wal_level(conn)
    if level != "logical":
        raise SchemaError(
            f"wal_level is {level!r}: the WAL source needs wal_level = logical (set it in postgresql.conf or with "
            "ALTER SYSTEM, then restart PostgreSQL); the source is unchanged"
        )
    row = conn.execute(_source_statement("wal_slot_exists", schema), {"slot": slot_name}).fetchone()
    if not (row and row[0]):
        raise SchemaError(
            f"no usable replication slot {slot_name!r} (logical, pgoutput, in this database, not lost): a message "
            "enqueued in WAL mode before the relay's slot exists would never be streamed; create it first "
            f"(`outbox-relay schema source wal --schema {schema} --slot {slot_name}` does); the source is unchanged"
        )
