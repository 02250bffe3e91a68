"""`outbox-relay status`: pending, in flight, dead letters, lag, replays and backfills."""

from __future__ import annotations

import sys
from uuid import UUID

import click

from outbox_relay.cli.common import Target, database_options, require_schema
from outbox_relay.cli.output import JSON_OPTION, NOT_FOUND, one_line_errors, print_json
from outbox_relay.operations import message_lookup, status


@click.command("status")
@database_options()
@JSON_OPTION
@click.option(
    "--message-id",
    type=click.UUID,
    default=None,
    help="One message instead: its state, attempts and, once dispatched, where it landed (exit 1 if not found).",
)
@one_line_errors
def status_command(target: Target, as_json: bool, message_id: UUID | None) -> None:
    """Pending, in flight, dead-lettered and oldest pending age, per topic; keys with
    messages behind a dead letter; live relays; the last replays and backfills."""
    cfg = target.config
    with target.connect() as conn:
        require_schema(conn, target.schema)
        if message_id is not None:
            rows = message_lookup.lookup(conn, target.schema, message_id)
        else:
            current = status.read(
                conn,
                target.schema,
                wal_slot=cfg.wal_slot if cfg else None,
                dead_letter_policy=cfg.relay.dead_letter_policy if cfg else None,
            )
    if message_id is not None:
        if not rows:
            click.echo(
                f"error: no message {message_id} in schema {target.schema!r}"
                " (never enqueued here, or deleted by retention or a purge)",
                err=True,
            )
            sys.exit(NOT_FOUND)
        click.echo(message_lookup.as_json(message_id, rows) if as_json else message_lookup.render(message_id, rows))
        return
    if as_json:
        print_json(current.as_dict())
    else:
        click.echo(status.render(current))
