"""`outbox-relay inbox ...`: the consumer inbox's commands.

Errors follow the rest of the CLI (`output`): one line, exit 1 for a runtime
failure, 2 for a usage error; the group formats click's own errors the same way when
an application runs it on its own. The options name the *consumer's* database (a
config only when given with --config: a relay's config found beside the command names
the outbox's database) and the inbox's schema.
"""

from __future__ import annotations

import click

from outbox_relay import sqlfiles
from outbox_relay.cli.common import Target, chunk_option, database_options, positive_duration
from outbox_relay.cli.output import JSON_OPTION, OneLineGroup, one_line_errors, print_json
from outbox_relay.durations import format_duration
from outbox_relay.errors import CommandLineError
from outbox_relay.inbox import schema_manager as inbox_schema

SCHEMA_OPTION = click.option(
    "--schema", "schema_name", default=sqlfiles.DEFAULT_INBOX_SCHEMA, show_default=True, help="Schema the DDL creates."
)


@click.group("inbox", cls=OneLineGroup)
def inbox_group() -> None:
    """The consumer inbox: exactly-once effects in the consumer's own database."""


@inbox_group.group("schema")
def schema_group() -> None:
    """Install the inbox in the consumer's database, or print its SQL."""


@schema_group.command("install")
@database_options(inbox=True)
@JSON_OPTION
@one_line_errors
def schema_install(target: Target, as_json: bool) -> None:
    """Create the inbox (idempotent, safe to run concurrently)."""
    schema_name = sqlfiles.validate_inbox_schema_name(target.schema)
    with target.connect() as conn:
        result = inbox_schema.install(conn, schema_name)
    if as_json:
        print_json({"schema": schema_name, "version": result.version, "previous_version": result.previous_version})
    elif result.previous_version is None:
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
        raise CommandLineError("--grants-only needs --consumer-role ROLE")
    parts: list[str] = []
    if not grants_only:
        parts.append(sqlfiles.inbox_ddl(schema_name).as_string())
        parts.append(sqlfiles.record_inbox_version(schema_name).as_string() + ";\n")
    if consumer_role:
        parts.append(sqlfiles.inbox_grants(schema_name, consumer_role).as_string())
    click.echo("\n".join(parts).rstrip())


@inbox_group.command("prune")
@database_options(inbox=True)
@click.option(
    "--older-than",
    "older_than",
    required=True,
    callback=positive_duration,
    help="Delete records of messages processed longer ago than this (e.g. 7d, 36h). Keep it above "
    "the longest time in which a message can be delivered again.",
)
@chunk_option(inbox_schema.PRUNE_BATCH, old="--batch-size")
@JSON_OPTION
@one_line_errors
def prune(target: Target, older_than: float, chunk: int, as_json: bool) -> None:
    """Retention: delete old records of processed messages, in chunks (exit 0 also when
    none is old enough: a job that runs it on a schedule)."""
    schema_name = sqlfiles.validate_inbox_schema_name(target.schema)
    with target.connect() as conn:
        inbox_schema.check(conn, schema_name)
        deleted = inbox_schema.prune(conn, older_than, schema=schema_name, batch_size=chunk)
    if as_json:
        print_json({"schema": schema_name, "deleted": deleted, "older_than_s": older_than})
        return
    click.echo(f"deleted {deleted} record(s) of messages processed more than {format_duration(older_than)} ago")
