"""Databases of the tests' PostgreSQL: one fresh database per test, cloned from a
template with the outbox schema installed."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox_relay import sqlfiles
from outbox_relay.operations import schema_manager

TEMPLATE = "outbox_relay_template"


def dsn_for(admin_dsn: str, dbname: str) -> str:
    return make_conninfo(admin_dsn, dbname=dbname)


def create_template(admin_dsn: str, name: str = TEMPLATE) -> str:
    """(Re)create database `name` with the outbox schema (schema 'outbox') installed."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(dsn_for(admin_dsn, name)) as conn:
        schema_manager.install(conn, "outbox")
    return name


@contextlib.contextmanager
def fresh_database(admin_dsn: str, template: str | None) -> Iterator[str]:
    """DSN of a new database (a copy of `template`, or empty), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if template:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
            )
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dsn_for(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def install_at(conn: psycopg.Connection[tuple[object, ...]], schema: str, version: int) -> None:
    """Install `schema` as an older release left it: the migrations up to `version`
    (the caller commits; `schema_manager.install` then upgrades it)."""
    for number, name in sqlfiles.migrations():
        if number <= version:
            conn.execute(sqlfiles.migration(name, schema))
            conn.execute(sqlfiles.record_version(schema, number))


# The GRANTs of schema/grants_relay.sql and grants_producer.sql as releases before schema
# version 7 printed them (commit 4c0e748), comments left out. An upgrade keeps them: the
# chart's pre-upgrade hook runs `schema install`, which grants nothing.
GRANTS_BEFORE_VERSION_7 = {
    "relay": """
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, UPDATE, DELETE ON {schema}.messages TO {role};
GRANT SELECT ON {schema}.schema_version TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.relays TO {role};
GRANT EXECUTE ON FUNCTION {schema}.note_skipped_wakeup() TO {role};
GRANT EXECUTE ON FUNCTION {schema}.skipped_wakeups() TO {role};
GRANT INSERT (message_id, topic, key, payload, content_type, headers) ON {schema}.messages TO {role};
GRANT EXECUTE ON FUNCTION {schema}.headers_valid(jsonb) TO {role};
GRANT SELECT, INSERT, UPDATE ON {schema}.replays TO {role};
GRANT SELECT, INSERT ON {schema}.backfills TO {role};
GRANT UPDATE (copied, cursor_key, finished_at) ON {schema}.backfills TO {role};
""",
    "producer": """
GRANT USAGE ON SCHEMA {schema} TO {role};
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {schema}.messages FROM {role};
GRANT INSERT (topic, key, payload, content_type, headers) ON {schema}.messages TO {role};
GRANT SELECT (message_id) ON {schema}.messages TO {role};
GRANT EXECUTE ON FUNCTION {schema}.enqueue(text, text, jsonb, jsonb) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.enqueue_binary(text, text, bytea, jsonb, text) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.headers_valid(jsonb) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.note_skipped_wakeup() TO {role};
GRANT EXECUTE ON FUNCTION {schema}.skipped_wakeups() TO {role};
GRANT SELECT ON {schema}.schema_version TO {role};
GRANT SELECT, INSERT ON {schema}.backfills TO {role};
GRANT UPDATE (copied, cursor_key, finished_at) ON {schema}.backfills TO {role};
""",
}


@contextlib.contextmanager
def role_with_grants(dsn: str, kind: str, prefix: str, *, before_version_7: bool = False) -> Iterator[str]:
    """A login role holding the GRANTs `schema sql --grants-only` prints for `kind`
    ("relay", "producer" or "outcomes"; several joined by "+") on schema outbox (`before_version_7`: those of releases
    before schema version 7); yields its DSN; dropped afterwards. Roles are the
    cluster's, so the name carries the database's."""
    role = f"{prefix}_{conninfo_to_dict(dsn)['dbname']}"
    if before_version_7:
        grants = sql.SQL(GRANTS_BEFORE_VERSION_7[kind]).format(
            schema=sql.Identifier("outbox"), role=sql.Identifier(role)
        )
    else:
        grants = sql.SQL("\n").join(sqlfiles.grants(part, "outbox", role) for part in kind.split("+"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
        conn.execute(grants)
    try:
        yield make_conninfo(dsn, user=role, password="pw")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@contextlib.contextmanager
def bare_role(dsn: str, prefix: str) -> Iterator[str]:
    """A login role granted nothing (it holds only what PUBLIC holds); yields its DSN;
    dropped afterwards. Roles are the cluster's, so the name carries the database's."""
    role = f"{prefix}_{conninfo_to_dict(dsn)['dbname']}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
    try:
        yield make_conninfo(dsn, user=role, password="pw")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
