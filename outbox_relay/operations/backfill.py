"""`outbox-relay backfill`: snapshot an existing table into the outbox.

One message per row (payload: the row as a JSON object, ``to_jsonb``), to seed a new
consumer or correct history. The table is read in keyset order of its primary key, in
chunks, each chunk its own short transaction that inserts the chunk's messages and
moves the backfill's cursor (a row in ``backfills``): a backfill killed mid-way resumes
after the last chunk that committed, with nothing missing and nothing twice.

Ordering against live writes. A chunk reads its rows ``FOR SHARE``: an application
transaction that updates one of them either committed before the chunk read it (the
snapshot shows its change, and its own message, enqueued in that transaction, has the
lower id and goes first), or waits until the chunk commits (the snapshot shows the row
before the change, and the application's message is committed, and so delivered, after
it). Either way, for an application that enqueues a row's event in the transaction that
changes the row, with the same key, the last message of that key carries the row's
latest state. A chunk holds its share locks for one chunk's time (milliseconds).

In WAL mode (docs/how-to/wal-source.md) a chunk writes where enqueue writes:
it calls ``enqueue_binary`` for each row, in key order, so its messages are logical
decoding messages like the application's, and go out in commit order with them. The
argument above then holds by commit order alone (even for an application that enqueues
before it updates). Inserting rows instead would put them in the table, which the
WAL source reads only to hold a key back, and only as a snapshot up to a second old:
an application's message of that key committed just after the chunk could be published
from the WAL before the chunk's older row. Each chunk takes the outbox schema's lock
shared and reads the source under it (``schema_manager.hold_enqueue_source``), so a
switch of source waits for the chunk, and the chunk writes wholly to one source.

Safety: the table and column names reach SQL only as quoted identifiers, after they
were found in the catalog; filter values only as bound parameters (sent untyped, so
PostgreSQL reads them as the column's type).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb

from outbox_relay.errors import ConfigError, DatabaseError, NotFound, first_line
from outbox_relay.operations import schema_manager
from outbox_relay.operations.copying import only_copier, requester
from outbox_relay.sqlfiles import Queries, validate_schema_name
from outbox_relay.validation import check_topic

log = structlog.get_logger("outbox_relay.operations.backfill")

BACKFILL_HEADER = "outbox-backfill-id"
DEFAULT_CHUNK = 1000
# Session advisory locks: (this class, backfill id), held for a whole copy, so that two
# `--resume N` never copy one backfill in turns.
_LOCK_CLASS = 0x0B0F_0002

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
_FILTER = re.compile(r"([A-Za-z_][A-Za-z0-9_$]{0,62})(>=|<=|!=|=|>|<)(.*)", re.DOTALL)


@dataclass(frozen=True)
class Filter:
    """`COLUMN OP VALUE` from the command line; the value stays text (a bound parameter)."""

    column: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Filter:
        match = _FILTER.fullmatch(text)
        if match is None:
            raise ConfigError(
                f"--where {text!r}: give COLUMN=VALUE, COLUMN>=VALUE, COLUMN<=VALUE, COLUMN>VALUE, "
                "COLUMN<VALUE or COLUMN!=VALUE"
            )
        return cls(match[1], match[2], match[3])

    def as_text(self) -> str:
        return f"{self.column}{self.op}{self.value}"


@dataclass(frozen=True)
class Source:
    """What a backfill snapshots, as given on the command line; recorded with its table
    schema-qualified (`qualified`)."""

    table: str  # `name` (found on the search path) or `schema.name`
    topic: str
    key_column: str | None = None
    filters: tuple[Filter, ...] = ()

    def __post_init__(self) -> None:
        try:
            check_topic(self.topic)
        except ValueError as exc:
            raise ConfigError(f"--topic: {exc}") from None
        parts = self.table.split(".")
        if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
            raise ConfigError(
                f"--table {self.table!r}: give a table name or schema.table "
                "(letters, digits, _ and $; as the catalog spells it)"
            )

    def as_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "topic": self.topic,
            "key_column": self.key_column,
            "where": [f.as_text() for f in self.filters],
        }

    def qualified(self, table: Table) -> Source:
        """This source naming its table as the catalog resolved it (schema.name), as it is
        recorded: a resume under another search path copies the same table."""
        try:
            return dataclasses.replace(self, table=f"{table.schema}.{table.name}")
        except ConfigError:  # a schema name that --table cannot spell: kept as given
            return self

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Source:
        return cls(
            data["table"],
            data["topic"],
            data.get("key_column"),
            tuple(Filter.parse(text) for text in data.get("where") or ()),
        )


@dataclass(frozen=True)
class Table:
    """The table as the catalog describes it: every name here came from the catalog."""

    schema: str
    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    partitioned: bool = False

    @property
    def identifier(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    @property
    def rows(self) -> sql.Composable:
        """What a statement reads: a plain table's own rows (ONLY: inheritance children
        are other tables); a partitioned table has none of its own, so all its partitions'."""
        if self.partitioned:
            return self.identifier
        return sql.SQL("ONLY {}").format(self.identifier)


