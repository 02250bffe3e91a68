"""Where an outbox's enqueue writes (its source, as {schema}.settings records it), and
the schema's lock under which the source is switched and read.

Below the sources and the operator's commands, which both need them: schema_manager
(operations/) switches the source and installs the schema under the lock; the WAL
source (sources/wal/runner.py) takes the same lock to drop a drained slot only while
the source is still table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from outbox_relay import sqlfiles
from outbox_relay.errors import SchemaError

SOURCES = ("table", "wal")

# One advisory lock per outbox schema, taken alone by whatever changes the schema or its
# source, shared by a writer that must write where enqueue does while it writes.
_LOCK_KEY = "SELECT pg_advisory_xact_lock(hashtext('outbox_relay.schema.' || %s))"
_SHARED_LOCK_KEY = "SELECT pg_advisory_xact_lock_shared(hashtext('outbox_relay.schema.' || %s))"


@dataclass(frozen=True)
class SourceSetting:
    """Where enqueue writes (`table` or `wal`), since when and who switched."""

    source: str
    changed_at: datetime
    changed_by: str
    wal_slot: str | None = None  # the slot the last switch to wal used


def read_source(conn: psycopg.Connection[Any], schema: str) -> SourceSetting:
    """The outbox's source as recorded (queries.sql, outbox_source)."""
    row = conn.execute(sqlfiles.Queries(schema)["outbox_source"]).fetchone()
    if row is None:  # the row is inserted with the table; only a hand-made DELETE removes it
        raise SchemaError(f"{schema}.settings holds no row: run `outbox-relay schema install --schema {schema}`")
    return SourceSetting(str(row[0]), row[1], str(row[2]), None if row[4] is None else str(row[4]))


def lock_schema(conn: psycopg.Connection[Any] | psycopg.Cursor[Any], schema: str, *, shared: bool = False) -> None:
    """Take `schema`'s lock until the caller's transaction ends: alone (install, upgrade,
    set_source; the WAL runner to drop a drained slot only while the source is table),
    or `shared` (a writer that must write where enqueue does: a switch waits for it)."""
    conn.execute(_SHARED_LOCK_KEY if shared else _LOCK_KEY, (sqlfiles.validate_schema_name(schema),))
