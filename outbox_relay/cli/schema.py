"""`outbox-relay schema ...`: install, upgrade or print the outbox schema; NOTIFY on or
off; the source (table or wal) enqueue writes to."""

from __future__ import annotations

from typing import Any

import click
import psycopg

from outbox_relay import sqlfiles
from outbox_relay.cli.common import DSN_OPTION, SCHEMA_OPTION, connect, one_line_errors, require_schema
from outbox_relay.durations import parse_duration
from outbox_relay.operations import schema_manager
from outbox_relay.sources.wal import slot as wal_slot


@click.group()
def schema() -> None:
    """Install the outbox schema, or print its SQL."""


SLOT_OPTION = click.option(
    "--slot",
    help="The WAL source's replication slot and publication (relay.wal.slot); default outbox_relay_<schema>.",
)


@schema.command("install")
@DSN_OPTION
@SCHEMA_OPTION
@click.option(
    "--source",
    type=click.Choice(schema_manager.SOURCES),
    help="Where enqueue writes: table (a new outbox's default) or wal; default: leave an installed outbox's as is.",
)
@SLOT_OPTION
@one_line_errors
def schema_install(dsn: str, schema_name: str, source: str | None, slot: str | None) -> None:
    """Create or upgrade the outbox schema (idempotent, safe to run concurrently)."""
    sqlfiles.validate_schema_name(schema_name)
    with connect(dsn) as conn:
        result = schema_manager.install(conn, schema_name)
        if result.previous_version is None:
            click.echo(f"installed outbox schema {schema_name!r} at version {result.version}")
        elif result.changed:
            click.echo(
                f"upgraded outbox schema {schema_name!r} from version {result.previous_version} to {result.version}"
            )
        else:
            click.echo(f"outbox schema {schema_name!r} is already at version {result.version}")
        if source is not None:
            _switch_source(conn, schema_name, source, slot)


@schema.command("source")
@click.argument("source", type=click.Choice(schema_manager.SOURCES))
@DSN_OPTION
@SCHEMA_OPTION
@SLOT_OPTION
@click.option(
    "--wait",
    default="10s",
    show_default=True,
    help="How long the switch waits for transactions that enqueued to end (enqueues wait for the switch meanwhile).",
)
@one_line_errors
def schema_source(source: str, dsn: str, schema_name: str, slot: str | None, wait: str) -> None:
    """Switch where enqueue writes: wal (creates the slot and publication first) or table
    (the slot stays until a relay has streamed what it holds, then that relay drops it).
    The switch waits for transactions that enqueued to end, so none of them goes on
    writing to the old source after it."""
    sqlfiles.validate_schema_name(schema_name)
    try:
        seconds = parse_duration(wait)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--wait") from None
    if seconds <= 0:
        raise click.BadParameter("must be positive", param_hint="--wait")
    with connect(dsn) as conn:
        require_schema(conn, schema_name)
        _switch_source(conn, schema_name, source, slot, seconds)


def _switch_source(
    conn: psycopg.Connection[Any],
    schema_name: str,
    source: str,
    slot: str | None,
    wait: float = schema_manager.SWITCH_WAIT_S,
) -> None:
    name = wal_slot.validate_name(slot) if slot else wal_slot.name_for(schema_name)
    if source == "wal":
        # The slot first: a message emitted before a slot exists is decoded by none.
        conn.autocommit = True
        if wal_slot.create(conn, name, name):
            click.echo(f"created replication slot and publication {name!r}")
    changed = schema_manager.set_source(conn, schema_name, source, warn=click.echo, slot_name=name, wait=wait)
    state = "now" if changed else "already"
    click.echo(f"outbox schema {schema_name!r} is {state} in {source} mode")
    if source == "table":
        name = schema_manager.read_source(conn, schema_name).wal_slot or name  # the one the drain reads
    if source == "table" and wal_slot.read_state(conn, name) is not None:
        click.echo(
            f"the replication slot {name!r} stays until a relay (`outbox-relay run`) has streamed every message "
            "enqueued before the switch; that relay then drops it"
        )


@schema.command("sql")
@SCHEMA_OPTION
@click.option("--relay-role", help="Also print GRANTs for the relay's least-privilege role.")
@click.option("--producer-role", help="Also print GRANTs for an application role that only enqueues.")
@click.option(
    "--outcomes-role",
    help="Also print GRANTs for the application role that takes outcomes (outbox.take_outcomes).",
)
@click.option(
    "--console-role",
    help="Also print GRANTs for the operator console's role (reads; no payloads unless --console-payloads).",
)
@click.option("--console-actions", is_flag=True, help="With --console-role: also requeue and purge dead letters.")
@click.option(
    "--console-payloads", is_flag=True, help="With --console-role: also read payloads (console.show_payloads)."
)
@click.option("--grants-only", is_flag=True, help="Print only the GRANTs.")
@one_line_errors
def schema_sql(
    schema_name: str,
    relay_role: str | None,
    producer_role: str | None,
    outcomes_role: str | None,
    console_role: str | None,
    console_actions: bool,
    console_payloads: bool,
    grants_only: bool,
) -> None:
    """Print the DDL, for teams that apply DDL with their own migration tool."""
    if (console_actions or console_payloads) and not console_role:
        flag = "--console-actions" if console_actions else "--console-payloads"
        raise click.UsageError(f"{flag} adds to the console role's grants: give --console-role ROLE too")
    parts: list[str] = []
    if not grants_only:
        parts.append(sqlfiles.ddl(schema_name).as_string())
        parts.append(sqlfiles.record_version(schema_name).as_string() + ";\n")
    console_kinds = ["console", *(["console_actions"] if console_actions else [])]
    console_kinds += ["console_payloads"] if console_payloads else []
    for kinds, role in (
        (["relay"], relay_role),
        (["producer"], producer_role),
        (["outcomes"], outcomes_role),
        (console_kinds, console_role),
    ):
        if role:
            parts.extend(sqlfiles.grants(kind, schema_name, role).as_string() for kind in kinds)
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