_FIND_TABLE = """
SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %(name)s
  AND (n.nspname = %(schema)s OR (%(schema)s IS NULL AND n.nspname = ANY (current_schemas(false))))
ORDER BY array_position(current_schemas(false), n.nspname::text) NULLS LAST LIMIT 1
"""
_COLUMNS = "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
_PRIMARY_KEY = """
SELECT a.attname FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.position
"""


def _find(conn: psycopg.Connection[Any], table: str) -> tuple[Any, ...] | None:
    """(oid, schema, name, relkind) of `table` (name or schema.name), as the catalog
    and this session's search path resolve it."""
    schema, _, name = table.rpartition(".")
    return conn.execute(_FIND_TABLE, {"name": name, "schema": schema or None}).fetchone()


def resolve(conn: psycopg.Connection[Any], source: Source) -> Table:
    """Find the table, its columns and its primary key; check every name given."""
    row = _find(conn, source.table)
    if row is None or row[3] not in ("r", "p"):
        schema = source.table.rpartition(".")[0]
        where = f"schema {schema!r}" if schema else "the search path"
        raise ConfigError(f"--table {source.table!r}: no such table in {where} (names are case-sensitive)")
    oid, table = row[0], Table(row[1], row[2], (), (), partitioned=row[3] == "p")
    columns = tuple(r[0] for r in conn.execute(_COLUMNS, (oid,)).fetchall())
    primary_key = tuple(r[0] for r in conn.execute(_PRIMARY_KEY, (oid,)).fetchall())
    conn.rollback()
    if not primary_key:
        raise ConfigError(f"--table {source.table!r} has no primary key: a backfill pages through the table by it")
    for column, option in [(source.key_column, "--key-column"), *((f.column, "--where") for f in source.filters)]:
        if column is not None and column not in columns:
            raise ConfigError(f"{option}: table {table.schema}.{table.name} has no column {column!r}")
    return dataclasses.replace(table, columns=columns, primary_key=primary_key)


def _where(table: Table, filters: Sequence[Filter], cursor: Sequence[str] | None) -> tuple[sql.Composable, list[str]]:
    clauses: list[sql.Composable] = []
    params: list[str] = []
    if cursor is not None:
        clauses.append(
            sql.SQL("({}) > ({})").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in table.primary_key),
                sql.SQL(", ").join(sql.Placeholder() for _ in table.primary_key),
            )
        )
        params.extend(cursor)
    for f in filters:  # the operator is one of six fixed strings (Filter.parse), never free text
        clauses.append(sql.SQL("{} {} %s").format(sql.Identifier(f.column), sql.SQL(f.op)))
        params.append(f.value)
    if not clauses:
        return sql.SQL("true"), params
    return sql.SQL(" AND ").join(clauses), params


def count(conn: psycopg.Connection[Any], table: Table, source: Source) -> int:
    where, params = _where(table, source.filters, None)
    row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table.rows, where), params).fetchone()
    conn.rollback()
    return int(row[0]) if row else 0


ROW = "__outbox_backfill_row"  # the table's alias: no column of the user's table has this name

# What a chunk does with its rows (__outbox_rows, in _chunk_statement), by source; both
# take the topic and the headers as parameters, in that order.
_TABLE_COPIES = sql.SQL("""
        , __outbox_copies AS (
            INSERT INTO {outbox}.messages (topic, key, payload, content_type, headers)
            SELECT %s, __outbox_key, __outbox_payload, 'application/json', %s
            FROM __outbox_rows ORDER BY {pk_order}
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM __outbox_copies),
               (SELECT coalesce(max(octet_length(__outbox_payload)), 0) FROM __outbox_rows)
""")
_WAL_COPIES = sql.SQL("""
        SELECT count({outbox}.enqueue_binary(%s, __outbox_key, __outbox_payload, %s, 'application/json')),
               coalesce(max(octet_length(__outbox_payload)), 0)
        FROM (SELECT * FROM __outbox_rows ORDER BY {pk_order} OFFSET 0) AS __outbox_ordered
""")


