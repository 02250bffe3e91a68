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


@contextlib.contextmanager
def role_with_grants(dsn: str, kind: str, prefix: str) -> Iterator[str]:
    """A login role holding the GRANTs `schema sql --grants-only` prints for `kind`
    ("relay" or "producer") on schema outbox; yields its DSN; dropped afterwards.
    Roles are the cluster's, so the name carries the database's."""
    role = f"{prefix}_{conninfo_to_dict(dsn)['dbname']}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(role)))
        conn.execute(sqlfiles.grants(kind, "outbox", role))
    try:
        yield make_conninfo(dsn, user=role, password="pw")
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
