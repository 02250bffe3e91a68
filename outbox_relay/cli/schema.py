"""`outbox-relay schema ...`: install, upgrade or print the outbox schema; NOTIFY on or
off; the source (table or wal) enqueue writes to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import psycopg

from outbox_relay import sqlfiles
from outbox_relay.cli.common import Target, database_options, positive_duration, require_schema
from outbox_relay.cli.output import JSON_OPTION, notes, one_line_errors, print_json
from outbox_relay.errors import CommandLineError
from outbox_relay.operations import schema_manager
from outbox_relay.sources.wal import slot as wal_slot


@click.group()
def schema() -> None:
    """Install the outbox schema, or print its SQL."""


SLOT_OPTION = click.option(
    "--slot",
    help="The WAL source's replication slot and publication (default: the config's relay.wal.slot, "
    "else outbox_relay_<schema>).",
)


@schema.command("install")
@database_options()
@click.option(
    "--source",
    type=click.Choice(schema_manager.SOURCES),
    help="Where enqueue writes: table (a new outbox's default) or wal; default: leave an installed outbox's as is.",
)
@SLOT_OPTION
@JSON_OPTION
@one_line_errors
def schema_install(target: Target, source: str | None, slot: str | None, as_json: bool) -> None:
    """Create or upgrade the outbox schema (idempotent, safe to run concurrently)."""
    say = notes(as_json)
    schema_name = sqlfiles.validate_schema_name(target.schema)
    with target.connect() as conn:
        result = schema_manager.install(conn, schema_name)
        if result.previous_version is None:
            say(f"installed outbox schema {schema_name!r} at version {result.version}")
        elif result.changed:
            say(f"upgraded outbox schema {schema_name!r} from version {result.previous_version} to {result.version}")
        else:
            say(f"outbox schema {schema_name!r} is already at version {result.version}")
        switched = _switch_source(conn, target, source, slot, say=say) if source is not None else None
    if as_json:
        print_json(
            {
                "schema": schema_name,
                "version": result.version,
                "previous_version": result.previous_version,
                "changed": result.changed,
                **({"source": switched} if switched else {}),
            }
        )


@schema.command("source")
@click.argument("source", type=click.Choice(schema_manager.SOURCES))
@database_options()
@SLOT_OPTION
@click.option(
    "--wait",
    default="10s",
    show_default=True,
    callback=positive_duration,
    help="How long the switch waits for transactions that enqueued to end (enqueues wait for the switch meanwhile).",
)
@JSON_OPTION
@one_line_errors
def schema_source(target: Target, source: str, slot: str | None, wait: float, as_json: bool) -> None:
    """Switch where enqueue writes: wal (creates the slot and publication first) or table
    (the slot stays until a relay has streamed what it holds, then that relay drops it).
    The switch waits for transactions that enqueued to end, so none of them goes on
    writing to the old source after it."""
    sqlfiles.validate_schema_name(target.schema)
    with target.connect() as conn:
        require_schema(conn, target.schema)
        switched = _switch_source(conn, target, source, slot, wait, say=notes(as_json))
    if as_json:
        print_json({"schema": target.schema, **switched})


def _switch_source(
    conn: psycopg.Connection[Any],
    target: Target,
    source: str,
    slot: str | None,
    wait: float = schema_manager.SWITCH_WAIT_S,
    *,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Switch, saying what it did; what it did as --json shows it."""
    schema_name = target.schema
    given = slot or (target.config.relay.wal.slot if target.config else None)
    name = wal_slot.validate_name(given) if given else wal_slot.name_for(schema_name)
    created = False
    if source == "wal":
        # The slot first: a message emitted before a slot exists is decoded by none.
        conn.autocommit = True
        created = wal_slot.create(conn, name, name)
        if created:
            say(f"created replication slot and publication {name!r}")
    try:
        changed = schema_manager.set_source(conn, schema_name, source, warn=say, slot_name=name, wait=wait)
    except BaseException:
        if created:  # the refusal's "nothing changed" is about the source: say what this run made
            say(
                f"the replication slot and publication {name!r} created above remain: the slot keeps WAL until"
                f" a switch to wal uses it, or pg_drop_replication_slot({name!r}) and DROP PUBLICATION drop them"
            )
        raise
    state = "now" if changed else "already"
    say(f"outbox schema {schema_name!r} is {state} in {source} mode")
    if source == "table":
        name = schema_manager.read_source(conn, schema_name).wal_slot or name  # the one the drain reads
    kept = source == "table" and wal_slot.read_state(conn, name) is not None
    if kept:
        say(
            f"the replication slot {name!r} stays until a relay (`outbox-relay run`) has streamed every message "
            "enqueued before the switch; that relay then drops it"
        )
    return {"source": source, "changed": changed, "slot": name, "slot_created": created, "slot_kept": kept}


@schema.command("sql")
@click.option(
    "--schema", "schema_name", default=sqlfiles.DEFAULT_SCHEMA, show_default=True, help="Schema the DDL creates."
)
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
        raise CommandLineError(f"{flag} adds to the console role's grants: give --console-role ROLE too")
    if grants_only and not (relay_role or producer_role or outcomes_role or console_role):
        raise CommandLineError(
            "--grants-only needs a role: --relay-role, --producer-role, --outcomes-role or --console-role ROLE"
        )
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
@database_options()
@JSON_OPTION
@one_line_errors
def schema_notify(state: str, target: Target, as_json: bool) -> None:
    """Turn the NOTIFY trigger on or off (off: the relay's poll finds new rows alone)."""
    with target.connect() as conn:
        schema_manager.set_notify(conn, target.schema, state == "on")
    if as_json:
        print_json({"schema": target.schema, "notify": state})
    else:
        click.echo(f"NOTIFY trigger {state} for schema {target.schema!r}")