def _window_statement(
    table: Table, source: Source, cursor: Sequence[str] | None, chunk: int
) -> tuple[sql.Composed, list[Any]]:
    """The primary keys of the next `chunk` matching rows, read without locks: the
    window's upper end is fixed before any row is locked, so a row whose key changes
    while the chunk waits for it can leave the window but never stretch it (a cursor
    taken from re-checked rows would jump past the rows in between)."""
    where, params = _where(table, source.filters, cursor)
    pk = sql.SQL(", ").join(sql.Identifier(c) for c in table.primary_key)
    pk_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in table.primary_key)
    statement = sql.SQL("SELECT ARRAY[{pk_text}] FROM {table} WHERE {where} ORDER BY {pk} LIMIT %s").format(
        pk_text=pk_text, table=table.rows, where=where, pk=pk
    )
    return statement, [*params, chunk]


def _chunk_statement(
    outbox: str,
    table: Table,
    source: Source,
    cursor: Sequence[str] | None,
    window_end: Sequence[str],
    backfill_id: int,
    *,
    wal: bool = False,
) -> tuple[sql.Composed, list[Any]]:
    """The window's rows, share-locked, copied to the outbox in key order; returns how
    many, and the size of the largest payload (checked against the relay's limit). In
    WAL mode (`wal`) each goes through enqueue_binary instead, in key order: the
    subquery's sort comes before the aggregate that calls it, row by row."""
    where, params = _where(table, source.filters, cursor)
    pk_cols = [sql.Identifier(ROW, c) for c in table.primary_key]
    pk = sql.SQL(", ").join(pk_cols)
    upper = sql.SQL("({}) <= ({})").format(pk, sql.SQL(", ").join(sql.Placeholder() for _ in table.primary_key))
    key = sql.SQL("{}::text").format(sql.Identifier(ROW, source.key_column)) if source.key_column else sql.SQL("NULL")
    # The primary key is selected as __outbox_pk_N (no clash with the table's columns),
    # for the copies' order; FOR SHARE allows no window function to number the rows.
    pk_out = sql.SQL(", ").join(
        sql.SQL("{} AS {}").format(col, sql.Identifier(f"__outbox_pk_{i}")) for i, col in enumerate(pk_cols)
    )
    pk_order = sql.SQL(", ").join(sql.Identifier(f"__outbox_pk_{i}") for i in range(len(pk_cols)))
    rows = sql.SQL("""
        WITH __outbox_rows AS MATERIALIZED (
            SELECT {key} AS __outbox_key, convert_to(to_jsonb({row}.*)::text, 'UTF8') AS __outbox_payload, {pk_out}
            FROM {table} AS {row} WHERE {where} AND {upper} ORDER BY {pk} FOR SHARE OF {row}
        )""").format(key=key, row=sql.Identifier(ROW), pk=pk, pk_out=pk_out, table=table.rows, where=where, upper=upper)
    copies = _WAL_COPIES if wal else _TABLE_COPIES
    statement = sql.Composed([rows, copies.format(pk_order=pk_order, outbox=sql.Identifier(outbox))])
    return statement, [*params, *window_end, source.topic, Jsonb({BACKFILL_HEADER: str(backfill_id)})]


def begin(conn: psycopg.Connection[Any], outbox: str, source: Source, total: int) -> int:
    with conn.transaction():
        row = conn.execute(
            Queries(validate_schema_name(outbox))["backfill_begin"],
            {
                "requested_by": requester(),
                "source": Jsonb(source.as_json()),
                "total": total,
            },
        ).fetchone()
    assert row is not None
    return int(row[0])


def previous(conn: psycopg.Connection[Any], outbox: str, source: Source, table: Table) -> tuple[int, Any, bool] | None:
    """(id, requested at, finished) of the last backfill of the same source, if any: the
    same topic, key column and filters, and the same table however it was named (a
    backfill recorded before names were recorded qualified may say `orders`)."""
    candidates = conn.execute(Queries(outbox)["backfill_same_source"], {"source": Jsonb(source.as_json())}).fetchall()
    try:
        for backfill_id, requested_at, finished, recorded in candidates:
            found = _find(conn, recorded)
            if found is not None and (found[1], found[2]) == (table.schema, table.name):
                return int(backfill_id), requested_at, bool(finished)
        return None
    finally:
        conn.rollback()


@dataclass(frozen=True)
class Backfill:
    backfill_id: int
    source: Source
    total: int
    copied: int
    finished: bool
    created_by: str | None  # the role that recorded it (None: before schema version 7)
    own: bool  # recorded by the role that reads it


def get(conn: psycopg.Connection[Any], outbox: str, backfill_id: int) -> Backfill:
    row = conn.execute(Queries(outbox)["backfill_get"], {"backfill_id": backfill_id}).fetchone()
    conn.rollback()
    if row is None:
        raise NotFound(f"no backfill #{backfill_id} (see `outbox-relay status`)")
    return Backfill(int(row[0]), Source.from_json(row[1]), int(row[2]), int(row[3]), bool(row[5]), row[6], bool(row[7]))


