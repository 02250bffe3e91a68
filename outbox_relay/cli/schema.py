"""`outbox-relay schema ...`: install, upgrade or print the outbox schema; NOTIFY on or off."""

from __future__ import annotations

import click

from outbox_relay import sqlfiles
from outbox_relay.cli.common import DSN_OPTION, SCHEMA_OPTION, connect, one_line_errors
from outbox_relay.operations import schema_manager


@click.group()
def schema() -> None:
    """Install the outbox schema, or print its SQL."""


@schema.command("install")
@DSN_OPTION
@SCHEMA_OPTION
@one_line_errors
def schema_install(dsn: str, schema_name: str) -> None:
    """Create or upgrade the outbox schema (idempotent, safe to run concurrently)."""
    sqlfiles.validate_schema_name(schema_name)
    with connect(dsn) as conn:
        result = schema_manager.install(conn, schema_name)
    if result.previous_version is None:
        click.echo(f"installed outbox schema {schema_name!r} at version {result.version}")
    elif result.changed:
        click.echo(f"upgraded outbox schema {schema_name!r} from version {result.previous_version} to {result.version}")
    else:
        click.echo(f"outbox schema {schema_name!r} is already at version {result.version}")


@schema.command("sql")
@SCHEMA_OPTION
@click.option("--relay-role", help="Also print GRANTs for the relay's least-privilege role.")
@click.option("--producer-role", help="Also print GRANTs for an application role that only enqueues.")
@click.option("--grants-only", is_flag=True, help="Print only the GRANTs.")
@one_line_errors
def schema_sql(schema_name: str, relay_role: str | None, producer_role: str | None, grants_only: bool) -> None:
    """Print the DDL, for teams that apply DDL with their own migration tool."""
    parts: list[str] = []
    if not grants_only:
        parts.append(sqlfiles.ddl(schema_name).as_string())
        parts.append(sqlfiles.record_version(schema_name).as_string() + ";\n")
    for kind, role in (("relay", relay_role), ("producer", producer_role)):
        if role:
            parts.append(sqlfiles.grants(kind, schema_name, role).as_string())
    click.echo("\n".join(parts).rstrip())


@schema.command("notify")
@click.argument("state", type=click.Choice(["on", "off"]))
@DSN_OPTION
@SCHEMA_OPTION
@one_line_errors
def schema_notify(state: str, dsn: str, schema_name: str) -> None:
    """Turn the NOTIFY trigger on or off (off: the relay's poll finds new rows alone)."""
    with connect(dsn) as conn:
        schema_manager.set_notify(conn, schema_name, state == "on")
    click.echo(f"NOTIFY trigger {state} for schema {schema_name!r}")
