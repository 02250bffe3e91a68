"""Install, check and prune the consumer inbox in the consumer's database.

Install is idempotent and safe when installs race (consumer pods starting
together): they serialize on a transaction-level advisory lock, and the second finds
the work done. It creates objects only inside its own schema, refuses a schema that
already holds objects that are not the inbox's, and refuses an inbox newer than this
code knows.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import tuple_row

from outbox_relay import sqlfiles
from outbox_relay.errors import DatabaseError, SchemaError, first_line
from outbox_relay.inbox import errors
from outbox_relay.operations.schema_manager import InstallResult
from outbox_relay.sqlfiles import DEFAULT_INBOX_SCHEMA, INBOX_SCHEMA_VERSION, inbox_query

PRUNE_BATCH = 1000

Cursor = psycopg.Cursor[tuple[Any, ...]]


def _scalar(cur: Cursor, name: str, schema: str, params: dict[str, object] | None = None) -> Any:
    cur.execute(inbox_query(name, schema), params or {})
    row = cur.fetchone()
    return row[0] if row else None


def _version_of(cur: Cursor, schema: str) -> int | None:
    if not _scalar(cur, "has_version_table", schema, {"schema": schema}):
        return None
    found = _scalar(cur, "version", schema)
    return int(found) if found is not None else None


def install(conn: psycopg.Connection[Any], schema: str = DEFAULT_INBOX_SCHEMA) -> InstallResult:
    """Create the inbox in `schema` (or find it at the current version), in one transaction.

    Outside a transaction it commits; inside the caller's open transaction it joins it
    (as a savepoint) and the caller's commit makes it visible.
    """
    sqlfiles.validate_inbox_schema_name(schema)
    try:
        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            _scalar(cur, "install_lock", schema, {"schema": schema})
            previous = _version_of(cur, schema)
            if previous is None:
                if _scalar(cur, "schema_objects", schema, {"schema": schema}):
                    raise SchemaError(
                        f"schema {schema!r} already exists and holds objects that are not the inbox's; "
                        "choose another name with --schema"
                    )
                cur.execute(sqlfiles.inbox_ddl(schema))
                cur.execute(sqlfiles.record_inbox_version(schema))
            elif previous > INBOX_SCHEMA_VERSION:
                raise SchemaError(str(errors.version_problem(previous, INBOX_SCHEMA_VERSION, schema)))
            # previous < INBOX_SCHEMA_VERSION cannot happen yet: version 1 is the first.
            # Its upgrades will be numbered migrations, replayed here like the outbox's.
    except psycopg.Error as exc:
        raise DatabaseError(f"inbox schema install failed: {first_line(exc)}") from exc
    return InstallResult(schema, previous, INBOX_SCHEMA_VERSION)


def version(conn: psycopg.Connection[Any], schema: str = DEFAULT_INBOX_SCHEMA) -> int | None:
    """The installed inbox version, or None when the inbox is not installed in `schema`.

    Reads in a transaction of its own (or the caller's, which it leaves open).
    """
    sqlfiles.validate_inbox_schema_name(schema)
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        return _version_of(cur, schema)


def check(conn: psycopg.Connection[Any], schema: str = DEFAULT_INBOX_SCHEMA) -> None:
    """Raise SchemaError unless the inbox in `schema` is at exactly the current version."""
    problem = errors.version_problem(version(conn, schema), INBOX_SCHEMA_VERSION, schema)
    if problem:
        raise SchemaError(problem)


def prune(
    conn: psycopg.Connection[Any],
    older_than_s: float,
    *,
    schema: str = DEFAULT_INBOX_SCHEMA,
    batch_size: int = PRUNE_BATCH,
) -> int:
    """Delete the records older than `older_than_s` seconds, `batch_size` rows per
    transaction; return how many were deleted.

    Each batch commits on its own, so a long prune holds no lock for long and can be
    stopped at any moment. Run it as the inbox's owner (the consumer's least-privilege
    role cannot delete). Keep `older_than_s` above the longest time in which a message
    can be delivered again: a message redelivered after its record was pruned takes
    effect a second time.
    """
    if older_than_s < 0:
        raise errors.InboxUsageError(f"older_than must be 0 or more seconds, got {older_than_s}")
    if batch_size < 1:
        raise errors.InboxUsageError(f"batch_size must be 1 or more, got {batch_size}")
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise errors.InboxUsageError("prune commits each batch: call it outside a transaction")
    sqlfiles.validate_inbox_schema_name(schema)
    total = 0
    while True:
        with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
            deleted = int(_scalar(cur, "prune", schema, {"older_than_s": older_than_s, "max_rows": batch_size}))
        total += deleted
        if deleted < batch_size:
            return total
