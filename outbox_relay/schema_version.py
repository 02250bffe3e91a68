"""Is the outbox schema there, at the version this outbox-relay needs, in a UTF8
database: the check the relay runs before it starts and every command before it
touches an outbox.

Below the engine and the operator's commands, which both ask it; installing and
upgrading a schema is ``operations/schema_manager.py``'s job.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import psycopg

from outbox_relay import sqlfiles
from outbox_relay.errors import SchemaError

ENCODING = "SELECT current_setting('server_encoding')"
_HAS_VERSION_TABLE = "SELECT to_regclass(format('%%I.schema_version', %s::text)) IS NOT NULL"


def encoding_problem(encoding: object) -> str | None:
    # Text in any other encoding comes back as bytes (SQL_ASCII) or cannot hold every
    # topic, key and header the relay accepts: refuse it up front, in one line.
    if isinstance(encoding, bytes):  # SQL_ASCII: psycopg hands text over undecoded
        encoding = encoding.decode("ascii", "replace")
    if encoding == "UTF8":
        return None
    return (
        f"the database's encoding is {encoding}; outbox-relay needs a UTF8 database "
        "(CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
    )


def version_of(cur: psycopg.Cursor[Any], schema: str) -> int | None:
    """The version recorded in `schema`, read with the caller's cursor (inside its
    transaction), or None when the schema holds no outbox."""
    cur.execute(_HAS_VERSION_TABLE, (schema,))
    row = cur.fetchone()
    if not row or not row[0]:
        return None
    cur.execute(sqlfiles.Queries(schema)["schema_version"])
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else None


def version(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> int | None:
    """The installed schema version, or None when the schema is not installed."""
    with conn.cursor() as cur:
        found = version_of(cur, schema)
    conn.rollback()
    return found


def why_unusable(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> str | None:
    """Why the relay cannot run against `schema` in this database, or None if it can."""
    found = version(conn, schema)
    installed: list[str] = []
    if found is None:
        installed = [str(row[0]) for row in conn.execute(sqlfiles.Queries(schema)["outbox_schemas"]).fetchall()]
        conn.rollback()
    return missing_or_old(found, schema, installed)


def _not_installed(schema: str, installed: Sequence[str]) -> str:
    """`schema` holds no outbox. A typo (`outbx`) is answered with the outbox that exists,
    not with the advice to install a second one."""
    missing = f"outbox schema {schema!r} is not installed in this database"
    others = [name for name in installed if name != schema]
    here = f"outbox schemas here: {', '.join(others)}"
    close = difflib.get_close_matches(schema, others, n=1, cutoff=0.6)
    if close:
        return f"{missing}; did you mean {close[0]!r}? (database.schema in the config; {here})"
    install = f"run `outbox-relay schema install --schema {schema}`"
    if others:
        return f"{missing} ({here}): set database.schema to one of them, or {install} for a new outbox"
    return f"{missing}: {install}"


def missing_or_old(version: int | None, schema: str, installed: Sequence[str] = ()) -> str | None:
    """Why the relay cannot run against a schema at `version`, or None if it can.
    `installed`: the schemas of the database that hold an outbox, named if `schema` does not."""
    if version is None:
        return _not_installed(schema, installed)
    if version < sqlfiles.SCHEMA_VERSION:
        return (
            f"outbox schema {schema!r} is at version {version}, older than this outbox-relay "
            f"needs ({sqlfiles.SCHEMA_VERSION}): run `outbox-relay schema install --schema {schema}`"
        )
    if version > sqlfiles.SCHEMA_VERSION:
        return (
            f"outbox schema {schema!r} is at version {version}, newer than this outbox-relay "
            f"knows ({sqlfiles.SCHEMA_VERSION}): upgrade outbox-relay"
        )
    return None


async def check(conn: psycopg.AsyncConnection[tuple[object, ...]], schema: str) -> None:
    """Raise SchemaError unless `schema` is installed at exactly the current version."""
    async with conn.cursor() as cur:
        await cur.execute(ENCODING)
        encoding = await cur.fetchone()
        problem = encoding_problem(encoding[0] if encoding else None)
        if problem:
            raise SchemaError(problem)
        await cur.execute(_HAS_VERSION_TABLE, (schema,))
        row = await cur.fetchone()
        version = None
        if row and row[0]:
            await cur.execute(sqlfiles.Queries(schema)["schema_version"])
            vrow = await cur.fetchone()
            version = int(vrow[0]) if vrow and vrow[0] is not None else None  # type: ignore[call-overload]
        installed: list[str] = []
        if version is None:
            await cur.execute(sqlfiles.Queries(schema)["outbox_schemas"])
            installed = [str(row[0]) for row in await cur.fetchall()]
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
        await conn.rollback()
    problem = missing_or_old(version, schema, installed)
    if problem:
        raise SchemaError(problem)