def copy(
    conn: psycopg.Connection[Any],
    outbox: str,
    backfill_id: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    max_payload_bytes: int | None = None,
) -> int:
    """Copy from where the backfill stands, chunk by chunk; returns the rows copied in
    all. `rate`: at most this many rows per second."""
    q = Queries(outbox)
    recorded = get(conn, outbox, backfill_id)
    table = resolve(conn, recorded.source)
    if rate:
        chunk = max(1, min(chunk, int(rate)))  # about a second's worth per transaction
    with only_copier(conn, _LOCK_CLASS, backfill_id, "backfill"):
        return _copy_locked(
            conn, q, outbox, table, recorded.source, backfill_id, chunk, rate, progress, max_payload_bytes
        )


# A chunk waits at most this long for a row an application transaction holds, then
# rolls back and tries again: shorter than PostgreSQL's deadlock_timeout (1 s by
# default), so that in a lock cycle with the application the backfill is always the
# side that gives way, never the application's transaction.
CHUNK_LOCK_TIMEOUT = "500ms"
RETRYABLE = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def _copy_locked(
    conn: psycopg.Connection[Any],
    q: Queries,
    outbox: str,
    table: Table,
    source: Source,
    backfill_id: int,
    chunk: int,
    rate: float | None,
    progress: Callable[[int], None] | None,
    max_payload_bytes: int | None = None,
) -> int:
    started, copied_now, yielded = time.monotonic(), 0, 0
    while True:
        try:
            with conn.transaction():
                try:
                    lock = conn.execute(q["backfill_lock"], {"backfill_id": backfill_id}).fetchone()
                except psycopg.errors.LockNotAvailable:
                    raise DatabaseError(
                        f"backfill #{backfill_id} is being copied by another process right now"
                    ) from None
                if lock is None:
                    raise NotFound(f"no backfill #{backfill_id}")
                cursor, total_copied, finished = lock[0], int(lock[1]), bool(lock[2])
                if finished:
                    return total_copied
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (CHUNK_LOCK_TIMEOUT,))
                wal = schema_manager.hold_enqueue_source(conn, outbox) == "wal"
                statement, params = _window_statement(table, source, cursor, chunk)
                keys = [r[0] for r in conn.execute(statement, params).fetchall()]
                rows = 0
                if keys:
                    statement, params = _chunk_statement(outbox, table, source, cursor, keys[-1], backfill_id, wal=wal)
                    result = conn.execute(statement, params).fetchone()
                    assert result is not None
                    rows, largest = int(result[0]), int(result[1])
                    if max_payload_bytes is not None and largest > max_payload_bytes:
                        raise DatabaseError(
                            f"backfill #{backfill_id} stopped: a row of {largest} bytes as JSON exceeds "
                            f"relay.max_payload_bytes ({max_payload_bytes}) and would be dead-lettered; "
                            "nothing of this chunk was written"
                        )
                advanced = conn.execute(
                    q["backfill_advance"],
                    {
                        "backfill_id": backfill_id,
                        "rows": rows,
                        "cursor_key": keys[-1] if keys else None,
                        "finished": len(keys) < chunk,
                    },
                ).fetchone()
        except RETRYABLE as exc:
            # An application transaction holds a row of this chunk (or a lock cycle with
            # it): this chunk rolled back; give way, then take the same chunk again.
            yielded += 1
            log.info("backfill_chunk_yielded", backfill_id=backfill_id, reason=type(exc).__name__, times=yielded)
            time.sleep(min(0.05 * yielded, 1.0))
            continue
        except psycopg.errors.CheckViolation as exc:
            # The outbox's own rules (a key over 2,048 bytes): this chunk is rolled
            # back, the cursor stays before it; say which rule, not the row's contents.
            raise DatabaseError(
                f"backfill #{backfill_id} stopped: a row breaks an outbox rule "
                f"({exc.diag.constraint_name}); nothing of this chunk was written"
            ) from None
        except (psycopg.errors.InvalidParameterValue, psycopg.errors.ProgramLimitExceeded) as exc:
            # The same rules as enqueue_binary states them (WAL mode: the chunk calls it),
            # with the size or length at fault and never the row's contents.
            raise DatabaseError(
                f"backfill #{backfill_id} stopped: a row breaks an outbox rule ({first_line(exc)}); "
                "nothing of this chunk was written"
            ) from None
        assert advanced is not None
        copied_now += rows
        if progress is not None:
            progress(int(advanced[0]))
        if len(keys) < chunk:
            return int(advanced[0])
        if rate:
            ahead = copied_now / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
