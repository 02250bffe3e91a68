"""`outbox-relay inbox ...`: the consumer inbox's commands.

Errors follow the rest of the CLI (`one_line_errors`): one line, exit 1 for a
runtime failure, 2 for a usage error. The options name the *consumer's* database and
the inbox's schema.
"""

from __future__ import annotations

import click

from outbox_relay import sqlfiles
from outbox_relay.cli.common import dsn_option, one_line_errors, schema_option
from outbox_relay.connections import connect_sync
from outbox_relay.durations import format_duration, parse_duration
from outbox_relay.inbox import schema_manager as inbox_schema

DSN_OPTION = dsn_option("The consumer's PostgreSQL")
SCHEMA_OPTION = schema_option(sqlfiles.DEFAULT_INBOX_SCHEMA, "inbox")


@click.group("inbox")
def inbox_group() -> None:
    """The consumer inbox: exactly-once effects in the consumer's own database."""


@inbox_group.group("schema")
def schema_group() -> None:
    """Install the inbox in the consumer's database, or print its SQL."""


@schema_group.command("install")
@DSN_OPTION
@SCHEMA_OPTION
@one_line_errors
def schema_install(dsn: str, schema_name: str) -> None:
    """Create the inbox (idempotent, safe to run concurrently)."""
    sqlfiles.validate_inbox_schema_name(schema_name)
    with connect_sync(dsn, application_name="outbox-relay-cli") as conn:
        result = inbox_schema.install(conn, schema_name)
    if result.previous_version is None:
        click.echo(f"installed inbox schema {schema_name!r} at version {result.version}")
    else:
        click.echo(f"inbox schema {schema_name!r} is already at version {result.version}")


@schema_group.command("sql")
@SCHEMA_OPTION
@click.option("--consumer-role", help="Also print GRANTs for the consumer's least-privilege role.")
@click.option("--grants-only", is_flag=True, help="Print only the GRANTs.")
@one_line_errors
def schema_sql(schema_name: str, consumer_role: str | None, grants_only: bool) -> None:
    """Print the DDL, for teams that apply DDL with their own migration tool."""
    if grants_only and not consumer_role:
        raise click.UsageError("--grants-only needs --consumer-role ROLE")
    parts: list[str] = []
    if not grants_only:
        parts.append(sqlfiles.inbox_ddl(schema_name).as_string())
        parts.append(sqlfiles.record_inbox_version(schema_name).as_string() + ";\n")
    if consumer_role:
        parts.append(sqlfiles.inbox_grants(schema_name, consumer_role).as_string())
    click.echo("\n".join(parts).rstrip())


@inbox_group.command("prune")
@DSN_OPTION
@SCHEMA_OPTION
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Delete records of messages processed longer ago than this (e.g. 7d, 36h). Keep it above "
    "the longest time in which a message can be delivered again.",
)
@click.option(
    "--batch-size",
    default=inbox_schema.PRUNE_BATCH,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Rows deleted per transaction.",
)
@one_line_errors
def prune(dsn: str, schema_name: str, older_than: str, batch_size: int) -> None:
    """Retention: delete old records of processed messages, in small batches."""
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    sqlfiles.validate_inbox_schema_name(schema_name)
    with connect_sync(dsn, application_name="outbox-relay-cli") as conn:
        inbox_schema.check(conn, schema_name)
        deleted = inbox_schema.prune(conn, seconds, schema=schema_name, batch_size=batch_size)
    click.echo(f"deleted {deleted} record(s) of messages processed more than {format_duration(seconds)} ago")
