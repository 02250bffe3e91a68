"""Loads the SQL under ``schema/`` once and renders it for a schema name.

Names reach SQL only as quoted identifiers and literals composed by
:mod:`psycopg.sql`, never by string formatting of user input.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from psycopg import sql

from outbox_relay.errors import ConfigError

SCHEMA_VERSION = 15
DEFAULT_SCHEMA = "outbox"

NOTIFY_PREFIX = "outbox_relay."
# PostgreSQL's identifiers, NOTIFY channels included, are at most 63 bytes; the
# channel is the prefix plus the schema name, so the name may have 63 - 13 = 50.
MAX_SCHEMA_NAME = 63 - len(NOTIFY_PREFIX)
_SCHEMA_NAME = re.compile(rf"^[a-z_][a-z0-9_]{{0,{MAX_SCHEMA_NAME - 1}}}$")
_QUERY_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def validate_schema_name(name: str) -> str:
    """Return `name` if it is a plain lower-case identifier that leaves room for its
    NOTIFY channel, else raise ConfigError."""
    if not _SCHEMA_NAME.match(name):
        raise ConfigError(
            f"invalid schema name {name!r}: use 1 to {MAX_SCHEMA_NAME} lower-case letters, digits or _, "
            f"not starting with a digit (its NOTIFY channel {NOTIFY_PREFIX}<name> must fit PostgreSQL's 63 bytes)"
        )
    return name


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel for one outbox schema."""
    return f"{NOTIFY_PREFIX}{schema}"


def _read(name: str) -> str:
    return resources.files("outbox_relay.schema").joinpath(name).read_text(encoding="utf-8")


def _render(text: str, schema: str, **extra: sql.Composable) -> sql.Composed:
    # The text comes from our own SQL files, never from user input.
    return sql.SQL(text).format(
        schema=sql.Identifier(validate_schema_name(schema)),
        channel=sql.Literal(notify_channel(schema)),
        **extra,
    )


def ddl(schema: str) -> sql.Composed:
    """The current DDL (``schema/schema.sql``) for `schema`."""
    return _render(_read("schema.sql"), schema)


def record_version(schema: str, version: int = SCHEMA_VERSION) -> sql.Composed:
    """The statement that marks `schema` as installed at `version`."""
    return sql.SQL("INSERT INTO {}.schema_version (version) VALUES ({})").format(
        sql.Identifier(validate_schema_name(schema)), sql.Literal(version)
    )


def migrations() -> list[tuple[int, str]]:
    """(version, file name) of every migration, in order."""
    found = []
    for entry in resources.files("outbox_relay.schema").joinpath("migrations").iterdir():
        match = re.match(r"^(\d{4})_\w+\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name))
    return sorted(found)


def migration(name: str, schema: str) -> sql.Composed:
    return _render(_read(f"migrations/{name}"), schema)


def grants(kind: str, schema: str, role: str) -> sql.Composed:
    """GRANT statements for a `relay`, `producer`, `outcomes` or `console` role (and the
    console's `console_actions` and `console_payloads`)."""
    return _render(_read(f"grants_{kind}.sql"), schema, role=sql.Identifier(role))


@functools.cache
def _query_texts() -> dict[str, str]:
    text = _read("queries.sql")
    parts = _QUERY_HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@functools.cache
def _source_texts() -> dict[str, str]:
    parts = _QUERY_HEADER.split(_read("sources.sql"))
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def source_statement(name: str, schema: str, prefix: str) -> sql.Composed:
    """One named statement of ``schema/sources.sql`` (the bodies of enqueue_binary per
    source, the record of a switch) for `schema`, whose logical message prefix is
    `prefix` (sources/wal/framing.py, PREFIX_FOR: passed in, as that module imports this
    one)."""
    return _render(_source_texts()[name], schema, prefix=sql.Literal(prefix))


class Queries:
    """Every named query of ``queries.sql``, rendered once for one schema."""

    def __init__(self, schema: str):
        self.schema = validate_schema_name(schema)
        self._rendered = {name: _render(text, schema) for name, text in _query_texts().items()}

    def __getitem__(self, name: str) -> sql.Composed:
        return self._rendered[name]


# -- the consumer inbox (outbox_relay/inbox/) ---------------------------------------------

INBOX_SCHEMA_VERSION = 1
DEFAULT_INBOX_SCHEMA = "inbox"


def validate_inbox_schema_name(name: str) -> str:
    """Return `name` if it is a valid inbox schema name (the outbox's rules), else raise
    ConfigError with a message about the inbox."""
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise ConfigError(
            f"invalid inbox schema name {name!r}: use 1 to {MAX_SCHEMA_NAME} lower-case letters, digits or _, "
            "not starting with a digit"
        )
    return name


def inbox_ddl(schema: str) -> sql.Composed:
    """The consumer inbox's current DDL (``schema/inbox.sql``) for `schema`."""
    return _render(_read("inbox.sql"), validate_inbox_schema_name(schema))


def record_inbox_version(schema: str, version: int = INBOX_SCHEMA_VERSION) -> sql.Composed:
    """The statement that marks the inbox in `schema` as installed at `version`."""
    return sql.SQL("INSERT INTO {}.inbox_version (version) VALUES ({})").format(
        sql.Identifier(validate_inbox_schema_name(schema)), sql.Literal(version)
    )


def inbox_grants(schema: str, role: str) -> sql.Composed:
    """GRANT statements for a consumer role that records message ids and nothing else."""
    return grants("inbox", validate_inbox_schema_name(schema), role)


@functools.cache
def _inbox_query_texts() -> dict[str, str]:
    parts = _QUERY_HEADER.split(_read("inbox_queries.sql"))
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@functools.cache
def inbox_query(name: str, schema: str) -> sql.Composed:
    """One named query of ``schema/inbox_queries.sql``, rendered for `schema` (cached)."""
    return _render(_inbox_query_texts()[name], validate_inbox_schema_name(schema))
